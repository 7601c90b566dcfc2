"""The RL loop: ARCHITECTURE.md's nine steps, one function each, in the order they run.

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
components are reached through the small protocols below, so the loop is tested with fakes
(tests/services/loop/test_trainer.py) and runs on Ray actors in production (services/backends/ray_cluster.py).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from services import algorithm as A
from services.config import AEPOConfig, TrainConfig
from services.data.datasets import PromptItem, PromptStream
from services.loop.outputs import MetricsLog, plot_entropy, summarize, write_json

# ----------------------------------------------------------------------------- component protocols


@dataclass
class Rollout:
    """One sampled response, joined with its verdict after step 4."""

    prompt: PromptItem
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str
    temperature: float
    policy_version: int
    engine: str
    text: str = ""
    reward: float = 0.0
    outcome: str = ""


class RolloutService(Protocol):
    def generate(self, prompts: Sequence[tuple[PromptItem, list[int]]], n: int, temperature: float, seed: int) -> list[Rollout]:
        """n samples per prompt, grouped prompt by prompt, in order."""

    def generate_step(
        self, step: int, prompts: Sequence[tuple[PromptItem, list[int]]], reg_prompts: Sequence[tuple[PromptItem, list[int]]],
        n: int, seed: int,
    ) -> tuple[list[Rollout], list[Rollout], dict]:
        """The GRPO batch at T=1 and, when reg_prompts is not empty, the regularizer batch at the
        temperature the rollout service gets from the controller's plan for `step`, in one engine
        call. Returns (grpo samples, regularizer samples, plan or {})."""

    def load_weights(self, version: int, weights: Any) -> float:
        """Push weights; returns seconds spent."""


class RewardService(Protocol):
    def verify(self, items: list[dict]) -> list[dict]:
        """[{id, task, response, reference}] -> [{id, reward, outcome, detail}] in order."""


class LearnerService(Protocol):
    def update(self, batch: dict, step: int) -> dict:
        """One policy update; publishes the step's entropy to the controller; returns stats."""

    def full_weights(self) -> dict: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...


class ControllerService(Protocol):
    def record_selection(self, step: int, n: int) -> None: ...

    def target(self, step: int) -> float | None: ...

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Components:
    rollout: RolloutService
    reward: RewardService
    learner: LearnerService
    controller: ControllerService
    tokenizer: Tokenizer
    metrics: Any = None  # services.loop.metrics.RunMetrics or None


# ----------------------------------------------------------------------------- pure step pieces


def verify(reward: RewardService, samples: list[Rollout], step: int, kind: str) -> dict[str, int]:
    """Step 4 for one batch: fill reward/outcome in place; returns counts of timeout/error outcomes."""
    if not samples:
        return {}
    items = [
        {"id": f"{step}-{kind}-{i}", "task": s.prompt.task, "response": s.text, "reference": s.prompt.reference}
        for i, s in enumerate(samples)
    ]
    results = reward.verify(items)
    if len(results) != len(samples):
        raise RuntimeError(f"reward server answered {len(results)} results for {len(samples)} items")
    failures = {"timeout": 0, "error": 0}
    for s, r in zip(samples, results):
        s.reward, s.outcome = float(r["reward"]), r["outcome"]
        if s.outcome in failures:  # scored 0, counted, never fatal
            failures[s.outcome] += 1
    return failures


def update_batch(rows: list[Rollout], advantages: list[float], is_reg: list[bool]) -> dict:
    """The learner's batch: prompt/response ids per sequence plus its advantage and role."""
    return {
        "_rows": rows,  # the samples themselves, for the driver's logs (never sent to the learners)
        "prompt_ids": [r.prompt_ids for r in rows],
        "response_ids": [r.response_ids for r in rows],
        "advantages": [float(a) for a in advantages],
        "is_regularizer": [bool(x) for x in is_reg],
    }


def assemble(
    cfg: TrainConfig, grpo: list[Rollout], reg: list[Rollout], reg_m: int, reg_weight: float = 1.0
) -> tuple[dict, dict]:
    """Step 5: advantages, regularizer selection and the update batch's layout.

    `reg_weight` scales the selected regularizer rows' advantages (the controller's plan: 1 for
    the paper's rule, the PI rule's |u| otherwise)."""
    G = cfg.rollout.group_size
    alg = cfg.algorithm
    adv = A.group_advantages(torch.tensor([s.reward for s in grpo], dtype=torch.float64), G)
    info: dict[str, Any] = {}
    if not isinstance(alg, AEPOConfig) or not reg:
        return update_batch(grpo, adv.tolist(), [False] * len(grpo)), {"reg_selected": 0 if isinstance(alg, AEPOConfig) else None}
    reg_rewards = torch.tensor([s.reward for s in reg], dtype=torch.float64)
    reg_adv = A.group_advantages(reg_rewards, G)
    idx, sel_adv = A.select_regularizer(reg_rewards, reg_adv, reg_m, alg.adv_threshold, signed=A.is_signed_regularizer(alg))
    keep = A.grpo_rows_kept(len(grpo), idx.numel(), alg.mode)
    rows = [reg[i] for i in idx.tolist()] + [grpo[i] for i in keep]
    advs = (sel_adv * reg_weight).tolist() + [float(adv[i]) for i in keep]
    flags = [True] * idx.numel() + [False] * len(keep)
    info["reg_selected"] = int(idx.numel())
    info["reg_positives_available"] = int(((reg_rewards >= 1.0) & (reg_adv > alg.adv_threshold)).sum())
    info["reg_share_of_batch"] = idx.numel() / max(1, len(rows))
    return update_batch(rows, advs, flags), info


