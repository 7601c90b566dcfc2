"""`aepo experiment <spec.yaml>`: a grid of short runs on the embedded toy, then a report.

    aepo experiment deploy/experiments/toy_claims.yaml            # run what is missing, write the report
    aepo experiment deploy/experiments/toy_claims.yaml --report-only
    aepo experiment deploy/experiments/toy_claims.yaml --dry-run  # list the runs and the time estimate

A spec names a base run config and groups of runs (algorithm overrides × targets × seeds), each
tagged with the report sections it feeds. Every run is an ordinary `aepo train` process (the
`local` backend by default: the same driver/learner/engine/verifier/controller code without Ray
transport, so two runs share the 2 cores; `backend: ray` runs each through the Ray system) with
its own output directory under `<output_dir>/runs/`, named by the run's config digest: a run
whose directory already holds a summary for the same config is not run again, so a killed
experiment continues where it stopped and two groups asking for the same config share one run.
A group with `targets: best` runs at the target of the `sweep` section with the best mean pass@1,
resolved once the sweep has finished; with `best_of: [groups]` it runs the configuration (algorithm,
overrides, target) of the best of those groups' runs instead, plus its own overrides (the same
controller setting on another task). The report (services/experiments/report/, `report:` picks
which) is written last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.config import SmallLLMConfig

SECTIONS = ("table1", "control", "sweep", "controller", "ablation", "base", "tracking", "headline", "offpolicy")
Section = Literal["table1", "control", "sweep", "controller", "ablation", "base", "tracking", "headline", "offpolicy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunGroup(_Strict):
    """Runs that differ only by target and seed."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Slug; run names are <name>-h<target>-s<seed>.")
    label: str | None = Field(None, description="How tables and plots name the group (default: name).")
    sections: list[Section] = Field(description="Report sections this group's runs appear in.")
    algorithm: dict[str, Any] = Field(description="The run config's `algorithm` (the base config's when empty).")
    targets: list[float] | Literal["best"] | None = Field(
        None, description="Constant targets H* (controlled algorithms); 'best' = the sweep's best target, or with "
        "best_of the best run's; None = the algorithm's own."
    )
    relative: bool = Field(False, description="The targets are multiples of the controlled signal's first value H0.")
    best_of: list[str] | None = Field(
        None, description="With targets: best, the groups whose best run (mean final pass@1 over seeds) this group "
        "repeats: its algorithm, overrides and target, then this group's overrides and seeds."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Merged into the run config after the spec's overrides (nested keys), e.g. "
        "controller.entropy_source, learner.mini_batches or another task under data."
    )
    toy: str | None = Field(None, description="The task the report files this group under (default: the spec's first).")
    seeds: list[int] | None = Field(None, description="Trainer seeds (default: the spec's).")
    steps: int | None = Field(None, ge=0, description="RL steps (default: the spec's; 0 = evaluate the base model).")


class ExperimentSpec(_Strict):
    """An experiment: a base config, run groups, seeds, targets, and how many run at once."""

    name: str
    base_config: str = Field(description="Run config every run starts from (path relative to the repository root).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Merged into the base config (nested keys), e.g. to pin the warm start."
    )
    output_dir: str = Field(description="Report folder; runs go under <output_dir>/runs.")
    steps: int = Field(100, ge=1, description="RL steps per run.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    eval_every: int = Field(25, ge=0)
    eval_samples: int = Field(8, ge=1, description="Samples per prompt at intermediate evals.")
    eval_prompts: int = Field(128, ge=1)
    final_eval_samples: int = Field(64, ge=1, description="Samples per prompt at the last eval: pass@k up to this k.")
    final_eval_prompts: int = Field(128, ge=1)
    parallel: int = Field(2, ge=1, description="Runs at once.")
    threads: int = Field(1, ge=1, description="torch threads per run.")
    backend: Literal["local", "ray"] = "local"
    report: Literal["toy_claims", "controllers"] = Field(
        "toy_claims", description="Which report: the paper's claims, or the entropy-controller benchmark."
    )
    groups: list[RunGroup]

    @model_validator(mode="after")
    def _unique(self) -> "ExperimentSpec":
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"group names must be unique, repeated: {dup}")
        needs_sweep = any(g.targets == "best" and not g.best_of for g in self.groups)
        if needs_sweep and not any("sweep" in g.sections for g in self.groups):
            raise ValueError("a group with targets: best needs a group in the sweep section (or best_of)")
        for g in self.groups:
            unknown = sorted(set(g.best_of or ()) - set(names))
            if unknown or (g.best_of and g.targets != "best"):
                raise ValueError(f"group {g.name}: best_of needs targets: best and known groups (unknown: {unknown})")
        return self


