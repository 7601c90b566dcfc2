"""A run's files and the numbers the report computes from them, per run and over seeds.

A run is the dict `load_run` returns: its job, its directory, the step rows (metrics.jsonl), the
evals (eval.jsonl), the last eval and summary.json. The words the report uses for these numbers
are defined once, in DEFINITIONS, which the report prints verbatim.
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

# Printed in the report's header (whitespace collapsed), so the report and this code share one text.
DEFINITIONS = """
* entropy H: exact token-mean entropy at T=1 over the step's GRPO samples (the controller's input);
* tracking error: mean |H − H*| over the second half of the steps;
* held: tracking error <= HELD_NATS;
* overshoot: after the first crossing of the target, the largest excursion beyond it (nats);
* settling step: the first step from which |H − H*| stays within SETTLE_NATS to the end;
* accuracy: held-out avg@k at the eval temperature (0.6), k = final_eval_samples;
* pass@k: unbiased estimator at T=1 from final_eval_samples samples per held-out prompt;
* mean ± spread: over seeds, spread = half the range (max − min) / 2.
"""


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


# ----------------------------------------------------------------------------- per-run numbers


def final_accuracy(run: dict) -> float | None:
    """Held-out avg@k of the run's last eval (None without one)."""
    return next((v for k, v in run["final"].items() if k.startswith("eval_avg@")), None)


def pass_at(run: dict, k: int) -> float | None:
    """pass@k of the run's last eval (None when it was not measured at that k)."""
    return run["final"].get(f"eval_pass@{k}")


def is_held(error: float | None) -> bool:
    """Whether a tracking error counts as holding the target (within HELD_NATS)."""
    return error is not None and error <= HELD_NATS


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
    """Mean of row[key] (or row[key][sub]) over the last n rows that have it."""
    vals = []
    for r in rows[-n:]:
        v = r.get(key)
        if sub is not None:
            v = (v or {}).get(sub)
        if v is not None:
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


def head_value(rows: list[dict], key: str, sub: str | None = None) -> float | None:
    """row[key] (or row[key][sub]) of the first row: step 0, the base model."""
    if not rows:
        return None
    v = rows[0].get(key)
    return (v or {}).get(sub) if sub is not None else v


# ----------------------------------------------------------------------------- over seeds


def mean_spread(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, half the range, count) of the values that are not None; (None, None, 0) if none are."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2, len(vals)


def fmt(values: Iterable[float | None], digits: int = 3) -> str:
    """A table cell: "mean ± spread", just the mean for one value, "–" for none."""
    m, s, n = mean_spread(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


# ----------------------------------------------------------------------------- grouping


def by_group(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs by their group's name."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        out[r["job"].group.name].append(r)
    return out


def by_target(runs: list[dict]) -> dict[float | None, list[dict]]:
    """The runs by their target entropy (None for runs without one), in the order first seen."""
    out: dict[float | None, list[dict]] = defaultdict(list)
    for r in runs:
        out[r["job"].target].append(r)
    return dict(out)


def label(group) -> str:
    """The group's name in the report: its label, else its name."""
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


def best_of_runs(spec, jobs) -> dict[str, tuple[str, float]]:
    """For each `best_of` group: (source group, target) of the best finished run among its
    `best_of` groups by mean final pass@1 over seeds (ties: the earlier group, the lower target).
    A group is left out until every run it chooses from has finished."""
    out: dict[str, tuple[str, float]] = {}
    order = {g.name: i for i, g in enumerate(spec.groups)}
    for g in spec.groups:
        if not g.best_of:
            continue
        scores: dict[tuple[str, float], list[float]] = defaultdict(list)
        candidates = [j for j in jobs if j.group.name in g.best_of and j.target is not None]
        runs = [(j, load_run(j)) for j in candidates]
        if not runs or any(run is None for _, run in runs):
            continue
        for j, run in runs:
            p1 = pass_at(run, 1)
            if p1 is not None:
                scores[(j.group.name, j.target)].append(p1)
        if scores:
            out[g.name] = max(scores, key=lambda k: (statistics.fmean(scores[k]), -order[k[0]], -k[1]))
    return out
