"""The experiment report: tables, figures and claim verdicts computed from the runs' own files.

Everything here reads what the runs wrote (metrics.jsonl, eval.jsonl, summary.json); no number
is typed in. Definitions used throughout:

* entropy H: exact token-mean entropy at T=1 over the step's GRPO samples (the controller's input);
* tracking error: mean |H − H*| over the second half of the steps;
* held: tracking error <= HELD_NATS;
* overshoot: after the first crossing of the target, the largest excursion beyond it (nats);
* settling step: the first step from which |H − H*| stays within SETTLE_NATS to the end;
* accuracy: held-out avg@k at the eval temperature (0.6), k = final_eval_samples;
* pass@k: unbiased estimator at T=1 from final_eval_samples samples per held-out prompt;
* mean ± spread: over seeds, spread = half the range (max − min) / 2.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable

HELD_NATS = 0.03
SETTLE_NATS = 0.02
COLLAPSE_DROP = 0.30


# ----------------------------------------------------------------------------- loading


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(job) -> dict | None:
    """The run's rows, evals and summary, or None when it has not finished."""
    d = Path(job.config["trainer"]["output_dir"])
    if not (d / "summary.json").exists():
        return None
    rows, evals = _jsonl(d / "metrics.jsonl"), _jsonl(d / "eval.jsonl")
    final = evals[-1] if evals else {}
    return {"job": job, "dir": d, "rows": rows, "evals": evals, "final": final,
            "summary": json.loads((d / "summary.json").read_text())}


def final_accuracy(run: dict) -> float | None:
    return next((v for k, v in run["final"].items() if k.startswith("eval_avg@")), None)


def pass_at(run: dict, k: int) -> float | None:
    return run["final"].get(f"eval_pass@{k}")