def batch_stats(samples: list[Rollout]) -> tuple[float | None, float | None]:
    """(mean reward, accuracy) of a batch; accuracy counts outcome 'correct'."""
    if not samples:
        return None, None
    return (sum(s.reward for s in samples) / len(samples), sum(s.outcome == "correct" for s in samples) / len(samples))


def step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class Trainer:
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

    # ------------------------------------------------------------------ helpers
    def _encoded(self, items: list[PromptItem]) -> list[tuple[PromptItem, list[int]]]:
        out = []
        for it in items:
            ids = self._prompt_ids.get(it.id)
            if ids is None:
                ids = self._prompt_ids[it.id] = self.parts.tokenizer.encode(it.prompt)
            out.append((it, ids))
        return out

    def _decode(self, samples: list[Rollout]) -> None:
        for s in samples:
            s.text = self.parts.tokenizer.decode(s.response_ids)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, parts, step = self.cfg, self.parts, self.step
        t_step = time.monotonic()
        timings: dict[str, float] = {}
        G = cfg.rollout.group_size
        prompts = self._encoded(self.stream.next_batch())  # 1

        t = time.monotonic()  # 2 + 3: the rollout service asks the controller for the plan itself
        reg_prompts = []
        if isinstance(cfg.algorithm, AEPOConfig):  # the reference draws it from the first quarter
            reg_prompts = prompts[: max(1, math.ceil(len(prompts) * cfg.algorithm.prompt_share))]
        grpo, reg, plan = parts.rollout.generate_step(step, prompts, reg_prompts, G, step_seed(cfg.trainer.seed, step, 1))
        timings["rollout"] = time.monotonic() - t
        self._decode(grpo + reg)

        t = time.monotonic()  # 4
        failures = verify(parts.reward, grpo + reg, step, "all")
        timings["reward"] = time.monotonic() - t

        t = time.monotonic()  # 5
        batch, sel = assemble(cfg, grpo, reg, int(plan.get("m", 0)), float(plan.get("weight", 1.0)))
        if plan:
            parts.controller.record_selection(step, sel["reg_selected"])
        timings["controller"] = time.monotonic() - t

        t = time.monotonic()  # 6 + 7: the learners publish the step's entropy to the controller
        stats = parts.learner.update({k: v for k, v in batch.items() if not k.startswith("_")}, step)
        timings["learner"] = time.monotonic() - t
        self._log_samples(step, grpo, batch)  # after the update: a crashed step leaves no trace

        t = time.monotonic()  # 8
        self.policy_version += 1
        timings["weight_sync"] = parts.rollout.load_weights(self.policy_version, parts.learner.full_weights())
        timings["weight_sync_total"] = time.monotonic() - t

        reward_grpo, acc_grpo = batch_stats(grpo)
        reward_reg, acc_reg = batch_stats(reg)
        gen_tokens = sum(len(s.response_ids) for s in grpo + reg)
        row = {
            "step": step,
            "algorithm": cfg.algorithm.type,
            "policy_version": self.policy_version,
            "entropy": stats.get("entropy"),
            "entropy_sampled": stats.get("entropy_sampled"),
            "entropy_regularizer": stats.get("entropy_regularizer"),
            "entropy_target": plan.get("target"),  # only AEPO has a target, and it always plans
            "reg_temperature": plan.get("temperature"),
            "reg_m": plan.get("m"),
            "reg_direction": plan.get("direction"),
            "reg_weight": plan.get("weight"),
            **sel,
            "reward_mean": reward_grpo,
            "reward_mean_grpo": reward_grpo,
            "accuracy_grpo": acc_grpo,
            "reward_mean_regularizer": reward_reg,
            "accuracy_regularizer": acc_reg,
            "reward_failures": failures,
            "response_length_mean": gen_tokens / max(1, len(grpo) + len(reg)),
            "rollout_tokens_per_s": gen_tokens / max(timings["rollout"], 1e-9),
            **{k: stats[k] for k in ("pg_loss", "reg_loss", "clipfrac", "approx_kl", "grad_norm") if k in stats},
            "learner_tokens_per_s": stats.get("tokens_per_s"),
            "weight_sync_seconds": timings["weight_sync"],
            "token_entropy": stats.get("token_entropy"),
            "entropy_irrelevant_share": stats.get("entropy_irrelevant_share"),
            "entropy_forking_share": stats.get("entropy_forking_share"),
            "entropy_by_position": stats.get("entropy_by_position"),
        }
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
        if self.parts.metrics is not None:
            self.parts.metrics.record_step(row)
        return row

    def _due(self, every: int) -> bool:
        last = self.step == self.cfg.trainer.steps
        return last or (every > 0 and self.step % every == 0)

    def _log_samples(self, step: int, grpo: list[Rollout], batch: dict) -> None:
        """samples.jsonl: the first few GRPO samples and every regularizer sample trained on."""
        n = self.cfg.trainer.log_samples
        if n == 0:
            return
        reg_rows = [i for i, flag in enumerate(batch["is_regularizer"]) if flag]
        picked = [("grpo", s, None) for s in grpo[:n]]
        picked += [("regularizer", batch["_rows"][i], batch["advantages"][i]) for i in reg_rows]
        for kind, s, adv in picked:
            self.sample_log.append({
                "step": step, "kind": kind, "prompt_id": s.prompt.id, "prompt": s.prompt.prompt, "response": s.text,
                "temperature": s.temperature, "policy_version": s.policy_version, "engine": s.engine,
                "finish_reason": s.finish_reason, "reward": s.reward, "outcome": s.outcome, "advantage": adv,
            })

    # ------------------------------------------------------------------ eval
    def evaluate(self, after_steps: int) -> dict:
        """Held-out avg@k at the eval temperature and pass@k at T=1 (unbiased estimator)."""
        tc = self.cfg.trainer
        if not self.eval_items:
            return {}
        final = after_steps == tc.steps
        n_prompts = (tc.final_eval_prompts or tc.eval_prompts) if final else tc.eval_prompts
        items = self.eval_items[:n_prompts] if n_prompts else self.eval_items
        prompts = self._encoded(items)
        n = (tc.final_eval_samples or tc.eval_samples) if final else tc.eval_samples
        out: dict[str, float] = {}
        for temp, tag in ((tc.eval_temperature, "low"), (1.0, "t1")):
            samples = self.parts.rollout.generate(prompts, n, temp, step_seed(tc.seed, after_steps, 3 if tag == "low" else 4))
            self._decode(samples)
            verify(self.parts.reward, samples, after_steps, f"eval-{tag}")
            correct = torch.tensor([s.outcome == "correct" for s in samples], dtype=torch.float32).view(len(items), n)
            if tag == "low":
                out[f"eval_avg@{n}"] = A.avg_at_k(correct)
            else:
                c = correct.sum(1).long().tolist()
                k = 1
                while k <= n:
                    out[f"eval_pass@{k}"] = sum(A.pass_at_k(n, ci, k) for ci in c) / len(c)
                    k *= 2
        self.eval_log.append({"step": after_steps, **out})
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Model + optimizer (sharded, by the learners), data position, RNG and controller state."""
        root = self.checkpoint_root()
        final = root / f"step_{self.step:06d}"
        tmp = root / f".tmp_step_{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.parts.learner.save(str(tmp / "learner"))
        state = {
            "step": self.step,
            "policy_version": self.policy_version,
            "stream": self.stream.state_dict(),
            "python_rng": _jsonable_rng(random.getstate()),
            "torch_rng": torch.get_rng_state().tolist(),
            "controller": self.parts.controller.state(),
            "config": self.cfg.model_dump(mode="json"),
        }
        write_json(tmp / "driver_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint exists only once complete
        write_json(root / "latest.json", {"step": self.step, "path": final.name})
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[: -self.cfg.trainer.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint; False when there is none."""
        latest = self.checkpoint_root() / "latest.json"
        if not latest.exists():
            return False
        path = self.checkpoint_root() / json.loads(latest.read_text())["path"]
        state = json.loads((path / "driver_state.json").read_text())
        self.parts.learner.load(str(path / "learner"))
        self.step, self.policy_version = state["step"], state["policy_version"]
        self.stream.load_state_dict(state["stream"])
        random.setstate(_rng_from_json(state["python_rng"]))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self.parts.controller.restore(state["controller"])
        self.parts.rollout.load_weights(self.policy_version, self.parts.learner.full_weights())
        self.log.truncate_after(self.step - 1)
        self.eval_log.truncate_after(self.step)
        self.sample_log.truncate_after(self.step - 1)
        return True

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> dict:
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
        rows = self.log.rows()
        evals = self.eval_log.rows()
        extra = {"run_name": self.cfg.run_name, "output_dir": str(self.output_dir), "resumed": resumed,
                 "learner_compute": getattr(self.parts.learner, "compute", None)}
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


def _jsonable_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
