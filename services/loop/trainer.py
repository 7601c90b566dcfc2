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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.config import AEPOConfig, TrainConfig
from services.contracts import Components, Sample
from services.data.datasets import PromptItem, PromptStream
from services.learner.batch import TrainBatch
from services.loop import checkpoint, evaluation
from services.loop.outputs import MetricsLog, plot_entropy, summarize, write_json
from services.loop.tracking import make_loggers
from services.loop.steps import assemble, step_row, step_seed, verify


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

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.stream = PromptStream(self.train_items, self.cfg.trainer.prompts_per_step, self.cfg.trainer.seed)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl")
        self.eval_log = MetricsLog(self.output_dir / "eval.jsonl")
        self.sample_log = MetricsLog(self.output_dir / "samples.jsonl")
        self.loggers = make_loggers(self.cfg.trainer.loggers, self.output_dir, self.cfg.run_name,
                                    self.cfg.model_dump(mode="json"))

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
        prompts = self.encoded(self.stream.next_batch())  # 1

        t = time.monotonic()  # 2 + 3: the rollout service asks the controller for the plan itself
        reg_prompts = []
        if isinstance(cfg.algorithm, AEPOConfig):  # the reference draws it from the first quarter
            reg_prompts = prompts[: max(1, math.ceil(len(prompts) * cfg.algorithm.prompt_share))]
        grpo, reg, plan = parts.rollout.generate_step(step, prompts, reg_prompts, G, step_seed(cfg.trainer.seed, step, 1))
        timings["rollout"] = time.monotonic() - t
        self.decode(grpo + reg)

        t = time.monotonic()  # 4
        failures = verify(parts.reward, grpo + reg, step, "all")
        timings["reward"] = time.monotonic() - t

        t = time.monotonic()  # 5
        rows, batch, sel = assemble(cfg, grpo, reg, int(plan.get("m", 0)), parts.tokenizer.pad_id,
                                    float(plan.get("weight", 1.0)))
        timings["controller"] = time.monotonic() - t

        t = time.monotonic()  # 6 + 7: the learners publish the step's entropy (and rows kept) to the controller
        stats = parts.learner.update(batch, step)
        timings["learner"] = time.monotonic() - t
        self._log_samples(step, grpo, rows, batch)  # after the update: a crashed step leaves no trace

        t = time.monotonic()  # 8
        self.policy_version += 1
        timings["weight_sync"] = parts.rollout.load_weights(self.policy_version, parts.learner.full_weights())
        timings["weight_sync_total"] = time.monotonic() - t

        row = step_row(cfg, step, self.policy_version, grpo, reg, plan, sel, stats, failures, timings)
        self.step += 1
        return self._finish_row(row, timings, t_step)

    def _finish_row(self, row: dict, timings: dict, t_step: float) -> dict:
        t = time.monotonic()
        if self._due(self.cfg.trainer.eval_every):
            row.update(self.evaluate(self.step))
        timings["eval"] = time.monotonic() - t
        t = time.monotonic()
        if self._due(self.cfg.trainer.save_every):
            self.save_checkpoint()
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

    def save_checkpoint(self) -> Path:
        """Model + optimizer (sharded, by the learners), data position, RNG and controller state."""
        return checkpoint.save(self)

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
    def fit(self, resume: bool = False) -> dict:
        """Evaluate the start, run the remaining steps, write summary.json and entropy.png; returns the summary."""
        resumed = self.resume() if resume else False
        if not resumed and self.step == 0 and self.cfg.trainer.eval_every >= 0 and self.eval_items:
            before = self.evaluate(0)
        else:
            before = None
        bar = _progress(self.cfg.trainer.steps, self.step, self.cfg.run_name, self.progress, self.progress_position)
        try:
            while self.step < self.cfg.trainer.steps:
                row = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(row), refresh=False)
        finally:
            if bar is not None:
                bar.close()
            for logger in self.loggers:
                logger.close()
        rows = self.log.rows()
        evals = self.eval_log.rows()
        exported = self.export_policy()
        extra = {"run_name": self.cfg.run_name, "output_dir": str(self.output_dir), "resumed": resumed,
                 "learner_compute": getattr(self.parts.learner, "compute", None), **exported}
        if evals:
            extra["eval_before"] = before or evals[0]
            extra["eval_after"] = evals[-1]
        summary = summarize(rows, extra)
        write_json(self.output_dir / "summary.json", summary)
        plot_entropy({self.cfg.algorithm.type: rows}, self.output_dir / "entropy.png")
        return summary


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




