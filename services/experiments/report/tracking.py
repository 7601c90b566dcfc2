"""The entropy-controller benchmark's numbers: how a run tracked its target on its controlled
signal, the content/forking split of its entropy, and the verdicts computed from them.

Every run of that benchmark controls `controller.entropy_source` (the rows' `entropy_controlled`)
towards a target relative to that signal's own step-0 value H0 (the rows' `entropy_target`, in
nats). Errors are relative to the target, so signals of different sizes (the forking tokens'
entropy is about five times the content entropy) compare on one scale. The words are defined once
in DEFINITIONS, which the report prints verbatim.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from services.experiments.report.runs import mean_spread, pass_at, tail_mean

HELD_REL = 0.10  # tracking error within 10 % of the target: held
SETTLE_REL = 0.05  # the settling band: 5 % of the target
MARGIN_PASS = 0.02  # a pass@k difference smaller than this (about one prompt in 64) is no difference
SIGNALS = {"exact": "mean", "content": "content", "forking": "forking"}

DEFINITIONS = """
* controlled signal H_c: the entropy the controller steers (controller.entropy_source): mean = the exact
  token-mean entropy of the GRPO batch; content = the mean minus the choice of reward-irrelevant tokens
  (the optional spaces); forking = the mean entropy of the batch's top-20 % highest-entropy tokens;
* H0: H_c at step 0 (the base model); targets are multiples of it: 0.7 (below), 1.0 (at), 1.2 (above);
* tracking error: mean |H_c − H*| / H* over the second half of the steps;
* held: tracking error <= HELD_REL;
* overshoot: after the first crossing of the target, the largest excursion beyond it, / H*;
* settling step: the first step from which |H_c − H*| <= SETTLE_REL · H* to the end;
* reachable: the targets a controller held on a signal;
* accuracy: held-out avg@k at T=0.6, k = final_eval_samples; pass@k: unbiased, at T=1;
* mean ± spread: over seeds, spread = half the range.
"""


def controlled_points(run: dict) -> list[tuple[int, float, float]]:
    """(step, H_c, H*) of the rows where both are known (H* is unknown at step 0 of a relative target)."""
    return [(r["step"], r["entropy_controlled"], r["entropy_target"]) for r in run["rows"]
            if r.get("entropy_controlled") is not None and r.get("entropy_target")]


def base_value(run: dict) -> float | None:
    """H0: the controlled signal at step 0."""
    rows = run["rows"]
    return rows[0].get("entropy_controlled") if rows else None


def tracking_error(run: dict) -> float | None:
    """Mean |H_c − H*| / H* over the second half of the steps."""
    pts = controlled_points(run)
    if not pts:
        return None
    half = run["rows"][-1]["step"] / 2
    tail = [abs(h - t) / t for s, h, t in pts if s >= half]
    return statistics.fmean(tail) if tail else None


def overshoot(run: dict) -> float | None:
    """Largest excursion beyond the target after the first crossing, / H* (0 without a crossing)."""
    pts = controlled_points(run)
    if not pts:
        return None
    side = 1.0 if pts[0][1] >= pts[0][2] else -1.0
    crossed = next((i for i, (_, h, t) in enumerate(pts) if (h - t) * side < 0), None)
    if crossed is None:
        return 0.0
    return max(0.0, max(-(h - t) * side / t for _, h, t in pts[crossed:]))


def settling_step(run: dict) -> int | None:
    """First step from which |H_c − H*| <= SETTLE_REL · H* to the end; None if the end is outside."""
    pts = controlled_points(run)
    if not pts or abs(pts[-1][1] - pts[-1][2]) > SETTLE_REL * pts[-1][2]:
        return None
    settle = pts[-1][0]
    for s, h, t in reversed(pts):
        if abs(h - t) > SETTLE_REL * t:
            break
        settle = s
    return settle


def _mean(values) -> float | None:
    return mean_spread(values)[0]


def split_at_end(runs: list[dict]) -> dict[str, float | None]:
    """Seed means of the last 10 steps' entropy and its parts: mean, irrelevant, content, forking."""
    out = {"mean": mean_spread(tail_mean(r["rows"], "entropy") for r in runs)[0]}
    for part in ("irrelevant", "content", "forking"):
        out[part] = mean_spread(tail_mean(r["rows"], "token_entropy", part) for r in runs)[0]
    return out


def split_at_start(runs: list[dict]) -> dict[str, float | None]:
    """The same split at step 0 (the base model), seed mean."""
    rows = [r["rows"][0] for r in runs if r["rows"]]
    out = {"mean": _mean(x.get("entropy") for x in rows)}
    for part in ("irrelevant", "content", "forking"):
        out[part] = _mean((x.get("token_entropy") or {}).get(part) for x in rows)
    return out


# ----------------------------------------------------------------------------- verdicts
Verdict = tuple[str, str, str]


