"""`aepo plan CONFIG`: what each role of a run needs, checked against a cluster before anything starts.

    aepo plan deploy/configs/gpu_qwen25_math_7b_dapo.yaml --gpus 8 --gpu-memory-gib 80 [--json]

Roles and what Ray reserves for them, by the code that reserves it: learners (a placement group of
num_workers bundles {CPU: cpus_per_worker, GPU: 1 when the learners run on cuda}, as
`services/learner/group.py` resolves `device: auto`), rollout actors (num_actors x
`services.rollout.pool.rollout_resources`), reward replicas on Serve (0 CPU, no GPU), the entropy
controller (0 CPU). Learners and vLLM engines never share a GPU, so a GPU run needs the sum of both.
Memory per role comes from the model's shape (`services/model/plan_memory.py` has the formulas).

The cluster: what `ray.cluster_resources()` and `ray.nodes()` report when RAY_ADDRESS is set; else
the one the flags describe (--gpus/--cpus/--memory-gib per node, --nodes of them), so a target
cluster can be checked from a laptop; else this machine. Exit 0 when the plan fits, 1 when it is
refused (each refusal names the role, what it needs and what exists), 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

GiB = 2**30
# GPU memory by Ray's accelerator_type resource, for clusters joined through RAY_ADDRESS (Ray does
# not report it); ambiguous types (V100: 16 or 32) are left out: pass --gpu-memory-gib
GPU_MEMORY_GIB = {"H100": 80, "H200": 141, "A100-80G": 80, "A100-40G": 40, "L4": 24, "A10G": 24, "L40S": 48, "T4": 16}
PROMPT_TOKENS = {"countdown": 12, "wordproblems": 128, "file": 512}  # assumed prompt lengths (--prompt-tokens)
PRESET_NAMES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-math-7b")  # plan_memory.PRESETS' keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML), e.g. deploy/configs/gpu_qwen25_math_7b_dapo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, as for `aepo train`")
    g = p.add_argument_group("the cluster (default: RAY_ADDRESS's cluster, else this machine)")
    g.add_argument("--gpus", type=float, help="GPUs per node")
    g.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU, GiB (also for RAY_ADDRESS's cluster)")
    g.add_argument("--cpus", type=float, help="CPUs per node")
    g.add_argument("--memory-gib", type=float, help="host memory per node, GiB")
    g.add_argument("--nodes", type=int, help="identical nodes (default 1)")
    g.add_argument("--shm-gib", type=float, help="/dev/shm per node, GiB (vLLM engines reload weights through it)")
    p.add_argument("--model-shape", choices=PRESET_NAMES, help="shape of a hub model that is not a local directory")
    p.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default by data type: "
                   + ", ".join(f"{k} {v}" for k, v in PROMPT_TOKENS.items()) + ")")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


# --------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """What a plan is checked against: nodes ({CPU, GPU, memory} each; None = not described),
    one GPU's memory, /dev/shm per node, and where the description came from."""

    source: str
    nodes: list[dict]
    gpu_memory: int | None = None
    shm: int | None = None
    strict_cpus: bool = True  # False for this machine: `aepo train` starts a local Ray with the CPUs a run needs

    def total(self, key: str) -> float | None:
        values = [n.get(key) for n in self.nodes]
        return None if any(v is None for v in values) else float(sum(values))


def _flags_given(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("gpus", "cpus", "memory_gib", "nodes", "shm_gib"))


def cluster_from_flags(args) -> Cluster:
    """--nodes identical nodes of --gpus, --cpus, --memory-gib each; GPUs default to 0, the rest to unknown."""
    k = args.nodes or 1
    node = {"CPU": args.cpus, "GPU": args.gpus or 0.0,
            "memory": int(args.memory_gib * GiB) if args.memory_gib is not None else None}
    gm = int(args.gpu_memory_gib * GiB) if args.gpu_memory_gib else None
    shm = int(args.shm_gib * GiB) if args.shm_gib else None
    return Cluster("flags", [dict(node) for _ in range(k)], gm, shm)


