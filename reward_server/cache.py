"""Verdict cache: Redis when REDIS_URL is set (shared by replicas), else an in-process LRU.

Keys name the task and its verifier's version and hash (task, version, reference, response);
only definite verdicts (correct, incorrect, unparsable) are stored, never timeouts or errors, so
a cached verdict is exactly the verdict a fresh verification would give.

Redis values are signed: HMAC-SHA256 over the key and the verdict, with the server's cache
secret. Anyone who can write to Redis could otherwise store `correct` for any answer (reward
hacking); an entry whose signature does not verify, including a genuine entry copied to
another key, is a miss, counted in aepo_reward_cache_rejected_total and logged once.

A Redis outage degrades to "no cache", never to a failed request: each call is retried briefly,
then the cache is skipped for `cache_retry_s` (aepo_reward_cache_up = 0, one log line each way).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import Any, Protocol

from reward_server.metrics import RewardMetrics
from reward_server.settings import RewardSettings
from reward_server.verifiers.base import Verdict

log = logging.getLogger("aepo.reward.cache")
CACHEABLE = frozenset({"correct", "incorrect", "unparsable"})
KEY_PREFIX = "aepo:reward:v2:"
_SIGNED = b"s1:"
_MAX_VALUE_BYTES = 16 * 1024  # a verdict's detail is a sentence: anything bigger is not ours
_LABEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _label(text: str) -> str:
    """`text` if it is safe and short inside a Redis key, else a stable digest of it."""
    return text if _LABEL_RE.match(text) else "h" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def cache_key(task: str, version: str, reference: Any, response: str) -> str:
    """`aepo:reward:v2:<task>:<version>:<sha256 of the canonical JSON of (task, version, reference, response)>`.

    The readable task and version let an operator drop one verifier's entries (SCAN + DEL).
    """
    blob = json.dumps([task, version, reference, response], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{KEY_PREFIX}{_label(task)}:{_label(version)}:{digest}"


def signing_key(settings: RewardSettings) -> tuple[bytes, str]:
    """The HMAC key for cache entries and where it came from (for the start-up log line)."""
    if settings.cache_secret is not None:
        return settings.cache_secret.get_secret_value().encode(), "AEPO_REWARD_CACHE_SECRET"
    if settings.token is not None:
        # Derived, not the token itself, so a leaked cache key does not authenticate requests.
        derived = hmac.new(settings.token.get_secret_value().encode(), b"aepo-reward-cache-signing-v1", hashlib.sha256)
        return derived.digest(), "derived from AEPO_REWARD_TOKEN"
    return secrets.token_bytes(32), "random per process (set AEPO_REWARD_CACHE_SECRET to share entries)"


class VerdictSigner:
    """Encodes verdicts as `s1:<hex hmac>:<json>` bound to their key, and checks them on the way back."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, key: str, payload: bytes) -> bytes:
        return hmac.new(self._key, key.encode() + b"\n" + payload, hashlib.sha256).hexdigest().encode()

    def encode(self, key: str, verdict: Verdict) -> bytes:
        """The Redis value for `verdict` under `key`."""
        payload = json.dumps([verdict.outcome, verdict.detail]).encode()
        return _SIGNED + self._mac(key, payload) + b":" + payload

    def decode(self, key: str, raw: bytes) -> tuple[Verdict | None, str | None]:
        """(verdict, None) for a genuine entry of `key`; (None, reason) for anything else."""
        if len(raw) > _MAX_VALUE_BYTES:
            return None, "oversized"
        if not raw.startswith(_SIGNED):
            return None, "unsigned"
        mac, sep, payload = raw[len(_SIGNED):].partition(b":")
        if not sep or not hmac.compare_digest(mac, self._mac(key, payload)):
            return None, "bad_signature"
        try:
            outcome, detail = json.loads(payload)
            return (Verdict(outcome, str(detail)), None) if outcome in CACHEABLE else (None, "bad_signature")
        except (ValueError, TypeError):
            return None, "bad_signature"  # signed by us yet unreadable: treat like a forgery


class VerdictCache(Protocol):
    """What the service needs from a cache."""

    backend: str
    healthy: bool

    async def get_many(self, keys: list[str]) -> list[Verdict | None]: ...

    async def put_many(self, entries: dict[str, Verdict]) -> None: ...

    async def close(self) -> None: ...


class NoCache:
    """Caching switched off."""

    backend = "none"
    healthy = True

    async def get_many(self, keys: list[str]) -> list[Verdict | None]:
        """All misses."""
        return [None] * len(keys)

    async def put_many(self, entries: dict[str, Verdict]) -> None:
        """Drop everything."""

    async def close(self) -> None:
        """Nothing to close."""


