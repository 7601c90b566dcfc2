"""GPU smoke: the RL loop, the learner's speed and a weight sync on one GPU, one JSON line each.

    bash scripts/gpu_smoke.sh                 # one GPU, torch + transformers + the project, no vLLM
    bash scripts/gpu_smoke.sh --cpu-check     # the same code on CPU at tiny shapes (tests/test_gpu_smoke.py)

Measurements, in order (each prints one JSON line on stdout with "measure" naming it; progress
goes to stderr):

  rl_steps        `aepo train` on deploy/configs/gpu_smoke.yaml in a child process: a local Ray,
                  the reward server on Serve, one learner rank on the GPU and the HF rollout engine on
                  the same GPU, a few AEPO steps. Per step: seconds, phase times, weight-sync seconds;
                  the learner's device and precision; how many processes held the GPU at once.
  fwd_bwd         per shape: a forward + backward of a random-weight Qwen2 model built from a
                  transformers Qwen2Config at Qwen2.5-0.5B's and 1.5B's published shapes, bf16, on
                  rows x seq_len tokens (default 4 x 2048): tokens/s and MFU, the kernels' ceiling.
  learner_update  per shape: the project's learner (`LearnerWorker.update`: FSDP2 on one rank, bf16
                  compute, fp32 master weights, exact entropy, GRPO loss, AdamW) on the same tokens,
                  in micro-batches of --micro-batch rows (default 1: 1.5B's update fits 80 GB).
  weight_sync     per shape: the learner's gather of the full float32 weights (`full_state_dict_wire`)
                  + the HF engine's `load_weights` of them onto the GPU, and the bucketed sync the
                  Ray path runs (`export_weights` in sync_dtype auto, bf16 on a GPU, +
                  `load_weight_buckets`), without the object store between them.
  done            the whole smoke's wall time.

MFU = 6 x parameters x tokens/s / peak bf16 FLOP/s (the attention's own FLOPs are left out of the
6 P rule; `mfu_with_attention` adds 12 x layers x hidden x seq_len per token). The peak is looked up
from the GPU's name (H100 SXM, H200: 989 TFLOP/s dense bf16), else given with --peak-tflops; without
either the MFU fields are null. Everything is bounded: --deadline-s (420 s) is checked before each
stage and bounds the RL child, which `scripts/gpu_smoke.sh` runs under an 8-minute timeout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository's code is what is smoke-tested, installed or not
    sys.path.insert(0, str(ROOT))

from services.model.plan_memory import PRESETS, ModelShape  # noqa: E402 - after the path fix
CONFIG = ROOT / "deploy" / "configs" / "gpu_smoke.yaml"


# The published config.json shapes of Qwen2.5-0.5B and Qwen2.5-1.5B: `aepo plan`'s presets, one table.
SHAPES = {name: PRESETS[name] for name in ("qwen2.5-0.5b", "qwen2.5-1.5b")}
CPU_SHAPES = {"tiny-qwen2": ModelShape("tiny-qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                       vocab=512, tied=True, max_positions=4096)}
SHAPE_FIELDS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16 = (("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
# The RL run at tiny shapes on CPU (--cpu-check): same config, same code path.
CPU_RL_OVERRIDES = (
    "learner.device=cpu", "rollout.dtype=auto", "trainer.steps=1", "trainer.prompts_per_step=2",
    "rollout.group_size=2", "rollout.max_tokens=16", "trainer.eval_prompts=2", "trainer.eval_samples=2",
    "data.num_train=16", "data.num_eval=2", "algorithm.rule.m_up=2", "algorithm.rule.m_down=1",
    "model.small_llm={vocab_size: 512, corpus_problems: 200, hidden_size: 64, num_layers: 2, num_heads: 2,"
    " num_kv_heads: 1, intermediate_size: 128, max_position_embeddings: 512}",
    "trainer.export_policy=false",
)


def log(msg: str) -> None:
    print(f"gpu_smoke: {msg}", file=sys.stderr, flush=True)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


class Deadline:
    """The smoke's time budget: each stage asks for what is left before it starts."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def require(self, stage: str, at_least: float) -> None:
        if self.left() < at_least:
            raise SystemExit(f"gpu_smoke: {self.left():.0f} s left of --deadline-s, {stage} needs about "
                             f"{at_least:.0f} s: stopped before it")