@dataclass
class Job:
    """One run of the grid: its config, its digest (which names its folder) and its group."""

    group: RunGroup
    target: float | None
    seed: int
    config: dict  # a full TrainConfig dump
    digest: str

    @property
    def name(self) -> str:
        t = f"-h{self.target:g}" if self.target is not None else ""
        return f"{self.group.name}{t}-s{self.seed}"


def load_spec(path: str | Path) -> ExperimentSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such experiment spec") from None
    try:
        return ExperimentSpec.model_validate(raw)
    except Exception as exc:
        raise ValueError(f"{path}: {exc}") from None


# Settings that change how fast a run goes, or what it writes beside its results, not what it
# computes (each speed switch has a test that the update or the samples are the same either way):
# left out of the digest, so that adding or flipping one does not orphan finished runs.
SPEED_ONLY = {"learner": ("fast_gather", "sync_bucket_mb", "sync_transport", "sort_by_length", "share_prefix",
                          "hold_full_params", "resources", "chunked_head", "remove_padding"),
              "trainer": ("export_policy", "loggers", "save_every_seconds"),
              # where a role's actors run and where a hub model is cached: not what they compute
              "rollout": ("resources",), "reward": ("resources",), "controller": ("resources",), "model": ("cache_dir",)}
# whole sections of that kind: timeouts and the recovery budget change when a run gives up, never
# a row it writes (a recovered run's metrics equal an untouched one's: tests/test_recovery.py)
SPEED_ONLY_SECTIONS = ("recovery",)
# Settings that do change what a run computes, added after runs were made: at the value that
# reproduces the earlier behaviour they are left out of the digest too (so those runs keep their
# names); at any other value they name a different run.
LEGACY_DEFAULTS = {
    # sync_dtype auto sends the weights in the dtype the engines compute in: float32 on CPU, as before;
    # a token budget regroups micro-batches, which changes clip_cov's and kl_cov's per-micro-batch picks
    "learner": {"cpu_compute": "float32", "sync_dtype": "auto", "max_tokens_per_micro_batch": None},
    "warm_start": {"cpu_compute": "float32"},
    "model": {"builtin": "tiny", "system_prompt": None, "small_llm": SmallLLMConfig().model_dump(mode="json"),
              "revision": None},
    # a bound the context check enforces (None checks the prompts themselves); where the engines run
    "rollout": {"max_prompt_tokens": None, "placement": "split"},
    # masking unverified items differs from scoring them 0 only when an item times out or errors;
    # the runs made before it record none (reward_failures all 0), so they computed the same
    "reward": {"on_failure": "mask", "max_failure_share": 0.2},
    "data": {"num_numbers": 3, "max_solutions": None},  # the harder Countdown's settings, at the toy's values
}


def config_digest(cfg: dict) -> str:
    """The digest that names a run's directory: the validated config without SPEED_ONLY settings
    and without LEGACY_DEFAULTS settings at their legacy value."""

    def keep(section: str, field: str, value) -> bool:
        legacy = LEGACY_DEFAULTS.get(section, {})
        return field not in SPEED_ONLY.get(section, ()) and not (field in legacy and legacy[field] == value)

    keyed = {k: ({f: x for f, x in v.items() if keep(k, f, x)} if isinstance(v, dict) else v)
             for k, v in cfg.items() if k not in SPEED_ONLY_SECTIONS}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]