def tracking_error(rows: list[dict], target: float | None = None) -> float | None:
    """Mean |H − H*| over the second half (H* from the rows, or the given constant)."""
    pts = [(r["entropy"], r.get("entropy_target") if target is None else target) for r in rows]
    pts = [(h, t) for h, t in pts if h is not None and t is not None]
    half = pts[len(pts) // 2 :]
    return sum(abs(h - t) for h, t in half) / len(half) if half else None


def overshoot(rows: list[dict], target: float) -> float | None:
    """Largest excursion beyond the target after the first crossing (0 if it never crosses)."""
    hs = [r["entropy"] for r in rows if r.get("entropy") is not None]
    if not hs:
        return None
    side = math.copysign(1.0, hs[0] - target) if hs[0] != target else 1.0
    crossed = next((i for i, h in enumerate(hs) if (h - target) * side < 0), None)
    if crossed is None:
        return 0.0
    return max(0.0, max(-(h - target) * side for h in hs[crossed:]))


def settling_step(rows: list[dict], target: float, band: float = SETTLE_NATS) -> int | None:
    """First step after which |H − H*| <= band for good; None if the last step is outside."""
    hs = [(r["step"], r["entropy"]) for r in rows if r.get("entropy") is not None]
    if not hs or abs(hs[-1][1] - target) > band:
        return None
    settle = hs[-1][0]
    for step, h in reversed(hs):
        if abs(h - target) > band:
            break
        settle = step
    return settle


def tail_mean(rows: list[dict], key: str, sub: str | None = None, n: int = 10) -> float | None:
    vals = []
    for r in rows[-n:]:
        v = r.get(key)
        if sub is not None:
            v = (v or {}).get(sub)
        if v is not None:
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


def head_value(rows: list[dict], key: str, sub: str | None = None) -> float | None:
    if not rows:
        return None
    v = rows[0].get(key)
    return (v or {}).get(sub) if sub is not None else v


def mean_spread(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2, len(vals)


def fmt(values: Iterable[float | None], digits: int = 3) -> str:
    m, s, n = mean_spread(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


# ----------------------------------------------------------------------------- grouping


def by_group(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        out[r["job"].group.name].append(r)
    return out


def label(group) -> str:
    return group.label or group.name


def best_sweep_target(jobs) -> float | None:
    """The sweep target with the best mean final pass@1 (over its seeds); None before the sweep ran."""
    scores: dict[float, list[float]] = defaultdict(list)
    for j in jobs:
        if "sweep" not in j.group.sections or j.target is None:
            continue
        run = load_run(j)
        if run is None:
            return None
        p1 = pass_at(run, 1)
        if p1 is not None:
            scores[j.target].append(p1)
    if not scores:
        return None
    return max(scores, key=lambda t: (statistics.fmean(scores[t]), -t))


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, xlabel: str, ylabel: str, path: Path, legend_size: int = 7) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_curve(runs: list[dict], key: str = "entropy", sub: str | None = None) -> tuple[list[int], list[float]]:
    per_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for r in run["rows"]:
            v = r.get(key)
            if sub is not None:
                v = (v or {}).get(sub)
            if v is not None:
                per_step[r["step"]].append(v)
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def fig_entropy_panels(panels: list[tuple[str, list[tuple[str, list[dict], float | None]]]], grpo: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        if grpo:
            s, h = _mean_curve(grpo)
            ax.plot(s, h, color="0.6", lw=1.5, label="GRPO")
        for i, (name, runs, target) in enumerate(curves):
            color = f"C{i}"
            s, h = _mean_curve(runs)
            ax.plot(s, h, color=color, lw=1.3, label=name)
            if target is not None:
                ax.axhline(target, color=color, ls="--", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("entropy (nats/token, T=1)")
    return _save(plt, fig, path)


def fig_pass_at_k(series: list[tuple[str, list[dict]]], ks: list[int], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, runs) in enumerate(series):
        ys = [statistics.fmean([p for p in (pass_at(r, k) for r in runs) if p is not None] or [float("nan")]) for k in ks]
        ax.plot(ks, ys, marker="o", ms=3, lw=1.2, label=name, color="k" if name == "base" else f"C{i}")
    ax.set_xscale("log", base=2)
    return _finish(plt, fig, ax, "k", "pass@k (T=1, unbiased)", path)


def fig_accuracy(series: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Held-out avg@k at the eval temperature after each eval, seed mean (k grows at the last eval)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, runs) in enumerate(series):
        per_step: dict[int, list[float]] = defaultdict(list)
        for run in runs:
            for e in run["evals"]:
                v = next((v for k, v in e.items() if k.startswith("eval_avg@")), None)
                if v is not None:
                    per_step[e["step"]].append(v)
        steps = sorted(per_step)
        ax.plot(steps, [statistics.fmean(per_step[s]) for s in steps], marker="o", ms=3,
                color="k" if name == "base" else f"C{i}", label=name)
    return _finish(plt, fig, ax, "step", "held-out accuracy avg@k (T=0.6)", path)


def fig_sweep(points: list[tuple[float, list[dict]]], grpo: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [t for t, _ in points]
    for key, name, color in (("acc", "accuracy avg@k (T=0.6)", "C0"), ("p1", "pass@1", "C1"), ("pmax", "pass@max k", "C2")):
        def value(run, key=key):
            if key == "acc":
                return final_accuracy(run)
            if key == "p1":
                return pass_at(run, 1)
            return max((v for k, v in run["final"].items() if k.startswith("eval_pass@")), default=None)
        ys = [mean_spread(value(r) for r in runs)[0] for _, runs in points]
        ax.plot(ts, ys, marker="o", color=color, label=name)
        if grpo:
            ax.axhline(mean_spread(value(r) for r in grpo)[0], color=color, ls=":", lw=1)
    return _finish(plt, fig, ax, "target entropy H* (nats/token)", "held-out score (dotted: GRPO)", path, 8)


def fig_decomposition(series: list[tuple[str, list[dict]]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, runs) in enumerate(series):
        s, irr = _mean_curve(runs, "token_entropy", "irrelevant")
        s2, con = _mean_curve(runs, "token_entropy", "content")
        axes[0].plot(s, irr, color=f"C{i}", ls="--", lw=1.1)
        axes[0].plot(s2, con, color=f"C{i}", lw=1.4, label=name)
        s3, fk = _mean_curve(runs, "token_entropy", "forking")
        axes[1].plot(s3, fk, color=f"C{i}", lw=1.4, label=name)
    axes[0].set_title("content (solid) vs reward-irrelevant space choice (dashed)", fontsize=9)
    axes[1].set_title("mean entropy of the top-20 % (forking) tokens", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("nats per token")
    return _save(plt, fig, path)


def fig_positions(series: list[tuple[str, list[float | None]]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, prof) in enumerate(series):
        xs = [p for p, v in enumerate(prof) if v is not None]
        ax.plot(xs, [prof[p] for p in xs], marker=".", color="k" if name.startswith("base") else f"C{i}", label=name)
    return _finish(plt, fig, ax, "response position (0 = first token)", "mean entropy (nats)", path)


def _mean_profile(runs: list[dict], at: str = "end", n: int = 10) -> list[float | None]:
    profs = []
    for run in runs:
        rows = run["rows"][-n:] if at == "end" else run["rows"][:1]
        for r in rows:
            if r.get("entropy_by_position"):
                profs.append(r["entropy_by_position"])
    if not profs:
        return []
    width = max(len(p) for p in profs)
    out = []
    for i in range(width):
        vals = [p[i] for p in profs if i < len(p) and p[i] is not None]
        out.append(statistics.fmean(vals) if vals else None)
    return out


# ----------------------------------------------------------------------------- the report


def write_report(spec, jobs, root: Path, wall_seconds: float | None = None, spec_path: str | None = None,
                 ran: int = 0) -> Path:
    """report.md and figures under `root`, from whatever runs have finished."""
    root.mkdir(parents=True, exist_ok=True)
    runs = [r for r in (load_run(j) for j in jobs) if r is not None]
    missing = [j.name for j in jobs if load_run(j) is None]
    groups = {g.name: g for g in spec.groups}
    G = by_group(runs)
    in_section = lambda sec: [g for g in spec.groups if sec in g.sections and G.get(g.name)]  # noqa: E731
    ks = [2**i for i in range(int(math.log2(spec.final_eval_samples)) + 1)]
    base_runs = [r for g in in_section("base") for r in G[g.name]]
    grpo_group = next((g for g in spec.groups if g.algorithm.get("type") == "grpo" and "base" not in g.sections
                       and G.get(g.name)), None)
    grpo = G[grpo_group.name] if grpo_group else []
    base_entropy = statistics.fmean([r["rows"][0]["entropy"] for r in runs if r["rows"] and r["rows"][0].get("entropy") is not None] or [float("nan")])
    lines: list[str] = []
    w = lines.append
    cmd = f"aepo experiment {spec_path}" if spec_path else "aepo experiment <spec>"
    w(f"# {spec.name}: the paper's claims at toy scale\n")
    w(f"Regenerate: `{cmd}` (runs what is missing, then rewrites this folder; `--report-only` just rewrites it).")
    walls = [json.loads((r["dir"] / "run_config.json").read_text()).get("wall_seconds", 0.0)
             for r in {str(r["dir"]): r for r in runs}.values() if (r["dir"] / "run_config.json").exists()]
    if walls:
        w(f"Cost of a full regeneration: **≈ {sum(walls) / spec.parallel / 60:.0f} min** on this machine "
          f"(the {len(walls)} runs' own wall times, {sum(walls) / 60:.0f} min, run {spec.parallel} at a time with "
          f"{spec.threads} torch thread(s) each, backend `{spec.backend}`; plus the warm start when not cached).")
    if wall_seconds is not None and ran:
        w(f"This invocation ran {ran} run(s) in {wall_seconds / 60:.1f} min.")
    w(f"Setup: `{spec.base_config}` (Countdown toy, tiny Qwen2, 32 prompts × G=8), {spec.steps} RL steps per run, "
      f"seeds {spec.seeds} where a group has several; final eval on {spec.final_eval_prompts} held-out prompts × "
      f"{spec.final_eval_samples} samples (accuracy = avg@{spec.final_eval_samples} at T=0.6; pass@k at T=1). "
      f"Base-model entropy (step 0): **{base_entropy:.3f}** nats/token.\n")
    if missing:
        w(f"**Missing runs** (not finished, excluded): {', '.join(missing)}\n")
    w("Definitions: " + " ".join(__doc__.split("Definitions used throughout:")[1].split()) + f" (HELD_NATS = {HELD_NATS}, SETTLE_NATS = {SETTLE_NATS}).\n")

    verdicts: list[tuple[str, str, str]] = []

    # --- Table 1
    t1 = in_section("table1")
    if t1 or base_runs:
        w("## 1. Table 1 at toy scale\n")
        cols = [f"pass@{k}" for k in ks if k in (1, 4, 16, 64) or k == ks[-1]]
        cols = list(dict.fromkeys(cols))
        w("| run | seeds | accuracy | " + " | ".join(cols) + " | entropy at end |")
        w("|---|---|---|" + "---|" * len(cols) + "---|")
        rows_t1 = ([("base", base_runs)] if base_runs else []) + [(_t1_label(g, G[g.name]), G[g.name]) for g in t1]
        for name, rs in rows_t1:
            ent = "–" if name == "base" else fmt(tail_mean(r["rows"], "entropy") for r in rs)
            w(f"| {name} | {len(rs)} | {fmt(final_accuracy(r) for r in rs)} | "
              + " | ".join(fmt(pass_at(r, int(c.split('@')[1])) for r in rs) for c in cols) + f" | {ent} |")
        w("")
        for name, rs in rows_t1:
            if name not in ("base", _t1_label(grpo_group, grpo)) and grpo and _same_trajectories(rs, grpo):
                w(f"- {name}: every step's entropy and every eval equal GRPO's for the same seeds. With one "
                  "on-policy update per step (learner.mini_batches 1) the ratio r is exactly 1, where its "
                  "mechanism does nothing (KL-Cov's |log r| penalty has zero gradient at r = 1).")
        w("")
        fig_pass_at_k(rows_t1, ks, root / "fig_pass_at_k.png")
        fig_entropy_panels([("Table 1 runs (seed mean)", [(label(g), G[g.name], None) for g in t1 if g.algorithm.get("type") != "grpo"])],
                           grpo, root / "fig_table1_entropy.png")
        fig_accuracy(rows_t1, root / "fig_accuracy.png")
        w(f"Accuracy is avg@{spec.eval_samples} on {spec.eval_prompts} prompts at intermediate evals (every "
          f"{spec.eval_every} steps) and avg@{spec.final_eval_samples} on {spec.final_eval_prompts} at the end.\n")
        w("![pass@k](fig_pass_at_k.png) ![accuracy](fig_accuracy.png) ![entropy](fig_table1_entropy.png)\n")
        verdicts += _claim_collapse(grpo, base_entropy)
        verdicts += _claim_table1(t1, G, base_runs, ks)

    # --- entropy control
    ctl = in_section("control") + [g for g in in_section("ablation") if g not in in_section("control")]
    if ctl:
        w("## 2. Entropy control\n")
        w("| group | rule | T up / down | target H* | entropy at 10 / 25 / 50 / 75 / end | tracking error | held | overshoot | settling step |")
        w("|---|---|---|---|---|---|---|---|---|")
        for g in ctl:
            for r in sorted(G[g.name], key=lambda r: (r["job"].target or 0, r["job"].seed)):
                w(_control_row(g, r, spec.steps))
        w("")
        panels = defaultdict(list)
        for g in ctl:
            for t, rs in _by_target(G[g.name]).items():
                panels[label(g)].append((f"H*={t:g}" if t is not None else label(g), rs, t))
        fig_entropy_panels(list(panels.items()), grpo, root / "fig_entropy_control.png")
        w("![entropy control](fig_entropy_control.png)\n")
        verdicts += _claim_control(in_section("control"), in_section("ablation"), G)

    # --- target sweep
    sw = in_section("sweep")
    if sw:
        w("## 3. Target sweep\n")
        pts = sorted(((t, rs) for g in sw for t, rs in _by_target(G[g.name]).items() if t is not None), key=lambda p: p[0])
        w("| target H* | seeds | accuracy | pass@1 | pass@" + str(ks[-1]) + " | entropy at end | tracking error |")
        w("|---|---|---|---|---|---|---|")
        for t, rs in pts:
            w(f"| {t:g} | {len(rs)} | {fmt(final_accuracy(r) for r in rs)} | {fmt(pass_at(r, 1) for r in rs)} | "
              f"{fmt(pass_at(r, ks[-1]) for r in rs)} | {fmt(tail_mean(r['rows'], 'entropy') for r in rs)} | "
              f"{fmt(tracking_error(r['rows']) for r in rs)} |")
        if grpo:
            w(f"| GRPO (no target) | {len(grpo)} | {fmt(final_accuracy(r) for r in grpo)} | {fmt(pass_at(r, 1) for r in grpo)} | "
              f"{fmt(pass_at(r, ks[-1]) for r in grpo)} | {fmt(tail_mean(r['rows'], 'entropy') for r in grpo)} | – |")
        w("")
        fig_sweep(pts, grpo, root / "fig_sweep.png")
        w("![sweep](fig_sweep.png)\n")
        verdicts += _claim_sweep(pts, G, t1)

    # --- where the entropy lives
    w("## 4. Where the entropy lives\n")
    w("Per step, the learners split the GRPO batch's exact entropy two ways (metrics.jsonl `token_entropy`, "
      "Prometheus `aepo_token_entropy{kind}`): by the chain rule into the choice the reward ignores (emit an "
      "optional space or not: `irrelevant`) and the rest (`content`), which add up to the mean; and into the "
      "top-20 % highest-entropy (`forking`) tokens vs the others. Values: mean of the last 10 steps (seed mean); "
      "step 0 is the base model.\n")
    w("| run | entropy | irrelevant | content | irrelevant share | forking (top 20 %) mean | non-forking mean | forking share of entropy |")
    w("|---|---|---|---|---|---|---|---|")
    dec_series = []
    trained = [r for r in runs if r["rows"]]
    if trained:
        first = trained[0]["rows"]  # step 0 of any run: the base model (every run starts from it)
        if first:
            w(f"| base (step 0) | {fmt([head_value(first, 'entropy')])} | {fmt([head_value(first, 'token_entropy', 'irrelevant')])} | "
              f"{fmt([head_value(first, 'token_entropy', 'content')])} | {fmt([head_value(first, 'entropy_irrelevant_share')], 2)} | "
              f"{fmt([head_value(first, 'token_entropy', 'forking')])} | {fmt([head_value(first, 'token_entropy', 'nonforking')])} | "
              f"{fmt([head_value(first, 'entropy_forking_share')], 2)} |")
    dec_groups = [g for g in spec.groups if G.get(g.name) and "base" not in g.sections
                  and (g.algorithm.get("type") == "grpo" or "control" in g.sections)]
    for g in dec_groups:
        for t, rs in _by_target(G[g.name]).items():
            name = label(g) + (f" H*={t:g}" if t is not None else "")
            w(f"| {name} | {fmt(tail_mean(r['rows'], 'entropy') for r in rs)} | {fmt(tail_mean(r['rows'], 'token_entropy', 'irrelevant') for r in rs)} | "
              f"{fmt(tail_mean(r['rows'], 'token_entropy', 'content') for r in rs)} | {fmt((tail_mean(r['rows'], 'entropy_irrelevant_share') for r in rs), 2)} | "
              f"{fmt(tail_mean(r['rows'], 'token_entropy', 'forking') for r in rs)} | {fmt(tail_mean(r['rows'], 'token_entropy', 'nonforking') for r in rs)} | "
              f"{fmt((tail_mean(r['rows'], 'entropy_forking_share') for r in rs), 2)} |")
            if g.algorithm.get("type") == "grpo" or (g.algorithm.get("rule", {}).get("type", "bang_bang") == "bang_bang"
                                                      and g.algorithm.get("rule", {}).get("temperature_up", 1.2) == 1.2):
                dec_series.append((name, rs))
    w("")
    if dec_series:
        fig_decomposition(dec_series, root / "fig_entropy_decomposition.png")
        prof = [("base (step 0)", _mean_profile(trained[:1], "start"))] + [(n, _mean_profile(rs)) for n, rs in dec_series]
        fig_positions(prof, root / "fig_entropy_by_position.png")
        w("![decomposition](fig_entropy_decomposition.png) ![by position](fig_entropy_by_position.png)\n")
        verdicts += _claim_decomposition(dec_series, grpo)

    # --- controllers
    cg = in_section("controller")
    if cg:
        w("## 5. Controllers: the paper's bang-bang rule vs a PI law\n")
        w("| controller | target H* | tracking error | overshoot | settling step | held | accuracy | pass@1 |")
        w("|---|---|---|---|---|---|---|---|")
        held_by: dict[str, list[float]] = defaultdict(list)
        for g in cg:
            for t, rs in sorted(_by_target(G[g.name]).items(), key=lambda p: p[0] or 0):
                errs = [tracking_error(r["rows"]) for r in rs]
                held = all(e is not None and e <= HELD_NATS for e in errs)
                if held:
                    held_by[label(g)].append(t)
                st = [settling_step(r["rows"], t) for r in rs]
                w(f"| {label(g)} | {t:g} | {fmt(errs)} | {fmt(overshoot(r['rows'], t) for r in rs)} | "
                  f"{', '.join('never' if s is None else str(s) for s in st)} | {'yes' if held else 'no'} | "
                  f"{fmt(final_accuracy(r) for r in rs)} | {fmt(pass_at(r, 1) for r in rs)} |")
        w("")
        for g in cg:
            ts = held_by.get(label(g), [])
            w(f"- {label(g)}: held {', '.join(f'{t:g}' for t in ts) if ts else 'no target'} "
              f"(reachable range {min(ts):g}–{max(ts):g})" if ts else f"- {label(g)}: held no target")
        w("")
        panels = [(label(g), [(f"H*={t:g}", rs, t) for t, rs in sorted(_by_target(G[g.name]).items(), key=lambda p: p[0] or 0)]) for g in cg]
        fig_entropy_panels(panels, grpo, root / "fig_controllers.png")
        w("![controllers](fig_controllers.png)\n")

    # --- verdicts
    w("## Claims\n")
    w("| claim | verdict | numbers |")
    w("|---|---|---|")
    for claim, verdict, numbers in verdicts:
        w(f"| {claim} | **{verdict}** | {numbers} |")
    w("")
    w("## Runs\n")
    w("| run | group | target | seed | steps | wall s | directory |")
    w("|---|---|---|---|---|---|---|")
    for r in runs:
        j = r["job"]
        cfgp = r["dir"] / "run_config.json"
        wall = json.loads(cfgp.read_text()).get("wall_seconds") if cfgp.exists() else None
        w(f"| {j.name} | {j.group.name} | {'' if j.target is None else f'{j.target:g}'} | {j.seed} | "
          f"{r['summary'].get('steps', 0)} | {wall if wall is not None else ''} | `{r['dir'].relative_to(root) if r['dir'].is_relative_to(root) else r['dir']}` |")
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (root / "verdicts.json").write_text(json.dumps([{"claim": c, "verdict": v, "numbers": n} for c, v, n in verdicts], indent=2) + "\n")
    return path


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


def _by_target(runs: list[dict]) -> dict[float | None, list[dict]]:
    out: dict[float | None, list[dict]] = defaultdict(list)
    for r in runs:
        out[r["job"].target].append(r)
    return dict(out)


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
    err = tracking_error(rows)
    rule, temps = _rule_desc(group)
    held = "yes" if err is not None and err <= HELD_NATS else "no"
    ov = overshoot(rows, t) if t is not None else None
    st = settling_step(rows, t) if t is not None else None
    return (f"| {label(group)} (s{run['job'].seed}) | {rule} | {temps} | {t if t is not None else '–'} | {ent} | "
            f"{'–' if err is None else f'{err:.3f}'} | {held} | {'–' if ov is None else f'{ov:.3f}'} | "
            f"{'never' if st is None else st} |")


# ----------------------------------------------------------------------------- claim verdicts


def _claim_collapse(grpo: list[dict], base_entropy: float) -> list[tuple[str, str, str]]:
    end, _, _ = mean_spread(tail_mean(r["rows"], "entropy") for r in grpo)
    if end is None or not math.isfinite(base_entropy):
        return []
    drop = 1 - end / base_entropy
    verdict = "reproduced" if drop >= COLLAPSE_DROP else "partly" if drop >= 0.1 else "not reproduced"
    return [("1a. GRPO's entropy collapses", verdict,
             f"GRPO entropy {base_entropy:.3f} → {end:.3f} ({-100 * drop:+.0f} %) over the run (collapse: a fall of at least {100 * COLLAPSE_DROP:.0f} %)")]


def _claim_control(ctl_groups, abl_groups, G) -> list[tuple[str, str, str]]:
    out = []
    targets: dict[float, list[str]] = defaultdict(list)
    for g in ctl_groups:
        if g.algorithm.get("type") != "aepo":
            continue
        for t, rs in _by_target(G[g.name]).items():
            errs = [tracking_error(r["rows"]) for r in rs]
            if t is not None and all(e is not None and e <= HELD_NATS for e in errs):
                targets[t].append(f"{label(g)} ({statistics.fmean(errs):.3f})")
    all_t = sorted({t for g in ctl_groups if g.algorithm.get("type") == "aepo" for t in _by_target(G[g.name]) if t is not None})
    held = [t for t in all_t if targets.get(t)]
    verdict = "reproduced" if held and len(held) == len(all_t) else "partly" if held else "not reproduced"
    detail = "; ".join(f"H*={t:g}: " + (", ".join(targets[t]) if targets.get(t) else "not held") for t in all_t)
    out.append(("1b. AEPO holds entropy at an arbitrary target (paper's rule)", verdict, detail))
    for g in abl_groups:
        errs = [(t, tracking_error(r["rows"])) for t, rs in _by_target(G[g.name]).items() for r in rs]
        failed = all(e is not None and e > HELD_NATS for _, e in errs)
        out.append((f"1c. the ablation '{label(g).removeprefix('ablation: ')}' fails to hold entropy", "reproduced" if failed else "not reproduced",
                    ", ".join(f"H*={t:g}: error {e:.3f}" for t, e in errs if e is not None)))
    return out


def _claim_table1(t1_groups, G, base_runs, ks) -> list[tuple[str, str, str]]:
    aepo = next((g for g in t1_groups if g.algorithm.get("type") == "aepo"), None)
    if aepo is None:
        return []
    kmax = ks[-1]
    a_runs = G[aepo.name]
    a1, s1, _ = mean_spread(pass_at(r, 1) for r in a_runs)
    ak, sk, _ = mean_spread(pass_at(r, kmax) for r in a_runs)
    wins, ties, losses, parts = 0, 0, 0, []
    for g in t1_groups:
        if g is aepo or g.algorithm.get("type") not in ("grpo", "entropy_reg", "entropy_adv"):
            continue
        for k, (am, asp) in ((1, (a1, s1)), (kmax, (ak, sk))):
            bm, bs, _ = mean_spread(pass_at(r, k) for r in G[g.name])
            if am is None or bm is None:
                continue
            margin = am - bm
            noise = max(asp or 0, bs or 0)
            if margin > noise:
                wins += 1
            elif margin < -noise:
                losses += 1
            else:
                ties += 1
            parts.append(f"pass@{k} vs {label(g)}: {am:.3f} vs {bm:.3f}")
    out = []
    verdict = "reproduced" if wins and not ties and not losses else "partly" if wins else "not reproduced"
    out.append((f"2a. AEPO (H*={a_runs[0]['job'].target:g}) beats GRPO, Entropy-Reg, Entropy-Adv on pass@1 and pass@{kmax}",
                verdict, f"{wins} wins, {ties} within the seed spread, {losses} losses; " + "; ".join(parts)))
    if base_runs:
        bm = mean_spread(pass_at(r, kmax) for r in base_runs)[0]
        if bm is not None and ak is not None:
            v = "reproduced" if ak - bm > (sk or 0) else "partly" if ak >= bm else "not reproduced"
            out.append((f"2b. AEPO beats the base model at large k (pass@{kmax})", v, f"AEPO {ak:.3f} ± {sk or 0:.3f} vs base {bm:.3f}"))
    return out


def _claim_sweep(pts, G, t1_groups) -> list[tuple[str, str, str]]:
    if len(pts) < 3:
        return []
    means = [(t, mean_spread(pass_at(r, 1) for r in rs)[0], mean_spread(pass_at(r, 1) for r in rs)[1]) for t, rs in pts]
    means = [(t, m, s) for t, m, s in means if m is not None]
    # noise: the largest seed spread of pass@1 among the Table 1 groups (or the sweep's own)
    spreads = [mean_spread(pass_at(r, 1) for r in G[g.name])[1] or 0 for g in t1_groups] + [s or 0 for _, _, s in means]
    noise = max(spreads) if spreads else 0.0
    i = max(range(len(means)), key=lambda j: means[j][1])
    t_best, m_best, _ = means[i]
    interior = 0 < i < len(means) - 1
    left, right = means[0][1], means[-1][1]
    clear = interior and m_best - left > noise and m_best - right > noise
    verdict = "reproduced" if clear else "partly" if interior else "not reproduced"
    return [("3. pass@1 rises then falls as the target grows", verdict,
             ", ".join(f"H*={t:g}: {m:.3f}" for t, m, _ in means) + f" (best {t_best:g}; seed noise ±{noise:.3f})")]


def _claim_decomposition(series, grpo) -> list[tuple[str, str, str]]:
    """Confirmed per AEPO run when its content entropy ends where GRPO's does (within 10 %, or 0.02
    nats) and at least 80 % of its entropy difference from GRPO lies on the reward-irrelevant part."""
    aepo = [(n, rs) for n, rs in series if "H*=" in n]
    if not aepo or not grpo:
        return []
    g_start = mean_spread(head_value(r["rows"], "token_entropy", "content") for r in grpo)[0]
    g_con = mean_spread(tail_mean(r["rows"], "token_entropy", "content") for r in grpo)[0]
    g_irr = mean_spread(tail_mean(r["rows"], "token_entropy", "irrelevant") for r in grpo)[0]
    if None in (g_start, g_con, g_irr):
        return []
    parts, confirms = [], 0
    for n, rs in aepo:
        share = mean_spread(tail_mean(r["rows"], "entropy_irrelevant_share") for r in rs)[0]
        con = mean_spread(tail_mean(r["rows"], "token_entropy", "content") for r in rs)[0]
        irr = mean_spread(tail_mean(r["rows"], "token_entropy", "irrelevant") for r in rs)[0]
        if None in (share, con, irr):
            continue
        d_irr, d_con = irr - g_irr, con - g_con
        same_content = abs(d_con) <= max(0.02, 0.1 * g_con)
        on_irrelevant = abs(d_irr) >= 0.8 * abs(d_irr + d_con)
        confirms += same_content and on_irrelevant
        parts.append(f"{n}: content {con:.3f} (GRPO {g_con:.3f}), vs GRPO irrelevant {d_irr:+.3f} / content "
                     f"{d_con:+.3f}, {100 * share:.0f} % of its entropy irrelevant")
    verdict = "confirmed" if parts and confirms == len(parts) else "partly" if confirms else "refuted"
    return [("4. (prototype) AEPO moves entropy only on reward-irrelevant choices; content entropy collapses as "
             "under GRPO", verdict, f"content from {g_start:.3f} at step 0; " + "; ".join(parts))]
