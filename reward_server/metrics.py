"""Prometheus metrics of one app, in its own CollectorRegistry (several apps per process don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RewardMetrics:
    """aepo_reward_* metrics: requests, items by task and outcome, verify time, in-flight, restarts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # prometheus-client appends `_total` to counters in the exposition.
        self.requests = Counter(
            "aepo_reward_requests", "POST /v1/verify requests by HTTP status.", ["status"], registry=self.registry
        )
        self.items = Counter(
            "aepo_reward_items", "Verified items by task and outcome.", ["task", "outcome"], registry=self.registry
        )
        self.verify_seconds = Histogram(
            "aepo_reward_verify_seconds",
            "Seconds from a request's arrival to an item's verdict, by task.",
            ["task"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "aepo_reward_request_seconds", "Seconds per POST /v1/verify request.", buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge("aepo_reward_inflight", "POST /v1/verify requests in progress.", registry=self.registry)
        self.worker_restarts = Counter(
            "aepo_reward_worker_restarts", "Verifier worker processes replaced (killed past a deadline, or died).",
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "aepo_reward_cache_lookups", "Verdict-cache lookups by result (hit/miss).", ["result"], registry=self.registry
        )
