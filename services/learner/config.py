"""The FSDP2 learners' settings: workers, batch layout, optimizer, precision, the entropy analysis.

`services.config` re-exports these; a run config sets them under `learner:`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntropyAnalysisConfig(_Strict):
    """Where the entropy lives: the per-step split every run reports (metrics.jsonl `token_entropy`,
    Prometheus `aepo_token_entropy{kind}`)."""

    irrelevant_tokens: list[str] | None = Field(
        None,
        description="Tokens the reward ignores; the entropy of choosing among them (vs the rest) is reported "
        "as `irrelevant`, the remainder as `content`. None: the task's default ([' '] for countdown, none for files).",
    )
    forking_share: float = Field(
        0.2, gt=0.0, lt=1.0, description="The highest-entropy share of GRPO tokens reported as `forking` tokens."
    )
    position_bucket: int = Field(1, ge=1, description="Response positions per bucket of the entropy-by-position profile.")
    position_buckets: int = Field(
        32, ge=1, le=512, description="Buckets in the profile; the last one holds every later position."
    )


class LearnerConfig(_Strict):
    """The FSDP2 learners: workers, batch layout, optimizer, precision and the speed switches."""

    num_workers: int = Field(2, ge=1, description="FSDP learner actors (one torch.distributed rank each).")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0.0, description="Global grad-norm clip.")
    micro_batch_size: int = Field(64, ge=1, description="Sequences per forward/backward on one worker.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per RL step (the batch is split into this many).")
    entropy_chunk_size: int = Field(
        4096, ge=1, description="Positions per chunk of the exact-entropy computation, and of the LM head with chunked_head "
        "(one chunk's logits are V x 4 bytes a position: 0.6 MB for Qwen2.5's 151,936 tokens, so 1024 holds 0.6 GB each)."
    )
    chunked_head: bool = Field(
        True,
        description="Compute log-probs and the exact entropy (and their gradients) from the final hidden states, "
        "applying the LM head entropy_chunk_size positions at a time and only at the positions a loss or statistic "
        "reads, recomputing each chunk's logits in the backward: never the whole micro-batch's [b, L, V] logits. Same "
        "values as the model's own logits within float rounding; needs a bias-free linear head (Qwen2, Llama).",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1,
        description="Cut each mini-batch into micro-batches by padded tokens (rows x the micro-batch's longest row, "
        "rows in their sorted order) instead of micro_batch_size rows; a longer row runs alone. Ranks agree on the "
        "count (a short rank runs inert one-row micro-batches). None = micro_batch_size rows. The token-mean loss "
        "is the same either way; clip_cov and kl_cov pick their tokens per micro-batch, so for them it is not.",
    )
    cpus_per_worker: float = Field(
        1.0, gt=0.0, description="Ray CPUs per learner actor (its placement-group bundle); fractions let 2 learners share a core."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda (NCCL, bf16 mixed precision) when the cluster has a GPU per worker, cpu (gloo, float32) "
        "when it has none; fewer GPUs than workers is an error (never a silent move to the CPUs)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the learner bundles."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each learner actor (and its bundle) requests, e.g. {node_a: 1} to place "
        "it on the nodes started with that resource (`ray start --resources`); empty = anywhere.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward (large models); turns share_prefix off."
    )
    fuse_scoring: bool = Field(
        True,
        description="With one mini-batch (on-policy), take the old log-probs and the entropy from the training "
        "forward itself (detached) instead of a separate scoring pass: identical values, one forward fewer.",
    )
    fast_gather: bool = Field(
        True,
        description="Weight sync: gather the full weights in flat bucketed all-gathers (FSDP2 dim-0 shards) "
        "instead of one collective per parameter; falls back to torch's gather for other layouts.",
    )
    sync_bucket_mb: int = Field(
        64, ge=1, description="Weight sync: MiB of parameters (float32) per flat all-gather bucket; each bucket, in "
        "sync_dtype, is one object the engines fetch and load in turn (services/learner/sync.py).",
    )
    sync_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weight sync: the dtype the weights travel to the rollout engines in. auto = what the engines "
        "compute in by default, so no sample changes: float32 for CPU learners, the checkpoint's dtype (bfloat16 "
        "for Qwen2.5) on GPU. bfloat16 on CPU halves the bytes but rounds the float32 engines' weights.",
    )
    sync_transport: Literal["object_store", "collective"] = Field(
        "object_store",
        description="Weight sync: how the buckets reach the rollout engines. object_store = learner rank 0 writes "
        "each bucket to Ray's object store and every actor fetches it (the refs pass through the driver "
        "unresolved). collective = learner rank 0 and every engine form one extra process group (gloo for CPU "
        "learners, NCCL on GPU, beside the learners' own) and rank 0 broadcasts each bucket while the engines "
        "receive and load it (vLLM: its workers join, inside the layerwise reload); the same weights "
        "either way, so no sample changes (services/learner/collective.py). Not with NCCL and colocated engines: "
        "NCCL refuses two ranks on one GPU.",
    )
    sort_by_length: bool = Field(
        True,
        description="Order each mini-batch's rows by length before cutting micro-batches, so each micro-batch "
        "is padded only to its own longest row; the loss is a token sum, so the update is unchanged. "
        "With share_prefix, rows are ordered by prompt instead.",
    )
    share_prefix: bool = Field(
        True,
        description="Run each distinct prompt once per micro-batch and only the responses per row, on the "
        "prompt's KV cache (a GRPO group of G shares its prompt): same logits at every response position, "
        "less work. Needs transformers' layered cache (5.x); off with gradient checkpointing or remove_padding.",
    )
    remove_padding: bool = Field(
        False,
        description="Pack each micro-batch's rows into one sequence (position ids restart per row, transformers "
        "masks the rows off from each other): no padded position is computed, the same values. The attention "
        "stays dense over the packed length under sdpa/eager (a varlen kernel skips that); a token budget "
        "then counts the rows' own tokens. Turns share_prefix off (services/learner/packing.py).",
    )
    hold_full_params: bool | None = Field(
        None,
        description="Keep each layer's full parameters from the first forward of an optimizer step to its last "
        "backward: one all-gather and one reduce-scatter per layer per step, instead of an all-gather for every "
        "forward and backward of every micro-batch (each one a point where the ranks wait for each other). Costs "
        "the full model's memory on every rank. None = on for CPU learners (small models), off on GPU.",
    )
    cpu_compute: Literal["float32", "bfloat16", "auto"] = Field(
        "float32",
        description="On CPU, the dtype of the decoder layers' matmuls: bfloat16 runs each layer under torch.autocast "
        "(weights, optimizer, residual stream, head, losses and entropies stay float32); auto = bfloat16 where the "
        "CPU has AMX-BF16 (several times the float32 matmul speed), else float32. Ignored on GPU.",
    )
    entropy_analysis: EntropyAnalysisConfig = Field(default_factory=EntropyAnalysisConfig)
