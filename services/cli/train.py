"""`aepo train` and `python -m services.cli.train` (the `ray job submit` entrypoint).

    aepo train --config deploy/configs/cpu_default.yaml [--output-dir DIR] [--resume] [--compare grpo] \
        [key.path=value ...]      e.g. trainer.steps=20 algorithm.target.value=0.3 rollout.engine=vllm-cpu

Parse the config, check its plan (`aepo plan`'s rules) against the cluster it is about to run on
(refused: exit 2, before anything starts; --skip-plan skips it), get the model (a hub name is
downloaded once into model.cache_dir; the embedded tiny model is warm-started once and cached),
check that the prompts and responses fit its context, start the system, train, write the outputs,
close. `--compare grpo` runs the same config with plain GRPO afterwards, in the same cluster, for
the same budget, and plots both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config (YAML), e.g. deploy/configs/cpu_default.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key.path=value",
        help="config overrides, applied in order and validated like the file: trainer.steps=20 "
        "algorithm.target.value=0.3 rollout.engine=vllm-cpu (values are YAML: numbers, true/false, null, [..], {..})",
    )
    p.add_argument("--output-dir", help="overrides trainer.output_dir")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in the output dir (an error when there is none)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output dir that holds an earlier run (deletes its logs and checkpoints)")
    p.add_argument("--compare", choices=["grpo"], help="also run this baseline on the same budget and plot both")
    p.add_argument(
        "--compare-mode", choices=["parallel", "sequential"], default="parallel",
        help="parallel (default, ray backend): both runs at once in one cluster, sharing the reward server, "
        "one torch thread per rollout actor; sequential: the baseline after the main run",
    )
    p.add_argument("--steps", type=int, help="overrides trainer.steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--verbose", action="store_true", help="show the Ray actors' logs")
    p.add_argument(
        "--backend", choices=["ray", "local"], default="ray",
        help="ray (default): the Ray system (actors, Serve reward server, FSDP learner group); local: the same "
        "driver, learner, engine, verifier and controller code in this process (one learner rank, no transport)",
    )
    p.add_argument("--threads", type=int, help="torch threads of the local backend (default: rollout.torch_threads)")
    p.add_argument(
        "--skip-plan", action="store_true",
        help="start without checking the run's plan (`aepo plan`) against the cluster: for a cluster whose "
        "description is wrong (a GPU type Ray does not name, resources it does not report)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the config; exit 0 when it finished, 128 + the signal when SIGTERM/SIGINT stopped it
    after a checkpoint, 2 when the output directory and --resume/--overwrite disagree or the run's
    plan does not fit the cluster (services/cli/start_plan.py)."""
    from services.cli.start_plan import PlanRefused
    from services.loop import checkpoint, interrupt
    from services.loop.outputs import RunDirNotEmpty
    from services.model.context import ContextTooLong
    from services.model.hub import ModelUnavailable

    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        print("aepo train: --resume and --overwrite contradict each other", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        interrupt.install()
    try:
        return _train(args)
    except (checkpoint.NoCheckpoint, RunDirNotEmpty, ModelUnavailable, ContextTooLong, PlanRefused) as exc:
        print(f"aepo train: {exc}", file=sys.stderr)
        return 2
    except interrupt.Interrupted as exc:
        print(f"aepo train: {exc}; continue with --resume", flush=True)
        return exc.exit_code


def run_config(args: argparse.Namespace):
    """The config file with the overrides and the --output-dir/--steps flags, validated again."""
    from services.cli.config_file import load_config

    cfg = load_config(args.config, getattr(args, "overrides", None) or ())
    trainer_over = {}
    if args.output_dir:
        trainer_over["output_dir"] = args.output_dir
    if args.steps is not None:
        trainer_over["steps"] = args.steps
    if trainer_over:
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update=trainer_over)})
    return type(cfg).model_validate(cfg.model_dump())  # re-check bounds after the overrides