def peak_flops(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak and where it came from."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, flops in PEAK_BF16:
        if key in device_name:
            return flops, f"table ({key})"
    return None, f"unknown for {device_name!r}: pass --peak-tflops"


def mfu_fields(params: int, shape: ModelShape, seq_len: int, tokens_per_s: float, peak: float | None) -> dict:
    """MFU by the 6 P rule, and with the attention's 12 L h s FLOPs per token added."""
    attn = 12 * shape.layers * shape.hidden * seq_len
    if not peak:
        return {"mfu": None, "mfu_with_attention": None}
    return {"mfu": round(6 * params * tokens_per_s / peak, 4),
            "mfu_with_attention": round((6 * params + attn) * tokens_per_s / peak, 4)}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the RL run


class GpuProcessWatch:
    """How many processes held the GPU at once, polled with nvidia-smi (None without it)."""

    def __init__(self, enabled: bool):
        self.max_procs: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if enabled and shutil.which("nvidia-smi") else None
        if self._thread:
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            n = len({line.strip() for line in out.splitlines() if line.strip()})
            self.max_procs = max(self.max_procs or 0, n)

    def stop(self) -> int | None:
        """The most processes seen at once; None where nvidia-smi is missing or lists none (in some
        containers it cannot see the processes' ids)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)
        return self.max_procs or None


def rl_command(args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "services.cli.train", "--config", str(CONFIG), "--output-dir", str(out),
           "--no-progress", f"trainer.steps={args.steps}"]
    return cmd + list(CPU_RL_OVERRIDES if args.cpu_check else ())


def measure_rl(args: argparse.Namespace, deadline: Deadline) -> dict:
    """A few AEPO steps of deploy/configs/gpu_smoke.yaml through the Ray system, in a child process."""
    deadline.require("rl_steps", 60)
    out = args.workdir / "rl"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "AEPO_CACHE": str(args.workdir / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    cmd = rl_command(args, out)
    log(f"rl_steps: {' '.join(cmd[1:4])} ... ({args.steps} steps)")
    watch = GpuProcessWatch(enabled=not args.cpu_check)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(deadline.left() - 30, 30))
    except subprocess.TimeoutExpired as exc:
        tail = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise SystemExit(f"gpu_smoke: rl_steps ran past the deadline; its last output:\n{tail[-3000:]}") from exc
    finally:
        gpu_procs = watch.stop()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"gpu_smoke: `aepo train` on {CONFIG.name} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return rl_row(out, wall, gpu_procs)


def rl_row(out: Path, wall: float, gpu_procs: int | None) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    if not rows:
        raise SystemExit(f"gpu_smoke: the RL run wrote no metrics rows to {out / 'metrics.jsonl'}")
    phases = sorted({k for r in rows for k in r.get("time", {})})
    return {
        "measure": "rl_steps", "config": str(CONFIG.relative_to(ROOT)), "steps": len(rows), "wall_s": round(wall, 1),
        "learner": summary.get("learner_compute"), "gpu_processes_max": gpu_procs,
        "step_s": [round(r["step_seconds"], 3) for r in rows],
        "time_mean_s": {k: round(statistics.mean(r["time"].get(k, 0.0) for r in rows), 4) for k in phases},
        "weight_sync_s": [round(r["weight_sync_seconds"], 4) for r in rows],
        "rollout_tokens_per_s": round(statistics.mean(r.get("rollout_tokens_per_s", 0.0) for r in rows), 1),
        "learner_tokens_per_s": round(statistics.mean(r.get("learner_tokens_per_s", 0.0) for r in rows), 1),
        "reward_mean": rows[-1].get("reward_mean"), "entropy": rows[-1].get("entropy"),
    }


# ----------------------------------------------------------------------------- one shape


def qwen_config(shape: ModelShape, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def timed(fn, device: str, warmup: int, iters: int) -> float:
    """Seconds for `iters` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return time.perf_counter() - t0


def measure_fwd_bwd(name: str, shape: ModelShape, args: argparse.Namespace, model, params: int) -> dict:
    """Forward + backward (next-token loss) of the random Qwen2 model, bf16 on GPU, on rows x seq_len tokens."""
    import torch

    dev, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)
    model.to(dtype).train()
    ids = torch.randint(0, shape.vocab, (args.rows, args.seq_len), device=dev)

    def step() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        seconds = timed(step, dev, args.warmup, args.iters)
    finally:
        model.zero_grad(set_to_none=True)
    tps = args.rows * args.seq_len * args.iters / seconds
    return {"measure": "fwd_bwd", "shape": name, **{k: getattr(shape, k) for k in SHAPE_FIELDS}, "params": params, "dtype": str(dtype).split(".")[-1],
            "attention": getattr(model.config, "_attn_implementation", None), "rows": args.rows,
            "seq_len": args.seq_len, "iters": args.iters, "seconds": round(seconds, 4), "tokens_per_s": round(tps, 1),
            **mfu_fields(params, shape, args.seq_len, tps, args.peak)}


