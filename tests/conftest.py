"""Shared fixtures: a real redis-server and a real local Ray, both on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from services.backends.network import free_port
from testlib import start_redis

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on by default
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole session."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session, started as `aepo train` starts it (2 CPUs, loopback only)."""
    import ray

    from services.backends.ray_cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    # left running for other session-scoped users; pytest's exit tears the local cluster down


@pytest.fixture(scope="session")
def taught_model(tmp_path_factory):
    """The tiny model after ~1 s/step of plain SFT on 4 problems (memorised, with spaces)."""
    import random

    import torch

    from services.config import TinyModelConfig
    from services.data.countdown import make_splits
    from services.model.tiny import build_tiny_model, load_causal_lm, load_tokenizer
    from services.model.warmstart import sft_batch

    root = tmp_path_factory.mktemp("model")
    base = build_tiny_model(TinyModelConfig(), root / "base", seed=0)
    problems = make_splits(4, 1, seed=0)[0]
    tok, model = load_tokenizer(base), load_causal_lm(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(120):
        ids, lab, att = sft_batch(problems, tok, 32, rng, space_prob=0.2)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = root / "taught"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), problems
