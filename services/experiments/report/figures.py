"""The report's figures: each fig_* draws one PNG from runs (seed means) and returns its path.

matplotlib is imported inside the functions (Agg backend), so loading the runs or computing the
verdicts never needs it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from services.experiments.report.runs import final_accuracy, mean_spread, pass_at

# (name, runs, target or None): one line in an entropy panel
Curve = tuple[str, list[dict], float | None]


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


def fig_entropy_panels(panels: list[tuple[str, list[Curve]]], grpo: list[dict], path: Path) -> Path:
    """Entropy per step, one panel per (title, curves), each target dashed and GRPO in grey."""
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
    """Final pass@k against k (log scale), one line per (name, runs); the base model in black."""
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


def _sweep_score(run: dict, key: str) -> float | None:
    if key == "acc":
        return final_accuracy(run)
    if key == "p1":
        return pass_at(run, 1)
    return max((v for k, v in run["final"].items() if k.startswith("eval_pass@")), default=None)


def fig_sweep(points: list[tuple[float, list[dict]]], grpo: list[dict], path: Path) -> Path:
    """Accuracy, pass@1 and pass@(largest k) against the target (seed means); GRPO's dotted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [t for t, _ in points]
    for key, name, color in (("acc", "accuracy avg@k (T=0.6)", "C0"), ("p1", "pass@1", "C1"), ("pmax", "pass@max k", "C2")):
        ys = [mean_spread(_sweep_score(r, key) for r in runs)[0] for _, runs in points]
        ax.plot(ts, ys, marker="o", color=color, label=name)
        if grpo:
            ax.axhline(mean_spread(_sweep_score(r, key) for r in grpo)[0], color=color, ls=":", lw=1)
    return _finish(plt, fig, ax, "target entropy H* (nats/token)", "held-out score (dotted: GRPO)", path, 8)


def fig_decomposition(series: list[tuple[str, list[dict]]], path: Path) -> Path:
    """Left: content vs reward-irrelevant entropy per step; right: the forking tokens' entropy."""
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
    """Mean entropy by response position, one line per (name, profile from mean_profile)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, prof) in enumerate(series):
        xs = [p for p, v in enumerate(prof) if v is not None]
        ax.plot(xs, [prof[p] for p in xs], marker=".", color="k" if name.startswith("base") else f"C{i}", label=name)
    return _finish(plt, fig, ax, "response position (0 = first token)", "mean entropy (nats)", path)


def mean_profile(runs: list[dict], at: str = "end", n: int = 10) -> list[float | None]:
    """Entropy by response position, averaged over the runs' last n rows (at="end") or their
    first row (at="start"); None at a position no row reached."""
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
