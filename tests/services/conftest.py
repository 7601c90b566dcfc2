"""Fixtures for the rollout/learner tests: the embedded tiny model, built once per session.

Nothing here imports Ray or vLLM at module level (collecting a test module should not start
either). Ray comes from tests/conftest.py's `ray_local`.
"""

from __future__ import annotations

import pytest
import torch

# Scale of the final RMSNorm that makes the random-init tiny model's next-token distribution
# peaked enough for temperature to show: on prompt `9,8,3>69|` (seed 0) the first token's exact
# entropy is then about 0.79 / 1.40 / 1.90 nats at T = 0.8 / 1.0 / 1.2 (at scale 1 all three are
# about 3.05, near log 23 = 3.14, and temperature changes nothing measurable).
PEAKED_NORM_SCALE = 4.0


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """The default tiny model (hidden 128, 4 layers, 4 heads, seed 0) in HF format."""
    from services.config import TinyModelConfig
    from services.model.tiny import build_tiny_model

    return str(build_tiny_model(TinyModelConfig(), tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from services.model.tiny import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def peaked_weights(tiny_model_path) -> dict[str, torch.Tensor]:
    """The tiny model's state dict with the final norm set to PEAKED_NORM_SCALE (logits x ~4)."""
    from services.model.tiny import load_causal_lm

    sd = load_causal_lm(tiny_model_path).state_dict()
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], PEAKED_NORM_SCALE)
    return {k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="session")
def perturbed_weights(tiny_model_path) -> dict[str, torch.Tensor]:
    """The tiny model's weights plus N(0, 0.05^2) noise (seed 1): greedy outputs change."""
    from services.model.tiny import load_causal_lm

    model = load_causal_lm(tiny_model_path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # parameters(), not the state dict: the tied lm_head once
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}
