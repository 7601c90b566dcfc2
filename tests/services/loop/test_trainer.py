"""The RL loop's orchestration, with small fakes around the real controller rule and math."""

import json
import random

import pytest

from controller.client import LocalControllerClient, publish_entropy
from controller.actor import ControllerCore, MemoryStore
from services.config import TrainConfig
from services.data.datasets import PromptItem
from reward_server.schemas import VerifyResult
from services.contracts import Components, Sample
from services.loop.steps import RewardFailureError
from services.loop.trainer import Trainer
from testlib import prompts_of, responses_of


class CharTokenizer:
    pad_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class FakeController(LocalControllerClient):
    """The real ControllerCore (pure rule + state), called in-process: the local controller client."""

    def __init__(self, cfg, store=None):
        super().__init__(ControllerCore(cfg.algorithm, cfg.controller, cfg.run_name, store=store or MemoryStore()))


class FakeRollout:
    """'good' answers with probability p(T) (hotter -> more mistakes); asks the controller for T_reg."""

    def __init__(self, controller):
        self.controller = controller
        self.version = 0
        self.calls = []

    def generate(self, prompts, n, temperature, seed):
        rng = random.Random(seed)
        self.calls.append(("generate", [p.id for p, _ in prompts], temperature))
        out = []
        for item, ids in prompts:
            for _ in range(n):
                text = "good" if rng.random() < 0.5 else "bad"
                out.append(Sample(item, ids, [ord(c) for c in text], "stop", temperature, self.version, "fake"))
        return out

    def generate_step(self, step, prompts, reg_prompts, n, seed):
        grpo = self.generate(prompts, n, 1.0, seed)
        if not reg_prompts:
            return grpo, [], {}
        plan = self.controller.plan(step)
        self.calls.append(("plan", step, plan["temperature"]))
        return grpo, self.generate(reg_prompts, n, plan["temperature"], seed + 1), plan

    def load_weights(self, version, weights):
        assert weights["version"] == version - 1 or weights["version"] == version
        self.version = version
        return 0.001


class FakeReward:
    def __init__(self, fail_every=0):
        self.fail_every = fail_every
        self.calls = 0

    def verify(self, items):
        self.calls += 1
        out = []
        for i, it in enumerate(items):
            if self.fail_every and i % self.fail_every == 0:
                out.append(VerifyResult(id=it.id, reward=0, outcome="timeout", detail="deadline", elapsed_s=0.0))
            else:
                ok = it.response == "good"
                out.append(VerifyResult(id=it.id, reward=int(ok), outcome="correct" if ok else "incorrect", detail="",
                                        elapsed_s=0.0))
        return out


class FakeLearner:
    """Publishes a scripted entropy per step to the controller, like the real learners do; with
    `split`, also where it lives (content = H − 0.1, forking = 2·H)."""

    def __init__(self, controller, entropies, crash_at=None, split=False):
        self.controller, self.entropies, self.crash_at, self.split = controller, entropies, crash_at, split
        self.version, self.batches = 0, []

    def update(self, batch, step, levers=None):
        if step == self.crash_at:
            raise RuntimeError("learner died")
        self.batches.append((step, batch))
        h = self.entropies[step % len(self.entropies)]
        stats = {"entropy": h, "entropy_sampled": h + 0.01, "entropy_sampled_batch": h + 0.02,
                 "entropy_regularizer": float("nan"), "reg_selected": int(batch.is_regularizer.sum()), "pg_loss": 0.0,
                 "tokens_per_s": 100.0}
        if self.split:
            stats["token_entropy"] = {"irrelevant": 0.1, "content": h - 0.1, "forking": 2 * h, "nonforking": h / 2}
        publish_entropy(self.controller, step, stats)
        self.version += 1
        return stats

    def full_weights(self):
        return {"version": self.version}

    def save(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True)
        (Path(path) / "state.json").write_text(json.dumps({"version": self.version}))
        return {"state.json": (Path(path) / "state.json").stat().st_size}

    def load(self, path):
        from pathlib import Path

        self.version = json.loads((Path(path) / "state.json").read_text())["version"]


