"""The chunked LM head: log π(token), the exact entropy and their gradients without [b, L, V] logits.

The plain learner path lets the Hugging Face model apply its head, which returns the logits of
every position ([b, L, V] at once: V = 151,936 for Qwen2.5), and keeps them, their fp32 log-probs
and in the backward their gradient alive together. Here the model's forward stops at the final
(normed) hidden states (`final_hidden`: the same forward with no logits kept), and `head_outputs`
applies the head `chunk` positions at a time, only at the positions a loss or statistic reads:

  * forward: per chunk the logits z = h W^T, then per position only log π_T(o_t), the exact
    entropy H and its reward-irrelevant part (`alg.token_logprobs_and_entropy`, `alg.entropy_split`
    on the chunk: the plain path's formulas);
  * backward: each chunk's logits are recomputed and turned into their gradient in closed form,
    with p = softmax(z / T) and g, e the incoming gradients of log π(o) and of H:
        ∂L/∂z = [g (onehot(o) − p) − e p (log p + H)] / T,
    then ∂L/∂h = (∂L/∂z) W and ∂L/∂W += (∂L/∂z)^T h.

So the peak holds one chunk's logits (a few [chunk, V] fp32 buffers) and one [V, h] weight-gradient
buffer (fp32), not the whole micro-batch's. In bf16 (FSDP's mixed precision on GPU) each chunk's
weight-gradient product is rounded to bf16 before the fp32 sum: on a CPU emulation its largest
relative error against float32 was 0.7 %, the plain path's single bf16 matmul 0.3 %.

The head must be `logits = h W^T` (a bias-free linear, no soft-capping or logit scale: Qwen2 and
Llama-style models; `check_plain_head` refuses others).
Under FSDP2 the root group (embedding, tied head, final norm) must stay unsharded from the forward
to the end of the backward: `build_fsdp_model` does not reshard the root after forward with this
path (FSDP2's own default for a root), and FSDP2 reduce-scatters the root's gradients in its
end-of-backward callback, after the head's backward has accumulated them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from services import algorithm as alg


def _chunks(n: int, size: int):
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def _logit_grad(h: torch.Tensor, weight: torch.Tensor, tok: torch.Tensor, temperature: float,
                g_lp: torch.Tensor | None, g_ent: torch.Tensor | None, ent: torch.Tensor | None) -> torch.Tensor:
    """∂L/∂z [c, V] (fp32; fp64 for fp64) of one chunk, recomputing its logits: two [c, V] buffers reused in place."""
    z = F.linear(h, weight)
    logp = torch.log_softmax((z.float() if z.dtype in (torch.float16, torch.bfloat16) else z) / temperature, dim=-1)
    del z
    p = logp.exp()
    if g_ent is not None:
        coef = logp.add_(ent.unsqueeze(1)).mul_(g_ent.unsqueeze(1))  # e (log p + H)
        if g_lp is not None:
            coef.add_(g_lp.unsqueeze(1))
        dz = p.mul_(coef).neg_()
    else:
        del logp
        dz = p.mul_(g_lp.unsqueeze(1)).neg_()
    if g_lp is not None:
        dz.scatter_add_(1, tok.unsqueeze(1), g_lp.unsqueeze(1))
    return dz.div_(temperature)


class _ChunkedHead(torch.autograd.Function):
    """(hidden [N, h], weight [V, h], tokens [N]) -> (log π_T(tokens) [N], H_T [N] or [0], irrelevant H [N] or [0])."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, chunk: int, with_entropy: bool, irrelevant_ids):
        n = hidden.shape[0]
        f32 = dict(dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        logp = torch.empty(n, **f32)
        ent = torch.empty(n if with_entropy else 0, **f32)
        irr = torch.empty(n if irrelevant_ids else 0, **f32)
        for sl in _chunks(n, chunk):
            z = F.linear(hidden[sl], weight).unsqueeze(0)
            lp, h = alg.token_logprobs_and_entropy(z, tokens[sl].unsqueeze(0), temperature, chunk, with_entropy)
            logp[sl] = lp[0]
            if with_entropy:
                ent[sl] = h[0]
            if irrelevant_ids:
                irr[sl] = alg.entropy_split(z, irrelevant_ids, 1.0, chunk)[0][0]
            del z, lp, h
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(irr)
        ctx.save_for_backward(hidden, weight, tokens, ent)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp, ent, irr

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_irr):
        hidden, weight, tokens, ent = ctx.saved_tensors
        if ent.numel() == 0:
            g_ent = None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_h = torch.zeros_like(hidden) if need_h else None
        # a real (zero) weight gradient even for no positions: every FSDP rank must reduce the same tensors
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        d_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        if g_lp is None and g_ent is None:
            return d_h, None if d_w is None else d_w.to(weight.dtype), None, None, None, None, None
        for sl in _chunks(hidden.shape[0], ctx.chunk):
            dz = _logit_grad(hidden[sl], weight, tokens[sl], ctx.temperature, None if g_lp is None else g_lp[sl],
                             None if g_ent is None else g_ent[sl], None if g_ent is None else ent[sl])
            dz = dz.to(weight.dtype)
            if need_h:
                d_h[sl] = dz @ weight
            if need_w:
                if acc == weight.dtype:
                    d_w.addmm_(dz.t(), hidden[sl])
                else:
                    d_w.add_(dz.t() @ hidden[sl])
            del dz
        return d_h, None if d_w is None else d_w.to(weight.dtype), None, None, None, None, None


