"""The chaos run: the embedded default job, with every role killed once at a random (seeded) step.

    .venv/bin/python scripts/chaos.py [--config deploy/configs/cpu_default.yaml] [--seed 0]
        [--steps N] [--out runs/chaos] [--no-compare] [key.path=value ...]

What dies, for real (SIGKILL to the process, or Ray's forced kill of a Serve replica):
- a rollout actor (Ray restarts it; the pool re-syncs it to the current weights),
- a learner rank (the driver replaces the group and rolls back to the latest checkpoint),
- the entropy controller (it comes back blank; the driver hands its state back),
- a reward server replica (Serve starts another; the client retries),
- the driver itself, with everything it started (the process group: Ray, Serve, the actors);
  the script then runs `aepo train --resume`, as a person or a supervisor would.

The job runs as `python scripts/chaos.py --child ...`: the real `aepo train` entry point with its
components wrapped so that each kill fires just before its step's call (once: `chaos_fired.json`
in the run directory remembers, across rollbacks and the resume). Afterwards the same job runs
untouched (unless --no-compare) and the two metrics.jsonl are compared field by field, timings
aside. Prints a table and one JSON line: kills survived per role, steps run again, whether the
files are equal, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ROLES = ("rollout", "learner", "controller", "reward", "driver")


# ----------------------------------------------------------------------------- the child: aepo train, wrapped


def _fired(out: Path) -> dict:
    path = out / "chaos_fired.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _fire(out: Path, role: str, step: int, kill) -> None:
    from services.loop.durable import write_json

    fired = _fired(out)
    if role in fired:
        return
    write_json(out / "chaos_fired.json", {**fired, role: {"step": step, "time": time.time()}})  # before: never twice
    print(f"chaos: killing the {role} before step {step}", flush=True)
    kill()


def _kill_replica() -> None:
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "REPLICA" in a["name"].upper() and "aepo-reward" in a["name"]]
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)


def _wrap(parts, system, plan: dict, out: Path) -> None:
    """Each role's kill, just before the call of its step that reaches it."""
    import ray

    def before(obj, method: str, step_of, role: str, kill) -> None:
        inner = getattr(obj, method)

        def call(*args, **kwargs):
            step = step_of(*args)
            if plan.get(role) == step:
                _fire(out, role, step, kill)
            return inner(*args, **kwargs)

        setattr(obj, method, call)

    sigkill = lambda pid: os.kill(pid, signal.SIGKILL)  # noqa: E731
    before(parts.rollout, "generate_step", lambda step, *a: step, "rollout", lambda: sigkill(system.pool.pids()[0]))
    before(parts.learner, "update", lambda batch, step: step, "learner", lambda: sigkill(system.learners.pids()[-1]))
    before(parts.reward, "verify", lambda items: int(items[0].id.split("-")[0]), "reward", _kill_replica)
    # the controller: before the rollout asks it for the plan (wrapped after the rollout's own kill)
    before(parts.rollout, "generate_step", lambda step, *a: step, "controller",
           lambda: sigkill(ray.get(system.controller_handle.pid.remote())))


def child(argv: list[str]) -> int:
    """`aepo train` with the chaos plan's kills wired into its components."""
    from services.backends.ray_cluster import System
    from services.cli.train import add_arguments, main

    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--plan", required=True)
    args = p.parse_args(argv)
    plan, out = json.loads(args.plan), Path(args.output_dir)
    components = System.components

    def wrapped(self, metrics=None):
        parts = components(self, metrics)
        _wrap(parts, self, plan, out)
        return parts

    System.components = wrapped
    return main(args)


# ----------------------------------------------------------------------------- the parent


