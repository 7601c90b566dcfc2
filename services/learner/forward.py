"""One micro-batch's forward, down to what the losses and statistics read: per-token log π, the
exact entropy (with gradient when the loss uses it, detached for the statistics) and its
reward-irrelevant part. Two ways, the same values within float rounding:

  * plain: the model's logits [b, w, V], then `alg.token_logprobs_and_entropy` on them;
  * chunked head (`learner.chunked_head`): the final hidden states, then `head.head_outputs`
    `entropy_chunk_size` positions at a time, never the whole logits. It computes only the
    positions a loss or statistic reads (response tokens; every real token for
    `compute_logprobs`), zeros elsewhere, where the plain path has values nobody reads.

Both run the shared-prefix forward (`prefix.py`) when asked: each prompt once, the responses on
its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from services import algorithm as alg
from services.config import LearnerConfig
from services.learner.batch import TrainBatch, inert_micro_batch, micro_batches
from services.learner.head import final_hidden, head_outputs, head_weight
from services.learner.packing import Packed, pack, packed_rows, unpack
from services.learner.prefix import shared_prefix_forward, shared_prefix_response_hidden
from services.learner.stats import irrelevant_entropy


@dataclass
class TokenOutputs:
    """[b, width - 1] per position t (predicting token t + 1) of a micro-batch cut to `width` columns.

    logp: log π_T(o_{t+1}) (with grad under grad mode); entropy: the exact entropy at T with grad,
    only when the loss asked for it; observed: the same entropy detached, and irrelevant: its
    reward-irrelevant part at T = 1, both only when the statistics asked for them."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    observed: torch.Tensor | None
    irrelevant: torch.Tensor | None
    width: int


@dataclass(frozen=True)
class ForwardSpec:
    """How a rank runs its micro-batches: the head path, the shared prefix, the chunk, the irrelevant tokens."""

    chunked: bool
    share_prefix: bool
    chunk_size: int
    irrelevant_ids: tuple[int, ...] = ()
    packed: bool = False  # remove_padding: the rows packed into one sequence (packing.py)


def token_outputs(model, mb: TrainBatch, spec: ForwardSpec, *, temperature: float = 1.0, loss_entropy: bool = False,
                  observe: bool = False, all_positions: bool = False) -> TokenOutputs:
    """The micro-batch's `TokenOutputs`. `loss_entropy`: the entropy with its gradient (the loss
    uses it); `observe`: the detached entropy and its irrelevant part (the step's statistics);
    `all_positions`: values at every real token, not only at response tokens (no shared prefix)."""
    width = int(mb.attention_mask.sum(1).max())
    tokens, attn, resp = mb.tokens[:, :width], mb.attention_mask[:, :width], mb.response_mask[:, :width]
    share = spec.share_prefix and not all_positions
    packed = pack(tokens, attn) if spec.packed and not share else None
    if packed is not None and not spec.chunked:
        return _packed_plain(model, packed, spec, temperature, loss_entropy, observe, width)
    if spec.chunked:
        positions = (attn if all_positions else resp)[:, 1:]
        if share:  # the response positions only, in the order of resp[:, 1:]: no [b, w, h] row layout
            hidden = shared_prefix_response_hidden(model, tokens, attn, resp)
        elif packed is not None:  # the wanted positions only, picked out of the packed sequence
            hidden = packed_rows(_packed_forward(model, packed, hidden=True), packed, positions)
        else:
            hidden = final_hidden(model, input_ids=tokens, attention_mask=attn, use_cache=False)[0][:, :-1]
        ids = spec.irrelevant_ids if observe else ()
        lp, ent, irr = head_outputs(hidden, head_weight(model), tokens[:, 1:], positions, temperature,
                                    spec.chunk_size, loss_entropy or observe, ids)
        observed = ent.detach() if observe else None
        if observe and not spec.irrelevant_ids:
            irr = torch.zeros_like(lp, requires_grad=False)
        return TokenOutputs(lp, ent if loss_entropy else None, observed, irr.detach() if observe else None, width)
    if share:
        logits = shared_prefix_forward(model, tokens, attn, resp)
    else:
        logits = model(input_ids=tokens, attention_mask=attn, use_cache=False).logits
    return TokenOutputs(*_plain_head(logits[:, :-1], tokens[:, 1:], spec, temperature, loss_entropy, observe), width)