def make_cfg(**over):
    base = {
        "run_name": "fake",
        "algorithm": {"type": "aepo", "target": {"type": "constant", "value": 0.35}, "prompt_share": 0.5,
                      "rule": {"m_up": 6, "m_down": 3}, "mode": "replace"},
        "rollout": {"group_size": 4},
        "trainer": {"steps": 4, "prompts_per_step": 4, "eval_every": 0, "save_every": 0, "eval_samples": 4},
    }
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) and k != "algorithm" else v
    return TrainConfig.model_validate(base)


def items(n, split="train"):
    return [PromptItem(f"{split}-{i}", f"q{i}", {"a": i}, "exact") for i in range(n)]


def build(tmp_path, cfg, entropies=(0.5,), crash_at=None, reward=None, store=None, split=False):
    ctl = FakeController(cfg, store)
    learner = FakeLearner(ctl, list(entropies), crash_at, split)
    parts = Components(FakeRollout(ctl), reward or FakeReward(), learner, ctl, CharTokenizer())
    return Trainer(cfg, parts, items(12), items(3, "eval"), tmp_path / "run", progress=False), parts


def test_an_aepo_step_trains_on_correct_regularizer_positives_that_replace_grpo_rows(tmp_path):
    cfg = make_cfg()
    trainer, parts = build(tmp_path, cfg)
    row = trainer.train_step()
    step, batch = parts.learner.batches[0]
    n_reg = int(batch.is_regularizer.sum())
    assert n_reg == row["reg_selected"] <= 6  # m_up = 6 on the first step (nothing observed yet: up)
    assert len(batch) == 4 * 4  # replace: the batch keeps B x G rows
    for resp, adv, flag in zip(responses_of(batch), batch.advantages.tolist(), batch.is_regularizer.tolist()):
        if flag:
            assert "".join(map(chr, resp)) == "good" and adv == 1.0
    assert row["reg_temperature"] == 1.2 and row["reg_direction"] == "up"
    # the learners told the controller how many rows they train on; the driver never reports back
    state = parts.controller.state()
    assert state["selected"] == {"step": 0, "n": n_reg} and state["log"][-1]["selected"] == n_reg
    logged = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    reg_logged = [r for r in logged if r["kind"] == "regularizer"]
    assert len(reg_logged) == n_reg and len(logged) == n_reg + 4
    assert all(r["temperature"] == 1.2 and r["reward"] == 1.0 and r["advantage"] == 1.0 for r in reg_logged)
    # the regularizer batch came from half of the prompts, drawn after the GRPO batch
    kinds = [c for c in parts.rollout.calls if c[0] == "generate"]
    assert kinds[0][2] == 1.0 and len(kinds[1][1]) == 2 and kinds[1][2] == 1.2


def test_the_regularizer_temperature_flips_when_published_entropy_crosses_the_target(tmp_path):
    trainer, parts = build(tmp_path, make_cfg(), entropies=(0.5, 0.2, 0.5, 0.2))
    temps = [trainer.train_step()["reg_temperature"] for _ in range(4)]
    # step 0: nothing observed -> 1.2; then H=0.5 > 0.35 -> 0.8; H=0.2 -> 1.2; H=0.5 -> 0.8
    assert temps == [1.2, 0.8, 1.2, 0.8]


def test_grpo_draws_no_regularizer_batch(tmp_path):
    cfg = make_cfg(algorithm={"type": "grpo"})
    trainer, parts = build(tmp_path, cfg)
    row = trainer.train_step()
    assert not any(c[0] == "plan" for c in parts.rollout.calls)
    assert not parts.learner.batches[0][1].is_regularizer.any()
    assert row["reg_temperature"] is None and row["entropy_target"] is None


def test_metrics_rows_carry_the_entropy_series_and_the_time_split(tmp_path):
    trainer, _ = build(tmp_path, make_cfg(trainer={"steps": 2}), entropies=(0.4, 0.3))
    trainer.fit()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("step", "algorithm", "entropy", "entropy_target", "reg_temperature", "reg_selected", "reward_mean",
                "policy_version", "step_seconds"):
        assert key in rows[0], key
    assert set(rows[0]["time"]) >= {"rollout", "reward", "learner", "weight_sync", "controller"}
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert rows[0]["entropy_regularizer"] is None  # NaN from the learners is written as JSON null
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "run" / "entropy.png").stat().st_size > 0
    assert "eval_before" in summary and "eval_pass@1" in summary["eval_after"]


