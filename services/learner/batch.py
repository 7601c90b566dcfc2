"""The learner's batch: padded rows, their shards per rank, and the row orders that share work.

Every reordering here is a permutation inside a mini-batch: each optimizer step sees the same rows,
so the update is the same; only which rows share a micro-batch (padding) or a rank (prompts run
once) changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from services.config import LearnerConfig


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
        """Right-padded batch from token-id lists (`Sample.prompt_ids` / `.response_ids`: the driver's step 5)."""
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


def micro_batches(batch: TrainBatch, size: int, max_tokens: int | None = None, packed: bool = False) -> list[TrainBatch]:
    """Consecutive slices of `size` rows (the last one shorter); with `max_tokens`, of as many rows
    as keep the slice's tokens within it (`token_budget_bounds`), whatever `size`."""
    if max_tokens is None:
        return [batch.select(slice(i, i + size)) for i in range(0, len(batch), size)]
    b = token_budget_bounds(batch.attention_mask.sum(1).tolist(), max_tokens, packed)
    return [batch.select(slice(b[k], b[k + 1])) for k in range(len(b) - 1)]


def token_budget_bounds(lengths: list[int], max_tokens: int, packed: bool = False) -> list[int]:
    """Where each micro-batch starts (and the end), cutting the rows in their order: a micro-batch
    takes the next row while the tokens of its forward stay within `max_tokens`: (its rows + 1) x
    its longest row, padded; with `packed` (remove_padding) the rows' own tokens. A row longer than
    the budget runs alone."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    bounds, longest, total = [0], 0, 0
    for i, n in enumerate(lengths):
        cost = total + n if packed else (i - bounds[-1] + 1) * max(longest, n)
        if i > bounds[-1] and cost > max_tokens:
            bounds.append(i)
            longest = total = 0
        longest, total = max(longest, n), total + n
    return bounds + [len(lengths)] if lengths else bounds


def inert_micro_batch(batch: TrainBatch) -> TrainBatch:
    """One row that adds nothing (the batch's shortest, with no response tokens and advantage 0):
    what a rank with fewer micro-batches than its peers runs, so FSDP's collectives pair up."""
    shortest = int(torch.argmin(batch.attention_mask.sum(1)))
    return batch.select(slice(shortest, shortest + 1)).padded_to(2).select(slice(1, 2))


def mini_batch_bounds(rows: int, mini_batches: int) -> list[int]:
    """Where each of `mini_batches` near-equal contiguous parts of `rows` starts (and the end):
    the first `rows % mini_batches` parts are one row longer."""
    q, extra = divmod(rows, mini_batches)
    return [k * q + min(k, extra) for k in range(mini_batches + 1)]


def _within_blocks(keys: torch.Tensor, mini_batches: int) -> torch.Tensor:
    """Row order that sorts `keys` (stably) inside each mini-batch block; rows never leave their block."""
    b = mini_batch_bounds(len(keys), mini_batches)
    return torch.cat([b[k] + torch.sort(keys[b[k] : b[k + 1]], stable=True).indices for k in range(mini_batches)])


def shard_batch(batch: TrainBatch, world_size: int, mini_batches: int = 1) -> list[TrainBatch]:
    """Split a global batch into per-rank shards that keep the mini-batch structure.

    Global mini-batch k is the k-th of `mini_batches` near-equal contiguous parts of the batch
    (the first parts one row longer when B does not divide). Each part is cut into `world_size`
    contiguous pieces of `per` rows, the last ones topped up with inert dummy rows, and rank r
    receives its piece of every part in order: its local mini-batch k is its k-th block of `per`.
    """
    B = len(batch)
    starts = mini_batch_bounds(B, mini_batches)
    per = max(1, math.ceil((starts[1] - starts[0]) / world_size))
    ext = batch.padded_to(B + 1)  # row B is the dummy every piece is topped up with
    shards = []
    for r in range(world_size):
        idx: list[int] = []
        for k in range(mini_batches):
            piece = list(range(starts[k], starts[k + 1]))[r * per : (r + 1) * per]
            idx += piece + [B] * (per - len(piece))
        shards.append(ext.select(torch.tensor(idx, dtype=torch.long)))
    return shards


def shard_for_ranks(batch: TrainBatch, world_size: int, cfg: LearnerConfig) -> list[TrainBatch]:
    """The update batch's one layout: with `share_prefix`, rows of one prompt side by side inside
    each mini-batch (a permutation inside it, so the update is the same), then `shard_batch`.

    Each prompt's rows, the regularizer samples of that prompt included, so land on one rank,
    which runs the prompt once; every rank holds whole groups of the same kind and about the same
    work, so neither waits at the collectives. The ranks do not reorder prompts again.
    """
    if cfg.share_prefix:
        batch = batch.select(prompt_order(batch, cfg.mini_batches))
    return shard_batch(batch, world_size, cfg.mini_batches)


def length_order(lengths: torch.Tensor, mini_batches: int = 1) -> torch.Tensor:
    """Row order that sorts each of the `mini_batches` blocks (`mini_batch_bounds`) by length (stable).

    Rows never leave their mini-batch, so each optimizer step sees the same rows; inside it the
    order only decides which rows share a micro-batch, i.e. how much padding each one carries.
    """
    return _within_blocks(lengths, mini_batches)


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
    return _within_blocks(group, mini_batches)
