"""The RL loop: the nine steps of docs/design.md, one function each, in the order they run.

    1. prompts      take B prompts from the stream (its position is checkpointed)
    2. plan         the rollout service asks the entropy controller for {T_reg, m}
    3. rollout      B x G samples at T=1, and for AEPO a regularizer batch at T_reg
    4. reward       one batched HTTP call to the reward server for both batches
    5. advantages   group-normalised per batch; regularizer positives selected (take m, A := 1)
    6. update       learners recompute log-probs at T=1 and take the policy-gradient step
    7. entropy      the learners publish the step's entropy to the controller
    8. sync         new weights learner -> rollout, policy version += 1
    9. eval/ckpt    every K steps

The driver orchestrates and records; it never decides the regularizer's temperature (the
controller does) and never computes a loss (the learners do, with services.algorithm). The
components are reached through the protocols of services/contracts.py, so the loop is tested
with fakes (tests/services/loop/test_trainer.py) and runs on Ray actors in production
(services/backends/ray_cluster.py). Steps 4-5 are services/loop/steps.py; step 9 is
services/loop/evaluation.py and services/loop/checkpoint.py.

Failures: every wait on a role has a timeout and the step watchdog names the role a step waits
on (services/loop/watchdog.py); a role that fails is mended in place or replaced with a rollback
to the latest checkpoint (services/loop/recovery.py); SIGTERM/SIGINT end the run after a
checkpoint (services/loop/interrupt.py).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from services.config import RIVAL_TYPES, AEPOConfig, TrainConfig
from services.contracts import Components, RoleFailure, Sample
from services.data.datasets import PromptItem, PromptStream
from services.learner.batch import TrainBatch
from services.loop import checkpoint, evaluation, interrupt, recovery
from services.loop.outputs import MetricsLog, claim_output_dir, plot_entropy, summarize, write_json
from services.loop.tracking import make_loggers
from services.loop.steps import assemble, step_row, step_seed, verify
from services.loop.watchdog import Watchdog


@dataclass
class Trainer:
    """The driver of one run: steps 1-9 per `train_step`, `fit` until `trainer.steps`, logs and checkpoints.

    It talks to the components only through `parts` (services/contracts.py), so the Ray system, the
    in-process backend and the tests' fakes run the same loop.
    """

    cfg: TrainConfig
    parts: Components
    train_items: list[PromptItem]
    eval_items: list[PromptItem]
    output_dir: Path
    progress: bool = True
    progress_position: int = 0  # tqdm line (two runs side by side: --compare)
    policy_version: int = 0
    step: int = 0
    _prompt_ids: dict[str, list[int]] = field(default_factory=dict)
    # failing and coming back (services/loop/recovery.py)
    recoveries: dict[str, int] = field(default_factory=dict)  # rollbacks per failed role
    controller_copy: dict | None = None  # the controller's state after the last complete step
    initial_state: dict | None = None  # the driver's state at step 0 (a rollback before any checkpoint)
    step_planned: bool = False  # the current step's plan / entropy reached the controller
    step_stats: dict | None = None

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.stream = PromptStream(self.train_items, self.cfg.trainer.prompts_per_step, self.cfg.trainer.seed)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl")
        self.eval_log = MetricsLog(self.output_dir / "eval.jsonl")
        self.sample_log = MetricsLog(self.output_dir / "samples.jsonl")
        self.event_log = MetricsLog(self.output_dir / "events.jsonl")
        self.loggers = make_loggers(self.cfg.trainer.loggers, self.output_dir, self.cfg.run_name,
                                    self.cfg.model_dump(mode="json"))
        self.watchdog: Watchdog | None = None
        self._last_save = time.monotonic()
        self._saved: tuple[int, Path] | None = None  # (step, checkpoint) last written by this process

    # ------------------------------------------------------------------ helpers
    def encoded(self, items: list[PromptItem]) -> list[tuple[PromptItem, list[int]]]:
        out = []
        for it in items:
            ids = self._prompt_ids.get(it.id)
            if ids is None:
                ids = self._prompt_ids[it.id] = self.parts.tokenizer.encode(it.prompt)
            out.append((it, ids))
        return out

    def decode(self, samples: list[Sample]) -> None:
        for s in samples:
            s.text = self.parts.tokenizer.decode(s.response_ids)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One RL step, steps 1-9 in order (the module docstring); returns its metrics row."""
        cfg, parts, step = self.cfg, self.parts, self.step
        t_step = time.monotonic()
        timings: dict[str, float] = {}
        G = cfg.rollout.group_size
        self.step_planned, self.step_stats = False, None
        prompts = self.encoded(self.stream.next_batch())  # 1

        t = time.monotonic()  # 2 + 3: the rollout service asks the controller for the plan itself
        reg_prompts = []
        if isinstance(cfg.algorithm, AEPOConfig):  # the reference draws it from the first quarter
            reg_prompts = prompts[: max(1, math.ceil(len(prompts) * cfg.algorithm.prompt_share))]
        with self._phase("rollout", "generating the step's batches"):
            grpo, reg, plan = recovery.with_controller(self, lambda: parts.rollout.generate_step(
                step, prompts, reg_prompts, G, step_seed(cfg.trainer.seed, step, 1)), planned=False, stats=None)
        self.step_planned = bool(reg_prompts)
        timings["rollout"] = time.monotonic() - t
        self.decode(grpo + reg)

        t = time.monotonic()  # 4
        with self._phase("reward", "verifying the step's samples"):
            failures = verify(parts.reward, grpo + reg, step, "all")
        timings["reward"] = time.monotonic() - t

        t = time.monotonic()  # 5
        rows, batch, sel = assemble(cfg, grpo, reg, int(plan.get("m", 0)), parts.tokenizer.pad_id,
                                    float(plan.get("weight", 1.0)), step=step)

        levers = None  # a rival rule's decision: its levers on the loss, from the last published entropy
        if isinstance(cfg.algorithm, RIVAL_TYPES):
            plan = levers = recovery.with_controller(self, lambda: parts.controller.plan(step), planned=False, stats=None)
            self.step_planned = True
        timings["controller"] = time.monotonic() - t

        t = time.monotonic()  # 6 + 7: the learners publish the step's entropy (and rows kept) to the controller
        with self._phase("learner", "the policy update"):
            stats = parts.learner.update(batch, step, levers=levers)
        self.step_stats = stats
        if stats.pop("publish_error", None) is not None:  # the controller restarted mid-publish
            recovery.restore_controller(self, self.step_planned, stats)
        timings["learner"] = time.monotonic() - t
        self._log_samples(step, grpo, rows, batch)  # after the update: a crashed step leaves no trace

        t = time.monotonic()  # 8
        with self._phase("learner", "weight sync to the rollout engines"):
            timings["weight_sync"] = parts.rollout.load_weights(self.policy_version + 1, parts.learner.full_weights())
        self.policy_version += 1
        timings["weight_sync_total"] = time.monotonic() - t
        recovery.take_controller_copy(self)

        row = step_row(cfg, step, self.policy_version, grpo, reg, plan, sel, stats, failures, timings)
        self.step += 1
        self.step_planned, self.step_stats = False, None
        return self._finish_row(row, timings, t_step)

    def _phase(self, role: str, what: str):
        return self.watchdog.phase(self.step, role, what) if self.watchdog is not None else nullcontext()

    def _finish_row(self, row: dict, timings: dict, t_step: float) -> dict:
        t = time.monotonic()
        if self._due(self.cfg.trainer.eval_every):
            with self._phase("rollout", "held-out evaluation"):
                row.update(self.evaluate(self.step))
        timings["eval"] = time.monotonic() - t
        t = time.monotonic()
        if self._checkpoint_due():
            # the row goes into the checkpoint: a kill before it reaches metrics.jsonl loses nothing
            with self._phase("learner", "writing a checkpoint"):
                self.save_checkpoint(row=_json_safe({**row, "time": {k: round(v, 4) for k, v in timings.items()}}))
        timings["checkpoint"] = time.monotonic() - t
        row["time"] = {k: round(v, 4) for k, v in timings.items()}
        row["step_seconds"] = time.monotonic() - t_step
        compute = timings["rollout"] + timings["learner"]
        row["step_overhead"] = (row["step_seconds"] - timings["eval"] - timings["checkpoint"]) / max(compute, 1e-9)
        row = _json_safe(row)  # NaN (e.g. no regularizer tokens) is not JSON: write null
        self.log.append(row)
        for logger in self.loggers:
            logger.log(row)
        if self.parts.metrics is not None:
            self.parts.metrics.record_step(row)
        return row

    def _checkpoint_due(self) -> bool:
        every_s = self.cfg.trainer.save_every_seconds
        return self._due(self.cfg.trainer.save_every) or (every_s > 0 and time.monotonic() - self._last_save >= every_s)

    def _due(self, every: int) -> bool:
        last = self.step == self.cfg.trainer.steps
        return last or (every > 0 and self.step % every == 0)

    def _log_samples(self, step: int, grpo: list[Sample], rows: list[Sample], batch: TrainBatch) -> None:
        """samples.jsonl: the first few GRPO samples and every regularizer sample trained on."""
        n = self.cfg.trainer.log_samples
        if n == 0:
            return
        reg_rows = batch.is_regularizer.nonzero().flatten().tolist()
        picked = [("grpo", s, None) for s in grpo[:n]]
        picked += [("regularizer", rows[i], float(batch.advantages[i])) for i in reg_rows]
        for kind, s, adv in picked:
            self.sample_log.append({
                "step": step, "kind": kind, "prompt_id": s.prompt.id, "prompt": s.prompt.prompt, "response": s.text,
                "temperature": s.temperature, "policy_version": s.policy_version, "engine": s.engine,
                "finish_reason": s.finish_reason, "reward": s.reward, "outcome": s.outcome, "advantage": adv,
            })

    # ------------------------------------------------------------------ eval
    def evaluate(self, after_steps: int) -> dict:
        """Held-out avg@k and pass@k after `after_steps` steps (services/loop/evaluation.py)."""
        return evaluation.evaluate(self, after_steps)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, row: dict | None = None) -> Path:
        """Model + optimizer (sharded, by the learners), data position, RNG and controller state,
        and `row`, the metrics row of the last step (services/loop/checkpoint.py)."""
        path = checkpoint.save(self, row)
        self._last_save, self._saved = time.monotonic(), (self.step, path)
        return path

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint; False when there is none."""
        return checkpoint.resume(self)

    def export_policy(self) -> dict:
        """The current policy as a loadable checkpoint in `output_dir/policy` (services/model/export.py);
        returns where it went and how long it took, for the summary."""
        if not self.cfg.trainer.export_policy or self.parts.model_path is None:
            return {}
        from services.model.export import export_policy

        t = time.monotonic()
        path = export_policy(self.parts.model_path, self.parts.learner.state_dict(), self.output_dir / "policy",
                             info={"run_name": self.cfg.run_name, "step": self.step, "policy_version": self.policy_version,
                                   "algorithm": self.cfg.algorithm.type})
        return {"policy_dir": str(path), "export_seconds": round(time.monotonic() - t, 2)}

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Evaluate the start, run the remaining steps, write summary.json and entropy.png; returns the summary.

        `resume`: continue from the newest intact checkpoint (an error when there is none);
        otherwise the output directory must hold no earlier run, unless `overwrite` clears it."""
        if resume:
            if not self.resume():
                raise checkpoint.nothing_to_resume(self.output_dir, self.cfg.trainer.save_every)
        else:
            claim_output_dir(self.output_dir, overwrite)
        before = self.evaluate(0) if not resume and self.eval_items else None
        if not resume:
            self.initial_state = checkpoint.snapshot(self)  # what a rollback before the first checkpoint restores
        recovery.take_controller_copy(self)
        bar = _progress(self.cfg.trainer.steps, self.step, self.cfg.run_name, self.progress, self.progress_position)
        self.watchdog = Watchdog(self.cfg.recovery.watchdog_s, report=_reporter(bar))
        try:
            self._loop(bar)
        finally:
            self.watchdog.close()
            if bar is not None:
                bar.close()
            for logger in self.loggers:
                logger.close()
        return self._summary(resume, before)

    def _loop(self, bar) -> None:
        while self.step < self.cfg.trainer.steps:
            try:
                row = self.train_step()
            except RoleFailure as failure:
                recovery.roll_back(self, failure)
                if bar is not None:
                    bar.n = self.step
                    bar.refresh()
                continue
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(_postfix(row), refresh=False)
            signum = interrupt.requested()
            if signum is not None and self.step < self.cfg.trainer.steps:
                saved = self._saved is not None and self._saved[0] == self.step
                path = self._saved[1] if saved else self.save_checkpoint(row=row)
                recovery.record(self, {"event": "interrupted", "signal": signum, "checkpoint": path.name})
                raise interrupt.Interrupted(signum, self.step, str(path))

    def _summary(self, resumed: bool, before: dict | None) -> dict:
        rows = self.log.rows()
        evals = self.eval_log.rows()
        exported = self.export_policy()
        extra = {"run_name": self.cfg.run_name, "output_dir": str(self.output_dir), "resumed": resumed,
                 "learner_compute": getattr(self.parts.learner, "compute", None), **exported, **recovery.counts(self)}
        if evals:
            extra["eval_before"] = before or evals[0]
            extra["eval_after"] = evals[-1]
        summary = summarize(rows, extra)
        write_json(self.output_dir / "summary.json", summary)
        plot_entropy({self.cfg.algorithm.type: rows}, self.output_dir / "entropy.png")
        return summary


def _reporter(bar):
    """The watchdog's voice: above the progress bar when there is one."""
    if bar is None:
        return None
    from tqdm import tqdm

    return lambda msg: tqdm.write(msg)


def _progress(total: int, start: int, name: str, enabled: bool, position: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True, position=position)


def _postfix(row: dict) -> str:
    parts = [f"H={row['entropy']:.3f}" if row.get("entropy") is not None else "H=?"]
    if row.get("entropy_target") is not None:
        parts.append(f"H*={row['entropy_target']:.2f}")
    if row.get("reg_temperature") is not None:
        parts.append(f"T={row['reg_temperature']:.2f} m={row.get('reg_selected', 0)}")
    parts.append(f"R={row['reward_mean']:.2f}")
    acc = next((v for k, v in row.items() if k.startswith("eval_avg@")), None)
    if acc is not None:
        parts.append(f"acc={acc:.2f}")
    return " ".join(parts)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value




