"""A real `aepo serve-reward` process over real HTTP: deadlines, concurrency, killed workers, client."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from reward_server.client import RewardClient, RewardRequestError, RewardServerUnavailable
from services.backends.network import free_port
from reward_testlib import item

TOKEN = {"Authorization": "Bearer tok"}
TOWER = "\\boxed{9^{9^{9^{9}}}}"  # sympy tries to build 9**(9**387420489): never finishes


def post(url, items, timeout_s=None, headers=TOKEN):
    body = {"items": items} | ({"timeout_s": timeout_s} if timeout_s else {})
    return httpx.post(url + "/v1/verify", json=body, headers=headers, timeout=60)


def test_client_verifies_a_mixed_batch(server_url):
    client = RewardClient(server_url, token="tok", timeout_s=30)
    items = [
        item("m1", "math", "We get \\boxed{\\dfrac{3}{4}}.", "\\frac34"),
        item("m2", "math", "so x = \\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        item("m3", "math", "Answer: 17", "18"),
        item("c1", "countdown", "9 * 8=72, 72-3 = 69", {"numbers": [9, 8, 3], "target": 69, "use_all": True}),
        item("u1", "nope", "", ""),
    ]
    results = client.verify_sync(items)
    assert [(r.id, r.reward, r.outcome) for r in results] == [
        ("m1", 1, "correct"), ("m2", 1, "correct"), ("m3", 0, "incorrect"), ("c1", 1, "correct"), ("u1", 0, "error"),
    ]
    assert client.counts["error"] == 1
    assert post(server_url, items[:1], headers={}).status_code == 401


def test_hanging_item_times_out_on_time_while_a_concurrent_request_succeeds(server_url):
    slow: dict = {}

    def hang():
        t0 = time.monotonic()
        slow["response"] = post(server_url, [item("h", "math", TOWER, "1")], timeout_s=1.0)
        slow["wall"] = time.monotonic() - t0

    thread = threading.Thread(target=hang)
    thread.start()
    time.sleep(0.3)  # the tower now occupies one of the two workers
    t0 = time.monotonic()
    # 5/7 (a fresh reference, so never cached): worked out as \frac{10}{14} = 5/7
    fast = post(server_url, [item("f", "math", "\\boxed{\\frac{10}{14}}", "5/7")], timeout_s=5)
    fast_wall = time.monotonic() - t0
    thread.join()
    assert fast.status_code == 200 and fast.json()["results"][0]["outcome"] == "correct"
    assert fast_wall < 1.0, fast_wall  # did not wait for the stuck worker
    result = slow["response"].json()["results"][0]
    assert result["outcome"] == "timeout" and result["reward"] == 0
    # deadline 1.0 s after arrival: the verdict comes at ~1.0 s, not when sympy would give up
    assert 0.9 <= result["elapsed_s"] <= 1.3, result
    assert slow["wall"] < 2.0, slow["wall"]


def test_hostile_inputs_time_out_within_the_deadline(server_url):
    """Exponent towers, a huge factorial, deep nesting: each item is killed at its 1.5 s limit."""
    hostile = [
        TOWER,
        "\\boxed{(10^{10})!}",
        "\\boxed{10^{10^{10}}}",
        "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
        "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",  # antlr on 400 nested parens: > 4 s here
    ]
    items = [item(i, "math", h, "1") for i, h in enumerate(hostile)]
    items.append(item("ok", "math", "Answer: \\frac{12}{4}", "3"))
    t0 = time.monotonic()
    results = post(server_url, items, timeout_s=8).json()["results"]
    wall = time.monotonic() - t0
    # 5 items x 1.5 s limit over 2 workers: about 4.5 s, always inside the 8 s deadline
    assert wall < 8.5, wall
    for r in results[:4]:
        assert r["outcome"] == "timeout" and r["reward"] == 0, r
    assert results[4]["reward"] == 0 and results[4]["outcome"] in ("timeout", "incorrect", "error"), results[4]
    assert results[5]["outcome"] == "correct", results[5]


def _ready(url):
    try:
        r = httpx.get(url + "/readyz", timeout=5)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def _restarts(url):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("aepo_reward_worker_restarts_total"):
            return float(line.split()[-1])
    raise AssertionError("no restarts metric")


def _settled(url, timeout_s=20.0):
    """/readyz once its 2 worker PIDs stayed the same for 1 s (earlier tests' stuck workers are reaped)."""
    end = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < end:
        now = _ready(url)
        if now != last:
            last, since = now, time.monotonic()
        elif now and now["workers"] == 2 and time.monotonic() - since > 1.0:
            return now
        time.sleep(0.1)
    raise AssertionError(f"workers did not settle: {last}")


def test_killed_worker_is_replaced(server_url):
    before = _settled(server_url)
    restarts = _restarts(server_url)
    os.kill(before["worker_pids"][0], signal.SIGKILL)  # an idle worker dies (OOM killer, kill -9)
    end = time.monotonic() + 30
    while True:
        now = _ready(server_url)
        if now and now["workers"] == 2 and before["worker_pids"][0] not in now["worker_pids"]:
            break
        assert time.monotonic() < end, f"worker not replaced: {now}"
        time.sleep(0.1)
    assert _restarts(server_url) >= restarts + 1
    # and the pool works: two items that need sympy (7/3 = \frac{14}{6})
    results = post(server_url, [item(1, "math", "\\boxed{\\frac{14}{6}}", "7/3"),
                                 item(2, "math", "\\boxed{\\frac{15}{6}}", "7/3")]).json()["results"]
    assert [r["outcome"] for r in results] == ["correct", "incorrect"]


def test_client_raises_clearly_when_the_server_is_unreachable():
    client = RewardClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.5, retry_initial_s=0.05, retry_max_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(RewardServerUnavailable, match="attempt"):
        client.verify_sync([item(1, "exact", "a", "a")])
    assert time.monotonic() - t0 < 3.0


def test_client_retries_5xx_then_succeeds_and_does_not_retry_4xx():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= 2:
            return httpx.Response(503, text="starting")
        return httpx.Response(200, json={"results": [
            {"id": "1", "reward": 0, "outcome": "timeout", "detail": "slow", "elapsed_s": 1.0}]})

    client = RewardClient("http://reward", timeout_s=10, retry_initial_s=0.01, transport=httpx.MockTransport(handler))
    results = client.verify_sync([item(1, "math", "x", "1")])
    assert len(calls) == 3 and results[0].reward == 0 and client.counts["timeout"] == 1

    rejecting = RewardClient("http://reward", transport=httpx.MockTransport(
        lambda r: httpx.Response(422, json={"detail": "bad"})))
    with pytest.raises(RewardRequestError, match="422"):
        rejecting.verify_sync([item(1, "math", "x", "1")])