def cluster_from_ray(args) -> Cluster:
    """The alive nodes of RAY_ADDRESS's cluster (memory = Ray's `memory` + `object_store_memory`)."""
    import ray

    from services.backends.ray_cluster import init_ray

    init_ray(quiet=True)
    nodes, types = [], set()
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n.get("Resources", {})
        nodes.append({"CPU": float(r.get("CPU", 0)), "GPU": float(r.get("GPU", 0)),
                      "memory": int(r.get("memory", 0) + r.get("object_store_memory", 0)),
                      "custom": {k: float(v) for k, v in r.items() if k not in STANDARD and ":" not in k}})
        types |= {k.split(":", 1)[1] for k in r if k.startswith("accelerator_type:")}
    gm = int(args.gpu_memory_gib * GiB) if args.gpu_memory_gib else None
    if gm is None and len(types) == 1 and next(iter(types)) in GPU_MEMORY_GIB:
        gm = GPU_MEMORY_GIB[next(iter(types))] * GiB
    return Cluster(f"ray cluster at {os.environ.get('RAY_ADDRESS')}", nodes, gm)


def cluster_from_machine(args) -> Cluster:
    """This machine: its cores, its memory (/proc/meminfo), its NVIDIA GPUs (nvidia-smi), /dev/shm."""
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        pass
    gpus, gm = [], None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20).stdout
            gpus = [int(float(x)) * 2**20 for x in out.split() if x.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            gpus = []
    gm = int(args.gpu_memory_gib * GiB) if args.gpu_memory_gib else (min(gpus) if gpus else None)
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_blocks * st.f_frsize
    except OSError:
        shm = None
    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(len(gpus)), "memory": memory}
    return Cluster("this machine", [node], gm, shm, strict_cpus=False)


def describe_cluster(args) -> Cluster:
    if _flags_given(args):
        return cluster_from_flags(args)
    if os.environ.get("RAY_ADDRESS"):
        return cluster_from_ray(args)
    return cluster_from_machine(args)


# --------------------------------------------------------------------------- roles


@dataclass
class RoleNeed:
    """One role: its units, what Ray reserves for each (CPU, GPU), and a note on where it runs."""

    role: str
    count: int
    unit: str  # "workers", "actors", ...
    cpu: float
    gpu: float
    note: str = ""

    def total(self, key: str) -> float:
        return self.count * (self.cpu if key == "CPU" else self.gpu)


def learner_device(lc, cluster_gpus: float) -> str:
    """`services.learner.group._resolve_device` on this cluster: cuda when asked or (auto) when the
    cluster has any GPU (too few are refused by the count, as the group refuses them); the rollout
    actors' GPUs are not subtracted, as there."""
    if lc.device != "auto":
        return lc.device
    return "cuda" if cluster_gpus > 0 else "cpu"


def role_needs(cfg, cluster_gpus: float) -> tuple[list[RoleNeed], str]:
    from services.rollout.pool import rollout_resources

    lc, rc = cfg.learner, cfg.rollout
    device = learner_device(lc, cluster_gpus)
    res = rollout_resources(rc)
    colocated = rc.placement == "colocated"  # the engines take half of the learners' GPUs, none of their own
    needs = [
        RoleNeed("rollout", rc.num_actors, "actors", res["num_cpus"], 0.0 if colocated else res["num_gpus"],
                 f"engine {rc.engine}" + (", colocated on the learners' GPUs" if colocated else "")),
        RoleNeed("learner", lc.num_workers, "workers", lc.cpus_per_worker, 1.0 if device == "cuda" else 0.0,
                 f"device {device}" + (", by device: auto" if lc.device == "auto" else "")),
    ]
    if cfg.reward.mode == "serve":
        needs.append(RoleNeed("reward", cfg.reward.replicas, "replicas", 0.0, 0.0,
                              "Ray Serve; its verifier processes use cores Ray does not count"))
    else:
        needs.append(RoleNeed("reward", 0, "replicas", 0.0, 0.0, f"{cfg.reward.mode}: outside Ray"))
    needs.append(RoleNeed("controller", 1, "actor", 0.0, 0.0, "redis" if cfg.controller.redis_url else "in memory"))
    return needs, device