def test_timeouts_are_reverified_then_masked_and_counted_without_stopping_training(tmp_path):
    reward = FakeReward(fail_every=5)
    trainer, parts = build(tmp_path, make_cfg(), reward=reward)
    row = trainer.train_step()
    # 16 GRPO + 8 regularizer items: 0, 5, 10, 15, 20 time out; sent again, the first of those 5
    # (GRPO sample 0) times out again and is left out: replace mode keeps the 15 rows with a verdict
    assert reward.calls == 2 and row["reward_reverified"] == 5
    assert row["reward_failures"] == {"timeout": 1, "error": 0} and row["reward_masked"] == 1
    assert len(parts.learner.batches[0][1]) == 15


def test_a_step_over_the_failure_threshold_stops_the_run_before_the_update(tmp_path):
    # every other item times out, twice for half of them: 6 of 24 = 25 % > reward.max_failure_share 20 %
    trainer, parts = build(tmp_path, make_cfg(), reward=FakeReward(fail_every=2))
    with pytest.raises(RewardFailureError, match="6 of 24 samples have no reward verdict"):
        trainer.fit()
    assert parts.learner.batches == [] and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_killed_run_resumes_at_the_checkpoint_with_controller_state_and_data_position(tmp_path):
    cfg = make_cfg(trainer={"steps": 5, "save_every": 2})
    first, parts = build(tmp_path, cfg, entropies=(0.5, 0.2, 0.5, 0.2, 0.5), crash_at=3)
    with pytest.raises(RuntimeError, match="learner died"):
        first.fit()
    prompts_seen = {s: prompts_of(b) for s, b in parts.learner.batches}
    # a fresh process: new components, new (in-memory) controller, same output dir
    second, parts2 = build(tmp_path, cfg, entropies=(0.5, 0.2, 0.5, 0.2, 0.5))
    second.fit(resume=True)
    assert parts2.learner.batches[0][0] == 2  # restarted at the checkpoint after 2 steps
    assert prompts_of(parts2.learner.batches[0][1])[-1] == prompts_seen[2][-1]  # same data position
    # the restored controller had seen H=0.2 at step 1 -> step 2 plans up, as before the crash
    assert parts2.rollout.calls[0] == ("generate", parts2.rollout.calls[0][1], 1.0)
    assert [c for c in parts2.rollout.calls if c[0] == "plan"][0] == ("plan", 2, 1.2)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert parts2.learner.version == 5 and rows[-1]["policy_version"] == 5


def _aepo(target):
    return {"type": "aepo", "target": target, "prompt_share": 0.5, "rule": {"m_up": 6, "m_down": 3}, "mode": "replace"}


def test_the_controller_holds_the_configured_part_of_the_entropy_and_the_row_says_which(tmp_path):
    cfg = make_cfg(algorithm=_aepo({"type": "constant", "value": 0.5}), controller={"entropy_source": "forking"},
                   trainer={"steps": 2})
    trainer, _ = build(tmp_path, cfg, entropies=(0.3,), split=True)
    rows = [trainer.train_step() for _ in range(2)]
    assert [(r["entropy_source"], r["entropy"], r["entropy_controlled"]) for r in rows] == [("forking", 0.3, 0.6)] * 2
    # step 1 plans from forking 0.6 > H* 0.5: down, though the mean 0.3 is below the target
    assert [r["reg_direction"] for r in rows] == ["up", "down"] and rows[1]["entropy_target"] == 0.5


def test_a_relative_target_keeps_its_absolute_value_across_a_crash_and_resume(tmp_path):
    cfg = make_cfg(algorithm=_aepo({"type": "constant", "value": 0.8, "relative": True}),
                   trainer={"steps": 5, "save_every": 2})
    hs = (0.5, 0.2, 0.5, 0.2, 0.5)
    first, _ = build(tmp_path, cfg, entropies=hs, crash_at=3)
    with pytest.raises(RuntimeError, match="learner died"):
        first.fit()
    second, _ = build(tmp_path, cfg, entropies=hs)  # a fresh in-memory controller, restored from the checkpoint
    second.fit(resume=True)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # step 0 plans before H0 is known (target None, up); then H* = 0.8 x H0 = 0.8 x 0.5 = 0.4 on both sides of the crash
    assert [r["entropy_target"] for r in rows] == [None] + [pytest.approx(0.4)] * 4
    assert [r["reg_direction"] for r in rows] == ["up", "down", "up", "down", "up"]
    assert all(r["entropy_controlled"] == r["entropy"] for r in rows)  # source exact: the mean itself


