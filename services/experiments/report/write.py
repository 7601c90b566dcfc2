"""write_report: report.md, verdicts.json and the figures under the experiment's folder.

The report is a sequence of sections; each section_* function reads the ReportData, draws its
figures into the folder and returns its markdown lines and the verdicts it decided. A section
whose groups have no finished run returns nothing, so a partial experiment still gets a report.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.experiments.report.claims import (
    Verdict, claim_collapse, claim_control, claim_decomposition, claim_sweep, claim_table1,
)
from services.experiments.report.figures import (
    fig_accuracy, fig_decomposition, fig_entropy_panels, fig_pass_at_k, fig_positions, fig_sweep, mean_profile,
)
from services.experiments.report.runs import (
    DEFINITIONS, HELD_NATS, SETTLE_NATS, by_group, by_target, final_accuracy, fmt, head_value, is_held, label,
    load_run, overshoot, pass_at, settling_step, tail_mean,
)
from services.loop.outputs import tracking_error


@dataclass
class Section:
    """A section's markdown lines (joined with newlines) and the claim verdicts it decided."""

    lines: list[str]
    verdicts: list[Verdict] = field(default_factory=list)


@dataclass
class ReportData:
    """What the sections read: the spec, the finished runs by group, and the references (base
    model, GRPO) several sections compare against."""

    spec: Any
    root: Path
    runs: list[dict]
    missing: list[str]  # names of the jobs without a finished run
    G: dict[str, list[dict]]  # finished runs by group name
    ks: list[int]  # the k of pass@k: powers of 2 up to final_eval_samples
    grpo_group: Any  # the GRPO baseline: the first GRPO group outside the base section with runs
    base_entropy: float  # step-0 entropy (the base model: every run starts from it); NaN if none

    @classmethod
    def load(cls, spec, jobs, root: Path) -> ReportData:
        """The finished runs among `jobs`; the others are listed as missing."""
        loaded = [(j, load_run(j)) for j in jobs]
        runs = [r for _, r in loaded if r is not None]
        G = by_group(runs)
        ks = [2**i for i in range(int(math.log2(spec.final_eval_samples)) + 1)]
        grpo_group = next((g for g in spec.groups if g.algorithm.get("type") == "grpo" and "base" not in g.sections
                           and G.get(g.name)), None)
        base_entropy = statistics.fmean([r["rows"][0]["entropy"] for r in runs
                                         if r["rows"] and r["rows"][0].get("entropy") is not None] or [float("nan")])
        return cls(spec, root, runs, [j.name for j, r in loaded if r is None], G, ks, grpo_group, base_entropy)

    def in_section(self, sec: str) -> list:
        """The spec's groups tagged with report section `sec` that have finished runs."""
        return [g for g in self.spec.groups if sec in g.sections and self.G.get(g.name)]

    @property
    def base_runs(self) -> list[dict]:
        """The runs of the base-model groups (0 RL steps)."""
        return [r for g in self.in_section("base") for r in self.G[g.name]]

    @property
    def grpo(self) -> list[dict]:
        """The GRPO baseline's runs ([] without one)."""
        return self.G[self.grpo_group.name] if self.grpo_group else []


def write_report(spec, jobs, root: Path, wall_seconds: float | None = None, spec_path: str | None = None,
                 ran: int = 0) -> Path:
    """report.md and figures under `root`, from whatever runs have finished."""
    root.mkdir(parents=True, exist_ok=True)
    d = ReportData.load(spec, jobs, root)
    body = [section_table1(d), section_control(d), section_sweep(d), section_decomposition(d), section_controllers(d)]
    verdicts = [v for s in body for v in s.verdicts]
    lines = section_header(d, wall_seconds, spec_path, ran) + [line for s in body for line in s.lines]
    lines += section_claims(verdicts) + section_runs(d)
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (root / "verdicts.json").write_text(json.dumps([{"claim": c, "verdict": v, "numbers": n} for c, v, n in verdicts], indent=2) + "\n")
    return path


def _run_config(run: dict) -> dict | None:
    p = run["dir"] / "run_config.json"
    return json.loads(p.read_text()) if p.exists() else None