def _num(x: float) -> str:
    return f"{x:g}"


def count_refusal(needs: list[RoleNeed], key: str, have: float | None) -> str | None:
    """`refused: rollout needs 8 GPUs (8 actors × 1) and learner 8 (8 workers × 1): 16 GPUs, the cluster has 8`."""
    def unit(n: RoleNeed) -> str:
        return n.unit[:-1] if n.count == 1 and n.unit.endswith("s") else n.unit

    parts = [(n.role, n.total(key), f"{n.count} {unit(n)} × {_num(n.cpu if key == 'CPU' else n.gpu)}")
             for n in needs if n.total(key) > 0]
    total = sum(p[1] for p in parts)
    if have is None or total <= have + 1e-9:
        return None
    word = key if parts[0][1] == 1 else f"{key}s"
    said = [f"{parts[0][0]} needs {_num(parts[0][1])} {word} ({parts[0][2]})"]
    said += [f"{role} {_num(t)} ({detail})" for role, t, detail in parts[1:]]
    text = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
    if len(parts) > 1:
        text += f": {_num(total)} {key}s"
    return f"refused: {text}, the cluster has {_num(have)}"


def packing_refusal(needs: list[RoleNeed], cluster: Cluster, strategy: str) -> str | None:
    """First-fit, largest first, of every learner bundle and rollout actor onto the nodes (STRICT_PACK:
    the learner bundles as one; STRICT_SPREAD: on distinct nodes). Totals can fit where nodes do not.
    CPUs count only where they are strict (not on this machine, which `aepo train` oversubscribes)."""
    free = [{"CPU": n["CPU"] if n["CPU"] is not None and cluster.strict_cpus else math.inf, "GPU": n["GPU"]}
            for n in cluster.nodes]
    items = []
    for n in needs:
        if n.count and (n.cpu or n.gpu):
            if n.role == "learner" and strategy == "STRICT_PACK":
                items.append((n.role, n.count, n.cpu * n.count, n.gpu * n.count))
            else:
                items += [(n.role, 1, n.cpu, n.gpu)] * n.count
    used_by_learner: set[int] = set()
    for role, k, cpu, gpu in sorted(items, key=lambda it: (it[3], it[2]), reverse=True):
        for i, node in enumerate(free):
            spread_ok = not (role == "learner" and strategy == "STRICT_SPREAD" and i in used_by_learner)
            if spread_ok and node["CPU"] >= cpu - 1e-9 and node["GPU"] >= gpu - 1e-9:
                node["CPU"] -= cpu
                node["GPU"] -= gpu
                if role == "learner":
                    used_by_learner.add(i)
                break
        else:
            what = f"{k} bundles together" if k > 1 else "one unit"
            return (f"refused: {role} ({what}) needs {_num(cpu)} CPU and {_num(gpu)} GPU on one node"
                    f"{' (STRICT_SPREAD: one node per bundle)' if strategy == 'STRICT_SPREAD' else ''}; "
                    f"the cluster's {len(cluster.nodes)} node(s) have {_nodes_text(cluster)} and no node has that left")
    return None


def _nodes_text(cluster: Cluster) -> str:
    def one(n):
        cpu = "? CPU" if n["CPU"] is None else f"{_num(n['CPU'])} CPU"
        mem = "" if n["memory"] is None else f", {n['memory'] / GiB:.0f} GiB"
        return f"{cpu}, {_num(n['GPU'])} GPU{mem}"

    texts = [one(n) for n in cluster.nodes]
    if len(set(texts)) == 1:
        return f"{len(texts)} x ({texts[0]})"
    return "; ".join(texts)


# --------------------------------------------------------------------------- the plan