def verdict_content_vs_mean(at_target: dict[str, dict[str, dict | None]]) -> Verdict:
    """`at_target[controller][signal]`: the run holding 1.0 × H0 of that signal (seed 0).

    Holds when, for at least 3 of the 4 controllers, pass@64 controlling content beats pass@64
    controlling the mean by more than MARGIN_PASS; refuted when it is lower by more than that for
    at least 3; otherwise not supported."""
    claim = "Controlling content entropy preserves pass@k better than controlling the mean (target 1.0 × H0)"
    diffs, parts = [], []
    for name, by_signal in at_target.items():
        c, m = by_signal.get("content"), by_signal.get("exact")
        pc, pm = (pass_at(c, 64) if c else None), (pass_at(m, 64) if m else None)
        if pc is None or pm is None:
            continue
        diffs.append(pc - pm)
        parts.append(f"{name}: {pc:.3f} vs {pm:.3f}")
    if len(diffs) < 3:
        return claim, "not measured", "fewer than 3 controllers with both runs"
    better = sum(d > MARGIN_PASS for d in diffs)
    worse = sum(d < -MARGIN_PASS for d in diffs)
    verdict = "holds" if better >= 3 else "refuted" if worse >= 3 else "not supported"
    return claim, verdict, f"pass@64 content vs mean — {'; '.join(parts)} (margin {MARGIN_PASS}; needs 3 of {len(diffs)})"


def verdict_aepo_moves_content(below: dict | None, above: dict | None, grpo: list[dict]) -> Verdict:
    """AEPO's bang-bang rule controlling content at 0.7 and 1.2 × H0: holds when the content
    entropy at the end differs between the two by more than max(0.02 nats, 3 × GRPO's seed spread)."""
    claim = "AEPO's regularizer can move content entropy at all (bang-bang, content signal, 0.7 vs 1.2 × H0)"
    lo = tail_mean(below["rows"], "token_entropy", "content") if below else None
    hi = tail_mean(above["rows"], "token_entropy", "content") if above else None
    g_mean, g_spread, n = mean_spread(tail_mean(r["rows"], "token_entropy", "content") for r in grpo)
    if lo is None or hi is None or g_mean is None:
        return claim, "not measured", "runs missing"
    need = max(0.02, 3 * (g_spread or 0.0))
    verdict = "holds" if hi - lo > need else "refuted"
    return claim, verdict, (f"content at end: {hi:.3f} (target 1.2 × H0) vs {lo:.3f} (0.7 × H0), difference "
                            f"{hi - lo:+.3f} nats against {need:.3f} needed; GRPO {g_mean:.3f} ± {g_spread:.3f} ({n} seeds)")


def verdict_aepo_vs_bonus(toys: dict[str, tuple[list[dict], list[dict]]]) -> Verdict:
    """`toys[name] = (AEPO bang-bang headline runs, adaptive-bonus headline runs)`. On each task, one
    is better when its mean pass@1 exceeds the other's by more than the two spreads together."""
    claim = "AEPO (bang-bang) vs an adaptive entropy bonus (Skywork-OR1) on the same budget: pass@1, 3 seeds"
    calls, parts = [], []
    for toy, (aepo, bonus) in toys.items():
        a, sa, na = mean_spread(pass_at(r, 1) for r in aepo)
        b, sb, nb = mean_spread(pass_at(r, 1) for r in bonus)
        if a is None or b is None:
            continue
        gap = (sa or 0.0) + (sb or 0.0)
        calls.append("AEPO" if a - b > gap else "bonus" if b - a > gap else "tie")
        parts.append(f"{toy}: AEPO {a:.3f} ± {sa:.3f} ({na}) vs bonus {b:.3f} ± {sb:.3f} ({nb}) → {calls[-1]}")
    if not calls:
        return claim, "not measured", "runs missing"
    verdict = ("AEPO better" if set(calls) == {"AEPO"} else "adaptive bonus better" if set(calls) == {"bonus"}
               else "no difference" if set(calls) == {"tie"} else "mixed")
    return claim, verdict, "; ".join(parts)


# ----------------------------------------------------------------------------- figure


def fig_tracking(grid: dict[str, dict[str, list[dict]]], grpo: list[dict], path: Path) -> Path:
    """H_c / H0 per step, one panel per (controller row, signal column), one line per target; the
    targets dashed; GRPO's same signal (its own H0) in grey."""
    from services.experiments.report.figures import _plt, _save

    plt = _plt()
    controllers, signals = list(grid), list(SIGNALS)
    fig, axes = plt.subplots(len(controllers), len(signals), figsize=(4.2 * len(signals), 2.6 * len(controllers)),
                             sharex=True, sharey=True, squeeze=False)
    for i, name in enumerate(controllers):
        for j, source in enumerate(signals):
            ax = axes[i][j]
            for g in grpo[:1]:
                ax.plot(*_relative_series(g, source), color="0.6", lw=1.0, label="GRPO")
            for k, run in enumerate(sorted(grid[name].get(source, []), key=lambda r: r["job"].target)):
                ax.plot(*_relative_series(run, source), color=f"C{k}", lw=1.2, label=f"{run['job'].target:g} × H0")
                ax.axhline(run["job"].target, color=f"C{k}", ls="--", lw=0.8)
            ax.set_title(f"{name} — {SIGNALS[source]}", fontsize=8)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("H_c / H0")
    return _save(plt, fig, path)


def _relative_series(run: dict, source: str) -> tuple[list[int], list[float]]:
    from controller.client import read_source  # a row holds the learners' stats under the same keys

    vals = [(r["step"], read_source(r, source)) for r in run["rows"]]
    vals = [(s, v) for s, v in vals if v is not None]
    if not vals or not vals[0][1]:
        return [], []
    h0 = vals[0][1]
    return [s for s, _ in vals], [v / h0 for _, v in vals]