def section_header(d: ReportData, wall_seconds: float | None, spec_path: str | None, ran: int) -> list[str]:
    """Title, how to regenerate and what it costs, the setup, missing runs and the definitions."""
    spec = d.spec
    lines: list[str] = []
    w = lines.append
    cmd = f"aepo experiment {spec_path}" if spec_path else "aepo experiment <spec>"
    w(f"# {spec.name}: the paper's claims at toy scale\n")
    w(f"Regenerate: `{cmd}` (runs what is missing, then rewrites this folder; `--report-only` just rewrites it).")
    # one wall time per run directory: groups sharing a run share its cost
    configs = [_run_config(r) for r in {str(r["dir"]): r for r in d.runs}.values()]
    walls = [c.get("wall_seconds", 0.0) for c in configs if c is not None]
    if walls:
        w(f"Cost of a full regeneration: **≈ {sum(walls) / spec.parallel / 60:.0f} min** on this machine "
          f"(the {len(walls)} runs' own wall times, {sum(walls) / 60:.0f} min, run {spec.parallel} at a time with "
          f"{spec.threads} torch thread(s) each, backend `{spec.backend}`; plus the warm start when not cached).")
    if wall_seconds is not None and ran:
        w(f"This invocation ran {ran} run(s) in {wall_seconds / 60:.1f} min.")
    w(f"Setup: `{spec.base_config}` (Countdown toy, tiny Qwen2, 32 prompts × G=8), {spec.steps} RL steps per run, "
      f"seeds {spec.seeds} where a group has several; final eval on {spec.final_eval_prompts} held-out prompts × "
      f"{spec.final_eval_samples} samples (accuracy = avg@{spec.final_eval_samples} at T=0.6; pass@k at T=1). "
      f"Base-model entropy (step 0): **{d.base_entropy:.3f}** nats/token.\n")
    if d.missing:
        w(f"**Missing runs** (not finished, excluded): {', '.join(d.missing)}\n")
    w("Definitions: " + " ".join(DEFINITIONS.split()) + f" (HELD_NATS = {HELD_NATS}, SETTLE_NATS = {SETTLE_NATS}).\n")
    return lines


def _same_trajectories(runs: list[dict], ref: list[dict]) -> bool:
    """Whether each run's entropy series and final eval equal the reference run of its seed."""
    by_seed = {r["job"].seed: r for r in ref}
    if not runs or any(r["job"].seed not in by_seed for r in runs):
        return False
    return all([x.get("entropy") for x in r["rows"]] == [x.get("entropy") for x in by_seed[r["job"].seed]["rows"]]
               and r["final"] == by_seed[r["job"].seed]["final"] for r in runs)


def _t1_label(group, runs: list[dict]) -> str:
    targets = sorted({r["job"].target for r in runs if r["job"].target is not None})
    return label(group) + (f" H*={targets[0]:g}" if len(targets) == 1 else "")


