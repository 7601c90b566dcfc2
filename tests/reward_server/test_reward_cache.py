"""Verdict cache: a real redis-server (hit == miss, no timeouts cached, forged entries not trusted), the LRU, outages."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import uuid

import pytest
import redis

from reward_server.cache import KEY_PREFIX, LRUCache, cache_key
from reward_server.verifiers import Verdict, get_verifier
from services.backends.network import free_port
from reward_testlib import item, make_client, metric, verify, wait_for


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


def test_forged_redis_entries_are_misses_counted_and_logged_once(redis_client, redis_url, caplog):
    """Whoever can write to Redis cannot make an answer `correct`: unsigned, badly signed or copied entries."""
    tag = uuid.uuid4().hex[:8]
    wrong = item("w", "math", f"{tag}: \\boxed{{\\frac{{1}}{{3}}}}", "0.5")  # incorrect; needs sympy (not inline)
    right = item("r", "math", f"{tag}: \\boxed{{\\frac{{2}}{{4}}}}", "0.5")  # correct
    version = get_verifier("math").version
    key = cache_key("math", version, "0.5", wrong["response"])
    assert key.startswith(KEY_PREFIX + f"math:{version}:")  # verifier name and version are part of the key
    r = redis.Redis.from_url(redis_url)

    def rejected(reason):
        return metric(redis_client, "aepo_reward_cache_rejected_total", f'reason="{reason}"')

    forgeries = [
        ("unsigned", json.dumps(["correct", "forged"]).encode()),  # the v1 format, or a plain forgery
        ("bad_signature", b"s1:" + b"0" * 64 + b":" + json.dumps(["correct", "forged"]).encode()),
    ]
    caplog.set_level(logging.ERROR, logger="aepo.reward.cache")
    for reason, value in forgeries:
        before = rejected(reason)
        r.set(key, value)
        assert verify(redis_client, [wrong], timeout_s=10)[0]["outcome"] == "incorrect"
        assert rejected(reason) == before + 1
        assert r.get(key).startswith(b"s1:")  # the fresh verdict replaced the forgery, signed
    # a genuine entry of a correct answer, copied onto the wrong answer's key: the signature binds the key
    assert verify(redis_client, [right], timeout_s=10)[0]["outcome"] == "correct"
    genuine = r.get(cache_key("math", version, "0.5", right["response"]))
    before = rejected("bad_signature")
    r.set(key, genuine)
    assert verify(redis_client, [wrong], timeout_s=10)[0]["outcome"] == "incorrect"
    assert rejected("bad_signature") == before + 1
    assert len([rec for rec in caplog.records if "not trusted" in rec.getMessage()]) == 1  # once per process
    hits = _hits(redis_client)
    assert verify(redis_client, [wrong], timeout_s=10)[0]["outcome"] == "incorrect" and _hits(redis_client) == hits + 1


def test_replicas_share_entries_only_with_the_same_secret(redis_url):
    tag = uuid.uuid4().hex[:8]
    it = item("s", "math", f"{tag}: \\boxed{{\\frac{{3}}{{6}}}}", "0.5")
    apps = [make_client(workers=1, redis_url=redis_url, cache_secret=s) for s in ("alpha", "alpha", "beta")]
    try:
        assert verify(apps[0], [it], timeout_s=10)[0]["outcome"] == "correct"
        assert verify(apps[1], [it], timeout_s=10)[0]["outcome"] == "correct" and _hits(apps[1]) == 1
        assert verify(apps[2], [it], timeout_s=10)[0]["outcome"] == "correct" and _hits(apps[2]) == 0
        assert metric(apps[2], "aepo_reward_cache_rejected_total", 'reason="bad_signature"') == 1
    finally:
        for app in apps:
            app.__exit__(None, None, None)


def test_a_redis_outage_is_reported_and_the_cache_comes_back(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    c = make_client(workers=1, redis_url=url, cache_retry_s=0)
    tag = uuid.uuid4().hex[:8]
    it = item("o", "math", f"{tag}: \\boxed{{\\frac{{5}}{{10}}}}", "0.5")
    proc = start_redis(port, tmp_path)
    try:
        assert verify(c, [it], timeout_s=10)[0]["outcome"] == "correct"
        stop_redis(proc)
        assert verify(c, [it], timeout_s=10)[0]["outcome"] == "correct"  # 200 from the workers, not a 500
        assert metric(c, "aepo_reward_cache_errors_total", 'op="get"') >= 1
        assert metric(c, "aepo_reward_cache_up") == 0 and c.get("/readyz").json()["cache_ok"] is False
        proc = start_redis(port, tmp_path)  # back, empty
        hits = _hits(c)
        verify(c, [it], timeout_s=10)  # a miss: stored again
        assert verify(c, [it], timeout_s=10)[0]["outcome"] == "correct" and _hits(c) == hits + 1
        assert metric(c, "aepo_reward_cache_up") == 1 and c.get("/readyz").json()["cache_ok"] is True
    finally:
        stop_redis(proc)
        c.__exit__(None, None, None)


def start_redis(port: int, workdir) -> subprocess.Popen:
    """A private redis-server on 127.0.0.1:port (this test kills it), once it accepts connections."""
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    wait_for(lambda: redis.Redis(port=port, socket_connect_timeout=0.2).ping() if _listening(port) else False,
             "redis-server to start", 30)
    return proc


def stop_redis(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
