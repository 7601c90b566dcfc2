"""Deadlines through TestClient: request deadline vs per-item limit, queueing, killed busy workers."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

from reward_server.verifiers import unregister_verifier
from reward_testlib import item, make_client, verify

TOWER = "\\boxed{9^{9^{9^{9}}}}"


def test_one_percent_hostile_batch_finishes_inside_its_deadline(client):
    # 99 items that need sympy (k/(2k) == 1/2, each with a fresh tag so none is cached) + 1 tower.
    tag = uuid.uuid4().hex[:8]
    items = [item(k, "math", f"{tag} \\boxed{{\\frac{{{k}}}{{{2 * k}}}}}", "0.5") for k in range(1, 100)]
    items.insert(50, item("tower", "math", TOWER, "1"))
    t0 = time.monotonic()
    results = verify(client, items, timeout_s=4)
    wall = time.monotonic() - t0
    outcomes = [r["outcome"] for r in results]
    assert outcomes[50] == "timeout"  # killed at the 1.5 s per-item limit
    assert outcomes[:50] + outcomes[51:] == ["correct"] * 99
    assert wall < 4.5, wall


def test_request_deadline_shorter_than_item_limit(client):
    t0 = time.monotonic()
    (result,) = verify(client, [item("t", "math", TOWER, "1")], timeout_s=0.5)
    assert result["outcome"] == "timeout" and 0.45 <= result["elapsed_s"] <= 0.8, result
    assert time.monotonic() - t0 < 1.2


def test_items_queued_past_the_deadline_time_out_too(client):
    # 4 towers, 2 workers, deadline 1 s: two run and are stopped at 1 s, two never get a worker.
    t0 = time.monotonic()
    results = verify(client, [item(i, "math", TOWER, str(i)) for i in range(4)], timeout_s=1.0)
    assert [r["outcome"] for r in results] == ["timeout"] * 4
    assert time.monotonic() - t0 < 1.6


def test_worker_killed_mid_item_gives_error_and_is_replaced():
    c = make_client(workers=1, item_time_limit_s=10)
    try:
        (pid,) = c.get("/readyz").json()["worker_pids"]
        out = {}
        thread = threading.Thread(target=lambda: out.update(r=verify(c, [item("t", "math", TOWER, "1")], timeout_s=10)))
        thread.start()
        time.sleep(0.7)  # the tower is running in the only worker
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        thread.join()
        assert time.monotonic() - t_kill < 2.0  # answered when the worker died, not at the deadline
        assert out["r"][0]["outcome"] == "error" and "died" in out["r"][0]["detail"], out
        results = verify(c, [item("ok", "math", "\\boxed{\\frac{3}{6}}", "0.5")], timeout_s=10)
        assert results[0]["outcome"] == "correct"
        assert pid not in c.get("/readyz").json()["worker_pids"]
    finally:
        c.__exit__(None, None, None)


def test_plugin_verifier_runs_in_the_pool():
    c = make_client(workers=1, plugins=["reward_plugin_example"])
    try:
        results = verify(c, [item(1, "test-reversed", "cba", "abc"), item(2, "test-reversed", "abc", "abc")])
        assert [r["outcome"] for r in results] == ["correct", "incorrect"]
        assert "test-reversed" in {t["name"] for t in c.get("/v1/tasks").json()}
    finally:
        c.__exit__(None, None, None)
        unregister_verifier("test-reversed")  # the registry is per process: keep other tests' task lists clean