def test_a_controlled_source_the_learners_do_not_measure_stops_the_first_step(tmp_path):
    # countdown has reward-irrelevant tokens, so the config is valid; these learners report no split
    cfg = make_cfg(controller={"entropy_source": "content"})
    trainer, parts = build(tmp_path, cfg)
    with pytest.raises(ValueError, match="controller.entropy_source 'content' was not measured at step 0"):
        trainer.train_step()
    assert parts.controller.state()["last"] == {}


class LeverLearner(FakeLearner):
    """Records the levers each update was given."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.levers = []

    def update(self, batch, step, levers=None):
        self.levers.append(levers)
        return super().update(batch, step)


def test_a_rival_rule_hands_its_levers_to_the_learners_every_step_and_draws_no_regularizer(tmp_path):
    # Skywork's rule with Δ 0.1 from α 0: H 0.2 < H* 0.35 -> α 0.1 on; H 0.5 -> α 0, off; H 0.2 -> 0.1 on
    cfg = make_cfg(algorithm={"type": "adaptive_entropy", "target": {"type": "constant", "value": 0.35},
                              "rule": {"coef_delta": 0.1}}, trainer={"steps": 4})
    ctl = FakeController(cfg)
    learner = LeverLearner(ctl, [0.2, 0.5, 0.2, 0.5])
    parts = Components(FakeRollout(ctl), FakeReward(), learner, ctl, CharTokenizer())
    trainer = Trainer(cfg, parts, items(12), items(3, "eval"), tmp_path / "run", progress=False)
    rows = [trainer.train_step() for _ in range(4)]
    # step 0 has seen nothing (α_0 = 0 applied); step k plans from the entropy published at step k-1
    assert [round(lv["entropy_coef"], 6) for lv in learner.levers] == [0.0, 0.1, 0.0, 0.1]
    assert [round(r["entropy_coef"], 6) for r in rows] == [0.0, 0.1, 0.0, 0.1]
    assert all(r["entropy_target"] == 0.35 and r["reg_temperature"] is None for r in rows[1:])
    assert not any(c[0] == "plan" for c in parts.rollout.calls)  # no regularizer batch was drawn
    assert not any(b.is_regularizer.any() for _, b in learner.batches)


def test_entropic_weights_reach_the_learners_and_a_resumed_run_repeats_them(tmp_path):
    cfg = make_cfg(algorithm={"type": "entropic", "target": {"type": "constant", "value": 0.35},
                              "rule": {"kp": 1.0, "ki": 0.5}}, trainer={"steps": 4, "save_every": 2})
    hs = [0.55, 0.25, 0.45, 0.15]

    def run(out, crash_at=None, resume=False):
        ctl = FakeController(cfg)
        learner = LeverLearner(ctl, hs, crash_at)
        parts = Components(FakeRollout(ctl), FakeReward(), learner, ctl, CharTokenizer())
        trainer = Trainer(cfg, parts, items(12), items(3, "eval"), tmp_path / out, progress=False)
        if crash_at is None:
            trainer.fit(resume=resume)
        else:
            with pytest.raises(RuntimeError, match="learner died"):
                trainer.fit()
        return learner.levers

    full = run("full")
    # e = H − H*: 0.2, −0.1, 0.1; α_k = kp·e_{k−1} + ki·(e_0 + … + e_{k−2}), clipped to ±1
    alphas = [0.0, 0.2, -0.1 + 0.5 * 0.2, 0.1 + 0.5 * 0.1]
    assert [lv["positive_weight"] for lv in full] == pytest.approx([1 + a for a in alphas])
    assert [lv["negative_weight"] for lv in full] == pytest.approx([1 - a for a in alphas])
    run("killed", crash_at=3)
    resumed = run("killed", resume=True)  # from the checkpoint after 2 steps: steps 2 and 3 again
    assert [lv["positive_weight"] for lv in resumed] == pytest.approx([1 + a for a in alphas[2:]])
