"""Reward-server configuration: environment variables (prefix ``AEPO_REWARD_``) or explicit values."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RewardSettings(BaseSettings):
    """Limits, admission, worker pool, auth and cache of one reward-server app.

    Every field can be set from the environment, e.g. ``AEPO_REWARD_MAX_ITEMS=8192``;
    the Redis URL is also read from plain ``REDIS_URL``.
    """

    model_config = SettingsConfigDict(env_prefix="AEPO_REWARD_", populate_by_name=True, extra="ignore")

    token: SecretStr | None = Field(
        None,
        description="Bearer token required on POST /v1/verify (AEPO_REWARD_TOKEN); None = no auth, which "
        "`aepo serve-reward` only allows on a loopback address.",
    )
    # ---- per-request limits (checked before and while the body is read, then per item)
    max_items: int = Field(4096, ge=1, description="Most items in one request; more gets 413.")
    max_response_chars: int = Field(200_000, ge=1, description="Longest `response` accepted; longer gets 413.")
    max_reference_bytes: int = Field(
        64 * 1024, ge=64, description="Largest `reference` (compact JSON, UTF-8 bytes); larger gets 413."
    )
    max_metadata_keys: int = Field(64, ge=0, description="Most keys in an item's `metadata`; more gets 413.")
    max_metadata_bytes: int = Field(
        16 * 1024, ge=0, description="Largest `metadata` (compact JSON, UTF-8 bytes); larger gets 413."
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413.")
    body_timeout_s: float = Field(
        60.0, gt=0, description="Seconds a request may take to send its whole body; slower gets 408 (slow senders "
        "would otherwise hold an admission slot forever)."
    )
    default_timeout_s: float = Field(10.0, gt=0, description="Request deadline when the body gives no `timeout_s`.")
    max_timeout_s: float = Field(300.0, gt=0, description="Largest `timeout_s` a request may ask for; more gets 422.")
    # ---- admission control (429 when full, 503 while starting or draining; both with Retry-After)
    max_inflight_requests: int = Field(
        64, ge=1, description="Most POST /v1/verify requests admitted at once (reading their body or verifying); "
        "more get 429."
    )
    max_inflight_items: int = Field(
        16_384, ge=1, description="Most items admitted at once (verifying or waiting for a worker); a request that "
        "would go over gets 429. Raised to max_items when lower, so any valid request can get in."
    )
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Most request-body bytes held at once; a request that would go over "
        "gets 429. Raised to max_body_bytes when lower."
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After (seconds) sent with 429 and 503.")
    start_wait_s: float = Field(
        30.0, ge=0, description="How long an admitted request waits for the verifier workers to come up before 503 "
        "(items never time out just because the workers were still starting)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT: answer 503 to new requests and wait this long at most for the "
        "requests in flight, then exit 0 (`aepo serve-reward`)."
    )
    max_connections: int = Field(
        1024, ge=1, description="Most open connections plus running requests before uvicorn answers 503 itself "
        "(`aepo serve-reward`)."
    )
    item_time_limit_s: float = Field(
        2.0,
        gt=0,
        description="Most seconds one item may run in a worker before it is killed (`timeout`); keeps a few "
        "hostile items from starving the rest of a batch. The request deadline still applies.",
    )
    workers: int = Field(2, ge=1, le=256, description="Verifier worker processes (math and other pool verifiers).")
    worker_memory_mb: int = Field(
        2048, ge=0, description="Address-space limit per worker process (MiB); 0 = unlimited."
    )
    worker_max_tasks: int = Field(0, ge=0, description="Recycle a worker after this many items (0 = never).")
    # ---- verdict cache
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "AEPO_REWARD_REDIS_URL", "REDIS_URL"),
        description="Verdict cache in Redis (e.g. redis://127.0.0.1:6379/0); None = in-process LRU.",
    )
    cache_secret: SecretStr | None = Field(
        None,
        description="HMAC key signing Redis cache entries (AEPO_REWARD_CACHE_SECRET); an entry whose signature "
        "does not verify is a miss. Unset: derived from the token, else a random key per process (replicas "
        "then share no entries).",
    )
    cache_retry_s: float = Field(
        5.0, ge=0, description="After a Redis failure (retried briefly), verify without cache this many seconds "
        "before trying Redis again."
    )
    cache_size: int = Field(100_000, ge=0, description="In-process LRU entries when there is no Redis (0 = off).")
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="Expiry of Redis cache entries, seconds.")
    plugins: list[str] = Field(
        default_factory=list,
        description="Modules imported at start-up (server and workers) that register extra verifiers.",
    )

    @field_validator("token", "cache_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value):
        # `AEPO_REWARD_TOKEN=` (compose's `${AEPO_REWARD_TOKEN:-}`) means "no token", not "the empty token".
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(raw, str) and not raw.strip() else value

    @model_validator(mode="after")
    def _budgets_fit_one_request(self) -> "RewardSettings":
        # A budget smaller than the largest valid request would turn that request into an
        # endless 429; raise the budget instead of rejecting the configuration.
        self.max_inflight_items = max(self.max_inflight_items, self.max_items)
        self.max_inflight_bytes = max(self.max_inflight_bytes, self.max_body_bytes)
        return self
