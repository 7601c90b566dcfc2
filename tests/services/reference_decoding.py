"""Reference computations the engine/learner tests compare against: plain HF forward passes."""

from __future__ import annotations

import torch


def hf_model_with(path: str, weights: dict[str, torch.Tensor] | None = None):
    """A fresh HF copy of the tiny model, optionally with other weights loaded."""
    from services.model.tiny import load_causal_lm

    model = load_causal_lm(path)
    if weights is not None:
        model.load_state_dict(weights)
    return model


@torch.no_grad()
def reference_greedy(model, prompt_ids: list[int], max_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by repeated full forward passes, no cache, no padding (the reference)."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos_id:
            break
    return out


@torch.no_grad()
def first_token_entropy(model, prompt_ids: list[int], temperature: float) -> float:
    """Exact entropy of softmax(logits / T) of the first response token."""
    logits = model(torch.tensor([prompt_ids])).logits[0, -1] / temperature
    logp = torch.log_softmax(logits.double(), -1)
    return float(-(logp.exp() * logp).sum())


def plugin_entropy(tokens: list[int]) -> float:
    """Entropy of the empirical distribution of `tokens` (the plug-in estimate)."""
    counts = torch.bincount(torch.tensor(tokens)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
