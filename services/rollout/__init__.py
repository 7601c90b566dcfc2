"""Rollout generation: the rollout service (one Ray actor), the pool of them, and the engine adapters."""
