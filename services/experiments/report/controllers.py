"""The entropy-controller benchmark's report (`report: controllers` in an experiment spec).

Sections, each computed from the runs' own files: how each controller tracked each signal at each
target (tracking), the headline rows per task (each controller at its best setting, GRPO and the
base model, 3 seeds), where each method's entropy went (the split), what several mini-batches
per step change for Clip-Cov and KL-Cov, and the verdicts (services/experiments/report/tracking.py
states their criteria). `write_report` has the toy_claims report's signature.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from services.experiments.report.figures import fig_decomposition, fig_pass_at_k
from services.experiments.report.runs import final_accuracy, fmt, label, load_run, pass_at, tail_mean
from services.experiments.report.write import _run_config, section_claims, section_runs
from services.experiments.report.tracking import (DEFINITIONS, HELD_REL, MARGIN_PASS, SETTLE_REL, SIGNALS, base_value,
                                                  fig_tracking, overshoot, settling_step, split_at_end, split_at_start,
                                                  tracking_error, verdict_aepo_moves_content, verdict_aepo_vs_bonus,
                                                  verdict_content_vs_mean)

KS = [1, 4, 16, 64]


class Data:
    """The finished runs of a spec, by section and task."""

    def __init__(self, spec, jobs, root: Path):
        self.spec, self.root = spec, root
        loaded = [(j, load_run(j)) for j in jobs]
        self.runs = [r for _, r in loaded if r is not None]
        self.missing = sorted({j.name for j, r in loaded if r is None})
        first = next((g.toy for g in spec.groups if g.toy), "toy")
        self.toys = list(dict.fromkeys(g.toy or first for g in spec.groups))
        self._first = first

    def toy(self, run: dict) -> str:
        return run["job"].group.toy or self._first

    def section(self, name: str, toy: str | None = None) -> list[dict]:
        return [r for r in self.runs if name in r["job"].group.sections and (toy is None or self.toy(r) == toy)]

    def groups(self, name: str, toy: str | None = None) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = defaultdict(list)
        for r in self.section(name, toy):
            out[r["job"].group.name].append(r)
        return dict(out)

    def grpo(self, toy: str) -> list[dict]:
        return [r for r in self.section("headline", toy) if r["job"].config["algorithm"]["type"] == "grpo"
                and r["job"].config["trainer"]["steps"] > 0]

    def tracking_grid(self) -> dict[str, dict[str, list[dict]]]:
        """controller label -> signal -> runs (one per target)."""
        grid: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for r in self.section("tracking"):
            grid[label(r["job"].group)][r["job"].config["controller"]["entropy_source"]].append(r)
        return {k: dict(v) for k, v in grid.items()}


def write_report(spec, jobs, root: Path, wall_seconds: float | None = None, spec_path: str | None = None,
                 ran: int = 0) -> Path:
    """report.md, verdicts.json and the figures under `root`, from whatever runs have finished."""
    root.mkdir(parents=True, exist_ok=True)
    d = Data(spec, jobs, root)
    verdicts: list = []
    lines = _header(d, wall_seconds, spec_path, ran)
    for section in (_tracking, _headline, _split, _offpolicy):
        body, found = section(d)
        lines += body
        verdicts += found
    lines += _claims(d, verdicts) + section_runs(d)  # Data has the runs and root section_runs reads
    (root / "report.md").write_text("\n".join(lines) + "\n")
    (root / "verdicts.json").write_text(json.dumps([{"claim": c, "verdict": v, "numbers": n} for c, v, n in verdicts],
                                                   indent=2) + "\n")
    return root / "report.md"


def _wall(run: dict) -> float:
    return (_run_config(run) or {}).get("wall_seconds", 0.0)


def _header(d: Data, wall_seconds: float | None, spec_path: str | None, ran: int) -> list[str]:
    spec = d.spec
    walls = [_wall(r) for r in {str(r["dir"]): r for r in d.runs}.values()]
    out = [f"# {spec.name}: which entropy each controller moves, and what holding it buys\n",
           f"Regenerate: `aepo experiment {spec_path or '<spec>'}` (runs what is missing, then rewrites this folder; "
           "`--report-only` just rewrites it)."]
    if walls:
        out.append(f"Cost of a full regeneration: **≈ {sum(walls) / spec.parallel / 60:.0f} min** on this machine (the "
                   f"{len(walls)} runs' own wall times, {sum(walls) / 60:.0f} min, {spec.parallel} at a time with "
                   f"{spec.threads} torch thread each, backend `{spec.backend}`; plus each task's warm start when not cached).")
    if wall_seconds is not None and ran:
        out.append(f"This invocation ran {ran} run(s) in {wall_seconds / 60:.1f} min, warm starts included.")
    prompts = d.runs[0]["job"].config["trainer"]["prompts_per_step"] if d.runs else "?"
    out.append(f"Setup: `{spec.base_config}` with {prompts} prompts × G=8 per step, {spec.steps} RL steps per run; final "
               f"eval on {spec.final_eval_prompts} held-out prompts × {spec.final_eval_samples} samples. Tasks: "
               + "; ".join(f"`{t}`" for t in d.toys) + ".\n")
    if d.missing:
        out.append(f"**Missing runs** (not finished, excluded): {', '.join(d.missing)}\n")
    out.append("Definitions: " + " ".join(DEFINITIONS.split()) + f" (HELD_REL = {HELD_REL}, SETTLE_REL = {SETTLE_REL}).\n")
    return out


def _tracking(d: Data) -> tuple[list[str], list]:
    grid = d.tracking_grid()
    if not grid:
        return [], []
    out = ["## 1. Tracking: each controller × signal × target (seed 0, first task)\n",
           "| controller | signal | H0 | target | H* (nats) | H_c at end | tracking error | held | overshoot | settling step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    reach = []
    for name, by_signal in grid.items():
        for source in SIGNALS:
            runs = sorted(by_signal.get(source, []), key=lambda r: r["job"].target)
            held = []
            for r in runs:
                err, h0 = tracking_error(r), base_value(r)
                target_abs = r["rows"][-1].get("entropy_target")
                if err is not None and err <= HELD_REL:
                    held.append(f"{r['job'].target:g}")
                out.append(f"| {name} | {SIGNALS[source]} | {_f(h0)} | {r['job'].target:.1f} × H0 | {_f(target_abs)} | "
                           f"{_f(tail_mean(r['rows'], 'entropy_controlled'))} | {_pct(err)} | "
                           f"{'yes' if err is not None and err <= HELD_REL else 'no'} | {_pct(overshoot(r))} | "
                           f"{_step(settling_step(r))} |")
            if runs:
                reach.append(f"| {name} | {SIGNALS[source]} | {', '.join(held) or 'none'} |")
    out += ["", "Reachable targets (× H0, held within the tracking error bound):\n", "| controller | signal | held |",
            "|---|---|---|", *reach, ""]
    first = d.toys[0]
    fig_tracking(grid, d.grpo(first), d.root / "fig_tracking.png")
    out.append("![tracking](fig_tracking.png)\n")
    return out, []


def _headline(d: Data) -> tuple[list[str], list]:
    out, verdict_runs = ["## 2. Headline: each controller at its best setting, GRPO and the base model\n"], {}
    for toy in d.toys:
        groups = d.groups("headline", toy)
        if not groups:
            continue
        out += [f"### Task `{toy}`\n", "| run | setting | seeds | accuracy | " + " | ".join(f"pass@{k}" for k in KS)
                + " | entropy at end |", "|---|---|---|---|" + "---|" * len(KS) + "---|"]
        series = []
        for name, runs in groups.items():
            group = runs[0]["job"].group
            out.append(f"| {label(group)} | {_setting(runs[0])} | {len(runs)} | {fmt(final_accuracy(r) for r in runs)} | "
                       + " | ".join(fmt(pass_at(r, k) for r in runs) for k in KS)
                       + f" | {fmt(tail_mean(r['rows'], 'entropy') for r in runs if r['rows'])} |")
            series.append(("base" if not runs[0]["rows"] else label(group), runs))
        out.append("")
        out += _acted_like_grpo(d, toy, groups)
        out += _base_vs_grpo(d, toy, groups)
        fig_pass_at_k(series, [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= d.spec.final_eval_samples],
                      d.root / f"fig_pass_at_k_{toy}.png")
        out.append(f"![pass@k on {toy}](fig_pass_at_k_{toy}.png)\n")
        verdict_runs[toy] = (_by_algo(groups, "aepo", "bang_bang"), _by_algo(groups, "adaptive_entropy"))
    if not verdict_runs:
        return [], []
    return out, [verdict_aepo_vs_bonus(verdict_runs)]


def _acted_like_grpo(d: Data, toy: str, groups: dict[str, list[dict]]) -> list[str]:
    """A controlled row whose every seed equals GRPO's run of that seed, step for step: at its
    target the controller never changed the update (a one-sided rule above its target)."""
    grpo = {r["job"].seed: r for r in d.grpo(toy)}
    out = []
    for runs in groups.values():
        cfg = runs[0]["job"].config
        if cfg["algorithm"].get("target") and all(r["job"].seed in grpo and _same(r, grpo[r["job"].seed]) for r in runs):
            out.append(f"- {label(runs[0]['job'].group)} ({_setting(runs[0])}): every seed's entropy series and final "
                       "eval equal GRPO's; the controller never changed the update at this target.")
    return out + ([""] if out else [])


def _base_vs_grpo(d: Data, toy: str, groups: dict[str, list[dict]]) -> list[str]:
    """Whether the base model's pass@64 is above GRPO's: what keeping exploration could win back."""
    base = [r for runs in groups.values() for r in runs if not r["rows"]]
    grpo = d.grpo(toy)
    b, g = fmt(pass_at(r, 64) for r in base), fmt(pass_at(r, 64) for r in grpo)
    if not base or not grpo or pass_at(base[0], 64) is None:
        return []
    gap = pass_at(base[0], 64) - sum(pass_at(r, 64) for r in grpo) / len(grpo)
    return [f"Base model pass@64 {b} vs GRPO {g}: {gap:+.3f} "
            f"({'above GRPO by more than ' if gap > MARGIN_PASS else 'not above GRPO by '}{MARGIN_PASS}).\n"]


def _by_algo(groups: dict[str, list[dict]], algo: str, rule: str | None = None) -> list[dict]:
    for runs in groups.values():
        a = runs[0]["job"].config["algorithm"]
        if a["type"] == algo and (rule is None or a.get("rule", {}).get("type") == rule):
            return runs
    return []


def _setting(run: dict) -> str:
    cfg = run["job"].config
    target = cfg["algorithm"].get("target")
    if not run["rows"]:
        return "no RL"
    if not target:
        return f"{cfg['algorithm']['type']}" + (f", {cfg['learner']['mini_batches']} mini-batches"
                                                 if cfg["learner"]["mini_batches"] > 1 else "")
    return f"{SIGNALS[cfg['controller']['entropy_source']]} at {target['value']:g} × H0"


def _split(d: Data) -> tuple[list[str], list]:
    out = ["## 3. Which entropy each method moved\n",
           "Last 10 steps (seed mean) against step 0: the mean entropy, the reward-irrelevant choice (optional spaces), "
           "the content part (mean − irrelevant) and the forking tokens' mean entropy.\n",
           "| task | run | mean | irrelevant | content | forking |", "|---|---|---|---|---|---|"]
    series = []
    for toy in d.toys:
        groups = d.groups("headline", toy)
        trained = [runs for runs in groups.values() if runs[0]["rows"] and runs[0]["job"].config["trainer"]["steps"] > 0]
        if trained:
            s = split_at_start(trained[0])
            out.append(f"| {toy} | base (step 0) | " + " | ".join(_f(s[k]) for k in ("mean", "irrelevant", "content", "forking")) + " |")
        for runs in trained:
            s = split_at_end(runs)
            out.append(f"| {toy} | {label(runs[0]['job'].group)} | "
                       + " | ".join(_f(s[k]) for k in ("mean", "irrelevant", "content", "forking")) + " |")
            if toy == d.toys[0]:
                series.append((label(runs[0]["job"].group), runs))
    out.append("")
    claim = _moves_content(d)
    if series:
        fig_decomposition(series, d.root / "fig_entropy_split.png")
        out.append("![split](fig_entropy_split.png)\n")
    return out, [claim] if claim else []


def _moves_content(d: Data):
    grid = d.tracking_grid()
    bb = next((v for k, v in grid.items() if "bang-bang" in k), None)
    if bb is None:
        return None
    runs = {r["job"].target: r for r in bb.get("content", [])}
    return verdict_aepo_moves_content(runs.get(0.7), runs.get(1.2), d.grpo(d.toys[0]))


def _offpolicy(d: Data) -> tuple[list[str], list]:
    groups = d.groups("offpolicy")
    if not groups:
        return [], []
    ref = {r["job"].seed: r for r in d.grpo(d.toys[0])}
    mb = next((runs for runs in groups.values() if runs[0]["job"].config["algorithm"]["type"] == "grpo"), [])
    out = ["## 4. Clip-Cov and KL-Cov with several mini-batches per step\n",
           "With one on-policy update per step the ratio is 1, where Clip-Cov's detached tokens and KL-Cov's |log r| "
           "penalty change nothing (the toy_claims report found KL-Cov equal to GRPO). Here each step's batch is "
           "cut into mini-batches, one optimizer step each, so later mini-batches are off-policy.\n",
           "| run | seeds | accuracy | pass@1 | pass@64 | entropy at end | same as GRPO (4 mini-batches) | Δ entropy vs it |",
           "|---|---|---|---|---|---|---|---|"]
    base_end = [tail_mean(r["rows"], "entropy") for r in mb]
    for runs in [[ref[s] for s in sorted(ref)][:1]] + list(groups.values()):
        if not runs:
            continue
        same = all(_same(r, m) for r, m in zip(runs, mb)) if mb and runs is not mb else None
        end = [tail_mean(r["rows"], "entropy") for r in runs]
        delta = (sum(end) / len(end) - sum(base_end) / len(base_end)) if base_end and None not in end + base_end else None
        out.append(f"| {label(runs[0]['job'].group)} ({_setting(runs[0])}) | {len(runs)} | "
                   f"{fmt(final_accuracy(r) for r in runs)} | {fmt(pass_at(r, 1) for r in runs)} | "
                   f"{fmt(pass_at(r, 64) for r in runs)} | {fmt(end)} | {'–' if same is None else 'yes' if same else 'no'} "
                   f"| {'–' if delta is None or runs is mb else f'{delta:+.3f}'} |")
    return out + [""], []


def _same(run: dict, ref: dict) -> bool:
    return [x.get("entropy") for x in run["rows"]] == [x.get("entropy") for x in ref["rows"]] and run["final"] == ref["final"]


def _claims(d: Data, verdicts: list) -> list[str]:
    grid = d.tracking_grid()
    at = {name: {s: next((r for r in runs if r["job"].target == 1.0), None) for s, runs in by.items()}
          for name, by in grid.items()}
    if at:
        verdicts.insert(0, verdict_content_vs_mean(at))
    return ["## 5. Verdicts\n"] + section_claims(verdicts)[1:]


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _step(x: int | None) -> str:
    return "never" if x is None else str(x)
