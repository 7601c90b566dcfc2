"""Wires the real components for the driver: Ray, the reward server, rollout, learners, controller.

`System` starts (or connects to) everything a run needs and hands the driver a `Components`
bundle of thin adapters over the Ray actors. Local Ray on 127.0.0.1 by default; inside
`ray job submit` (RAY_ADDRESS set) it joins the cluster instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from controller.client import ControllerClient, RayControllerClient
from services.backends.network import free_port
from services.config import AEPOConfig, TrainConfig, learner_config
from services.contracts import Components, Sample

if TYPE_CHECKING:
    from reward_server.schemas import VerifyItem, VerifyResult
    from services.learner.batch import TrainBatch

log = logging.getLogger("aepo")


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join RAY_ADDRESS's cluster when set (ray job submit), else start a local one on loopback.

    A local cluster keeps every socket on 127.0.0.1 and sends nothing off the machine
    (services/backends/network.py says what Ray would do otherwise); a user's cluster is left as it is.
    """
    import ray

    from services.backends.network import LOOPBACK, local_ray_environment

    if quiet:  # Serve's INFO lines ("Started Serve ...") would break the progress bar
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a real cluster with auth sets its own
        # the address itself, not "auto": auto may pick another cluster on the same machine
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=not quiet)
        return
    with local_ray_environment():
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 2,
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            log_to_driver=not quiet,
            configure_logging=False,
        )


# ----------------------------------------------------------------------------- adapters


class RewardAdapter:
    """The reward server over HTTP, however it was started."""

    def __init__(self, base_url: str, timeout_s: float, token: str | None = None):
        from reward_server.client import RewardClient

        self.base_url = base_url
        self.client = RewardClient(base_url, token=token, item_timeout_s=timeout_s)

    def verify(self, items: list[VerifyItem]) -> list[VerifyResult]:
        return self.client.verify_sync(items)


class RolloutAdapter:
    """RolloutPool (or one RolloutService) behind the driver's protocol; asks the controller for
    the regularizer plan. Each request carries the driver's PromptItem with its ids, so the
    samples come back holding it (`Sample.prompt`)."""

    def __init__(self, pool, controller: ControllerClient | None):
        self.pool, self.controller = pool, controller

    def generate(self, prompts, n: int, temperature: float, seed: int) -> list[Sample]:
        from services.rollout.service import SamplingRequest

        return self.pool.generate_many([SamplingRequest(list(prompts), n, temperature)], seed=seed).samples[0]

    def generate_step(self, step: int, prompts, reg_prompts, n: int, seed: int):
        from services.rollout.service import SamplingRequest

        reqs = [SamplingRequest(list(prompts), n, 1.0)]
        plan: dict = {}
        if reg_prompts:
            if self.controller is None:
                raise RuntimeError("a regularizer batch needs the entropy controller")
            plan = self.controller.plan(step)
            reqs.append(SamplingRequest(list(reg_prompts), n, plan["temperature"]))
        result = self.pool.generate_many(reqs, seed=seed)
        return result.samples[0], (result.samples[1] if reg_prompts else []), plan

    def load_weights(self, version: int, weights: Any) -> float:
        return float(self.pool.load_weights(version, weights)["sync_s"])


class LearnerAdapter:
    """The learner group behind the driver's protocol; rank 0 publishes entropy to `controller`."""

    def __init__(self, group, controller: ControllerClient):
        self.group, self.controller = group, controller
        self.compute = group.compute  # device and precision, for the run summary

    def update(self, batch: TrainBatch, step: int) -> dict:
        return self.group.update(batch, step=step, controller=self.controller)

    def full_weights(self):
        return self.group.state_dict_ref()  # an ObjectRef: gathered once, shipped by the object store

    def state_dict(self) -> dict:
        return self.group.get_full_state_dict()

    def save(self, path: str) -> None:
        self.group.save_checkpoint(path)

    def load(self, path: str) -> None:
        self.group.load_checkpoint(path)


class TokenizerAdapter:
    """Prompt text to ids (with the chat template when asked) and response ids to text."""

    def __init__(self, tokenizer, chat_template: bool, system_prompt: str | None = None):
        self.tok, self.chat_template, self.system_prompt = tokenizer, chat_template, system_prompt
        self.pad_id = int(tokenizer.pad_token_id)

    def encode(self, text: str) -> list[int]:
        from services.model.tiny import encode_prompt

        return encode_prompt(self.tok, text, self.chat_template, self.system_prompt)

    def decode(self, ids: list[int]) -> str:
        from services.model.tiny import decode_response

        return decode_response(self.tok, ids)


