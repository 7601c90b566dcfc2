"""Wall time and split of the README's first command (the embedded default job), and its science.

    .venv/bin/python scripts/bench_default_job.py                  # run it (warm start cached if present)
    .venv/bin/python scripts/bench_default_job.py --fresh          # with an empty model cache: warm start included
    .venv/bin/python scripts/bench_default_job.py --from runs/bench # only summarise an earlier run's files

Runs `aepo train --config deploy/configs/cpu_default.yaml --compare grpo` as a child process and
prints: the wall time and where it went (warm start, then per run the summed phases: rollout,
reward, learner, weight sync, controller, eval, checkpoint, and the rest = start-up and driver);
the AEPO and GRPO entropy every 10 steps; held-out accuracy before and after; the step overhead
(step wall time excluding eval/checkpoint, divided by rollout + learner compute), mean and median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "reward", "controller", "learner", "weight_sync_total", "eval", "checkpoint")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="deploy/configs/cpu_default.yaml")
    p.add_argument("--output-dir", default="runs/bench-default")
    p.add_argument("--fresh", action="store_true", help="empty model cache (a temporary AEPO_CACHE): times the warm start")
    p.add_argument("--compare-mode", default="parallel", choices=["parallel", "sequential"])
    p.add_argument("--from", dest="from_dir", help="summarise this output dir instead of running")
    return p.parse_args()


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args) -> tuple[Path, float]:
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    cache = None
    if args.fresh:
        cache = tempfile.mkdtemp(prefix="aepo-bench-cache-")
        env["AEPO_CACHE"] = cache
    cmd = [sys.executable, "-m", "services.cli", "train", "--config", args.config, "--compare", "grpo",
           "--compare-mode", args.compare_mode, "--output-dir", args.output_dir, "--no-progress"]
    print("$", " ".join(cmd), f"(AEPO_CACHE={cache})" if cache else "", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"the job failed (exit {proc.returncode})")
    return ROOT / args.output_dir, wall


def summarise(out: Path, wall: float | None) -> None:
    summary = json.loads((out / "summary.json").read_text())
    runs = {"aepo": rows_of(out / "metrics.jsonl"), "grpo": rows_of(out / "compare-grpo" / "metrics.jsonl")}
    evals = {"aepo": rows_of(out / "eval.jsonl"), "grpo": rows_of(out / "compare-grpo" / "eval.jsonl")}
    warm = (summary.get("warm_start") or {}).get("wall_seconds_this_run", 0.0)
    total = wall if wall is not None else summary.get("wall_seconds")
    print(f"\nwall time: {total:.1f} s ({total / 60:.2f} min); warm start this run: {warm:.1f} s")
    for name, rows in runs.items():
        sums = {p: sum(r["time"].get(p, 0.0) for r in rows) for p in PHASES}
        steps_wall = sum(r["step_seconds"] for r in rows)
        split = ", ".join(f"{p.replace('_total', '')} {v:.1f}" for p, v in sums.items())
        print(f"{name}: {len(rows)} steps, {steps_wall:.1f} s in steps ({steps_wall / len(rows):.2f} s/step): {split}; "
              f"other (driver) {steps_wall - sum(sums.values()):.1f}")
        over = [r["step_overhead"] for r in rows if r.get("step_overhead") is not None]
        print(f"  step overhead: mean {statistics.fmean(over):.3f}, median {statistics.median(over):.3f}")
    print("\nentropy every 10 steps (AEPO target from metrics):")
    print(f"{'step':>5} {'AEPO':>8} {'GRPO':>8} {'H*':>6}")
    by = {k: {r['step']: r for r in v} for k, v in runs.items()}
    for s in sorted(k for k in by["aepo"] if k % 10 == 0 or k == max(by["aepo"])):
        a, g = by["aepo"].get(s, {}), by["grpo"].get(s, {})
        print(f"{s:>5} {a.get('entropy', float('nan')):>8.3f} {g.get('entropy', float('nan')):>8.3f} "
              f"{a.get('entropy_target') or float('nan'):>6.2f}")
    err = summary.get("mean_abs_entropy_error_second_half")
    print(f"AEPO mean |H - H*| over the second half: {err:.4f}" if err is not None else "")
    for name, ev in evals.items():
        first, last = ev[0], ev[-1]
        keys = [k for k in last if k.startswith("eval_")]
        print(f"{name} held-out: " + ", ".join(f"{k[5:]} {first.get(k, float('nan')):.3f} -> {last[k]:.3f}" for k in keys))


def main() -> None:
    args = parse_args()
    if args.from_dir:
        summarise(Path(args.from_dir), None)
        return
    out, wall = run(args)
    summarise(out, wall)


if __name__ == "__main__":
    main()