def sequence_lengths(cfg, shape, prompt_tokens: int | None) -> dict:
    """Tokens per row: prompt (--prompt-tokens, else rollout.max_prompt_tokens, else assumed per data
    type) + rollout.max_tokens, and the limit (rollout.max_model_len, else the model's positions),
    which the run refuses to exceed (services/model/context.py)."""
    rc = cfg.rollout
    prompt = next((n for n in (prompt_tokens, rc.max_prompt_tokens) if n is not None), None)
    assumed = prompt is None
    prompt = PROMPT_TOKENS.get(cfg.data.type, 512) if assumed else prompt
    wanted = prompt + rc.max_tokens
    cap = rc.max_model_len or (shape.max_positions if shape is not None else None)
    seq = min(wanted, cap) if cap else wanted
    return {"prompt": prompt, "prompt_assumed": assumed, "response": rc.max_tokens,
            "wanted": wanted, "max_model_len": cap, "seq_len": seq}


def rollout_rows(cfg) -> int:
    """Rows one actor generates per step: its share of B prompts x G, and of the regularizer's prompts x G."""
    from services.config import AEPOConfig

    B, G, A = cfg.trainer.prompts_per_step, cfg.rollout.group_size, cfg.rollout.num_actors
    rows = math.ceil(B / A) * G
    if isinstance(cfg.algorithm, AEPOConfig):
        rows += math.ceil(max(1, math.ceil(B * cfg.algorithm.prompt_share)) / A) * G
    return rows


@dataclass
class Plan:
    """Everything `aepo plan` found: the cluster, the model, the roles, the memory, the verdict."""

    config: str
    cluster: Cluster
    needs: list[RoleNeed]
    device: str
    shape_source: str
    shape: object = None
    lengths: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # role -> plan_memory.Estimate
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.refusals


def make_plan(cfg, cluster: Cluster, config_path: str = "", model_shape: str | None = None,
              prompt_tokens: int | None = None) -> Plan:
    """The whole plan for `cfg` on `cluster`: resources first, then memory (`plan_memory.check_memory`)."""
    from services.model.plan_memory import resolve_shape

    needs, device = role_needs(cfg, cluster.total("GPU") or 0.0)
    shape, source = resolve_shape(cfg.model, model_shape)
    plan = Plan(config_path, cluster, needs, device, source, shape, sequence_lengths(cfg, shape, prompt_tokens))
    check_resources(plan, cfg)
    if shape is None:
        plan.warnings.append(f"memory not estimated: {source}")
    else:
        _memory(plan, cfg)
    return plan


def check_resources(plan: Plan, cfg) -> None:
    """CPU and GPU totals per resource, then whether every unit finds a node. On this machine a CPU
    shortfall is a warning: `aepo train` starts its local Ray with max(cores, what the run needs)."""
    cl = plan.cluster
    cpu = count_refusal(plan.needs, "CPU", cl.total("CPU"))
    gpu = count_refusal(plan.needs, "GPU", cl.total("GPU"))
    if cpu and not cl.strict_cpus:
        plan.warnings.append(cpu.replace("refused: ", "") + ": aepo train oversubscribes this machine's cores")
        cpu = None
    plan.refusals += [r for r in (gpu, cpu) if r]
    if not plan.refusals and cl.total("CPU") is not None:
        packed = packing_refusal(plan.needs, cl, cfg.learner.placement_strategy)
        if packed:
            plan.refusals.append(packed)
    if cl.total("CPU") is None:
        plan.warnings.append("CPUs of the cluster not given (--cpus): not checked")
    plan.refusals += custom_refusals(cfg, plan.needs, cl)


STANDARD = ("CPU", "GPU", "memory", "object_store_memory")


def custom_refusals(cfg, needs: list[RoleNeed], cluster: Cluster) -> list[str]:
    """A role's custom resources (`<role>.resources`) must add up on the cluster's nodes: a role
    whose actors ask for a resource no node declares would wait for a node that never comes."""
    asked = {"learner": cfg.learner.resources, "rollout": cfg.rollout.resources, "reward": cfg.reward.resources,
             "controller": cfg.controller.resources}
    out = []
    for need in (n for n in needs if n.count):
        for key, amount in asked.get(need.role, {}).items():
            if any("custom" not in n for n in cluster.nodes):
                continue  # a cluster described by flags or by this machine: nothing declares custom resources
            have = sum(n["custom"].get(key, 0.0) for n in cluster.nodes)
            count = need.count
            if have < count * amount - 1e-9:
                declared = sorted({k for n in cluster.nodes for k in n["custom"]})
                out.append(f"refused: {need.role} asks for {key}: {_num(amount)} per {need.unit.rstrip('s')} "
                           f"({count} × {_num(amount)}), the cluster's nodes declare {_num(have)} "
                           f"(custom resources: {', '.join(declared) or 'none'}; `ray start --resources`)")
    return out