def _train(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    out = Path(cfg.trainer.output_dir)
    t0 = time.monotonic()

    from services.backends.ray_cluster import System, init_ray

    backend = getattr(args, "backend", "ray")
    base = compare_config(cfg, args.compare) if args.compare else None
    parallel = base is not None and backend == "ray" and getattr(args, "compare_mode", "parallel") == "parallel"
    need = cpus_needed(cfg) + (cpus_needed(base) if parallel else 0)
    if backend == "ray":
        init_ray(num_cpus=max(os.cpu_count() or 2, need), quiet=not args.verbose)
    # the plan before the model is fetched or warm-started: its shape is known without it unless
    # it is a hub name with no preset, which is planned again once its config.json is here
    both = [c for c in (cfg, base) if c is not None]
    plans = start_plans(args, backend, both)
    base_out = out / f"compare-{args.compare}"
    mode = {"resume": args.resume, "overwrite": getattr(args, "overwrite", False)}
    # before anything starts: a missing checkpoint is an error now, not after the warm start
    run_id, base_id = (run_id_for(c, o, args.resume) if c is not None else None for c, o in ((cfg, out), (base, base_out)))
    model_path, warm, items = prepare_run(cfg, progress=not args.no_progress)
    if any(p.shape is None for p in plans):
        plans = start_plans(args, backend, both)
    parallel = parallel and side_by_side(plans, need)
    threads_alone = cfg.rollout.torch_threads
    if parallel:  # two runs share the cores: one generation thread each (until one of them ends)
        cfg, base = single_threaded(cfg), single_threaded(base)
    runs = {}
    if backend == "local":
        from services.backends.in_process import LocalSystem

        make_system = lambda: LocalSystem(cfg, model_path, threads=getattr(args, "threads", None), run_id=run_id)  # noqa: E731
    else:
        make_system = lambda: System(cfg, model_path, quiet=not args.verbose, run_id=run_id)  # noqa: E731
    progress = not args.no_progress
    with make_system() as system:
        if parallel:
            from concurrent.futures import ThreadPoolExecutor

            sibling = system.sibling(base, run_id=base_id)
            try:
                with ThreadPoolExecutor(2) as pool:
                    main_run = pool.submit(run_one, cfg, system, out, mode, progress, 0, items)
                    base_run = pool.submit(run_one, base, sibling, base_out, mode, progress, 1, items)
                    hand_over_threads({main_run: sibling, base_run: system}, threads_alone)
                    runs[cfg.algorithm.type], runs[args.compare] = main_run.result(), base_run.result()
            finally:
                sibling.close()
        else:
            runs[cfg.algorithm.type] = run_one(cfg, system, out, mode, progress, items=items)
            if base is not None:
                system.restart_policy_side(base, run_id=base_id)
                runs[args.compare] = run_one(base, system, base_out, mode, progress, items=items)
    finish(cfg, out, runs, warm, time.monotonic() - t0)
    return 0


def compare_config(cfg, baseline: str):
    """The baseline run of `--compare`: same everything, GRPO with the main run's clipping."""
    from services.config import GRPOConfig

    tr = cfg.trainer
    return cfg.model_copy(update={
        "algorithm": GRPOConfig(clip_low=cfg.algorithm.clip_low, clip_high=cfg.algorithm.clip_high,
                                dual_clip=cfg.algorithm.dual_clip),
        "run_name": f"{cfg.run_name}-{baseline}",
        "controller": cfg.controller.model_copy(update={"name": f"{cfg.controller.name}-{baseline}"}),
        "trainer": tr.model_copy(update={"metrics_port": tr.metrics_port + 1 if tr.metrics_port else 0}),
    })


def hand_over_threads(runs: dict, threads: int | None) -> None:
    """When the first of two side-by-side runs ends, give the other one's rollout actors the
    generation threads a run has alone (`rollout.torch_threads`), so its tail does not run on
    one thread while a core idles. `runs` maps each run's future to the *other* run's system."""
    from concurrent.futures import FIRST_COMPLETED, wait

    if not threads or threads <= 1:
        return
    done, _ = wait(list(runs), return_when=FIRST_COMPLETED)
    first = next(iter(done))
    if first.exception() is None and not all(f.done() for f in runs):
        try:
            runs[first].pool.set_threads(threads)
        except Exception as exc:  # a speed-up only: never fail the surviving run over it
            print(f"--compare: could not raise the remaining run's generation threads ({exc})", flush=True)


def single_threaded(cfg):
    return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"torch_threads": 1})})


