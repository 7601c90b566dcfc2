"""The reward server: a FastAPI verification service (POST /v1/verify).

Public API (imported lazily, so `from reward_server import RewardClient` stays light):

- `create_app(settings=None)`: the FastAPI app (reward_server.main)
- `RewardSettings`: limits, workers, token, cache (env AEPO_REWARD_*, REDIS_URL)
- `deploy(replicas=1, route_prefix="/", settings=None) -> base_url`: Ray Serve deployment
- `RewardClient(base_url, token=None, timeout_s=...)`: async/sync client with retries
- `register_verifier(name, fn, ...)`: add a task
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "reward_server.main",
    "RewardSettings": "reward_server.settings",
    "deploy": "reward_server.serve_deploy",
    "RewardClient": "reward_server.client",
    "RewardServerUnavailable": "reward_server.client",
    "RewardRequestError": "reward_server.client",
    "register_verifier": "reward_server.verifiers",
    "VerifyItem": "reward_server.schemas",
    "VerifyResult": "reward_server.schemas",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reward_server' has no attribute {name!r}")