def _memory(plan: Plan, cfg) -> None:
    from services.model.plan_memory import Capacity, check_memory

    cl = plan.cluster
    rollout = next(n for n in plan.needs if n.role == "rollout")
    node_mem = [n["memory"] for n in cl.nodes if n["memory"] is not None]
    cap = Capacity(gpu=cl.gpu_memory, node=min(node_mem) if node_mem else None,
                   total=int(cl.total("memory")) if cl.total("memory") is not None else None, shm=cl.shm,
                   engines_per_node=engines_per_node(rollout, cl))
    from services.backends.placement import colocated_refusal

    # colocated: one engine per learner GPU, checked as if alone there; what it shares with the
    # learner rank beside it is colocated_refusal's
    colocated = cfg.rollout.placement == "colocated" and plan.device == "cuda"
    found = check_memory(cfg, plan.shape, plan.device, 1.0 if colocated else rollout.gpu, plan.lengths,
                         rollout_rows(cfg), cap)
    shared = colocated_refusal(cfg, plan.shape.params, cl.gpu_memory) if colocated else None
    plan.memory, plan.warnings = found.estimates, plan.warnings + found.warnings
    plan.refusals += found.refusals + ([shared] if shared else [])
    if cl.total("memory") is None:
        plan.warnings.append("host memory of the cluster not given (--memory-gib): not checked")


