"""Reward-server configuration: environment variables (prefix ``AEPO_REWARD_``) or explicit values."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RewardSettings(BaseSettings):
    """Limits, worker pool, auth and cache of one reward-server app.

    Every field can be set from the environment, e.g. ``AEPO_REWARD_MAX_ITEMS=8192``;
    the Redis URL is also read from plain ``REDIS_URL``.
    """

    model_config = SettingsConfigDict(env_prefix="AEPO_REWARD_", populate_by_name=True, extra="ignore")

    token: SecretStr | None = Field(
        None, description="Bearer token required on POST /v1/verify (AEPO_REWARD_TOKEN); None = no auth."
    )
    max_items: int = Field(4096, ge=1, description="Most items in one request; more gets 413.")
    max_response_chars: int = Field(200_000, ge=1, description="Longest `response` accepted; longer gets 413.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413.")
    default_timeout_s: float = Field(10.0, gt=0, description="Request deadline when the body gives no `timeout_s`.")
    max_timeout_s: float = Field(300.0, gt=0, description="Largest `timeout_s` a request may ask for; more gets 422.")
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
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "AEPO_REWARD_REDIS_URL", "REDIS_URL"),
        description="Verdict cache in Redis (e.g. redis://127.0.0.1:6379/0); None = in-process LRU.",
    )
    cache_size: int = Field(100_000, ge=0, description="In-process LRU entries when there is no Redis (0 = off).")
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="Expiry of Redis cache entries, seconds.")
    plugins: list[str] = Field(
        default_factory=list,
        description="Modules imported at start-up (server and workers) that register extra verifiers.",
    )
