"""Each distinct prompt run once: the shared-prefix forward the learner trains through."""

from __future__ import annotations

import torch

from services.learner.batch import prompt_lengths
from services.learner.head import final_hidden


def layered_cache_supported() -> bool:
    """Whether this transformers has the per-layer KV cache the shared-prefix forward writes into."""
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:
        return False
    return hasattr(DynamicCache(), "layers")


def shared_prefix_logits(model, tokens: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """`shared_prefix_forward`'s logits [B, W, V]."""
    return shared_prefix_forward(model, tokens, attention_mask, response_mask, hidden=False)


def shared_prefix_forward(model, tokens: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                          hidden: bool = False):
    """Logits [B, W, V] (with `hidden`: the final hidden states [B, W, h]) of right-padded rows
    (prompt, response, padding) with each distinct prompt run once: a forward over the unique
    prompts (left-padded) fills a KV cache, its rows are repeated for the rows that share them, and
    a second forward runs only the responses on it. Gradients flow back through the cache into the
    prompt positions, as in the joint forward.

    Exact at every position t from a row's last prompt token on (they predict response tokens,
    the only ones a loss reads); prompt positions hold zeros. Always two forwards, whatever the
    rows: under FSDP every rank must run the same collectives, so no rank may take a shortcut
    (a micro-batch of distinct prompts, or of inert rows only) that another does not.
    """
    B, W = tokens.shape
    pred, plen, _ = _response_predictions(model, tokens, attention_mask, response_mask, hidden)
    la, dev = pred.shape[1], tokens.device
    j = torch.arange(la, device=dev)
    # back to the row layout, where position t predicts token t + 1: pred[i, j] goes to plen_i - 1 + j
    # (padding positions j >= rlen_i land on the row's own padding, or past W and are cut)
    out = pred.new_zeros((B, W + la, pred.shape[-1]))
    dst = (plen.to(dev).unsqueeze(1) - 1 + j).unsqueeze(-1).expand(-1, -1, pred.shape[-1])
    return out.scatter(1, dst, pred)[:, :W]


def shared_prefix_response_hidden(model, tokens: torch.Tensor, attention_mask: torch.Tensor,
                                  response_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states that predict the response tokens, [N, h], in the row-major order of
    response_mask[:, 1:] (row i's j-th response token is predicted at position plen_i - 1 + j), with
    each distinct prompt run once: `shared_prefix_forward`'s values at those positions, without
    its [B, W, h] row layout. For the chunked head (services/learner/forward.py)."""
    pred, _, rlen = _response_predictions(model, tokens, attention_mask, response_mask, hidden=True)
    valid = torch.arange(pred.shape[1], device=pred.device) < rlen.to(pred.device).unsqueeze(1)
    return pred[valid]


def _response_predictions(model, tokens, attention_mask, response_mask, hidden: bool):
    """(pred [B, la, D], prompt lengths, response lengths): pred[i, j] is the logits (or final
    hidden state) that predicts row i's response token j: the prompt's last position for j = 0,
    then the responses' own positions; la = the longest response (at least 1)."""
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
    first = _run(model, hidden, True, input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, past_key_values=cache,
                 use_cache=True)
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
    second = _run(model, hidden, False, input_ids=r_ids, attention_mask=torch.cat([p_mask[owner], valid.long()], 1),
                  position_ids=plen.to(dev).unsqueeze(1) + j, past_key_values=rows_cache, use_cache=True)
    return torch.cat([first[:, -1][owner].unsqueeze(1), second[:, :-1]], 1), plen, rlen


def _run(model, hidden: bool, last_only: bool, **kwargs) -> torch.Tensor:
    """One forward's final hidden states (`hidden`) or logits (only the last position's with `last_only`)."""
    if hidden:
        return final_hidden(model, **kwargs)[0]
    return model(**kwargs, logits_to_keep=1 if last_only else 0).logits