def section_table1(d: ReportData) -> Section:
    """1. Table 1: accuracy and pass@k per method (and the base model); verdicts 1a, 2a, 2b."""
    t1, base_runs, grpo, ks, spec = d.in_section("table1"), d.base_runs, d.grpo, d.ks, d.spec
    if not (t1 or base_runs):
        return Section([])
    lines: list[str] = []
    w = lines.append
    w("## 1. Table 1 at toy scale\n")
    cols = [f"pass@{k}" for k in ks if k in (1, 4, 16, 64) or k == ks[-1]]
    cols = list(dict.fromkeys(cols))
    w("| run | seeds | accuracy | " + " | ".join(cols) + " | entropy at end |")
    w("|---|---|---|" + "---|" * len(cols) + "---|")
    rows_t1 = ([("base", base_runs)] if base_runs else []) + [(_t1_label(g, d.G[g.name]), d.G[g.name]) for g in t1]
    for name, rs in rows_t1:
        ent = "–" if name == "base" else fmt(tail_mean(r["rows"], "entropy") for r in rs)
        w(f"| {name} | {len(rs)} | {fmt(final_accuracy(r) for r in rs)} | "
          + " | ".join(fmt(pass_at(r, int(c.split('@')[1])) for r in rs) for c in cols) + f" | {ent} |")
    w("")
    for name, rs in rows_t1:
        if name not in ("base", _t1_label(d.grpo_group, grpo)) and grpo and _same_trajectories(rs, grpo):
            w(f"- {name}: every step's entropy and every eval equal GRPO's for the same seeds. With one "
              "on-policy update per step (learner.mini_batches 1) the ratio r is exactly 1, where its "
              "mechanism does nothing (KL-Cov's |log r| penalty has zero gradient at r = 1).")
    w("")
    fig_pass_at_k(rows_t1, ks, d.root / "fig_pass_at_k.png")
    fig_entropy_panels([("Table 1 runs (seed mean)", [(label(g), d.G[g.name], None) for g in t1 if g.algorithm.get("type") != "grpo"])],
                       grpo, d.root / "fig_table1_entropy.png")
    fig_accuracy(rows_t1, d.root / "fig_accuracy.png")
    w(f"Accuracy is avg@{spec.eval_samples} on {spec.eval_prompts} prompts at intermediate evals (every "
      f"{spec.eval_every} steps) and avg@{spec.final_eval_samples} on {spec.final_eval_prompts} at the end.\n")
    w("![pass@k](fig_pass_at_k.png) ![accuracy](fig_accuracy.png) ![entropy](fig_table1_entropy.png)\n")
    return Section(lines, claim_collapse(grpo, d.base_entropy) + claim_table1(t1, d.G, base_runs, ks))


def _rule_desc(group) -> tuple[str, str]:
    a = group.algorithm
    rule = a.get("rule", {}) or {}
    kind = rule.get("type", "bang_bang")
    if a.get("type") == "aepo_t1":
        return "bang-bang (T ≡ 1 ablation)", "1 / 1"
    tu, td = rule.get("temperature_up", 1.2), rule.get("temperature_down", 0.8)
    name = {"bang_bang": "bang-bang", "pi": "PI"}.get(kind, kind)
    if a.get("type") == "aepo_signed":
        name += " (signed-advantage ablation)"
    return name, f"{tu:g} / {td:g}"


def _control_row(group, run: dict, steps: int) -> str:
    rows = run["rows"]
    t = run["job"].target
    by = {r["step"]: r.get("entropy") for r in rows}
    pts = [10, 25, 50, 75, steps - 1]
    ent = " / ".join(f"{by[s]:.3f}" if by.get(s) is not None else "–" for s in pts)
    err = tracking_error(rows, second_half=True)
    rule, temps = _rule_desc(group)
    held = "yes" if is_held(err) else "no"
    ov = overshoot(rows, t) if t is not None else None
    st = settling_step(rows, t) if t is not None else None
    return (f"| {label(group)} (s{run['job'].seed}) | {rule} | {temps} | {t if t is not None else '–'} | {ent} | "
            f"{'–' if err is None else f'{err:.3f}'} | {held} | {'–' if ov is None else f'{ov:.3f}'} | "
            f"{'never' if st is None else st} |")


