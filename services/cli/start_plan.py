"""The plan check at the start of every `aepo train`: `aepo plan`'s rules on the cluster the run is
about to use, before any role starts.

The ray backend is checked against the Ray cluster `init_ray` joined or started, as Ray reports
its nodes (a local Ray is the one started with the CPUs the run needs, so its CPUs are what the
actors will get); the local backend against this machine, for the run as that backend runs it
(one CPU learner rank, one engine). A refusal stops the run with exit 2 and the refusal's text
(`PlanRefused`); notes are printed and the run goes on. `--skip-plan` skips the check, for a
cluster whose description is wrong (a GPU type Ray does not name, resources it does not report).
"""

from __future__ import annotations

import argparse
import os

GiB = 2**30


class PlanRefused(Exception):
    """The run's plan does not fit the cluster; the message holds every refusal."""


def run_cluster(backend: str):
    """The cluster this run is about to use. Ray reports no GPU memory and no /dev/shm: a local Ray
    is this machine, so they come from it (nvidia-smi, statvfs); a joined cluster's GPU memory
    comes from its accelerator type (`cluster_from_ray`)."""
    from services.cli.plan import cluster_from_machine, cluster_from_ray

    none = argparse.Namespace(gpu_memory_gib=None)
    if backend == "local":
        return cluster_from_machine(none)
    cluster = cluster_from_ray(none)
    if not os.environ.get("RAY_ADDRESS"):
        here = cluster_from_machine(none)
        cluster.source = "the local Ray this run started"
        cluster.gpu_memory, cluster.shm = cluster.gpu_memory or here.gpu_memory, here.shm
    return cluster


def as_run(cfg, backend: str):
    """`cfg` as the backend runs it: the local backend has one learner rank on the CPU and one
    engine in its own process (services/backends/in_process.py) and reserves nothing, so the engine
    needs a GPU only when it is vLLM (gpus_per_actor None: `rollout_resources`' own rule)."""
    if backend != "local":
        return cfg
    return cfg.model_copy(update={
        "learner": cfg.learner.model_copy(update={"num_workers": 1, "device": "cpu"}),
        "rollout": cfg.rollout.model_copy(update={"num_actors": 1, "placement": "split", "gpus_per_actor": None}),
    })


def check_start(cfgs: list, backend: str, cluster, config_path: str = "") -> list:
    """The plan of every run in `cfgs` (the main run, and `--compare`'s baseline) on `cluster`:
    prints one line per run and its notes, raises PlanRefused with every refusal when one does not fit."""
    from services.cli.plan import make_plan

    plans = [make_plan(as_run(c, backend), cluster, config_path) for c in cfgs]
    refused = []
    for cfg, plan in zip(cfgs, plans):
        name = cfg.run_name
        if plan.fits:
            print(f"plan: {name} fits {cluster.source}: {summary(plan)}", flush=True)
        else:
            refused += [f"{name}: {r}" for r in plan.refusals]
        for note in plan.warnings:  # `aepo train` has no --gpu-memory-gib: `aepo plan` is where to give it
            print(f"plan: {name}: note: {note.replace('(pass --gpu-memory-gib)', '(aepo plan --gpu-memory-gib)')}",
                  flush=True)
    if refused:
        raise PlanRefused(
            f"the run does not fit {cluster.source} (`aepo plan {config_path or 'CONFIG'}` shows the whole plan; "
            "--skip-plan starts it anyway):\n  " + "\n  ".join(refused))
    return plans


def summary(plan) -> str:
    """`2 CPU, 0 GPU of 4 CPU, 0 GPU; host 4.4 GiB of 23.3 GiB at the peak`."""
    from services.cli.plan import _num

    need = {k: sum(n.total(k) for n in plan.needs) for k in ("CPU", "GPU")}
    cl, host = plan.cluster, plan.memory.get("host")
    have = f"{_num(cl.total('CPU'))} CPU" if cl.total("CPU") is not None else "? CPU"
    text = f"{_num(need['CPU'])} CPU, {_num(need['GPU'])} GPU of {have}, {_num(cl.total('GPU') or 0)} GPU"
    if host is not None:
        mem = cl.total("memory")
        text += f"; host {host.peak / GiB:.1f} GiB" + (f" of {mem / GiB:.1f} GiB" if mem else "") + " at the peak"
    return text


def side_by_side_shortfall(plans: list, cpus: int, cluster_cpus: float) -> str | None:
    """Why two runs cannot share the cluster at once (None: they can). Each plan fits alone; side
    by side both hold their CPUs and GPUs at once, and Ray would leave the second run's actors
    waiting for a reservation that never frees, so the sums must fit."""
    if cluster_cpus < cpus:
        return f"fewer than the {cpus} CPUs two runs at once reserve"
    if not plans:  # --skip-plan: the CPUs are all that is known
        return None
    gpus = sum(n.total("GPU") for p in plans for n in p.needs)
    if gpus > (plans[0].cluster.total("GPU") or 0) + 1e-9:
        return f"fewer than the {gpus:g} GPUs two runs at once reserve"
    return None


def side_by_side_memory_note(plans: list) -> str | None:
    """A note when two runs side by side may not fit the host memory. Only a note: the estimate's
    per-process terms are assumptions (plan_memory.PROCESS_BASELINE), and a wrong guess here would
    send runs that fit one after the other. The driver, Ray's own processes and the reward
    replicas are shared, so the second run's share of them is not counted twice."""
    from services.model.plan_memory import DRIVER_AND_RAY, PROCESS_BASELINE

    memory = plans[0].cluster.total("memory") if plans else None
    if memory is None or any("host" not in p.memory for p in plans):
        return None
    replicas = sum(n.count for n in plans[-1].needs if n.role == "reward")  # 0 unless Serve runs them
    shared = DRIVER_AND_RAY + PROCESS_BASELINE * replicas
    need = sum(p.memory["host"].peak for p in plans) - shared * (len(plans) - 1)
    if need <= memory:
        return None
    return (f"side by side the two runs may need {need / GiB:.1f} GiB of host memory at their peaks, "
            f"the cluster has {memory / GiB:.1f} GiB (--compare-mode sequential runs one after the other)")
