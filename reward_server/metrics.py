"""Prometheus metrics of one app, in its own CollectorRegistry (several apps per process don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RewardMetrics:
    """aepo_reward_* metrics: requests, items, verify time, in-flight work, admission, cache, restarts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # prometheus-client appends `_total` to counters in the exposition.
        self.requests = Counter("aepo_reward_requests", "POST /v1/verify requests by HTTP status.", ["status"], registry=r)
        self.items = Counter("aepo_reward_items", "Verified items by task and outcome.", ["task", "outcome"], registry=r)
        self.verify_seconds = Histogram(
            "aepo_reward_verify_seconds",
            "Seconds from a request's arrival to an item's verdict, by task.",
            ["task"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "aepo_reward_request_seconds", "Seconds per POST /v1/verify request.", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.inflight = Gauge("aepo_reward_inflight", "POST /v1/verify requests in progress.", registry=r)
        self.inflight_items = Gauge(
            "aepo_reward_inflight_items", "Items admitted and not yet answered (the admission queue).", registry=r
        )
        self.rejected = Counter(
            "aepo_reward_rejected",
            "POST /v1/verify requests refused before verification, by reason (unauthorized, too_large, "
            "invalid, busy, draining, starting, body_timeout).",
            ["reason"],
            registry=r,
        )
        self.draining = Gauge("aepo_reward_draining", "1 while the server drains before exiting.", registry=r)
        self.worker_restarts = Counter(
            "aepo_reward_worker_restarts", "Verifier worker processes replaced (killed past a deadline, or died).",
            registry=r,
        )
        self.cache_lookups = Counter(
            "aepo_reward_cache_lookups", "Verdict-cache lookups by result (hit/miss).", ["result"], registry=r
        )
        self.cache_rejected = Counter(
            "aepo_reward_cache_rejected",
            "Redis cache entries not trusted (treated as a miss), by reason (unsigned, bad_signature, oversized).",
            ["reason"],
            registry=r,
        )
        self.cache_errors = Counter(
            "aepo_reward_cache_errors", "Redis cache operations that failed after their retries, by op.", ["op"],
            registry=r,
        )
        self.cache_up = Gauge("aepo_reward_cache_up", "1 while the Redis cache answers (0: verifying without it).",
                              registry=r)
