"""A vLLM worker extension: reload the weights bucket by bucket (imported inside vLLM's workers).

`VLLMEngine` passes `worker_extension_cls` naming `BucketReload`, so vLLM mixes these methods into
each of its worker processes, where `LLM.collective_rpc("aepo_...")` reaches them by name with
plain arguments (a path): tensors passed as RPC arguments lose their data in the multiprocess
executor, so each bucket travels as a safetensors file in /dev/shm, one at a time.

The lifecycle is vLLM's own for chunked weight updates (what its NCCL weight-transfer engine runs):
`initialize_layerwise_reload`, then the model's `load_weights` once per chunk (a layer is
processed, e.g. repacked for oneDNN on CPU, as soon as all its weights have arrived), then
`finalize_layerwise_reload`. It needs vLLM's `model_executor.model_loader.reload` module
(vLLM >= 0.11); `supported()` says whether it is there, and the engine otherwise writes every
bucket as a file of one directory and reloads from it once.

`aepo_receive` is the collective transport's way in (`learner.sync_transport: collective`,
services/learner/collective.py): the worker itself joins the weight-sync group and receives each
bucket from learner rank 0 into a buffer on its own device, inside the same layerwise reload; no
file, and nothing passes through the engine's process.
"""

from __future__ import annotations

import importlib.util

QUALNAME = "services.rollout.engines.vllm_reload.BucketReload"


def supported() -> bool:
    """Whether this vLLM has the layerwise reload the bucketed path runs on."""
    try:
        return importlib.util.find_spec("vllm.model_executor.model_loader.reload") is not None
    except ModuleNotFoundError:
        return False


class BucketReload:
    """Mixed into vLLM's worker class: begin a reload, load one bucket file, finish it."""

    def aepo_begin_reload(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def aepo_load_file(self, path: str) -> int:
        """Load one bucket's safetensors file into the model; returns the tensors read."""
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config

        tensors = load_file(path)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(iter(tensors.items()))
        return len(tensors)

    def aepo_receive(self, ticket: dict, tied: bool) -> int:
        """The collective transport: join the weight-sync group the ticket names (this worker's rank
        is the ticket's plus its own rank in vLLM's world), then, inside one layerwise reload, load
        each bucket learner rank 0 broadcasts as it arrives, on this worker's device (NCCL on GPU).
        A tied `lm_head.weight` is loaded from the embedding, as the file path does. Returns the
        tensor bytes received."""
        from dataclasses import replace

        from vllm.config import set_current_vllm_config

        from services.learner.collective import SyncMember, SyncTicket, receive_weights

        t = SyncTicket.from_dict(ticket)
        t = replace(t, rank=t.rank + int(getattr(self, "rank", 0)))
        if getattr(self, "_aepo_sync", None) is None:
            self._aepo_sync = SyncMember()
        device = self.device if t.rendezvous.backend == "nccl" else "cpu"

        def load(buckets) -> None:
            model = self.model_runner.get_model()
            for bucket in buckets:
                tensors = dict(bucket)
                if tied and "model.embed_tokens.weight" in tensors:
                    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
                with set_current_vllm_config(self.vllm_config):
                    model.load_weights(iter(tensors.items()))

        self.aepo_begin_reload()
        try:
            return receive_weights(self._aepo_sync, t, device, load)
        finally:  # also after a failure: the layers go back to device tensors
            self.aepo_finish_reload()

    def aepo_finish_reload(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as vLLM's reload_weights
            getattr(self.model_runner, reset, lambda: None)()
