"""Each distinct prompt run once: the shared-prefix forward the learner trains through."""

from __future__ import annotations

import torch

from services.learner.batch import prompt_lengths


def layered_cache_supported() -> bool:
    """Whether this transformers has the per-layer KV cache the shared-prefix forward writes into."""
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