class LRUCache:
    """In-process least-recently-used cache of at most `size` verdicts (nothing outside can write it)."""

    backend = "lru"
    healthy = True

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, Verdict] = OrderedDict()

    async def get_many(self, keys: list[str]) -> list[Verdict | None]:
        """Cached verdicts (None = miss), refreshing recency of the hits."""
        out = []
        for key in keys:
            verdict = self._data.get(key)
            if verdict is not None:
                self._data.move_to_end(key)
            out.append(verdict)
        return out

    async def put_many(self, entries: dict[str, Verdict]) -> None:
        """Store definite verdicts, evicting the least recently used beyond `size`."""
        for key, verdict in entries.items():
            if verdict.outcome in CACHEABLE:
                self._data[key] = verdict
                self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    async def close(self) -> None:
        """Forget everything."""
        self._data.clear()


class RedisCache:
    """Signed verdicts in Redis (MGET / pipelined SET EX), shared by every replica with the same URL and secret."""

    backend = "redis"

    def __init__(self, url: str, ttl_s: int, signer: VerdictSigner, metrics: RewardMetrics | None = None,
                 retry_s: float = 5.0) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.url, self.ttl_s, self.retry_s = url, ttl_s, retry_s
        self._signer = signer
        self._metrics = metrics or RewardMetrics()
        # Brief retries (2, 10-50 ms apart) ride out a Redis restart or a dropped connection;
        # redis-py's default (3 retries up to 10 s apart) would stall every request instead.
        self._redis = aioredis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._skip_until = 0.0
        self.healthy = True
        self._forgery_logged = False
        self._metrics.cache_up.set(1)

    def _available(self) -> bool:
        return self.healthy or time.monotonic() >= self._skip_until

    def _failed(self, op: str, exc: Exception) -> None:
        self._metrics.cache_errors.labels(op).inc()
        self._skip_until = time.monotonic() + self.retry_s
        if self.healthy:
            log.warning("redis cache at %s failed on %s (%r): verifying without cache, trying Redis again every "
                        "%gs (aepo_reward_cache_up=0)", self.url, op, exc, self.retry_s)
            self.healthy = False
            self._metrics.cache_up.set(0)

    def _succeeded(self) -> None:
        if not self.healthy:
            log.warning("redis cache at %s is back", self.url)
            self.healthy = True
            self._metrics.cache_up.set(1)

    async def get_many(self, keys: list[str]) -> list[Verdict | None]:
        """Cached verdicts (None = miss, untrusted entry, or Redis unavailable)."""
        if not keys:
            return []
        if not self._available():
            return [None] * len(keys)
        try:
            raw = await self._redis.mget(keys)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "no cache", never a failed request
            self._failed("get", exc)
            return [None] * len(keys)
        self._succeeded()
        return [None if r is None else self._trusted(k, r) for k, r in zip(keys, raw)]

    def _trusted(self, key: str, raw: bytes) -> Verdict | None:
        verdict, reason = self._signer.decode(key, raw)
        if reason is not None:
            self._metrics.cache_rejected.labels(reason).inc()
            if not self._forgery_logged:  # once: a flood of forged entries must not flood the log
                self._forgery_logged = True
                log.error("redis cache entry %s is %s: not trusted (verified afresh); someone with write access to "
                          "%s may be forging verdicts (further ones only count in aepo_reward_cache_rejected_total)",
                          key, reason, self.url)
        return verdict

    async def put_many(self, entries: dict[str, Verdict]) -> None:
        """Store definite verdicts, signed, with the TTL; failures are counted and logged, not raised."""
        entries = {k: v for k, v in entries.items() if v.outcome in CACHEABLE}
        if not entries or not self._available():
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, verdict in entries.items():
                    pipe.set(key, self._signer.encode(key, verdict), ex=self.ttl_s)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed("put", exc)
            return
        self._succeeded()

    async def ping(self) -> bool:
        """True if Redis answers."""
        try:
            return bool(await self._redis.ping())
        except Exception:  # noqa: BLE001
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def make_cache(settings: RewardSettings, metrics: RewardMetrics) -> VerdictCache:
    """Redis if a URL is set, else an LRU (or no cache when cache_size is 0)."""
    if settings.redis_url:
        key, source = signing_key(settings)
        log.info("redis verdict cache at %s; entries signed with a key %s", settings.redis_url, source)
        if source.startswith("random"):
            log.warning("no AEPO_REWARD_CACHE_SECRET and no token: this process signs Redis cache entries with a "
                        "random key, so other replicas and later restarts will not reuse its entries")
        return RedisCache(settings.redis_url, settings.cache_ttl_s, VerdictSigner(key), metrics, settings.cache_retry_s)
    return LRUCache(settings.cache_size) if settings.cache_size > 0 else NoCache()