def _plain_head(logits, targets, spec: ForwardSpec, temperature: float, loss_entropy: bool, observe: bool) -> tuple:
    """(log π, the entropy with grad or None, the observed entropy, its irrelevant part) from the
    model's logits, per position (the last two None unless `observe`)."""
    joint = loss_entropy or (observe and not torch.is_grad_enabled())
    lp, ent = alg.token_logprobs_and_entropy(logits, targets, temperature, spec.chunk_size, joint)
    observed = irr = None
    if observe:
        with torch.no_grad():
            observed = ent.detach() if ent is not None else alg.exact_entropy(logits.detach(), temperature, spec.chunk_size)
            irr = irrelevant_entropy(logits, list(spec.irrelevant_ids), spec.chunk_size)
    return lp, ent if loss_entropy else None, observed, irr


def _packed_forward(model, packed: Packed, hidden: bool) -> torch.Tensor:
    """The packed sequence's final hidden states (`hidden`) or logits, [1, T - 1, .]: position ids and
    no attention mask, so transformers masks each row off from the others."""
    kwargs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    if hidden:
        return final_hidden(model, **kwargs)[0][:, :-1]
    return model(**kwargs).logits[:, :-1]


def _packed_plain(model, packed: Packed, spec: ForwardSpec, temperature: float, loss_entropy: bool,
                  observe: bool, width: int) -> TokenOutputs:
    """The plain head on the packed sequence: [1, T, V] logits (the rows' tokens, no padding), the
    per-token values unpacked to the row layout."""
    logits = _packed_forward(model, packed, hidden=False)
    values = _plain_head(logits, packed.input_ids[:, 1:], spec, temperature, loss_entropy, observe)
    return TokenOutputs(*(None if v is None else unpack(v, packed) for v in values), width)


# what `policy_loss` reports that adds across micro-batches, and the real tokens trained on
SUM_KEYS = ("pg_loss", "reg_loss", "entropy_bonus", "clipped_tokens", "approx_kl_sum", "grpo_tokens", "tokens")


def add_sums(sums: dict[str, float], stats: dict[str, float], mb: TrainBatch) -> None:
    """Add one micro-batch's loss statistics and its real tokens to the mini-batch's sums."""
    for key in sums:
        sums[key] += stats.get(key, 0.0)
    sums["tokens"] += float(mb.attention_mask.sum())


def collect(seen: dict[str, list[torch.Tensor]], out: TokenOutputs, L: int) -> None:
    """Append a micro-batch's detached log-probs (and entropy, irrelevant part) padded to L - 1 columns."""
    for key, val in (("logp", out.logp), ("ent", out.observed), ("irr", out.irrelevant)):
        if val is not None:
            seen[key].append(F.pad(val.detach().float(), (0, L - out.width)))


def rank_micro_batches(batch: TrainBatch, cfg: LearnerConfig, world_size: int,
                       all_reduce: Callable[..., torch.Tensor]) -> tuple[list[TrainBatch], int]:
    """This rank's micro-batches (`micro_batch_size` rows, or `max_tokens_per_micro_batch` padded
    tokens) and how many of them are real. With a token budget the ranks' counts can differ, and
    FSDP's collectives (an all-gather per forward and backward, the reduce-scatter on the last
    micro-batch) pair up only if every rank runs as many: the count is agreed (an all-reduce of
    the max) and a rank with fewer appends inert one-row micro-batches, which add nothing."""
    micro = micro_batches(batch, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch, packed=cfg.remove_padding)
    real = len(micro)
    if cfg.max_tokens_per_micro_batch is not None and world_size > 1:
        most = int(all_reduce(torch.tensor([real], dtype=torch.int64), op=dist.ReduceOp.MAX).item())
        micro += [inert_micro_batch(batch)] * (most - real)
    return micro, real
