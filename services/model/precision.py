"""bfloat16 matmuls on CPUs that have them in hardware (Intel AMX), everything else in float32.

On a CPU with AMX-BF16 a bf16 matmul runs several times faster than a float32 one (this project's
reference machine: 458 against 86 GFLOPS at the tiny model's shapes, one core). The tiny model's
training step is half matmuls, so running the decoder layers under `torch.autocast(bfloat16)` cuts
the warm start's and the learner's step by about a third (scripts/bench_components.py).

Only the decoder layers run under autocast. The parameters, the optimizer state, the residual
stream, the embeddings, the final norm, the head and every loss or entropy computed from the
logits stay float32: a linear inside a layer takes bf16 inputs and returns bf16, and adding it to
the float32 residual promotes back to float32. On a CPU without AMX, bf16 matmuls are slower
than float32 ones, so `"auto"` picks float32 there.
"""

from __future__ import annotations

import functools
from pathlib import Path

CPU_COMPUTE = ("float32", "bfloat16", "auto")


def cpu_has_amx_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU lists the `amx_bf16` flag (Linux; False where cpuinfo cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return "amx_bf16" in line.split(":", 1)[-1].split()
    return False


def resolve_cpu_compute(value: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """"float32" or "bfloat16": `value` itself, or for "auto" bfloat16 exactly when the CPU has AMX-BF16."""
    if value not in CPU_COMPUTE:
        raise ValueError(f"cpu_compute must be one of {CPU_COMPUTE}, got {value!r}")
    if value == "auto":
        return "bfloat16" if cpu_has_amx_bf16(cpuinfo) else "float32"
    return value


def autocast_layers(layers, device_type: str = "cpu", dtype=None) -> None:
    """Run each module's forward under `torch.autocast(device_type, dtype)` (bfloat16 by default).

    Wraps the instance's `forward`, so it survives DDP and FSDP2 wrapping (both act through hooks
    or an outer module) and applies again in a gradient-checkpointing recompute.
    """
    import torch

    dtype = dtype or torch.bfloat16
    for layer in layers:
        if getattr(layer.forward, "_aepo_autocast", None) is not None:
            continue  # already wrapped

        def make(forward):
            @functools.wraps(forward)
            def run(*args, **kwargs):
                with torch.autocast(device_type, dtype=dtype):
                    return forward(*args, **kwargs)

            run._aepo_autocast = dtype
            return run

        layer.forward = make(layer.forward)


def decoder_layers(model) -> list:
    """The repeated transformer blocks (model.model.layers for Qwen/Llama-style HF models)."""
    inner = getattr(model, "module", model)  # DDP
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__}: no model.layers (not a Qwen/Llama-style HF causal LM)")
    return list(layers)