def cpus_needed(cfg) -> int:
    """Ray CPUs one run reserves (learner bundles + rollout actors; the reward replica reserves none)."""
    import math

    need = cfg.learner.num_workers * cfg.learner.cpus_per_worker + cfg.rollout.num_actors * cfg.rollout.cpus_per_actor
    return max(math.ceil(need), 1)


def side_by_side(plans: list, cpus: int) -> bool:
    """Whether `--compare`'s two runs fit the cluster at once; else the baseline runs after the main run."""
    import ray

    from services.cli.start_plan import side_by_side_memory_note, side_by_side_shortfall

    short = side_by_side_shortfall(plans, cpus, ray.cluster_resources().get("CPU", 0))
    note = None if short else side_by_side_memory_note(plans)
    if short:
        print(f"--compare: the cluster has {short}; running the baseline after the main run", flush=True)
    if note:
        print(f"plan: note: {note}", flush=True)
    return short is None


def start_plans(args: argparse.Namespace, backend: str, cfgs: list) -> list:
    """`aepo plan` on the cluster this run is about to use (services/cli/start_plan.py); raises
    PlanRefused when a run does not fit; no plans with --skip-plan."""
    if getattr(args, "skip_plan", False):
        print("plan: not checked (--skip-plan)", flush=True)
        return []
    from services.cli.start_plan import check_start, run_cluster

    return check_start(cfgs, backend, run_cluster(backend), args.config)


def prepare_run(cfg, progress: bool) -> tuple[str, dict, tuple[list, list]]:
    """Before any engine or learner starts: the model's local directory (`prepare_model`), the
    prompts, and the context check (the longest prompt + rollout.max_tokens fits rollout.max_model_len
    and the model: services/model/context.py)."""
    from services.data.datasets import load_items
    from services.model.context import check_context

    path, warm = prepare_model(cfg, progress)
    items = load_items(cfg.data)
    fit = check_context(cfg, path, items)
    bound = "" if fit["prompt_bound"] == fit["longest_prompt"] else f" (bound {fit['prompt_bound']})"
    print(f"context: longest prompt {fit['longest_prompt']} tokens{bound} + max_tokens {fit['max_tokens']}, within "
          f"max_model_len {fit['max_model_len'] or 'unset'} and the model's {fit['positions'] or '?'} positions", flush=True)
    return path, warm, items


def prepare_model(cfg, progress: bool) -> tuple[str, dict]:
    """The local directory the engines and learners load: a hub name downloaded into model.cache_dir
    (services/model/hub.py), or a built-in model, warm-started on its task (cached): the tiny model
    on the Countdown toy, the small LLM on the word problems."""
    from services.model.tiny import default_cache_dir, resolve_model_path

    path = resolve_model_path(cfg.model, seed=cfg.trainer.seed if cfg.model.init_seed is None else cfg.model.init_seed)
    if cfg.model.path is not None and path != cfg.model.path:
        print(f"model: {cfg.model.path} -> {path}", flush=True)
    if cfg.model.path is not None or cfg.data.type not in ("countdown", "wordproblems") or cfg.warm_start.steps == 0:
        return path, {}
    from services.model.warmstart import warm_start

    t0 = time.monotonic()
    task = "the Countdown toy" if cfg.data.type == "countdown" else "the word problems' worked solutions"
    print(f"warm start: {cfg.warm_start.steps} SFT steps on {task} with Ray Train "
          f"({cfg.warm_start.num_workers} workers); cached after the first run", flush=True)
    warm = warm_start(path, default_cache_dir(), cfg.data, cfg.warm_start, system_prompt=cfg.model.system_prompt)
    info = json.loads((warm / "aepo_warmstart.json").read_text())
    info["wall_seconds_this_run"] = round(time.monotonic() - t0, 1)
    print(f"warm start: {warm} (loss {info.get('final_loss')}, {info['wall_seconds_this_run']} s this run)", flush=True)
    return str(warm), info


