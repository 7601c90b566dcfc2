"""Padding removal (`learner.remove_padding`): a micro-batch's rows packed into one sequence.

A micro-batch of right-padded rows [b, w] runs b x w positions, of which only the rows' own
tokens count. Packed, the rows' tokens are laid end to end in one row [1, T] (T = the rows'
tokens together) with position ids that restart at every row; given position ids and no attention
mask, transformers builds the block-diagonal causal mask itself (masking_utils'
`find_packed_sequence_indices`), so no row attends to another and every value equals the padded
forward's. The MLPs, norms and the head then run T positions, not b w.

The attention itself is dense over T under sdpa and eager (the mask only zeroes the other rows'
scores): T^2 against the padded b w^2. Only a varlen kernel (flash-attention's, which transformers
picks from the same position ids) skips the masked blocks; so padding removal pays where rows
differ in length and the attention is not the bulk of the work.

`unpack` maps values at packed positions back to the row layout the losses read: row i's position
t (predicting its token t + 1) is packed position o_i + t, o_i the row's offset; positions from a
row's last token on hold zeros, as the padded path's unread padding positions do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed:
    """One micro-batch packed: `input_ids` and `position_ids` [1, T]; `index` [b, w - 1], the packed
    position of each row-layout position t < length - 1 (0 elsewhere), and `valid` marks those."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def pack(tokens: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Pack right-padded rows (each row's tokens first, then padding) into one sequence."""
    lengths = attention_mask.sum(1)
    if not bool((attention_mask.cumsum(1) == torch.minimum(
            torch.arange(1, attention_mask.shape[1] + 1, device=lengths.device), lengths.unsqueeze(1))).all()):
        raise ValueError("remove_padding needs right-padded rows (every row's tokens before its padding)")
    keep = attention_mask.bool()
    ids = tokens[keep].unsqueeze(0)
    positions = (attention_mask.cumsum(1) - 1)[keep].unsqueeze(0)
    offsets = torch.cumsum(lengths, 0) - lengths
    t = torch.arange(max(tokens.shape[1] - 1, 0), device=tokens.device)
    valid = t.unsqueeze(0) < (lengths - 1).unsqueeze(1)
    index = torch.where(valid, offsets.unsqueeze(1) + t, torch.zeros_like(valid, dtype=offsets.dtype))
    return Packed(ids, positions, index, valid)


def unpack(values: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Values at the packed positions that predict the next token ([1, T - 1] or [1, T - 1, ...]) in
    the row layout [b, w - 1, ...], zeros where a row has no next token. Differentiable."""
    flat = values[0]
    if flat.shape[0] == 0:
        return flat.new_zeros((*packed.index.shape, *flat.shape[1:]))
    picked = flat[packed.index.clamp(max=flat.shape[0] - 1)]
    mask = packed.valid.reshape(*packed.valid.shape, *([1] * (flat.dim() - 1)))
    return torch.where(mask, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def packed_rows(values: torch.Tensor, packed: Packed, positions: torch.Tensor) -> torch.Tensor:
    """The packed values [1, T - 1, ...] at the row-layout `positions` [b, w - 1] (nonzero: wanted),
    in row-major order: what the chunked head takes as its rows."""
    where = positions.bool() & packed.valid
    if bool((positions.bool() & ~packed.valid).any()):
        raise ValueError("a position past its row's last token was asked for")
    return values[0][packed.index[where]]
