"""bf16 matmuls on AMX CPUs: the CPU check, the per-layer autocast, and the learner and warm start
that use it (services/model/precision.py)."""

from __future__ import annotations

import pytest
import torch
from reference_decoding import hf_model_with
from services.backends.network import free_port

from services import algorithm as alg
from services.config import AEPOConfig, LearnerConfig, WarmStartSettings
from services.learner.batch import TrainBatch
from services.learner.worker import LearnerWorker
from services.model.precision import autocast_layers, cpu_has_amx_bf16, decoder_layers, resolve_cpu_compute
from services.model.warmstart import warmstart_hash

AMX_LINE = "flags\t\t: fpu vme avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
NO_AMX_LINE = "flags\t\t: fpu vme avx512f avx512_bf16 avx512_vnni\n"


def test_the_cpu_check_reads_the_amx_bf16_flag(tmp_path):
    (tmp_path / "amx").write_text("processor\t: 0\n" + AMX_LINE)
    (tmp_path / "noamx").write_text("processor\t: 0\n" + NO_AMX_LINE)
    (tmp_path / "prefix").write_text("flags\t\t: amx_bf16x amx_tile\n")  # a longer flag is not the flag
    assert cpu_has_amx_bf16(tmp_path / "amx")
    assert not cpu_has_amx_bf16(tmp_path / "noamx")
    assert not cpu_has_amx_bf16(tmp_path / "prefix")
    assert not cpu_has_amx_bf16(tmp_path / "missing")
    assert resolve_cpu_compute("auto", tmp_path / "amx") == "bfloat16"
    assert resolve_cpu_compute("auto", tmp_path / "noamx") == "float32"
    assert resolve_cpu_compute("float32", tmp_path / "amx") == "float32"
    assert resolve_cpu_compute("bfloat16", tmp_path / "noamx") == "bfloat16"  # asked for explicitly
    with pytest.raises(ValueError, match="cpu_compute must be one of"):
        resolve_cpu_compute("fp16")


def _dtypes_seen(model) -> dict[str, torch.dtype]:
    """Output dtypes of the first layer's down_proj and of the head on the next forward."""
    seen: dict[str, torch.dtype] = {}
    layer = decoder_layers(model)[0]

    def record(name):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, output.dtype)
        return hook

    layer.mlp.down_proj.register_forward_hook(record("layer_linear"))
    model.lm_head.register_forward_hook(record("head"))
    return seen


def test_the_layers_run_in_bf16_and_the_rest_stays_float32(tiny_model_path):
    ref = hf_model_with(tiny_model_path, None)
    model = hf_model_with(tiny_model_path, None)
    autocast_layers(decoder_layers(model))
    autocast_layers(decoder_layers(model))  # a second wrap is a no-op, not a nested one
    seen = _dtypes_seen(model)
    ids = torch.randint(4, 20, (3, 9), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    want = ref(input_ids=ids).logits
    assert seen == {"layer_linear": torch.bfloat16, "head": torch.float32}
    assert logits.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the logits agree to a few hundredths, not to float32's 1e-6
    diff = float((logits - want).detach().abs().max())
    assert 1e-7 < diff < 0.05
    # the gradient: float32 parameters and grads, pointing where float32's does
    for m in (model, ref):
        lp = alg.token_logprobs(m(input_ids=ids).logits[:, :-1], ids[:, 1:])
        lp.sum().backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert float(torch.nn.functional.cosine_similarity(g, g_ref, dim=0)) > 0.999


def _batch(rows: int = 8, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(4, 20, (5,), generator=g).tolist() for _ in range(rows)]
    responses = [torch.randint(4, 20, (int(torch.randint(2, 9, (), generator=g)),), generator=g).tolist() + [2] for _ in range(rows)]
    adv = torch.randn(rows, generator=g)
    adv[:2] = 1.0
    return TrainBatch.from_sequences(prompts, responses, adv, [i < 2 for i in range(rows)], pad_id=0)


def _update(path: str, cpu_compute: str, batch: TrainBatch):
    cfg = LearnerConfig(num_workers=1, cpus_per_worker=1, micro_batch_size=4, cpu_compute=cpu_compute)
    worker = LearnerWorker(0, 1, path, cfg, AEPOConfig(mode="replace"), seed=0)
    worker.setup("127.0.0.1", free_port())
    try:
        seen = _dtypes_seen(worker.model)
        stats = worker.update(batch)
        weights = {k: v.clone() for k, v in worker.full_state_dict().items()}
        attn = worker.model.config._attn_implementation
    finally:
        worker.shutdown()
    return stats, weights, seen, attn


def test_the_fsdp_learner_computes_its_layers_in_bf16_when_asked(tiny_model_path):
    """The FSDP2-sharded learner: bf16 inside the layers (eager attention), float32 head and
    statistics, the same entropy as float32 to bf16's precision, float32 weights after the step."""
    batch = _batch()
    s16, w16, seen16, attn16 = _update(tiny_model_path, "bfloat16", batch)
    s32, w32, seen32, attn32 = _update(tiny_model_path, "float32", batch)
    assert seen16 == {"layer_linear": torch.bfloat16, "head": torch.float32} and attn16 == "eager"
    assert seen32 == {"layer_linear": torch.float32, "head": torch.float32} and attn32 == "sdpa"
    assert s16["optimizer_steps"] == 1 and all(w.dtype == torch.float32 for w in w16.values())
    for key in ("entropy", "entropy_regularizer", "entropy_sampled"):
        assert s16[key] == pytest.approx(s32[key], abs=5e-3), key
        assert s16[key] != s32[key], key  # it did compute in bf16
    assert s16["grad_norm"] == pytest.approx(s32["grad_norm"], rel=2e-2)


def test_the_warm_start_hash_leaves_float32_out_and_refuses_auto():
    base, data = "tiny-x", {"num_train": 10, "num_eval": 2, "space_prob": 0.2, "seed": 0}
    f32 = warmstart_hash(base, data, WarmStartSettings(cpu_compute="float32"))
    # float32 names the model exactly as before the setting existed (cached models are found again)
    import hashlib
    import json

    old = {k: v for k, v in WarmStartSettings().model_dump(mode="json").items() if k != "cpu_compute"}
    payload = {"base": base, "data": data, "cfg": old, "format": 1}
    assert f32 == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert warmstart_hash(base, data, WarmStartSettings(cpu_compute="bfloat16")) != f32
    with pytest.raises(ValueError, match="resolve cpu_compute"):
        warmstart_hash(base, data, WarmStartSettings(cpu_compute="auto"))


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "auto"])
def test_a_learner_reports_what_it_computes_in(tiny_model_path, setting):
    """compute_info (the run summary's `learner_compute`): cpu_compute as resolved on the learner's node."""
    worker = LearnerWorker(0, 1, tiny_model_path, LearnerConfig(num_workers=1, cpu_compute=setting), AEPOConfig(), seed=0)
    info = worker.compute_info()
    assert info == {"device": "cpu", "layers": resolve_cpu_compute(setting), "params": "float32"}
    assert info["layers"] == {"float32": "float32", "bfloat16": "bfloat16"}.get(setting, info["layers"])