# ----------------------------------------------------------------------------- the system


class RewardProcess:
    """`aepo serve-reward` as a child process on a free loopback port (reward.mode: standalone)."""

    def __init__(self, workers: int = 2, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve-reward", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reward server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"reward server did not become ready on {self.url} within {timeout_s}s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_reward(cfg: TrainConfig) -> tuple[str, Any]:
    """The reward server's base URL, and what to close at the end (or None)."""
    rc = cfg.reward
    if rc.mode == "external":
        return rc.url, None
    if rc.mode == "standalone":
        proc = RewardProcess()
        return proc.url, proc
    from reward_server.serve_deploy import deploy

    return deploy(replicas=rc.replicas), None


class PolicySystem:
    """What every backend shares: the driver's component bundle, a policy-side restart, `with`.

    Subclasses start `controller`, `reward`, `tokenizer` and whatever `_rollout()` and
    `_learner()` return in `_start_policy_side`, and stop them in `_stop_policy_side`."""

    cfg: TrainConfig

    def _rollout(self) -> Any: ...

    def _learner(self) -> Any: ...

    def _start_policy_side(self) -> None: ...

    def _stop_policy_side(self) -> None: ...

    def close(self) -> None:
        self._stop_policy_side()

    def components(self, metrics=None) -> Components:
        aepo = isinstance(self.cfg.algorithm, AEPOConfig)
        return Components(
            rollout=RolloutAdapter(self._rollout(), self.controller if aepo else None),
            reward=self.reward,
            learner=self._learner(),
            controller=self.controller,
            tokenizer=self.tokenizer,
            metrics=metrics,
            model_path=self.model_path,
        )

    def restart_policy_side(self, cfg: TrainConfig) -> None:
        """New learners, rollout engines and controller (for a second run on the same system)."""
        self._stop_policy_side()
        self.cfg = cfg
        self._start_policy_side()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class System(PolicySystem):
    """Everything one run needs, started in order and closed in reverse."""

    def __init__(self, cfg: TrainConfig, model_path: str, quiet: bool = True):
        self.cfg, self.model_path = cfg, model_path
        self._closers: list = []
        init_ray(quiet=quiet)
        self.reward_url, closer = start_reward(cfg)
        if closer is not None:
            self._closers.append(closer.close)
        self.reward = RewardAdapter(self.reward_url, cfg.reward.timeout_s, os.environ.get("AEPO_REWARD_TOKEN"))
        self._start_policy_side()

    def _start_policy_side(self) -> None:
        from controller.actor import start_controller
        from services.learner.group import LearnerGroup
        from services.model.tiny import load_tokenizer
        from services.rollout.pool import RolloutPool

        cfg = self.cfg
        self.controller_handle = start_controller(cfg.algorithm, cfg.controller, cfg.run_name)
        self.controller = RayControllerClient(self.controller_handle)
        self.learners = LearnerGroup(self.model_path, learner_config(cfg), cfg.algorithm, seed=cfg.trainer.seed)
        self.pool = RolloutPool(self.model_path, cfg.rollout, seed=cfg.trainer.seed)
        self.tokenizer = TokenizerAdapter(load_tokenizer(self.model_path), cfg.model.chat_template, cfg.model.system_prompt)

    def sibling(self, cfg: TrainConfig) -> "System":
        """A second run's policy side (learners, rollout, controller) in this cluster, sharing this
        system's reward server; close it before this one. Its controller must have its own name."""
        if cfg.controller.name == self.cfg.controller.name:
            raise ValueError(f"a sibling run needs its own controller.name, not {cfg.controller.name!r}")
        other = System.__new__(System)
        other.cfg, other.model_path, other._closers = cfg, self.model_path, []
        other.reward_url = self.reward_url
        other.reward = RewardAdapter(self.reward_url, cfg.reward.timeout_s, os.environ.get("AEPO_REWARD_TOKEN"))
        other._start_policy_side()
        return other

    def _rollout(self):
        return self.pool

    def _learner(self):
        return LearnerAdapter(self.learners, self.controller)

    def _stop_policy_side(self) -> None:
        import ray

        for stop in (lambda: self.learners.shutdown(), lambda: self.pool.shutdown(),
                     lambda: ray.kill(self.controller_handle, no_restart=True)):
            try:
                stop()
            except Exception as exc:  # best effort at teardown: report, keep closing the rest
                log.warning("shutdown: %s", exc)

    def close(self) -> None:
        self._stop_policy_side()
        for close in reversed(self._closers):
            close()