def section_control(d: ReportData) -> Section:
    """2. Entropy control: one row per control/ablation run; verdicts 1b, 1c."""
    control, ablation = d.in_section("control"), d.in_section("ablation")
    ctl = control + [g for g in ablation if g not in control]
    if not ctl:
        return Section([])
    lines = ["## 2. Entropy control\n",
             "| group | rule | T up / down | target H* | entropy at 10 / 25 / 50 / 75 / end | tracking error | held | overshoot | settling step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in ctl:
        for r in sorted(d.G[g.name], key=lambda r: (r["job"].target or 0, r["job"].seed)):
            lines.append(_control_row(g, r, d.spec.steps))
    lines.append("")
    panels = defaultdict(list)
    for g in ctl:
        for t, rs in by_target(d.G[g.name]).items():
            panels[label(g)].append((f"H*={t:g}" if t is not None else label(g), rs, t))
    fig_entropy_panels(list(panels.items()), d.grpo, d.root / "fig_entropy_control.png")
    lines.append("![entropy control](fig_entropy_control.png)\n")
    return Section(lines, claim_control(control, ablation, d.G))


def section_sweep(d: ReportData) -> Section:
    """3. Target sweep: scores per target, GRPO for reference; verdict 3."""
    sw, grpo, kmax = d.in_section("sweep"), d.grpo, d.ks[-1]
    if not sw:
        return Section([])
    lines: list[str] = []
    w = lines.append
    w("## 3. Target sweep\n")
    pts = sorted(((t, rs) for g in sw for t, rs in by_target(d.G[g.name]).items() if t is not None), key=lambda p: p[0])
    w("| target H* | seeds | accuracy | pass@1 | pass@" + str(kmax) + " | entropy at end | tracking error |")
    w("|---|---|---|---|---|---|---|")
    for t, rs in pts:
        w(f"| {t:g} | {len(rs)} | {fmt(final_accuracy(r) for r in rs)} | {fmt(pass_at(r, 1) for r in rs)} | "
          f"{fmt(pass_at(r, kmax) for r in rs)} | {fmt(tail_mean(r['rows'], 'entropy') for r in rs)} | "
          f"{fmt(tracking_error(r['rows'], second_half=True) for r in rs)} |")
    if grpo:
        w(f"| GRPO (no target) | {len(grpo)} | {fmt(final_accuracy(r) for r in grpo)} | {fmt(pass_at(r, 1) for r in grpo)} | "
          f"{fmt(pass_at(r, kmax) for r in grpo)} | {fmt(tail_mean(r['rows'], 'entropy') for r in grpo)} | – |")
    w("")
    fig_sweep(pts, grpo, d.root / "fig_sweep.png")
    w("![sweep](fig_sweep.png)\n")
    return Section(lines, claim_sweep(pts, d.G, d.in_section("table1")))


def _split_row(name: str, value) -> str:
    """One row of the entropy-split table; value(key, sub) gives a cell's list of numbers."""
    return (f"| {name} | {fmt(value('entropy'))} | {fmt(value('token_entropy', 'irrelevant'))} | "
            f"{fmt(value('token_entropy', 'content'))} | {fmt(value('entropy_irrelevant_share'), 2)} | "
            f"{fmt(value('token_entropy', 'forking'))} | {fmt(value('token_entropy', 'nonforking'))} | "
            f"{fmt(value('entropy_forking_share'), 2)} |")


def _plotted_in_decomposition(group) -> bool:
    """Whether the group is drawn in the decomposition figures, not only tabled: GRPO and the
    bang-bang groups at the default temperature_up 1.2 (not the PI law or other temperatures)."""
    rule = group.algorithm.get("rule", {})
    return group.algorithm.get("type") == "grpo" or (rule.get("type", "bang_bang") == "bang_bang"
                                                    and rule.get("temperature_up", 1.2) == 1.2)


def section_decomposition(d: ReportData) -> Section:
    """4. Where the entropy lives: the reward-irrelevant / content and forking splits; verdict 4."""
    lines = [
        "## 4. Where the entropy lives\n",
        "Per step, the learners split the GRPO batch's exact entropy two ways (metrics.jsonl `token_entropy`, "
        "Prometheus `aepo_token_entropy{kind}`): by the chain rule into the choice the reward ignores (emit an "
        "optional space or not: `irrelevant`) and the rest (`content`), which add up to the mean; and into the "
        "top-20 % highest-entropy (`forking`) tokens vs the others. Values: mean of the last 10 steps (seed mean); "
        "step 0 is the base model.\n",
        "| run | entropy | irrelevant | content | irrelevant share | forking (top 20 %) mean | non-forking mean | forking share of entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    series = []
    trained = [r for r in d.runs if r["rows"]]
    if trained:
        first = trained[0]["rows"]  # step 0 of any run: the base model (every run starts from it)
        lines.append(_split_row("base (step 0)", lambda key, sub=None: [head_value(first, key, sub)]))
    groups = [g for g in d.spec.groups if d.G.get(g.name) and "base" not in g.sections
              and (g.algorithm.get("type") == "grpo" or "control" in g.sections)]
    for g in groups:
        for t, rs in by_target(d.G[g.name]).items():
            name = label(g) + (f" H*={t:g}" if t is not None else "")
            lines.append(_split_row(name, lambda key, sub=None, rs=rs: (tail_mean(r["rows"], key, sub) for r in rs)))
            if _plotted_in_decomposition(g):
                series.append((name, rs))
    lines.append("")
    if not series:
        return Section(lines)
    fig_decomposition(series, d.root / "fig_entropy_decomposition.png")
    prof = [("base (step 0)", mean_profile(trained[:1], "start"))] + [(n, mean_profile(rs)) for n, rs in series]
    fig_positions(prof, d.root / "fig_entropy_by_position.png")
    lines.append("![decomposition](fig_entropy_decomposition.png) ![by position](fig_entropy_by_position.png)\n")
    return Section(lines, claim_decomposition(series, d.grpo))


def section_controllers(d: ReportData) -> Section:
    """5. Controllers: tracking quality per controller and target, and the range each held."""
    cg = d.in_section("controller")
    if not cg:
        return Section([])
    lines = ["## 5. Controllers: the paper's bang-bang rule vs a PI law\n",
             "| controller | target H* | tracking error | overshoot | settling step | held | accuracy | pass@1 |",
             "|---|---|---|---|---|---|---|---|"]
    held_by: dict[str, list[float]] = defaultdict(list)
    for g in cg:
        for t, rs in sorted(by_target(d.G[g.name]).items(), key=lambda p: p[0] or 0):
            errs = [tracking_error(r["rows"], second_half=True) for r in rs]
            held = all(is_held(e) for e in errs)
            if held:
                held_by[label(g)].append(t)
            st = [settling_step(r["rows"], t) for r in rs]
            lines.append(f"| {label(g)} | {t:g} | {fmt(errs)} | {fmt(overshoot(r['rows'], t) for r in rs)} | "
                         f"{', '.join('never' if s is None else str(s) for s in st)} | {'yes' if held else 'no'} | "
                         f"{fmt(final_accuracy(r) for r in rs)} | {fmt(pass_at(r, 1) for r in rs)} |")
    lines.append("")
    for g in cg:
        ts = held_by.get(label(g), [])
        lines.append(f"- {label(g)}: held {', '.join(f'{t:g}' for t in ts)} (reachable range {min(ts):g}–{max(ts):g})"
                     if ts else f"- {label(g)}: held no target")
    lines.append("")
    panels = [(label(g), [(f"H*={t:g}", rs, t) for t, rs in sorted(by_target(d.G[g.name]).items(), key=lambda p: p[0] or 0)])
              for g in cg]
    fig_entropy_panels(panels, d.grpo, d.root / "fig_controllers.png")
    lines.append("![controllers](fig_controllers.png)\n")
    return Section(lines)


def section_claims(verdicts: list[Verdict]) -> list[str]:
    """The Claims table: every verdict the sections decided, in order."""
    lines = ["## Claims\n", "| claim | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {claim} | **{verdict}** | {numbers} |" for claim, verdict, numbers in verdicts]
    return lines + [""]


def section_runs(d: ReportData) -> list[str]:
    """The Runs table: every finished run with its wall time and directory (relative to the report)."""
    lines = ["## Runs\n", "| run | group | target | seed | steps | wall s | directory |", "|---|---|---|---|---|---|---|"]
    for r in d.runs:
        j = r["job"]
        cfg = _run_config(r)
        wall = cfg.get("wall_seconds") if cfg is not None else None
        where = r["dir"].relative_to(d.root) if r["dir"].is_relative_to(d.root) else r["dir"]
        lines.append(f"| {j.name} | {j.group.name} | {'' if j.target is None else f'{j.target:g}'} | {j.seed} | "
                     f"{r['summary'].get('steps', 0)} | {wall if wall is not None else ''} | `{where}` |")
    return lines