def _train(args, out: Path, *flags: str, plan: dict | None = None, kill_after_rows: int | None = None):
    """One `aepo train` (through the child when there is a plan); SIGKILL to its process group
    once metrics.jsonl has `kill_after_rows` rows. Returns (exit code, seconds, output tail)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--plan", json.dumps(plan)] if plan is not None \
        else [sys.executable, "-m", "services.cli.train"]
    cmd += ["--config", args.config, "--output-dir", str(out), "--steps", str(args.steps), "--no-progress", *flags,
            *args.overrides]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    log = open(out.parent / f"{out.name}.log", "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if kill_after_rows is not None:
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_rows):
            if proc.poll() is not None:
                raise SystemExit(f"chaos: the run ended (exit {proc.returncode}) before the driver kill; see {log.name}")
            time.sleep(0.1)
        print(f"chaos: killing the driver (and its process group) after {kill_after_rows} rows", flush=True)
        os.killpg(proc.pid, signal.SIGKILL)
    code = proc.wait()
    log.close()
    return code, time.monotonic() - t0


def make_plan(seed: int, steps: int) -> dict:
    """A distinct step in [2, steps - 2) for each role, from `seed`."""
    if steps < len(ROLES) + 4:
        raise SystemExit(f"chaos: --steps must be at least {len(ROLES) + 4} for five distinct kill steps")
    return dict(zip(ROLES, random.Random(seed).sample(range(2, steps - 2), len(ROLES))))


def parent(args) -> int:
    from services.loop import checkpoint
    from services.loop.outputs import comparable

    out = Path(args.out).resolve()
    run, ref = out / "run", out / "untouched"
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args.seed, args.steps)
    print(f"chaos: plan (role: step) {plan}", flush=True)
    t0 = time.monotonic()
    code, _ = _train(args, run, "--overwrite", plan=plan, kill_after_rows=plan["driver"] + 1)
    rows_at_kill = len((run / "metrics.jsonl").read_text().splitlines())
    from_step = checkpoint.latest_intact(run)[1]["step"]
    resumed, _ = _train(args, run, "--resume", plan=plan)
    wall = time.monotonic() - t0
    if resumed != 0:
        raise SystemExit(f"chaos: the resumed run failed (exit {resumed}); see {run.parent / 'run.log'}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()] if (run / "events.jsonl").exists() else []
    summary = json.loads((run / "summary.json").read_text())
    fired = _fired(run)
    report = {
        "plan": plan, "killed": sorted(fired) + ["driver"] * (code == -signal.SIGKILL),
        "steps": len(rows), "every_step_once": [r["step"] for r in rows] == list(range(args.steps)),
        "rollbacks": [{k: e[k] for k in ("role", "failed_at_step", "to_step")} for e in events if e["event"] == "rollback"],
        "driver_killed_after_rows": rows_at_kill, "driver_resumed_from_step": from_step,
        "steps_run_again": rows_at_kill - from_step
        + sum(e["failed_at_step"] - e["to_step"] for e in events if e["event"] == "rollback"),
        "controller_restores": summary.get("controller_restores"), "chaos_wall_s": round(wall, 1),
    }
    if not args.no_compare:
        t1 = time.monotonic()
        code_ref, _ = _train(args, ref, "--overwrite")
        base = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()] if code_ref == 0 else []
        report["untouched_wall_s"] = round(time.monotonic() - t1, 1)
        report["metrics_equal_untouched"] = [comparable(r) for r in rows] == [comparable(r) for r in base]
        report["first_differing_step"] = next((a["step"] for a, b in zip(rows, base) if comparable(a) != comparable(b)), None)
    _print(report)
    return 0 if report["every_step_once"] and report.get("metrics_equal_untouched", True) else 1


def _print(report: dict) -> None:
    print(f"\n{'role':<12}{'killed before step':>20}{'survived':>10}")
    for role in ROLES:
        print(f"{role:<12}{report['plan'][role]:>20}{'yes' if role in report['killed'] else 'not fired':>10}")
    print(f"\nsteps: {report['steps']} (each once: {report['every_step_once']}); run again (rollbacks and the "
          f"driver's resume from step {report['driver_resumed_from_step']}): {report['steps_run_again']}; "
          f"controller restores: {report['controller_restores']}")
    if "metrics_equal_untouched" in report:
        print(f"metrics.jsonl equal to the untouched run's (timings aside): {report['metrics_equal_untouched']}")
    print(json.dumps(report))


def main() -> int:
    if "--child" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--child"]
        return child(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="deploy/configs/cpu_default.yaml")
    p.add_argument("--seed", type=int, default=0, help="chooses the kill steps")
    p.add_argument("--steps", type=int, default=150, help="RL steps (the default job's 150)")
    p.add_argument("--out", default="runs/chaos")
    p.add_argument("--no-compare", action="store_true", help="skip the untouched run")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    return parent(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