def make_job(spec: ExperimentSpec, group: RunGroup, target: float | None, seed: int, root: Path,
             source: RunGroup | None = None) -> Job:
    """The run config of one (group, target, seed), validated; its digest names its directory.
    `source`: the group whose setting a `best_of` group repeats (its algorithm, overrides, target
    kind), before this group's own overrides."""
    from services.cli.config_file import load_config
    from services.config import TrainConfig

    setting = source or group
    base = _merge(load_config(spec.base_config).model_dump(mode="json"), spec.overrides)
    base = _merge(_merge(base, setting.overrides), group.overrides if source is not None else {})
    algo = dict(setting.algorithm) or dict(base["algorithm"])
    if target is not None:
        algo["target"] = {"type": "constant", "value": float(target), **({"relative": True} if setting.relative else {})}
    steps = spec.steps if group.steps is None else group.steps
    base["algorithm"] = algo
    base["model"]["init_seed"] = 0  # one base model for every seed: seeds vary the RL run only
    base["rollout"]["torch_threads"] = spec.threads
    base["trainer"].update(
        steps=steps, seed=seed, eval_every=spec.eval_every, eval_samples=spec.eval_samples,
        eval_prompts=spec.eval_prompts, final_eval_samples=spec.final_eval_samples,
        final_eval_prompts=spec.final_eval_prompts, save_every=0, keep_checkpoints=1, metrics_port=0, log_samples=0,
        output_dir="", export_policy=False,  # a report reads the runs' logs; 7 MB of weights per run would not help it
    )
    base["run_name"] = "x"
    cfg = TrainConfig.model_validate(base).model_dump(mode="json")
    digest = config_digest(cfg)
    t = f"-h{target:g}" if target is not None else ""
    cfg["run_name"] = f"{group.name}{t}-s{seed}"
    cfg["trainer"]["output_dir"] = str(root / "runs" / f"{group.name}{t}-s{seed}-{digest}")
    return Job(group, target, seed, cfg, digest)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def expand(spec: ExperimentSpec, root: Path, best_target: float | None = None,
           best_runs: dict[str, tuple[str, float]] | None = None) -> list[Job]:
    """Every job of the spec; groups with `targets: best` only once their best is known:
    `best_target` for the sweep's, `best_runs[group] = (source group, target)` for `best_of`."""
    jobs = []
    groups = {g.name: g for g in spec.groups}
    for g in spec.groups:
        source = None
        if g.targets == "best" and g.best_of:
            if not best_runs or g.name not in best_runs:
                continue
            source, target = groups[best_runs[g.name][0]], best_runs[g.name][1]
            targets: list[float | None] = [target]
        elif g.targets == "best":
            if best_target is None:
                continue
            targets = [best_target]
        else:
            targets = list(g.targets) if g.targets else [None]
        for target in targets:
            for seed in g.seeds or spec.seeds:
                jobs.append(make_job(spec, g, target, seed, root, source))
    return jobs


def run_dir(job: Job) -> Path:
    return Path(job.config["trainer"]["output_dir"])


def is_done(job: Job) -> bool:
    """A run counts as done when its summary exists and was produced by this very config."""
    d = run_dir(job)
    return (d / "summary.json").exists() and (d / "run_config.json").exists() and \
        json.loads((d / "run_config.json").read_text()).get("digest") == job.digest


def dedupe(jobs: list[Job]) -> list[Job]:
    """One job per output directory (two groups asking for one config share its run)."""
    seen, out = set(), []
    for j in jobs:
        key = j.digest
        if key not in seen:
            seen.add(key)
            out.append(j)
    return out


def share_dirs(jobs: list[Job]) -> None:
    """Jobs with the same digest read the directory of the first one (so they share one run)."""
    first: dict[str, str] = {}
    # groups with a fixed target name the shared directory, so that it does not depend on
    # whether the 'best' groups have been expanded yet
    for j in sorted(jobs, key=lambda j: j.group.targets == "best"):
        first.setdefault(j.digest, j.config["trainer"]["output_dir"])
    for j in jobs:
        j.config["trainer"]["output_dir"] = first[j.digest]


