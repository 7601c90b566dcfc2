"""The learner group: N Ray actors, one torch.distributed rank each, training one FSDP2 model.

`LearnerWorker` is a plain class (one rank); `LearnerGroup` (driver side) reserves a placement
group, starts the workers as Ray actors, forms the process group (gloo on CPU, NCCL on GPU) and
fans calls out, giving every rank its shard of the batch.

Losses come from `services.algorithm` only. Normalisation: each micro-batch's loss is its token sum
divided by the mini-batch's global token count (all ranks, all micro-batches), and multiplied by
world_size before backward because FSDP averages gradients over ranks; so the accumulated gradient
is exactly that of the token-mean over the whole mini-batch, as in a single-process update.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import torch.distributed as dist

from services import algorithm as alg
from services.config import AlgorithmConfig, LearnerConfig

# --------------------------------------------------------------------------- the batch


@dataclass
class TrainBatch:
    """Padded sequences (prompt then response then padding), one row per sample.

    tokens [B, L] long; attention_mask [B, L] (1 on prompt + response); response_mask [B, L]
    (1 on response tokens, eos included); advantages [B] float; is_regularizer [B] bool.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    is_regularizer: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_sequences(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        advantages: Sequence[float] | torch.Tensor,
        is_regularizer: Sequence[bool] | torch.Tensor,
        pad_id: int,
    ) -> "TrainBatch":
        """Right-padded batch from token-id lists (e.g. `Sample.prompt_ids` / `.response_ids`)."""
        if not (len(prompts) == len(responses) == len(advantages) == len(is_regularizer)):
            raise ValueError("prompts, responses, advantages and is_regularizer must have one entry per row")
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        resp = torch.zeros((len(prompts), width), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            tokens[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
            attn[i, : len(p) + len(r)] = 1
            resp[i, len(p) : len(p) + len(r)] = 1.0
        return cls(
            tokens,
            attn,
            resp,
            torch.as_tensor(advantages, dtype=torch.float32),
            torch.as_tensor(is_regularizer, dtype=torch.bool),
        )

    @classmethod
    def from_dict(cls, batch: dict, pad_id: int) -> "TrainBatch":
        """From the driver's {prompt_ids, response_ids, advantages, is_regularizer} lists."""
        return cls.from_sequences(
            batch["prompt_ids"], batch["response_ids"], batch["advantages"], batch["is_regularizer"], pad_id
        )

    def select(self, rows) -> "TrainBatch":
        """The rows given by an index tensor or slice."""
        return TrainBatch(*(getattr(self, f.name)[rows] for f in fields(self)))

    def to(self, device) -> "TrainBatch":
        """Every tensor on `device`."""
        return TrainBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def padded_to(self, rows: int) -> "TrainBatch":
        """Append dummy rows (copies of row 0 with no response tokens and advantage 0) up to `rows`.

        Data-parallel ranks must run the same number of forward/backward passes (FSDP's
        collectives pair up), so every rank gets the same row count; dummy rows add nothing to
        the loss, the gradient or the token counts.
        """
        extra = rows - len(self)
        if extra <= 0:
            return self
        pad = self.select(torch.zeros(extra, dtype=torch.long))
        pad.response_mask = torch.zeros_like(pad.response_mask)
        pad.advantages = torch.zeros_like(pad.advantages)
        pad.is_regularizer = torch.zeros_like(pad.is_regularizer)
        return TrainBatch(*(torch.cat([getattr(self, f.name), getattr(pad, f.name)]) for f in fields(self)))


def shard_batch(batch: TrainBatch, world_size: int, mini_batches: int = 1) -> list[TrainBatch]:
    """Split a global batch into per-rank shards that keep the mini-batch structure.

    Global mini-batch k is the k-th of `mini_batches` near-equal contiguous parts of the batch
    (the first parts one row longer when B does not divide). Each part is cut into `world_size`
    contiguous pieces of `per` rows, the last ones topped up with inert dummy rows, and rank r
    receives its piece of every part in order: its local mini-batch k is its k-th block of `per`.
    """
    B = len(batch)
    q, extra = divmod(B, mini_batches)
    starts = [k * q + min(k, extra) for k in range(mini_batches + 1)]
    per = max(1, math.ceil((q + (1 if extra else 0)) / world_size))
    ext = batch.padded_to(B + 1)  # row B is the dummy every piece is topped up with
    shards = []
    for r in range(world_size):
        idx: list[int] = []
        for k in range(mini_batches):
            piece = list(range(starts[k], starts[k + 1]))[r * per : (r + 1) * per]
            idx += piece + [B] * (per - len(piece))
        shards.append(ext.select(torch.tensor(idx, dtype=torch.long)))
    return shards


def make_adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these tensors (CPU and CUDA, DTensors
    included): the same update as the per-tensor loop up to float rounding, and on the tiny model
    3 ms a step instead of 20."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def length_order(lengths: torch.Tensor, mini_batches: int = 1) -> torch.Tensor:
    """Row order that sorts each of the `mini_batches` contiguous blocks by length (stable).

    Rows never leave their mini-batch, so each optimizer step sees the same rows; inside it the
    order only decides which rows share a micro-batch, i.e. how much padding each one carries.
    """
    per = len(lengths) // mini_batches
    return torch.cat([
        k * per + torch.sort(lengths[k * per : (k + 1) * per], stable=True).indices for k in range(mini_batches)
    ])


def prompt_lengths(attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Tokens before each row's response; a row without response tokens (an inert dummy) counts
    as all prompt."""
    has = response_mask.sum(1) > 0
    return torch.where(has, response_mask.argmax(1), attention_mask.sum(1)).long()


def prompt_order(batch: TrainBatch, mini_batches: int = 1) -> torch.Tensor:
    """Row order that puts rows with the same prompt side by side inside each of the
    `mini_batches` contiguous blocks, groups in order of first appearance (stable)."""
    plen = prompt_lengths(batch.attention_mask, batch.response_mask).tolist()
    first: dict[tuple, int] = {}
    group = torch.tensor([first.setdefault(tuple(row[:n]), i) for i, (row, n) in enumerate(zip(batch.tokens.tolist(), plen))])
    per = len(group) // mini_batches
    return torch.cat([
        k * per + torch.sort(group[k * per : (k + 1) * per], stable=True).indices for k in range(mini_batches)
    ])


def _layered_cache() -> bool:
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:
        return False
    return hasattr(DynamicCache(), "layers")


def shared_prefix_logits(model, tokens: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """Logits [B, W, V] of right-padded rows (prompt, response, padding) with each distinct prompt
    run once: a forward over the unique prompts (left-padded) fills a KV cache, its rows are
    repeated for the rows that share them, and a second forward runs only the responses on it.
    Gradients flow back through the cache into the prompt positions, as in the joint forward.

    Exact at every position t from a row's last prompt token on (they predict response tokens,
    the only ones a loss reads); prompt positions hold zeros. Always two forwards, whatever the
    rows: under FSDP every rank must run the same collectives, so no rank may take a shortcut
    (a micro-batch of distinct prompts, or of inert rows only) that another does not.
    """
    from transformers.cache_utils import DynamicCache

    B, W = tokens.shape
    plen = prompt_lengths(attention_mask, response_mask)
    rlen = attention_mask.sum(1).long() - plen
    rows = tokens.tolist()
    index: dict[tuple, int] = {}
    owner = torch.tensor([index.setdefault(tuple(r[:n]), len(index)) for r, n in zip(rows, plen.tolist())])
    P = len(index)
    if int(plen.min()) < 1:
        raise ValueError("a row has an empty prompt: every row needs at least one token (e.g. <bos>) before its response")
    prompts = list(index)
    lp = max(map(len, prompts))
    dev = tokens.device
    p_ids = torch.zeros((P, lp), dtype=torch.long, device=dev)
    p_mask = torch.zeros((P, lp), dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        p_ids[i, lp - len(p) :] = torch.tensor(p, device=dev)
        p_mask[i, lp - len(p) :] = 1
    p_pos = (p_mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    first = model(
        input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, past_key_values=cache, use_cache=True, logits_to_keep=1
    )
    owner = owner.to(dev)
    rows_cache = DynamicCache()
    for i, layer in enumerate(cache.layers):
        rows_cache.update(layer.keys[owner], layer.values[owner], i)
    la = max(1, int(rlen.max()))  # at least one column, so inert-only micro-batches run the same passes
    # each row's response, moved to the front: r_ids[i, j] = tokens[i, plen_i + j]
    j = torch.arange(la, device=dev)
    src = (plen.to(dev).unsqueeze(1) + j).clamp_max(W - 1)
    valid = j < rlen.to(dev).unsqueeze(1)
    r_ids = torch.where(valid, tokens.gather(1, src), torch.zeros_like(src))
    r_mask = valid.long()
    second = model(
        input_ids=r_ids,
        attention_mask=torch.cat([p_mask[owner], r_mask], 1),
        position_ids=plen.to(dev).unsqueeze(1) + j,
        past_key_values=rows_cache,
        use_cache=True,
    )
    # pred[i, j] predicts response token j: the prompt's last position, then the responses' own
    pred = torch.cat([first.logits[:, -1][owner].unsqueeze(1), second.logits[:, :-1]], 1)
    # back to the row layout, where position t predicts token t + 1: pred[i, j] goes to plen_i - 1 + j
    # (padding positions j >= rlen_i land on the row's own padding, or past W and are cut)
    out = pred.new_zeros((B, W + la, pred.shape[-1]))
    dst = (plen.to(dev).unsqueeze(1) - 1 + j).unsqueeze(-1).expand(-1, -1, pred.shape[-1])
    return out.scatter(1, dst, pred)[:, :W]


# --------------------------------------------------------------------------- one rank


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerWorker:
    """One data-parallel rank: the FSDP2-sharded model, its AdamW and the update loop."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        model_path: str,
        cfg: LearnerConfig,
        algorithm: AlgorithmConfig,
        seed: int = 0,
        device: str = "cpu",
    ):
        self.rank, self.world_size = rank, world_size
        self.cfg, self.algorithm, self.model_path, self.seed = cfg, algorithm, model_path, seed
        self.device = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        if device == "cpu":
            # one thread per reserved CPU: two learners sharing a core must not oversubscribe it
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.model = self.optimizer = None
        # Clip-Cov's random token choice; seeded per rank so reruns repeat
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port on it (asked of rank 0 to rendezvous)."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, load the model, shard it with FSDP2, make the optimizer."""
        from services.backends.network import join_process_group

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if master_addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback-only clusters (CI)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        join_process_group(backend, master_addr, master_port, self.rank, self.world_size)
        self.model = build_fsdp_model(self.model_path, self.cfg, self.device, self.seed)
        self.optimizer = make_adamw(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.irrelevant_ids = _token_ids(self.model_path, self.cfg.entropy_analysis.irrelevant_tokens or [])
        # the prompt-once forward feeds a KV cache with gradients; checkpointed layers drop caches
        self._share_prefix = self.cfg.share_prefix and not self.cfg.gradient_checkpointing and _layered_cache()
        self._hold = hold_full_params(self.cfg, self.device)
        self.vocab_size = int(self.model.config.vocab_size)

    def compute_info(self) -> dict[str, str]:
        """What this rank computes in: device, the decoder layers' matmul dtype (`cpu_compute`
        as resolved on this node, or FSDP's bf16 mixed precision on GPU), parameters float32."""
        from services.model.precision import resolve_cpu_compute

        layers = "bfloat16" if self.device.type == "cuda" else resolve_cpu_compute(self.cfg.cpu_compute)
        return {"device": self.device.type, "layers": layers, "params": "float32"}

    # ------------------------------------------------------------------ forward passes

    def _logits(self, batch: TrainBatch, all_positions: bool = False) -> tuple[torch.Tensor, int]:
        """Logits of the batch cut to its longest row; returns (logits [b, l, V], l).

        With `share_prefix`, rows that share a prompt (a GRPO group, and the regularizer samples of
        the same prompt) run the prompt once: `shared_prefix_logits` gives the same values at every
        response position (the only ones any loss or statistic reads) for a fraction of the work.
        """
        width = int(batch.attention_mask.sum(1).max())
        if self._share_prefix and not all_positions:
            return shared_prefix_logits(self.model, batch.tokens[:, :width], batch.attention_mask[:, :width],
                                        batch.response_mask[:, :width]), width
        out = self.model(input_ids=batch.tokens[:, :width], attention_mask=batch.attention_mask[:, :width], use_cache=False)
        return out.logits, width

    def _micro_batches(self, batch: TrainBatch) -> list[TrainBatch]:
        step = self.cfg.micro_batch_size
        return [batch.select(slice(i, i + step)) for i in range(0, len(batch), step)]

    @torch.no_grad()
    def _score(self, batch: TrainBatch, temperature: float = 1.0, with_entropy: bool = True, all_positions: bool = False):
        """Per-token log π_T(o_t) [B, L-1] (position t predicts token t+1), exact entropy and its
        reward-irrelevant part (both None without `with_entropy`)."""
        lps, ents, irrs = [], [], []
        L = batch.tokens.shape[1]
        for mb in self._micro_batches(batch):
            logits, width = self._logits(mb, all_positions)
            lp, ent = alg.token_logprobs_and_entropy(
                logits[:, :-1], mb.tokens[:, 1:width], temperature, self.cfg.entropy_chunk_size, with_entropy
            )
            lps.append(torch.nn.functional.pad(lp.float(), (0, L - width)))
            if with_entropy:
                ents.append(torch.nn.functional.pad(ent.float(), (0, L - width)))
                irrs.append(torch.nn.functional.pad(self._irrelevant(logits[:, :-1]), (0, L - width)))
        if not with_entropy:
            return torch.cat(lps), None, None
        return torch.cat(lps), torch.cat(ents), torch.cat(irrs)

    def _irrelevant(self, logits: torch.Tensor) -> torch.Tensor:
        """The reward-irrelevant part of each position's entropy (zeros when no such tokens)."""
        if not self.irrelevant_ids:
            return torch.zeros(logits.shape[:2], device=logits.device)
        irr, _ = alg.entropy_split(logits, self.irrelevant_ids, 1.0, self.cfg.entropy_chunk_size)
        return irr.float()

    def compute_logprobs(self, shard: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
        """log π_T(tokens[:, t] | tokens[:, <t]) as [B, L]; column 0 (nothing predicts it) is 0."""
        self.model.eval()
        logp, _, _ = self._score(shard.to(self.device), temperature, with_entropy=False, all_positions=True)
        self._reshard()
        return torch.nn.functional.pad(logp, (1, 0)).cpu()

    # ------------------------------------------------------------------ the update

    def update(self, shard: TrainBatch, step: int | None = None, publish_to: str | None = None) -> dict[str, float]:
        """One RL update on this rank's shard: old log-probs, then `mini_batches` optimizer steps.

        With `publish_to` (the entropy controller's actor name), rank 0 publishes the step's
        entropy there before training on it: the controller reads it live, from the learners.
        """
        t0 = time.perf_counter()
        batch = shard.to(self.device)
        M = self.cfg.mini_batches
        if len(batch) % M:
            raise ValueError(f"shard of {len(batch)} rows does not split into {M} mini-batches; use shard_batch")
        if self._share_prefix:  # rows of one prompt side by side (within each mini-batch), to share it
            batch = batch.select(prompt_order(batch, M))
        elif self.cfg.sort_by_length:
            batch = batch.select(length_order(batch.attention_mask.sum(1), M))
        stats: dict[str, Any] = {}

        def observe(old_logp: torch.Tensor, entropy: torch.Tensor, irrelevant: torch.Tensor) -> None:
            stats.update(self._entropy_stats(batch, old_logp, entropy, irrelevant))
            if publish_to and self.rank == 0:
                self._publish(publish_to, step, stats)

        if M == 1 and self.cfg.fuse_scoring and not _has_dropout(self.model):
            # On-policy: the behaviour policy is the current one, so its log-probs and entropy
            # come from the training forward (detached); the controller hears the entropy before
            # the optimizer step, exactly as with a separate scoring pass.
            self.model.train()
            totals = self._train_minibatch(batch, None, observe)
        else:
            self.model.eval()  # dropout-free scoring of the behaviour policy at T=1
            old_logp, entropy, irrelevant = self._score(batch)
            observe(old_logp, entropy, irrelevant)
            self.model.train()
            per = len(batch) // M
            totals = {}
            for k in range(M):
                rows = slice(k * per, (k + 1) * per)
                step_stats = self._train_minibatch(batch.select(rows), old_logp[rows])
                for key, v in step_stats.items():
                    totals[key] = totals.get(key, 0.0) + v
        self._reshard()
        elapsed = time.perf_counter() - t0
        stats.update(_finish_stats(totals, M, elapsed))
        return stats

    def _reshard(self) -> None:
        """Back to the sharded parameters (no-op when they are): a forward with no backward after it
        (scoring, a step with no loss tokens) leaves held parameters unsharded."""
        if self._hold:
            from torch.distributed.fsdp import FSDPModule

            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    @staticmethod
    def _publish(controller_name: str, step: int | None, stats: dict[str, float]) -> None:
        import ray

        if step is None:
            raise ValueError("publishing entropy needs the step it belongs to")
        controller = ray.get_actor(controller_name)
        ray.get([
            controller.observe.remote(step, stats["entropy_exact_grpo"], "exact"),
            controller.observe.remote(step, stats["entropy_sampled_grpo"], "sampled"),
        ])

    def _entropy_stats(
        self, batch: TrainBatch, old_logp: torch.Tensor, entropy: torch.Tensor, irrelevant: torch.Tensor
    ) -> dict[str, Any]:
        """Exact token-mean entropy at T=1 of GRPO rows and of regularizer rows; sampled estimates;
        and where the GRPO rows' entropy lives (`token_entropy`, `entropy_by_position`)."""
        ea = self.cfg.entropy_analysis
        mask = batch.response_mask[:, 1:]
        reg = batch.is_regularizer.unsqueeze(1).to(mask.dtype)
        grpo_mask, reg_mask = mask * (1 - reg), mask * reg
        sums = torch.stack([
            (entropy * grpo_mask).sum(), grpo_mask.sum(),
            (entropy * reg_mask).sum(), reg_mask.sum(),
            alg.sampled_entropy_estimate(old_logp, grpo_mask) * grpo_mask.sum(),
            alg.sampled_entropy_estimate(old_logp, mask) * mask.sum(), mask.sum(),
            (irrelevant * grpo_mask).sum(),
        ]).double().cpu()
        fork = alg.forking_split(entropy, grpo_mask, ea.forking_share, max_entropy=math.log(self.vocab_size))
        prof = alg.position_profile(entropy, grpo_mask, ea.position_bucket, ea.position_buckets)
        # one all-reduce for everything: the scalars, the histogram and the position profile
        packed = self._all_reduce(torch.cat([sums, fork.flatten(), prof.flatten()]))
        sums = packed[: len(sums)].tolist()
        fork = packed[len(sums) : len(sums) + fork.numel()].reshape(fork.shape)
        prof = packed[len(sums) + fork.numel() :].reshape(prof.shape)
        n_grpo = max(sums[1], 1.0)
        h = sums[0] / n_grpo
        kinds = alg.forking_stats(fork, ea.forking_share)
        token_entropy = {"forking": kinds["forking"], "nonforking": kinds["nonforking"]}
        if self.irrelevant_ids:
            token_entropy.update(irrelevant=sums[7] / n_grpo, content=(sums[0] - sums[7]) / n_grpo)
        return {
            "entropy_exact_grpo": h,
            "entropy_exact_reg": sums[2] / sums[3] if sums[3] > 0 else float("nan"),
            "entropy_sampled_grpo": sums[4] / n_grpo,
            "entropy_sampled_batch": sums[5] / max(sums[6], 1.0),
            "grpo_tokens": sums[1],
            "reg_tokens": sums[3],
            "token_entropy": token_entropy,
            "entropy_irrelevant_share": sums[7] / sums[0] if self.irrelevant_ids and sums[0] > 0 else None,
            "entropy_forking_share": kinds["forking_entropy_share"],
            "entropy_by_position": [s / c if c > 0 else None for c, s in prof.T.tolist()],
        }

    def _train_minibatch(self, batch: TrainBatch, old_logp: torch.Tensor | None, observe=None) -> dict[str, float]:
        """Gradient accumulation over micro-batches, then clip + AdamW step (skipped if no tokens).

        `old_logp` None: on-policy, the behaviour log-probs are this forward's own (detached), and
        `observe(old_logp, entropy, irrelevant)` gets them, full-batch, before the optimizer step.
        """
        cfg, algo = self.cfg, self.algorithm
        fused = old_logp is None
        L = batch.tokens.shape[1]
        seen: dict[str, list[torch.Tensor]] = {"logp": [], "ent": [], "irr": []}
        mask = batch.response_mask[:, 1:]
        count = alg.loss_token_count(algo, mask, batch.is_regularizer)
        normalizer = float(self._all_reduce(torch.tensor([count], dtype=torch.float64)).item())
        if normalizer == 0 and not fused:  # every rank sees the same global count, so all skip together
            return {"skipped_steps": 1.0}
        sums = dict.fromkeys(
            ("pg_loss", "reg_loss", "entropy_bonus", "clipped_tokens", "approx_kl_sum", "grpo_tokens", "tokens"), 0.0
        )
        micro = self._micro_batches(batch)
        for i, mb in enumerate(micro):
            if hasattr(self.model, "set_requires_gradient_sync"):
                # reduce-scatter gradients once per optimizer step, not once per micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
                if self._hold:  # and all-gather the parameters once: reshard after the last backward only
                    self.model.set_reshard_after_backward(i == len(micro) - 1)
            rows = slice(i * cfg.micro_batch_size, i * cfg.micro_batch_size + len(mb))
            logits, width = self._logits(mb)
            logp, ent = alg.token_logprobs_and_entropy(
                logits[:, :-1], mb.tokens[:, 1:width], 1.0, cfg.entropy_chunk_size, alg.needs_entropy(algo)
            )
            if fused:
                behaviour = logp.detach()
                with torch.no_grad():
                    ent_obs = ent.detach() if ent is not None else alg.exact_entropy(
                        logits[:, :-1].detach(), 1.0, cfg.entropy_chunk_size
                    )
                for key, val in (("logp", behaviour), ("ent", ent_obs), ("irr", self._irrelevant(logits[:, :-1]))):
                    seen[key].append(torch.nn.functional.pad(val.float(), (0, L - width)))
                if normalizer == 0:
                    continue
            else:
                behaviour = old_logp[rows, : width - 1]
            loss, st = alg.policy_loss(
                algo, logp=logp, old_logp=behaviour, advantages=mb.advantages,
                mask=mb.response_mask[:, 1:width], is_regularizer=mb.is_regularizer,
                normalizer=normalizer, entropy=ent, generator=self.generator,
            )
            (loss * self.world_size).backward()
            for key in sums:
                sums[key] += st.get(key, 0.0)
            sums["tokens"] += float(mb.attention_mask.sum())
        if fused:
            observe(*(torch.cat(seen[k]) for k in ("logp", "ent", "irr")))
            if normalizer == 0:
                self.optimizer.zero_grad(set_to_none=True)
                return {"skipped_steps": 1.0}
        grad_norm = _total_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        if math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = list(sums)
        reduced = self._all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()
        out = dict(zip(keys, reduced))
        out.update(grad_norm=grad_norm, optimizer_steps=1.0 if math.isfinite(grad_norm) else 0.0,
                   skipped_steps=0.0 if math.isfinite(grad_norm) else 1.0, steps_counted=1.0)
        return out

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (NCCL needs the tensor on the GPU)."""
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    # ------------------------------------------------------------------ weights and checkpoints

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded weights on CPU on rank 0 (None elsewhere); a collective: call on every rank.

        FSDP2 shards every parameter along dim 0, so the full tensor is the ranks' local shards
        concatenated in rank order; `gather_full_state` moves them in a few flat all-gathers
        (one per `cfg.sync_bucket_mb`) instead of one collective per parameter, which was 85 % of
        the weight-sync time of the tiny model. Anything else falls back to torch's own gather.
        """
        sd = gather_full_state(self.model, self.cfg.sync_bucket_mb * 2**20) if self.cfg.fast_gather else None
        if sd is None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None

    def full_state_dict_wire(self) -> dict | None:
        """`full_state_dict` as numpy arrays for Ray to ship zero-copy (services/backends/wire.py)."""
        from services.backends.wire import to_wire

        return to_wire(self.full_state_dict())

    def save_checkpoint(self, path: str) -> None:
        """Sharded model + optimizer state with torch.distributed.checkpoint (every rank writes its shard)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    def load_checkpoint(self, path: str) -> None:
        """Load what `save_checkpoint` wrote (same world size or not: DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def shutdown(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _shard0_local(param) -> torch.Tensor | None:
    """The local shard of an FSDP2 parameter sharded along dim 0 over a 1-D mesh, else None."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return None
    return param.to_local()


def gather_full_state(model, bucket_bytes: int) -> dict[str, torch.Tensor] | None:
    """Full CPU state dict (every rank gets it) from flat bucketed all-gathers, or None when some
    parameter is not a dim-0 shard (then use torch's get_model_state_dict).

    Rank r's shard of a parameter is rows [start_r, start_r + n_r) of it; the rows each rank holds
    are exchanged first (one small all-gather), then each bucket of parameters travels as one flat
    tensor per rank, padded to the longest rank's length. The keys are the model's state-dict
    keys, tied weights (`lm_head.weight`) and unsharded buffers included, as torch's gather gives.
    """
    params = list(model.named_parameters())
    if not dist.is_initialized() or not params:
        return None
    locals_ = [_shard0_local(p) for _, p in params]
    if any(t is None for t in locals_):
        return None
    by_id = {id(p): name for name, p in params}
    layout = model.state_dict(keep_vars=True)
    if any(id(t) not in by_id and _shard0_local(t) is not None for t in layout.values()):
        return None  # a sharded state entry that is not a parameter: leave it to torch
    world = dist.get_world_size()
    device = locals_[0].device
    rows = torch.tensor([t.shape[0] if t.dim() else 0 for t in locals_], dtype=torch.long, device=device)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    all_rows = [r.cpu().tolist() for r in all_rows]
    out: dict[str, torch.Tensor] = {}
    bucket: list[int] = []
    size = 0
    for i, (_, p) in enumerate(params):
        bucket.append(i)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes or i == len(params) - 1:
            _gather_bucket(params, locals_, all_rows, bucket, world, out)
            bucket, size = [], 0
    return {
        key: out[by_id[id(t)]] if id(t) in by_id else t.detach().cpu().clone() for key, t in layout.items()
    }


def _gather_bucket(params, locals_, all_rows, bucket, world, out) -> None:
    dtype = locals_[bucket[0]].dtype
    if any(locals_[i].dtype != dtype for i in bucket):  # mixed dtypes: one bucket per parameter
        for i in bucket:
            _gather_bucket(params, locals_, all_rows, [i], world, out)
        return
    row_numel = [math.prod(params[i][1].shape[1:]) for i in bucket]
    lengths = [sum(all_rows[r][i] * n for i, n in zip(bucket, row_numel)) for r in range(world)]
    flat = torch.cat([locals_[i].reshape(-1) for i in bucket]) if lengths[dist.get_rank()] else locals_[bucket[0]].new_empty(0)
    flat = torch.nn.functional.pad(flat, (0, max(lengths) - flat.numel()))
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat.contiguous())
    parts = [t.cpu() for t in parts]
    offsets = [0] * world
    for i, n in zip(bucket, row_numel):
        name, p = params[i]
        pieces = []
        for r in range(world):
            k = all_rows[r][i] * n
            pieces.append(parts[r][offsets[r] : offsets[r] + k])
            offsets[r] += k
        out[name] = torch.cat(pieces).view(p.shape).clone()


def build_fsdp_model(model_path: str, cfg: LearnerConfig, device: torch.device, seed: int = 0):
    """Load the HF model in float32 and shard it with FSDP2: each decoder layer, then the root.

    On GPU, parameters are cast to bf16 for compute and gradients reduced in float32
    (MixedPrecisionPolicy). On CPU parameters, gradients and optimizer stay float32; with
    `cpu_compute` bfloat16 (or auto on an AMX CPU) the decoder layers run under bf16 autocast
    (services/model/precision.py). The root group holds the
    embedding and the (tied) lm_head together, so tying survives sharding.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from services.model.tiny import load_causal_lm
    from services.model.precision import autocast_layers, decoder_layers, resolve_cpu_compute

    torch.manual_seed(seed)
    cpu_bf16 = device.type == "cpu" and resolve_cpu_compute(cfg.cpu_compute) == "bfloat16"
    # eager attention under bf16 autocast: SDPA's CPU kernel is slower in bf16 than eager's two matmuls
    model = load_causal_lm(model_path, dtype=torch.float32, device=str(device),
                           attn_implementation="eager" if cpu_bf16 else "sdpa")
    if cpu_bf16:
        autocast_layers(decoder_layers(model))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    hold = hold_full_params(cfg, device)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=not hold)
    fully_shard(model, mp_policy=mp, reshard_after_forward=not hold)
    return model


def hold_full_params(cfg: LearnerConfig, device: torch.device) -> bool:
    """`cfg.hold_full_params`, with None meaning: on CPU yes, on GPU no."""
    return device.type == "cpu" if cfg.hold_full_params is None else cfg.hold_full_params


def _token_ids(model_path: str, tokens: Sequence[str]) -> list[int]:
    """Ids of single-token strings in the model's vocabulary; a string that is not one token is an error."""
    if not tokens:
        return []
    from services.model.tiny import load_tokenizer

    vocab = load_tokenizer(model_path).get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(f"entropy_analysis.irrelevant_tokens not in the vocabulary as single tokens: {missing}")
    return sorted({int(vocab[t]) for t in tokens})


def _has_dropout(model: torch.nn.Module) -> bool:
    """Whether train mode would change the forward (then scoring needs its own eval-mode pass)."""
    if float(getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor under FSDP2; its full value is the global norm."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _finish_stats(totals: dict[str, float], mini_batches: int, elapsed: float) -> dict[str, float]:
    """Ratios from raw sums; losses and grad norm averaged over the optimizer steps taken."""
    counted = max(totals.get("steps_counted", 0.0), 1.0)
    grpo = totals.get("grpo_tokens", 0.0)
    return {
        "pg_loss": totals.get("pg_loss", 0.0) / counted,
        "reg_loss": totals.get("reg_loss", 0.0) / counted,
        "entropy_bonus": totals.get("entropy_bonus", 0.0) / counted,
        "clipfrac": totals.get("clipped_tokens", 0.0) / max(grpo, 1.0),
        "approx_kl": totals.get("approx_kl_sum", 0.0) / max(grpo, 1.0),
        "grad_norm": totals.get("grad_norm", 0.0) / counted,
        "optimizer_steps": totals.get("optimizer_steps", 0.0),
        "skipped_steps": totals.get("skipped_steps", 0.0),
        "tokens": totals.get("tokens", 0.0),
        "tokens_per_s": totals.get("tokens", 0.0) / max(elapsed, 1e-9),
        "update_s": elapsed,
    }


# --------------------------------------------------------------------------- the group (driver side)


def _resolve_device(cfg: LearnerConfig) -> str:
    """cuda when asked, or (auto) when the cluster has a GPU for every worker."""
    if cfg.device != "auto":
        return cfg.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) >= cfg.num_workers else "cpu"


class LearnerGroup:
    """`cfg.num_workers` LearnerWorker actors in one placement group, forming one process group."""

    def __init__(self, model_path: str, cfg: LearnerConfig, algorithm: AlgorithmConfig, seed: int = 0):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from services.model.tiny import load_tokenizer

        self.cfg, self.world_size = cfg, cfg.num_workers
        self.pad_id = int(load_tokenizer(model_path).pad_token_id)
        self.device = _resolve_device(cfg)
        gpus = 1 if self.device == "cuda" else 0
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy=cfg.placement_strategy)
        ray.get(self.pg.ready())
        remote_cls = ray.remote(LearnerWorker)
        self.workers = [
            remote_cls.options(
                num_cpus=cfg.cpus_per_worker,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank, self.world_size, model_path, cfg, algorithm, seed, self.device)
            for rank in range(self.world_size)
        ]
        # rank 0's node hosts the rendezvous: its IP (127.0.0.1 on a loopback-only cluster) and a
        # port that is free there
        addr, port = ray.get(self.workers[0].master_address.remote())
        ray.get([w.setup.remote(addr, port) for w in self.workers])
        self.compute = ray.get(self.workers[0].compute_info.remote())

    def _fan_out(self, method: str, *per_rank_args) -> list[Any]:
        import ray

        if per_rank_args:
            refs = [getattr(w, method).remote(*args) for w, args in zip(self.workers, zip(*per_rank_args))]
        else:
            refs = [getattr(w, method).remote() for w in self.workers]
        return ray.get(refs)

    def _as_batch(self, batch: "TrainBatch | dict") -> TrainBatch:
        return batch if isinstance(batch, TrainBatch) else TrainBatch.from_dict(batch, self.pad_id)

    def update(
        self, batch: "TrainBatch | dict", step: int | None = None, publish_to: str | None = None
    ) -> dict[str, float]:
        """One RL update on the global batch; stats are global (all-reduced), taken from rank 0.

        `publish_to`: the entropy controller's actor name; rank 0 publishes the step's entropy there.
        """
        batch = self._as_batch(batch)
        if self.cfg.share_prefix:
            # Rows of one prompt side by side before the contiguous split (a permutation inside each
            # mini-batch, so the update is the same): each prompt's rows, the regularizer samples of
            # that prompt included, go to one rank, which runs the prompt once; every rank then holds
            # whole groups of the same kind and about the same work, so neither waits at the collectives.
            batch = batch.select(prompt_order(batch, self.cfg.mini_batches))
        shards = shard_batch(batch, self.world_size, self.cfg.mini_batches)
        n = self.world_size
        return self._fan_out("update", shards, [step] * n, [publish_to] * n)[0]

    def compute_logprobs(self, batch: "TrainBatch | dict", temperature: float = 1.0) -> torch.Tensor:
        """log π_T of every token given its prefix, [B, L] (column 0 is 0), no grad."""
        batch = self._as_batch(batch)
        shards = shard_batch(batch, self.world_size, 1)
        parts = self._fan_out("compute_logprobs", shards, [temperature] * self.world_size)
        return torch.cat(parts)[: len(batch)]

    def state_dict_ref(self):
        """ObjectRef of the full (unsharded, CPU) state dict, gathered once; pass it to
        `RolloutPool.load_weights` so Ray ships it to every rollout actor from the object store."""
        import ray

        refs = [w.full_state_dict_wire.remote() for w in self.workers]
        ray.get(refs[1:])  # the others only take part in the gather
        ray.wait(refs[:1])
        return refs[0]

    def get_full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict itself (tests, export): tensors of their own (writable)."""
        import ray

        from services.backends.wire import from_wire

        return {k: v.clone() for k, v in from_wire(ray.get(self.state_dict_ref())).items()}

    def save_checkpoint(self, path: str) -> None:
        """Sharded model + optimizer state under `path` (a directory every worker can reach)."""
        # absolute: the workers' working directories are Ray's, not the driver's
        self._fan_out("save_checkpoint", [os.path.abspath(path)] * self.world_size)

    def load_checkpoint(self, path: str) -> None:
        """Restore model + optimizer state saved by `save_checkpoint`."""
        self._fan_out("load_checkpoint", [os.path.abspath(path)] * self.world_size)

    def shutdown(self) -> None:
        """Leave the process group, end the actors, free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            self._fan_out("shutdown")
        finally:
            for w in self.workers:
                ray.kill(w)
            remove_placement_group(self.pg)
            self.workers = []