def save_model_dir(model, tokenizer, path: Path) -> None:
    """The random model and a tokenizer as a checkpoint directory the learner and the engine load."""
    from transformers import GenerationConfig

    shutil.rmtree(path, ignore_errors=True)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def synthetic_batch(args: argparse.Namespace, vocab: int):
    """rows x seq_len tokens: a prompt of seq_len/8, the rest response, advantages +1/-1."""
    import torch

    from services.learner.batch import TrainBatch

    g = torch.Generator().manual_seed(0)
    prompt_len = max(1, args.seq_len // 8)
    tokens = torch.randint(1, vocab, (args.rows, args.seq_len), generator=g).tolist()
    prompts = [row[:prompt_len] for row in tokens]
    responses = [row[prompt_len:] for row in tokens]
    advantages = [1.0 if i % 2 == 0 else -1.0 for i in range(args.rows)]
    return TrainBatch.from_sequences(prompts, responses, advantages, [False] * args.rows, pad_id=0)


def start_learner(path: Path, args: argparse.Namespace):
    """One learner rank in this process, as the Ray learner group runs each (its own process group)."""
    from services.backends.network import free_port
    from services.config import GRPOConfig, LearnerConfig
    from services.learner.worker import LearnerWorker

    cpus = float(os.cpu_count() or 1) if args.device == "cpu" else 1.0
    cfg = LearnerConfig(num_workers=1, device=args.device, cpus_per_worker=cpus, micro_batch_size=args.micro_batch,
                        mini_batches=1)
    worker = LearnerWorker(0, 1, str(path), cfg, GRPOConfig(), seed=0, device=args.device)
    worker.setup("127.0.0.1", free_port())
    return worker


def measure_learner(name: str, shape: ModelShape, args: argparse.Namespace, worker, params: int) -> dict:
    """`LearnerWorker.update` (the RL step's learner work) on rows x seq_len tokens."""
    batch = synthetic_batch(args, shape.vocab)
    stats: list[dict] = []
    seconds = timed(lambda: stats.append(worker.update(batch)), args.device, args.warmup, args.iters)
    tokens = stats[-1]["tokens"]
    tps = tokens * args.iters / seconds
    return {"measure": "learner_update", "shape": name, "params": params, "compute": worker.compute_info(),
            "rows": args.rows, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "iters": args.iters,
            "seconds": round(seconds, 4), "tokens_per_s": round(tps, 1), **mfu_fields(params, shape, args.seq_len, tps, args.peak),
            "grad_norm": round(float(stats[-1]["grad_norm"]), 4), "pg_loss": round(float(stats[-1]["pg_loss"]), 6)}


def measure_sync(name: str, args: argparse.Namespace, worker, path: Path) -> dict:
    """Two ways of one RL step's weight sync minus the object store, onto the HF engine on the
    device: the float32 full dict (`full_state_dict_wire`, the way before) + `load_weights`, and the
    bucketed export in `learner.sync_dtype` auto (bf16 on a GPU) + `load_weight_buckets`."""
    from services.backends.weight_buckets import iter_bucket_tensors
    from services.backends.wire import from_wire
    from services.learner.sync import local_buckets
    from services.rollout.engines.hf import HFEngine

    engine = HFEngine(str(path), device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32")
    times: dict[str, list] = {"gather_s": [], "load_s": [], "buckets_export_s": [], "buckets_load_s": []}
    nbytes = bucket_bytes = 0
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        wire = worker.full_state_dict_wire()
        t1 = time.perf_counter()
        engine.load_weights(from_wire(wire))
        sync(args.device)
        t2 = time.perf_counter()
        nbytes = sum(int(v.nbytes) for v in wire.values())
        del wire
        handle = local_buckets(worker.export_weights())
        t3 = time.perf_counter()
        engine.load_weight_buckets(iter_bucket_tensors(handle))
        sync(args.device)
        t4 = time.perf_counter()
        bucket_bytes, dtype = handle.nbytes, handle.manifest["dtype"]
        del handle
        if i >= args.warmup:
            for key, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(v)
    engine.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    total = med["gather_s"] + med["load_s"]
    return {"measure": "weight_sync", "shape": name, "engine": "hf", "engine_device": str(engine.device),
            "bytes": nbytes, **{k: round(v, 4) for k, v in med.items()}, "total_s": round(total, 4),
            "gb_per_s": round(nbytes / 1e9 / max(total, 1e-9), 2), "buckets_dtype": dtype, "buckets_bytes": bucket_bytes,
            "buckets_total_s": round(med["buckets_export_s"] + med["buckets_load_s"], 4), "iters": args.iters}


def guarded(measure: str, name: str, args: argparse.Namespace, fn) -> dict:
    """`fn()`'s row, or (out of device memory) a row saying so: the other measurements still run."""
    import torch

    log(f"{name}: {measure}")
    error = None
    try:
        row = fn()
    except torch.OutOfMemoryError as exc:
        error = str(exc).splitlines()[0]
    if error is not None:  # outside the except block: its traceback no longer holds the tensors
        free_memory()
        row = {"measure": measure, "shape": name, "error": f"out of memory at {args.rows} x {args.seq_len} tokens "
               f"(micro-batch {args.micro_batch}): {error}; try smaller --rows/--micro-batch"}
    emit({**row, "device": args.device_name})
    return row


def measure_shape(name: str, shape: ModelShape, args: argparse.Namespace, tokenizer, deadline: Deadline) -> None:
    """fwd_bwd, learner_update and weight_sync of one shape; frees the device after each."""
    deadline.require(f"{name}", 20 if args.cpu_check else 90)
    log(f"{name}: building the model")
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it runs: seconds, not minutes, for 1.5 B
        model = Qwen2ForCausalLM(qwen_config(shape, tokenizer))
    params = sum(p.numel() for p in model.parameters())
    guarded("fwd_bwd", name, args, lambda: {**measure_fwd_bwd(name, shape, args, model, params),
                                            "peak_flops": args.peak, "peak_source": args.peak_source})
    path = args.workdir / "models" / name
    save_model_dir(model, tokenizer, path)
    del model
    free_memory()
    worker = start_learner(path, args)
    try:
        guarded("learner_update", name, args, lambda: measure_learner(name, shape, args, worker, params))
        guarded("weight_sync", name, args, lambda: measure_sync(name, args, worker, path))
    finally:
        worker.shutdown()
        del worker
        free_memory()
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-check", action="store_true", help="tiny shapes on CPU, 1 step, 1 iteration (no GPU needed)")
    p.add_argument("--workdir", type=Path, help="scratch space (default: a new temporary directory, removed after)")
    p.add_argument("--steps", type=int, help="RL steps (default 4; --cpu-check 1)")
    p.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default: both)")
    p.add_argument("--rows", type=int, help="sequences per forward/backward (default 4; --cpu-check 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; --cpu-check 64)")
    p.add_argument("--micro-batch", type=int, help="the learner's micro_batch_size: rows per forward/backward of "
                   "its gradient accumulation (default 1, which keeps 1.5B's update within 80 GB; --cpu-check 2)")
    p.add_argument("--iters", type=int, help="timed iterations (default 3; --cpu-check 1)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 1; --cpu-check 0)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, TFLOP/s, when its name is not in the table")
    p.add_argument("--deadline-s", type=float, default=420.0, help="stop before a stage once this much time is spent")
    p.add_argument("--skip-rl", action="store_true", help="only the learner and weight-sync measurements")
    args = p.parse_args(argv)
    small = args.cpu_check
    for key, gpu, cpu in (("steps", 4, 1), ("rows", 4, 2), ("seq_len", 2048, 64), ("iters", 3, 1), ("warmup", 1, 0),
                           ("micro_batch", 1, 2)):
        if getattr(args, key) is None:
            setattr(args, key, cpu if small else gpu)
    table = CPU_SHAPES if small else SHAPES
    names = args.shapes.split(",") if args.shapes else list(table)
    unknown = [n for n in names if n not in {**SHAPES, **CPU_SHAPES}]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; known: {', '.join({**SHAPES, **CPU_SHAPES})}")
    args.shape_list = [(n, {**SHAPES, **CPU_SHAPES}[n]) for n in names]
    return args


def resolve_device(args: argparse.Namespace) -> None:
    """cuda, or cpu with --cpu-check; the name and bf16 peak for MFU."""
    import torch

    if args.cpu_check:
        args.device, args.device_name = "cpu", "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_smoke: no CUDA device (torch.cuda.is_available() is False; torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); --cpu-check runs it on CPU")
    else:
        args.device, args.device_name = "cuda", torch.cuda.get_device_name(0)
    args.peak, args.peak_source = peak_flops(args.device_name, args.peak_tflops)


def run(args: argparse.Namespace) -> None:
    from services.model.tiny import build_char_tokenizer

    deadline = Deadline(args.deadline_s)
    t0 = time.monotonic()
    resolve_device(args)
    log(f"device {args.device_name}, bf16 peak {args.peak} ({args.peak_source}), workdir {args.workdir}")
    if not args.skip_rl:
        emit({**measure_rl(args, deadline), "device": args.device_name})
    tokenizer = build_char_tokenizer()  # the engine needs pad/eos ids; the weights are random anyway
    for name, shape in args.shape_list:
        measure_shape(name, shape, args, tokenizer, deadline)
    emit({"measure": "done", "device": args.device_name, "wall_s": round(time.monotonic() - t0, 1)})


def main(argv: list[str] | None = None) -> int:
    import signal

    # SIGTERM (gpu_smoke.sh's timeout) unwinds like an error: the RL child is killed, the workdir removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    own_workdir = args.workdir is None
    if own_workdir:
        import tempfile

        args.workdir = Path(tempfile.mkdtemp(prefix="aepo-gpu-smoke-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args)
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