def run_id_for(cfg, out: Path, resume: bool) -> str:
    """The controller's run id: the checkpoint's when resuming (its state is keyed by it), a new
    one for a fresh run (an earlier run's Redis state under the same run_name stays its own)."""
    from services.backends.ray_cluster import new_run_id
    from services.loop import checkpoint

    if not resume:
        return new_run_id(cfg.run_name)
    saved = checkpoint.saved_run_id(out)
    if saved is None:
        raise checkpoint.nothing_to_resume(out, cfg.trainer.save_every)
    return saved


def run_one(cfg, system, out: Path, mode: dict, progress: bool, position: int = 0, items=None) -> dict:
    from services.data.datasets import load_items
    from services.loop.trainer import Trainer
    from services.loop.metrics import RunMetrics

    train_items, eval_items = items if items is not None else load_items(cfg.data)
    metrics = RunMetrics(cfg.run_name, cfg.trainer.metrics_port, cfg.trainer.metrics_host)
    try:
        trainer = Trainer(cfg, system.components(metrics), train_items, eval_items, out, progress=progress,
                          progress_position=position)
        trainer.fit(**mode)
    finally:
        metrics.close()
    return {"dir": out, "rows": trainer.log.rows(), "summary": json.loads((out / "summary.json").read_text())}


def finish(cfg, out: Path, runs: dict, warm: dict, wall: float) -> None:
    from services.loop.outputs import plot_entropy, write_json

    summary = runs[cfg.algorithm.type]["summary"]
    summary["wall_seconds"] = round(wall, 1)
    summary["warm_start"] = warm
    if len(runs) > 1:
        summary["compare"] = {name: r["summary"] for name, r in runs.items() if name != cfg.algorithm.type}
    write_json(out / "summary.json", summary)
    plot = plot_entropy({name: r["rows"] for name, r in runs.items()}, out / "entropy.png")
    print(trajectory_table(runs))
    print(f"\nsummary: {out / 'summary.json'}\nplot:    {plot}\nmetrics: {out / 'metrics.jsonl'}")


def trajectory_table(runs: dict) -> str:
    """Entropy every 10 steps, one column per run, and each run's tracking error and accuracy."""
    names = list(runs)
    steps = sorted({r["step"] for run in runs.values() for r in run["rows"] if r["step"] % 10 == 0})
    by = {n: {r["step"]: r for r in runs[n]["rows"]} for n in names}
    lines = ["step " + "".join(f"{n + ' H':>16}" for n in names) + f"{'H*':>8}"]
    for s in steps:
        tgt = next((by[n][s].get("entropy_target") for n in names if s in by[n] and by[n][s].get("entropy_target") is not None), None)
        cells = "".join(f"{by[n][s]['entropy']:>16.3f}" if s in by[n] and by[n][s].get("entropy") is not None else f"{'':>16}" for n in names)
        lines.append(f"{s:>4} {cells}{tgt if tgt is None else round(tgt, 3)!s:>8}")
    for n in names:
        sm = runs[n]["summary"]
        err = sm.get("mean_abs_entropy_error_second_half")
        before, after = sm.get("eval_before", {}), sm.get("eval_after", {})
        acc = next((k for k in after if k.startswith("eval_avg@")), None)
        if sm.get("entropy_first") is None:  # a 0-step run: evaluation only
            lines.append(f"{n}: no RL steps" + (f", held-out {acc} {after[acc]:.3f}" if acc else ""))
            continue
        lines.append(
            f"{n}: entropy {sm.get('entropy_first'):.3f} -> {sm.get('entropy_last'):.3f}"
            + (f", mean |H-H*| 2nd half {err:.3f}" if err is not None else "")
            + (f", held-out {acc} {before.get(acc, float('nan')):.3f} -> {after[acc]:.3f}" if acc else "")
        )
    return "\n".join(lines)


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cli.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(cli())
