"""Wires the real components for the driver: Ray, the reward server, rollout, learners, controller.

`System` starts (or connects to) everything a run needs and hands the driver a `Components`
bundle of thin adapters over the Ray actors. Local Ray on 127.0.0.1 by default; with RAY_ADDRESS
set (`ray job submit`, compose's `ray-head` container) it joins that cluster instead.
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


def cluster_address() -> str | None:
    """The running cluster the driver joins: RAY_ADDRESS (`ray job submit` sets it, so does
    docker-compose.yml in the `ray-head` container), or None: the driver starts a local one."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return address if address and address != "local" else None


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join RAY_ADDRESS's cluster when set, else start a local one on loopback.

    Joining passes no resources: the cluster has its own, and Ray refuses `num_cpus` when it
    connects to a running cluster, so `num_cpus` only sizes a local one. A local one is asked for
    explicitly (address "local"): without it Ray would connect to the last cluster `ray start`
    left on this machine (/tmp/ray/ray_current_cluster) and refuse the CPUs. A local cluster keeps
    every socket on 127.0.0.1 and sends nothing off the machine (services/backends/network.py says
    what Ray would do otherwise); a user's cluster is left as it is.
    """
    import ray

    from services.backends.network import LOOPBACK, local_ray_environment

    if quiet:  # Serve's INFO lines ("Started Serve ...") would break the progress bar
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    address = cluster_address()
    if address is not None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a real cluster with auth sets its own
        # prefer the address itself to "auto": auto may pick another cluster on the same machine
        ray.init(address=address, log_to_driver=not quiet)
        log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
        return
    with local_ray_environment():
        ray.init(
            address="local",
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
    """The system's RolloutPool (or one RolloutService) behind the driver's protocol; asks the
    system's controller for the regularizer plan (None: no regularizer). Each request carries the
    driver's PromptItem with its ids, so the samples come back holding it (`Sample.prompt`)."""

    def __init__(self, system: "PolicySystem", with_controller: bool):
        self.system, self.with_controller = system, with_controller

    @property
    def pool(self):
        return self.system._rollout()

    @property
    def controller(self) -> ControllerClient | None:
        return self.system.controller if self.with_controller else None

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
    """The system's learner group behind the driver's protocol (whichever group the system holds
    now: a recovery replaces it); rank 0 publishes entropy to the system's controller."""

    def __init__(self, system: "System"):
        self.system = system
        self.compute = system.learners.compute  # device and precision, for the run summary

    @property
    def group(self):
        return self.system.learners

    @property
    def controller(self) -> ControllerClient:
        return self.system.controller

    def update(self, batch: TrainBatch, step: int, levers: dict | None = None) -> dict:
        return self.group.update(batch, step=step, controller=self.controller, levers=levers)

    def full_weights(self):
        return self.group.weight_buckets()  # bucket refs: written to the object store by rank 0, never fetched here

    def state_dict(self) -> dict:
        return self.group.get_full_state_dict()

    def save(self, path: str) -> dict[str, int]:
        return self.group.save_checkpoint(path)

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

    return deploy(replicas=rc.replicas, resources=rc.resources), None


def check_output_dir(cfg: TrainConfig) -> None:
    """Before anything starts: an absolute directory on a cluster, and one every node sees
    (services/backends/storage.py)."""
    from services.backends.storage import check_shared, require_absolute

    require_absolute(cfg.trainer.output_dir, on_cluster=cluster_address() is not None)
    os.makedirs(cfg.trainer.output_dir, exist_ok=True)
    check_shared(cfg.trainer.output_dir, cfg.recovery.start_timeout_s)


def new_run_id(run_name: str) -> str:
    """A fresh run's id: its controller state (in Redis, in checkpoints) is keyed by it, so a rerun
    under the same run_name never inherits an old run's state."""
    import uuid

    return f"{run_name}-{uuid.uuid4().hex[:8]}"