def head_outputs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 temperature: float = 1.0, chunk_size: int = 4096, with_entropy: bool = True,
                 irrelevant_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log π_T(tokens), the exact entropy at T and the irrelevant part of the entropy at T = 1 ([b, w]
    each; the last two None unless asked for), from hidden states [b, w, h] where position t predicts
    tokens[:, t] (or from the rows at `positions` already picked out, [N, h] in row-major order).
    Computed only where `positions` [b, w] is nonzero (zeros elsewhere), `chunk_size` positions at
    a time. log π and the entropy carry gradients to `hidden` and `weight`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    where = positions.bool()
    rows = hidden if hidden.dim() == 2 else hidden[where]
    if rows.shape[0] != int(where.sum()):
        raise ValueError(f"{rows.shape[0]} hidden rows for {int(where.sum())} positions")
    ids = sorted({int(i) for i in irrelevant_ids})
    lp, ent, irr = _ChunkedHead.apply(rows, weight, tokens[where], float(temperature), int(chunk_size),
                                      bool(with_entropy), ids)

    def place(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(where.shape, dtype=values.dtype, device=values.device).index_put((where,), values)

    return place(lp), place(ent) if with_entropy else None, place(irr) if ids else None


def check_plain_head(model) -> None:
    """Refuse a model whose logits are not `lm_head(hidden)` (a bias, soft-capping, a logit scale)."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling") if getattr(cfg, k, None) not in (None, 1, 1.0)]
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or scaled:
        raise ValueError(f"learner.chunked_head needs logits = lm_head(hidden) with a bias-free linear head; "
                         f"{type(model).__name__} has {type(head).__name__}{' with a bias' if getattr(head, 'bias', None) is not None else ''}"
                         f"{' and ' + ', '.join(scaled) if scaled else ''}: set learner.chunked_head: false")


def head_weight(model) -> torch.Tensor:
    """The head's weight as the forward left it: under FSDP2 the root's unsharded parameter."""
    weight = model.get_output_embeddings().weight
    if hasattr(weight, "full_tensor"):  # a DTensor: the root was resharded after its forward
        raise RuntimeError("chunked head: the FSDP root's parameters are sharded after the forward; build the model "
                           "with build_fsdp_model (which keeps them unsharded through the backward)")
    return weight


def final_hidden(model, **forward_kwargs):
    """(final hidden states [b, l, h], the model's output) of one forward through the root module
    (so FSDP's hooks gather its parameters), with no logits kept (`logits_to_keep` = no position)."""
    box: dict[str, torch.Tensor] = {}

    def grab(_module, _args, out) -> None:
        box["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    ids = forward_kwargs.get("input_ids")
    keep = torch.empty(0, dtype=torch.long, device=ids.device if ids is not None else None)
    handle = model.get_decoder().register_forward_hook(grab)
    try:
        out = model(**forward_kwargs, logits_to_keep=keep)
    finally:
        handle.remove()
    return box["hidden"], out