def engines_per_node(rollout: RoleNeed, cluster: Cluster) -> int:
    """The most rollout actors one node can take (Ray may pack them so): its GPUs over each actor's,
    else its CPUs over each actor's, at most all of them."""
    fits = []
    for n in cluster.nodes:
        if rollout.gpu > 0:
            fits.append(int(n["GPU"] // rollout.gpu + 1e-9))
        elif n["CPU"] is not None and rollout.cpu > 0:
            fits.append(int(n["CPU"] // rollout.cpu + 1e-9))
    return max(1, min(rollout.count, max(fits, default=rollout.count)))


# --------------------------------------------------------------------------- output


def _gib(nbytes: float) -> str:
    """Bytes as `12.3 GiB`, `1.23 GiB` or `45 MiB`."""
    if nbytes >= 10 * GiB:
        return f"{nbytes / GiB:.1f} GiB"
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.0f} MiB"


def render(plan: Plan) -> str:
    """The plan as text: the cluster, the model, a row per role, the memory terms, the verdict."""
    cl, lines = plan.cluster, [f"aepo plan: {plan.config}"]
    gm = f", {cl.gpu_memory / GiB:g} GiB per GPU" if cl.gpu_memory else (", GPU memory unknown" if cl.total("GPU") else "")
    lines.append(f"cluster: {cl.source}: {_nodes_text(cl)}{gm}"
                 + (f", /dev/shm {cl.shm / GiB:.0f} GiB" if cl.shm else ""))
    lines.append(f"model:   {plan.shape.describe() if plan.shape else 'shape unknown'} [{plan.shape_source}]")
    ln = plan.lengths
    cap = f", over the limit {ln['max_model_len']}" if ln["max_model_len"] and ln["wanted"] > ln["max_model_len"] else ""
    lines.append(f"rows:    prompt {ln['prompt']}{' (assumed; --prompt-tokens)' if ln['prompt_assumed'] else ''} + "
                 f"response {ln['response']} = {ln['wanted']} tokens{cap}: L = {ln['seq_len']}")
    lines += ["", f"{'role':<11}{'count':>6}  {'each':<16}{'total':<16}{'memory (estimate, each)':<}"]
    for n in plan.needs:
        est = plan.memory.get(n.role)
        mem = f"{est.where} {_gib(est.peak)}" if est is not None else ""
        lines.append(f"{n.role:<11}{n.count:>6}  {_num(n.cpu)} CPU, {_num(n.gpu)} GPU".ljust(35)
                     + f"{_num(n.total('CPU'))} CPU, {_num(n.total('GPU'))} GPU".ljust(16) + f"{mem}  ({n.note})")
    tot = {k: sum(n.total(k) for n in plan.needs) for k in ("CPU", "GPU")}
    host = plan.memory.get("host")
    lines.append("total".ljust(35) + f"{_num(tot['CPU'])} CPU, {_num(tot['GPU'])} GPU".ljust(16)
                 + (f"host {_gib(host.peak)} at the peak" if host else ""))
    for role, est in plan.memory.items():
        lines += ["", _estimate_title(role, est, plan)]
        for label, formula, nbytes, phase in est.terms:
            tag = "" if phase == "always" else f"[{phase}] "
            lines.append(f"  {_gib(nbytes):>10}  {tag}{label}" + (f"   = {formula}" if formula else ""))
    lines += ["", "verdict: " + ("fits" if plan.fits else "REFUSED")] + [f"  {r}" for r in plan.refusals]
    lines += [f"  note: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _estimate_title(role: str, est, plan: Plan) -> str:
    f = est.facts
    if role == "learner":
        return (f"learner, per {'GPU' if est.where == 'GPU' else 'worker (host)'}: {f['rows']} rows per optimizer step in "
                f"{f['micro_batches']} micro-batch(es) of b = {f['micro']}, L = {f['seq_len']}; peak {_gib(est.peak)} "
                f"(the larger of [update] and [start])")
    if role == "rollout":
        kv = f" ({f['kv_tokens']} tokens of KV cache)" if "kv_tokens" in f else ""
        return f"rollout, per actor on its {'GPU' if est.where == 'GPU' else 'node'}: {f['rows']} rows a step{kv}; {_gib(est.peak)}"
    return f"host, the whole cluster: peak {_gib(est.peak)} (every unmarked term + the largest [phase])"


def plan_json(plan: Plan) -> dict:
    """The plan as one JSON object (bytes as integers)."""
    cl = plan.cluster
    return {
        "config": plan.config, "fits": plan.fits, "refusals": plan.refusals, "warnings": plan.warnings,
        "cluster": {"source": cl.source, "nodes": cl.nodes, "gpu_memory": cl.gpu_memory, "shm": cl.shm,
                    "cpus": cl.total("CPU"), "gpus": cl.total("GPU"), "memory": cl.total("memory")},
        "model": None if plan.shape is None else {**asdict(plan.shape), "params": plan.shape.params,
                                                   "source": plan.shape_source},
        "lengths": plan.lengths, "learner_device": plan.device,
        "roles": [{**asdict(n), "cpus": n.total("CPU"), "gpus": n.total("GPU"),
                   "memory_peak": plan.memory[n.role].peak if n.role in plan.memory else None} for n in plan.needs],
        "totals": {k: sum(n.total(k) for n in plan.needs) for k in ("CPU", "GPU")},
        "memory": {role: {"where": e.where, "peak": e.peak, "facts": e.facts,
                          "terms": [{"label": t[0], "formula": t[1], "bytes": t[2], "phase": t[3]} for t in e.terms]}
                   for role, e in plan.memory.items()},
    }


def main(args: argparse.Namespace) -> int:
    """Print the plan (text or --json); exit 0 when it fits, 1 when refused, 2 on a bad config."""
    from services.cli.config_file import load_config

    try:
        cfg = load_config(args.config, getattr(args, "overrides", None) or ())
    except (OSError, ValueError) as exc:
        print(f"aepo plan: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(cfg, describe_cluster(args), args.config, args.model_shape, args.prompt_tokens)
    if args.json:
        print(json.dumps(plan_json(plan), indent=2, ensure_ascii=False))
    else:
        print(render(plan))
    return 0 if plan.fits else 1


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cli.plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(cli())

