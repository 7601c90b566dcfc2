"""Verdict cache: a real redis-server (hit == miss, no timeouts cached), the LRU, Redis outages."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis

from reward_server.cache import KEY_PREFIX, LRUCache, cache_key
from reward_server.verifiers import Verdict
from services.backends.network import free_port
from reward_testlib import item, make_client, verify


def _hits(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('aepo_reward_cache_lookups_total{result="hit"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def redis_client(redis_url):
    c = make_client(workers=2, item_time_limit_s=1.0, redis_url=redis_url)
    yield c
    c.__exit__(None, None, None)


def test_redis_cache_hit_equals_miss(redis_client, redis_url):
    tag = uuid.uuid4().hex[:8]  # fresh responses: nothing of this test is cached yet
    items = [
        item("eq", "math", f"{tag}: \\boxed{{\\frac{{1}}{{2}}}}", "0.5"),  # correct
        item("ne", "math", f"{tag}: \\boxed{{\\frac{{1}}{{3}}}}", "0.5"),  # incorrect
        item("iv", "math", f"{tag}: \\boxed{{[1, 2)}}", "[1,2)"),  # correct
        item("to", "math", f"{tag}: \\boxed{{9^{{9^{{9^{{9}}}}}}}}", "1"),  # timeout: must not be cached
        item("fp", "math", f"{tag}\nAnswer: 7", "7"),  # decided inline (integer fast path): not cached
    ]
    r = redis.Redis.from_url(redis_url)
    before_keys = set(r.scan_iter(KEY_PREFIX + "*"))
    hits0 = _hits(redis_client)
    miss = verify(redis_client, items, timeout_s=5)
    new_keys = set(r.scan_iter(KEY_PREFIX + "*")) - before_keys
    assert len(new_keys) == 3  # eq, ne, iv; not the timeout, not the inline one
    hits1 = _hits(redis_client)
    hit = verify(redis_client, items, timeout_s=5)
    hits2 = _hits(redis_client)
    assert hits1 == hits0 and hits2 - hits1 == 3

    def strip(results):
        return [{k: v for k, v in res.items() if k != "elapsed_s"} for res in results]

    assert strip(hit)[:3] == strip(miss)[:3]
    assert [x["outcome"] for x in miss] == ["correct", "incorrect", "correct", "timeout", "correct"]
    assert hit[3]["outcome"] == "timeout"  # verified again (and timed out again), not served from cache
    assert max(x["elapsed_s"] for x in hit[:3]) < 0.5  # served from Redis, no sympy


def test_cache_key_covers_task_version_reference_response():
    base = cache_key("math", "1", "0.5", "\\boxed{1/2}")
    assert base == cache_key("math", "1", "0.5", "\\boxed{1/2}")
    assert len({base, cache_key("math", "2", "0.5", "\\boxed{1/2}"), cache_key("math", "1", "0.25", "\\boxed{1/2}"),
                cache_key("math", "1", "0.5", "\\boxed{2/4}"), cache_key("exact", "1", "0.5", "\\boxed{1/2}")}) == 5
    # object references are canonical (key order does not matter)
    assert cache_key("c", "1", {"a": 1, "b": 2}, "x") == cache_key("c", "1", {"b": 2, "a": 1}, "x")


def test_lru_keeps_the_most_recent_and_skips_timeouts():
    async def run():
        lru = LRUCache(2)
        await lru.put_many({"a": Verdict("correct", "a"), "b": Verdict("incorrect", "b")})
        assert (await lru.get_many(["a"]))[0].outcome == "correct"  # a is now most recent
        await lru.put_many({"c": Verdict("correct", "c"), "t": Verdict("timeout", "t")})
        return await lru.get_many(["a", "b", "c", "t"])

    a, b, c, t = asyncio.run(run())
    assert a is not None and b is None and c is not None and t is None  # b evicted; timeout never stored


def test_unreachable_redis_degrades_to_no_cache():
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    c = make_client(workers=1, redis_url=dead)
    try:
        results = verify(c, [item(1, "math", "\\boxed{\\frac{2}{4}}", "0.5"), item(2, "exact", "a", "a")], timeout_s=10)
        assert [x["outcome"] for x in results] == ["correct", "correct"]
    finally:
        c.__exit__(None, None, None)
