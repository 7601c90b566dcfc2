"""Fixtures shared by the weight-sync tests."""

from __future__ import annotations

import pytest
import torch

from services.backends.network import free_port
from services.config import GRPOConfig, LearnerConfig


@pytest.fixture(scope="module")
def worker(tiny_model_path):
    """One learner rank (gloo, one process, 1 MiB sync buckets) whose weights moved away from the checkpoint's."""
    from services.learner.worker import LearnerWorker

    w = LearnerWorker(0, 1, tiny_model_path, LearnerConfig(num_workers=1, sync_bucket_mb=1), GRPOConfig(), seed=0)
    w.setup("127.0.0.1", free_port())
    with torch.no_grad():
        for p in w.model.parameters():
            local = p.to_local()  # one rank: its shard is the whole parameter
            local.add_(0.01 * torch.randn(local.shape, generator=torch.Generator().manual_seed(3)))
    yield w
    w.shutdown()
