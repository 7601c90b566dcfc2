"""The HTTP API through TestClient: order, per-item errors, auth, limits, validation, metrics."""

from __future__ import annotations

import json

from reward_testlib import item, verify

TOY = {"numbers": [9, 8, 3], "target": 69, "use_all": True}


def test_batch_results_in_request_order_and_bad_items_do_not_fail_it(client):
    items = [
        item("a", "math", "\\boxed{\\frac{1}{2}}", "0.5"),  # pool: correct
        item("b", "nope", "x", "y"),  # unknown task: error naming the known tasks
        item("c", "countdown", "9*8=72,72-3=69", TOY),  # inline: correct
        item("d", "countdown", "9*8=72,72-3=69", {"numbers": "oops"}),  # bad reference: error
        item("e", "math", "Answer: 35", "34"),  # fast path: incorrect
        item("f", "numeric", "the area is about \\boxed{3.14159}", 3.14159),
        item("g", "exact", "Paris", "paris"),
        item("h", "math", "no final answer", "1"),
    ]
    results = verify(client, items)
    assert [r["id"] for r in results] == list("abcdefgh")
    got = {r["id"]: (r["reward"], r["outcome"]) for r in results}
    assert got == {
        "a": (1, "correct"), "b": (0, "error"), "c": (1, "correct"), "d": (0, "error"),
        "e": (0, "incorrect"), "f": (1, "correct"), "g": (1, "correct"), "h": (0, "unparsable"),
    }
    unknown = results[1]["detail"]
    assert "nope" in unknown and all(t in unknown for t in ("math", "countdown", "numeric", "exact"))
    assert all(r["elapsed_s"] >= 0 for r in results)


def test_openapi_health_tasks(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/verify" in spec["paths"] and "VerifyItem" in spec["components"]["schemas"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["workers"] == 2
    names = {t["name"] for t in client.get("/v1/tasks").json()}
    assert {"math", "countdown", "numeric", "exact"} <= names


def test_metrics_count_requests_and_items(client):
    def scrape():
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("aepo_reward_")
        }

    before = scrape()
    verify(client, [item(1, "exact", "a", "a"), item(2, "exact", "a", "b")])
    client.post("/v1/verify", content=b"{not json", headers={"content-type": "application/json"})
    after = scrape()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta('aepo_reward_requests_total{status="200"}') == 1
    assert delta('aepo_reward_requests_total{status="422"}') == 1
    assert delta('aepo_reward_items_total{outcome="correct",task="exact"}') == 1
    assert delta('aepo_reward_items_total{outcome="incorrect",task="exact"}') == 1
    assert delta('aepo_reward_verify_seconds_count{task="exact"}') == 2
    assert after["aepo_reward_inflight"] == 0
    assert "aepo_reward_worker_restarts_total" in after


def test_auth(strict_client):
    body = {"items": [item(1, "exact", "a", "a")]}
    assert strict_client.post("/v1/verify", json=body).status_code == 401
    r = strict_client.post("/v1/verify", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong bearer token" in r.json()["detail"]
    assert strict_client.post("/v1/verify", json=body, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
    ok = strict_client.post("/v1/verify", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["results"][0]["reward"] == 1
    assert strict_client.get("/healthz").status_code == 200  # probes need no token


AUTH = {"Authorization": "Bearer s3cret"}


def test_limits_give_413_with_a_reason(strict_client):
    # max_items=5: six items is one too many
    r = strict_client.post("/v1/verify", json={"items": [item(i, "exact", "a", "a") for i in range(6)]}, headers=AUTH)
    assert r.status_code == 413 and "too many items: 6" in r.json()["detail"] and "5" in r.json()["detail"]
    # max_response_chars=100: a 101-char response
    r = strict_client.post("/v1/verify", json={"items": [item("long", "exact", "x" * 101, "a")]}, headers=AUTH)
    assert r.status_code == 413 and "longer than 100 characters" in r.json()["detail"] and "'long'" in r.json()["detail"]
    # max_body_bytes=4096: declared by Content-Length ...
    big = json.dumps({"items": [item(1, "exact", "x" * 5000, "a")]}).encode()
    r = strict_client.post("/v1/verify", content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

    # ... and streamed without a Content-Length (chunked): still cut off at the limit
    def chunks():
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = strict_client.post("/v1/verify", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_malformed_requests_give_422(strict_client):
    def post(content):
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        return strict_client.post("/v1/verify", content=raw, headers={**AUTH, "content-type": "application/json"})

    r = post(b'{"items": [')  # malformed JSON
    assert r.status_code == 422 and "JSON" in r.json()["message"]
    r = post({"items": [{"id": 1, "task": "math", "response": 5, "reference": "1"}]})  # wrong types
    assert r.status_code == 422
    assert "items.0.id" in r.json()["message"] and "items.0.response" in r.json()["message"]
    assert post({"items": [{"id": "1", "task": "math", "response": "x"}]}).status_code == 422  # no reference
    assert post({"items": []}).status_code == 422  # empty batch
    assert post({"items": [item(1, "exact", "a", "a")], "timeout_s": -1}).status_code == 422
    r = post({"items": [item(1, "exact", "a", "a")], "timeout_s": 31})  # max_timeout_s=30
    assert r.status_code == 422 and "AEPO_REWARD_MAX_TIMEOUT_S" in r.json()["detail"]
    assert post({"items": [item(1, "exact", "a", "a")], "extra": 1}).status_code == 422  # unknown field


def test_injection_strings_are_never_executed(client, tmp_path):
    marker = tmp_path / "x"
    # The temp path's digits depend on how often pytest ran on this machine (".../pytest-0/..." on
    # a fresh one); the same payload with a fixed "pytest-0" path makes every machine check the
    # case where the text's only free-standing number equals the reference.
    payloads = [f"__import__('os').system('touch {marker}')", "__import__('os').system('touch /tmp/pytest-0/x')"]
    forms = [form for payload in payloads for form in (
        payload, f"\\boxed{{{payload}}}", f"Answer: {payload}", f"<answer>{payload}</answer>",
        f"\\boxed{{\\text{{{payload}}}}}", f"eval(\"{payload}\")")]
    items = [item(f"{t}{i}", t, form, ref) for i, form in enumerate(forms)
             for t, ref in (("math", "0"), ("countdown", TOY), ("numeric", 0), ("exact", "0"))]
    results = verify(client, items, timeout_s=10)
    assert all(r["reward"] == 0 for r in results), results
    assert not marker.exists()