class ControllerProxy:
    """The system's current controller client (a recovery replaces it), for the driver."""

    def __init__(self, system: "PolicySystem"):
        self.system = system

    def __getattr__(self, name: str):
        return getattr(self.system.controller, name)


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
            rollout=RolloutAdapter(self, aepo),
            reward=self.reward,
            learner=self._learner(),
            controller=ControllerProxy(self),
            tokenizer=self.tokenizer,
            metrics=metrics,
            model_path=self.model_path,
            recover=self.recover,
        )

    def recover(self, role: str) -> None:
        """Replace `role`'s actors (the driver then rolls the run back to its latest checkpoint)."""
        raise RuntimeError(f"this backend cannot rebuild the {role}")

    def restart_policy_side(self, cfg: TrainConfig, run_id: str | None = None) -> None:
        """New learners, rollout engines and controller (for a second run on the same system)."""
        self._stop_policy_side()
        self.cfg, self.run_id = cfg, run_id or new_run_id(cfg.run_name)
        self._start_policy_side()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class System(PolicySystem):
    """Everything one run needs, started in order and closed in reverse."""

    def __init__(self, cfg: TrainConfig, model_path: str, quiet: bool = True, run_id: str | None = None):
        self.cfg, self.model_path = cfg, model_path
        self.run_id = run_id or new_run_id(cfg.run_name)
        self._closers: list = []
        self.bundles = None  # colocated placement: the run's shared bundles (services/backends/placement.py)
        init_ray(quiet=quiet)
        check_output_dir(cfg)
        self.reward_url, closer = start_reward(cfg)
        if closer is not None:
            self._closers.append(closer.close)
        self.reward = RewardAdapter(self.reward_url, cfg.reward.timeout_s, os.environ.get("AEPO_REWARD_TOKEN"))
        self._start_policy_side()

    def _start_policy_side(self) -> None:
        from services.model.tiny import load_tokenizer

        cfg = self.cfg
        self._start_controller()
        self._start_learners()
        self._start_rollout()
        self.tokenizer = TokenizerAdapter(load_tokenizer(self.model_path), cfg.model.chat_template, cfg.model.system_prompt)

    def _start_controller(self) -> None:
        from controller.actor import start_controller

        rc = self.cfg.recovery
        self.controller_handle = start_controller(self.cfg.algorithm, self.cfg.controller, self.run_id,
                                                  max_restarts=max(1, rc.max_recoveries))
        self.controller = RayControllerClient(self.controller_handle, rc.controller_timeout_s)

    def _start_learners(self) -> None:
        from services.backends.placement import colocated_bundles
        from services.learner.group import LearnerGroup, _resolve_device

        cfg = self.cfg
        if cfg.rollout.placement == "colocated" and self.bundles is None:
            gpu = _resolve_device(cfg.learner) == "cuda"
            self.bundles = colocated_bundles(cfg.learner, cfg.rollout, gpu, cfg.recovery.start_timeout_s)
        self.learners = LearnerGroup(self.model_path, learner_config(cfg), cfg.algorithm, seed=cfg.trainer.seed,
                                     recovery=cfg.recovery, bundles=self.bundles)

    def _start_rollout(self) -> None:
        from services.rollout.pool import RolloutPool

        self.pool = RolloutPool(self.model_path, self.cfg.rollout, seed=self.cfg.trainer.seed, recovery=self.cfg.recovery,
                                bundles=self.bundles)

    def recover(self, role: str) -> None:
        """Replace `role`'s actors with new ones on the initial weights (the driver then rolls the
        run back to its latest checkpoint, which loads the learners and re-syncs the engines)."""
        import ray

        log.warning("recovery: replacing the %s", role)
        if role == "learner":
            self.learners.abort()
            self._start_learners()
        elif role == "rollout":
            self.pool.abort()
            self._start_rollout()
        elif role == "controller":
            ray.kill(self.controller_handle, no_restart=True)
            _wait_name_free(self.cfg.controller.name, self.cfg.recovery.start_timeout_s)
            self._start_controller()
        else:
            raise RuntimeError(f"the {role} cannot be rebuilt by the driver; the run stops (resume it with --resume)")

    def sibling(self, cfg: TrainConfig, run_id: str | None = None) -> "System":
        """A second run's policy side (learners, rollout, controller) in this cluster, sharing this
        system's reward server; close it before this one. Its controller must have its own name."""
        if cfg.controller.name == self.cfg.controller.name:
            raise ValueError(f"a sibling run needs its own controller.name, not {cfg.controller.name!r}")
        other = System.__new__(System)
        other.cfg, other.model_path, other._closers, other.bundles = cfg, self.model_path, [], None
        other.run_id = run_id or new_run_id(cfg.run_name)
        other.reward_url = self.reward_url
        other.reward = RewardAdapter(self.reward_url, cfg.reward.timeout_s, os.environ.get("AEPO_REWARD_TOKEN"))
        other._start_policy_side()
        return other

    def _rollout(self):
        return self.pool

    def _learner(self):
        return LearnerAdapter(self)

    def _stop_policy_side(self) -> None:
        import ray

        for stop in (lambda: self.learners.shutdown(), lambda: self.pool.shutdown(),
                     lambda: ray.kill(self.controller_handle, no_restart=True), self._free_bundles):
            try:
                stop()
            except Exception as exc:  # best effort at teardown: report, keep closing the rest
                log.warning("shutdown: %s", exc)

    def _free_bundles(self) -> None:
        bundles, self.bundles = self.bundles, None
        if bundles is not None:
            bundles.remove()

    def close(self) -> None:
        self._stop_policy_side()
        for close in reversed(self._closers):
            close()


def _wait_name_free(name: str, timeout_s: float) -> None:
    """Until the killed actor's name is released (a new actor under it must not find the old one)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the actor name {name!r} was not released within {timeout_s:g} s")
