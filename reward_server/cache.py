"""Verdict cache: Redis when REDIS_URL is set (shared by replicas), else an in-process LRU.

Keys hash (task, verifier version, reference, response); only definite verdicts (correct,
incorrect, unparsable) are stored, never timeouts or errors, so a cached verdict is exactly the
verdict a fresh verification would give. A Redis outage degrades to "no cache", never to a
failed request.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from typing import Any, Protocol

from reward_server.verifiers.base import Verdict

log = logging.getLogger("aepo.reward.cache")
CACHEABLE = frozenset({"correct", "incorrect", "unparsable"})
KEY_PREFIX = "aepo:reward:v1:"


def cache_key(task: str, version: str, reference: Any, response: str) -> str:
    """Stable key: sha256 of the canonical JSON of (task, version, reference, response)."""
    blob = json.dumps([task, version, reference, response], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return KEY_PREFIX + hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def _encode(verdict: Verdict) -> str:
    return json.dumps([verdict.outcome, verdict.detail])


def _decode(raw: str | bytes) -> Verdict | None:
    try:
        outcome, detail = json.loads(raw)
        return Verdict(outcome, detail) if outcome in CACHEABLE else None
    except (ValueError, TypeError):
        return None


class VerdictCache(Protocol):
    """What the service needs from a cache."""

    backend: str

    async def get_many(self, keys: list[str]) -> list[Verdict | None]: ...

    async def put_many(self, entries: dict[str, Verdict]) -> None: ...

    async def close(self) -> None: ...


class NoCache:
    """Caching switched off."""

    backend = "none"

    async def get_many(self, keys: list[str]) -> list[Verdict | None]:
        """All misses."""
        return [None] * len(keys)

    async def put_many(self, entries: dict[str, Verdict]) -> None:
        """Drop everything."""

    async def close(self) -> None:
        """Nothing to close."""


class LRUCache:
    """In-process least-recently-used cache of at most `size` verdicts."""

    backend = "lru"

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
    """Verdicts in Redis (MGET / pipelined SET EX), shared by every replica using the URL."""

    backend = "redis"

    def __init__(self, url: str, ttl_s: int) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.ttl_s = ttl_s
        self._redis = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._warned = False

    def _degrade(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("redis cache at %s unavailable (%r): verifying without cache", self.url, exc)
            self._warned = True

    async def get_many(self, keys: list[str]) -> list[Verdict | None]:
        """Cached verdicts (None = miss); all misses if Redis is down."""
        if not keys:
            return []
        try:
            raw = await self._redis.mget(keys)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "miss"
            self._degrade(exc)
            return [None] * len(keys)
        self._warned = False
        return [None if r is None else _decode(r) for r in raw]

    async def put_many(self, entries: dict[str, Verdict]) -> None:
        """Store definite verdicts with the TTL; errors are logged, not raised."""
        entries = {k: v for k, v in entries.items() if v.outcome in CACHEABLE}
        if not entries:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, verdict in entries.items():
                    pipe.set(key, _encode(verdict), ex=self.ttl_s)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)

    async def ping(self) -> bool:
        """True if Redis answers."""
        try:
            return bool(await self._redis.ping())
        except Exception:  # noqa: BLE001
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def make_cache(redis_url: str | None, lru_size: int, ttl_s: int) -> VerdictCache:
    """Redis if a URL is given, else an LRU (or no cache when lru_size is 0)."""
    if redis_url:
        return RedisCache(redis_url, ttl_s)
    return LRUCache(lru_size) if lru_size > 0 else NoCache()