def launch(job: Job, spec: ExperimentSpec) -> subprocess.Popen:
    d = run_dir(job)
    if d.exists():
        shutil.rmtree(d)  # a run that did not finish starts over (it saves only at the end)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(job.config, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "services.cli.train", "--config", str(d / "config.yaml"), "--no-progress",
           "--backend", spec.backend, "--threads", str(spec.threads)]
    log = open(d / "log.txt", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc._aepo_log = log  # type: ignore[attr-defined]
    return proc


def run_jobs(jobs: list[Job], spec: ExperimentSpec, progress: bool = True) -> list[str]:
    """Run the jobs, `spec.parallel` at a time; returns the names of the ones that failed."""
    from tqdm import tqdm

    todo = [j for j in dedupe(jobs) if not is_done(j)]
    failed: list[str] = []
    running: list[tuple[Job, subprocess.Popen, float]] = []
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        while todo or running:
            while todo and len(running) < spec.parallel:
                job = todo.pop(0)
                running.append((job, launch(job, spec), time.monotonic()))
                bar.set_postfix_str(", ".join(j.name for j, _, _ in running), refresh=True)
            time.sleep(1.0)
            for item in list(running):
                job, proc, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                proc._aepo_log.close()  # type: ignore[attr-defined]
                if proc.returncode == 0 and (run_dir(job) / "summary.json").exists():
                    (run_dir(job) / "run_config.json").write_text(json.dumps(
                        {"digest": job.digest, "name": job.name, "wall_seconds": round(time.monotonic() - t0, 1)}))
                else:
                    failed.append(job.name)
                    bar.write(f"run {job.name} failed (exit {proc.returncode}); log: {run_dir(job) / 'log.txt'}")
                bar.update(1)
    except BaseException:
        for _, proc, _ in running:  # Ctrl-C: stop the children too; their runs restart next time
            proc.terminate()
        raise
    finally:
        bar.close()
    return failed


def main(args: argparse.Namespace) -> int:
    from services.experiments.report.runs import best_of_runs, best_sweep_target

    spec = load_spec(args.spec)
    if args.parallel:
        spec = spec.model_copy(update={"parallel": args.parallel})
    root = Path(spec.output_dir)
    t0 = time.monotonic()
    jobs = expand(spec, root)
    share_dirs(jobs)
    if args.dry_run:
        for j in dedupe(jobs):
            print(f"{'done' if is_done(j) else 'todo'}  {j.name:32s} {run_dir(j)}")
        print(f"{sum(not is_done(j) for j in dedupe(jobs))} runs to do (+ the 'best target' groups after the sweep)")
        return 0
    failed: list[str] = []
    ran = 0
    if not args.report_only:
        _prepare_base_models(jobs)
        ran += sum(not is_done(j) for j in dedupe(jobs))
        failed += run_jobs(jobs, spec, progress=not args.no_progress)
    best, best_runs = best_sweep_target(jobs), best_of_runs(spec, jobs)
    if best is not None or best_runs:
        jobs = expand(spec, root, best_target=best, best_runs=best_runs)
        share_dirs(jobs)
        if not args.report_only:
            ran += sum(not is_done(j) for j in dedupe(jobs))
            failed += run_jobs(jobs, spec, progress=not args.no_progress)
    wall = time.monotonic() - t0
    if spec.report == "controllers":
        from services.experiments.report.controllers import write_report
    else:
        from services.experiments.report.write import write_report
    report = write_report(spec, jobs, root, wall_seconds=None if args.report_only else wall, spec_path=args.spec,
                          ran=ran)
    print(f"report: {report}")
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _prepare_base_models(jobs: list[Job]) -> None:
    """Build and warm-start each shared base model once (Ray Train, cached) before any run starts:
    one per distinct model, task and warm start among the jobs (two runs never train one twice)."""
    from services.config import TrainConfig
    from services.cli.train import prepare_model

    seen: set[str] = set()
    for job in jobs:
        key = json.dumps([job.config[k] for k in ("model", "data", "warm_start")], sort_keys=True)
        if key not in seen:
            seen.add(key)
            path, _ = prepare_model(TrainConfig.model_validate(job.config), progress=True)
            print(f"base model: {path}", flush=True)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # free the cores for the runs
    except ImportError:
        pass
