"""The in-process backend: the same driver, learner, engine, verifiers and controller, no Ray.

`aepo train --backend local` and the experiment runner use it. Every number it produces comes
from the same code paths as the Ray system: `Trainer` (services.loop.trainer) runs steps 1-9, the
policy update is `LearnerWorker.update` (a one-rank FSDP2 process group over gloo), generation
is `RolloutService` with the configured engine, the decision is `ControllerCore.plan`, and
rewards come from the reward server's verifier registry. What it leaves out is the transport:
no actors, no object store, no HTTP, one learner rank. That is what lets a grid of short runs
share a 2-core machine (two runs side by side, one thread each) instead of paying for a Ray
cluster per run. Only verifiers registered `inline` (countdown, numeric, exact) run here:
math verification needs the reward server's killable worker pool, so `math` tasks are refused.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from services.backends.network import free_port
from services.config import TrainConfig, learner_config
from controller.client import LocalControllerClient
from services.backends.ray_cluster import PolicySystem, TokenizerAdapter, new_run_id

if TYPE_CHECKING:
    from reward_server.schemas import VerifyItem, VerifyResult
    from services.learner.batch import TrainBatch

log = logging.getLogger("aepo")


class InlineReward:
    """The reward server's verdicts, computed in this process (inline verifiers only)."""

    def __init__(self) -> None:
        from reward_server.verifiers import get_verifier

        self._get = get_verifier

    def verify(self, items: list[VerifyItem]) -> list[VerifyResult]:
        from reward_server.schemas import VerifyResult
        from reward_server.verifiers import run_verifier
        from reward_server.verifiers.base import reward_of

        out = []
        t0 = time.monotonic()
        for it in items:
            verifier = self._get(it.task)
            if not verifier.inline:
                raise ValueError(
                    f"task {it.task!r} needs the reward server's worker pool (it is not an inline verifier); "
                    "run it with the ray backend"
                )
            verdict = run_verifier(verifier.verify, it.response, it.reference)
            out.append(VerifyResult(id=it.id, reward=reward_of(verdict.outcome), outcome=verdict.outcome,
                                    detail=verdict.detail, elapsed_s=time.monotonic() - t0))
        return out


class LocalLearner:
    """One `LearnerWorker` rank in this process; publishes the step's entropy to the controller
    core exactly as the Ray learners publish to the controller actor."""

    def __init__(self, worker, controller: LocalControllerClient) -> None:
        self.worker, self.controller = worker, controller
        self.compute = worker.compute_info()  # device and precision, for the run summary

    def update(self, batch: TrainBatch, step: int, levers: dict | None = None) -> dict:
        from services.learner.batch import shard_for_ranks

        (shard,) = shard_for_ranks(batch, 1, self.worker.cfg)
        return self.worker.update(shard, step=step, controller=self.controller, levers=levers)

    def full_weights(self):
        from services.learner.sync import local_buckets

        return local_buckets(self.worker.export_weights())  # the same buckets, in the sync dtype, in memory

    def state_dict(self) -> dict:
        return self.worker.full_state_dict()

    def save(self, path: str) -> dict[str, int]:
        return self.worker.save_checkpoint(os.path.abspath(path))

    def load(self, path: str) -> None:
        self.worker.load_checkpoint(os.path.abspath(path))


class LocalSystem(PolicySystem):
    """`System`'s interface (components, restart_policy_side, close) with everything in-process."""

    def __init__(self, cfg: TrainConfig, model_path: str, threads: int | None = None, run_id: str | None = None) -> None:
        self.cfg, self.model_path = cfg, model_path
        self.run_id = run_id or new_run_id(cfg.run_name)
        self.threads = threads or cfg.rollout.torch_threads or 1
        self.reward = InlineReward()
        self.worker = None
        self._start_policy_side()

    def _start_policy_side(self) -> None:
        import torch

        from controller.actor import ControllerCore, MemoryStore, RedisStore
        from services.learner.worker import LearnerWorker
        from services.model.tiny import load_tokenizer
        from services.rollout.service import RolloutService

        cfg = self.cfg
        store = RedisStore(cfg.controller.redis_url, self.run_id) if cfg.controller.redis_url else MemoryStore()
        self.controller = LocalControllerClient(ControllerCore(cfg.algorithm, cfg.controller, self.run_id, store=store))
        lcfg = learner_config(cfg).model_copy(update={"num_workers": 1, "device": "cpu"})
        self.worker = LearnerWorker(0, 1, self.model_path, lcfg, cfg.algorithm, seed=cfg.trainer.seed, device="cpu")
        self.worker.setup("127.0.0.1", free_port())
        self.rollout = RolloutService(self.model_path, cfg.rollout, seed=cfg.trainer.seed)
        torch.set_num_threads(self.threads)  # after both: each sets its own thread count
        tok = load_tokenizer(self.model_path)
        self.tokenizer = TokenizerAdapter(tok, cfg.model.chat_template, cfg.model.system_prompt)
        self.learner = LocalLearner(self.worker, self.controller)

    def _rollout(self):
        return self.rollout

    def _learner(self):
        return self.learner

    def _stop_policy_side(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
        self.rollout.close()
