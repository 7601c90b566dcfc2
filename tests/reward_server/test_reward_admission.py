"""Admission control over real HTTP (uvicorn on 127.0.0.1): checks before the body, 429/503/408, field limits.

Requests are held in flight with the `test-gate` plugin verifier (reward_plugin_gate.py): its items
wait until the test creates a file, so "the queue is full" is a state the test sets up, not a race.
"""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from reward_server.client import RewardClient, RewardRequestError
from reward_server.verifiers import unregister_verifier
from reward_testlib import ServerThread, gate_item, item, make_client, metric, start_client, wait_for

TOKEN = "admission-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = dict(max_items=4, max_inflight_items=4, max_inflight_requests=2, max_body_bytes=64 * 1024,
              max_reference_bytes=256, max_metadata_keys=3, max_metadata_bytes=128, body_timeout_s=2.0)


@pytest.fixture(scope="module")
def url():
    """A token-protected server with small limits and the gate plugin, one verifier worker."""
    server = ServerThread(token=TOKEN, workers=1, item_time_limit_s=60, plugins=["reward_plugin_gate"], **LIMITS)
    with server as base_url:
        yield base_url
    unregister_verifier("test-gate")


def raw_exchange(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict, bytes]:
    """Send raw bytes on a fresh connection; read the answer until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_part, _, payload = data.partition(b"\r\n\r\n")
    lines = head_part.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def post_head(content_length: int, auth: str | None = None) -> bytes:
    lines = ["POST /v1/verify HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {content_length}"] + ([f"Authorization: {auth}"] if auth else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def inflight(url: str) -> dict:
    return httpx.get(url + "/readyz").json()["inflight"]


def test_token_is_checked_before_the_body_is_read(url):
    # Headers only, body never sent: a server that read the body first would answer 408 after
    # body_timeout_s; this one answers from the headers.
    status, headers, payload = raw_exchange(url, post_head(50_000))
    assert status == 401 and b"missing bearer token" in payload and headers["www-authenticate"] == "Bearer"
    status, _, payload = raw_exchange(url, post_head(50_000, "Bearer nope"))
    assert status == 401 and b"wrong bearer token" in payload and b'"reason": "unauthorized"' in payload


def test_a_declared_oversized_body_gets_413_before_it_is_sent(url):
    status, headers, payload = raw_exchange(url, post_head(10_000_000, f"Bearer {TOKEN}"))
    assert status == 413 and b"65536 bytes" in payload and b"AEPO_REWARD_MAX_BODY_BYTES" in payload
    assert headers["connection"] == "close"


def test_a_chunked_oversized_body_is_cut_off_while_it_streams(url):
    def chunks():
        yield b'{"items": [{"id": "1", "task": "exact", "reference": "a", "response": "'
        for _ in range(100):
            yield b"x" * 1024

    r = httpx.post(url + "/v1/verify", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["reason"] == "too_large"


def test_a_body_that_does_not_arrive_in_time_gets_408(url):
    status, _, payload = raw_exchange(url, post_head(100, f"Bearer {TOKEN}"), b'{"items": [')
    assert status == 408 and b"AEPO_REWARD_BODY_TIMEOUT_S" in payload and b'"reason": "body_timeout"' in payload


@pytest.mark.parametrize(
    "bad_item, words",
    [
        (item("r", "exact", "a", "x" * 300), "larger than 256 bytes as JSON (AEPO_REWARD_MAX_REFERENCE_BYTES)"),
        (item("k", "exact", "a", "a") | {"metadata": {"a": 1, "b": 2, "c": 3, "d": 4}},
         "more than 3 keys (AEPO_REWARD_MAX_METADATA_KEYS)"),
        (item("m", "exact", "a", "a") | {"metadata": {"note": "y" * 200}},
         "larger than 128 bytes as JSON (AEPO_REWARD_MAX_METADATA_BYTES)"),
    ],
)
def test_field_limits_give_413_naming_the_limit_and_the_item(url, bad_item, words):
    items = [item("ok", "exact", "a", "a"), bad_item]
    r = httpx.post(url + "/v1/verify", json={"items": items}, headers=AUTH)
    assert r.status_code == 413, r.text
    assert words in r.json()["detail"] and repr(bad_item["id"]) in r.json()["detail"]


def test_a_full_item_queue_gives_429_and_the_client_gets_in_after_it_drains(url, tmp_path):
    gate = tmp_path / "open"
    held = {}
    first = threading.Thread(target=lambda: held.update(r=httpx.post(
        url + "/v1/verify", json={"items": [gate_item(i, gate) for i in range(4)], "timeout_s": 60},
        headers=AUTH, timeout=90)))
    first.start()
    wait_for(lambda: inflight(url)["items"] == 4, "4 gate items in flight")
    r = httpx.post(url + "/v1/verify", json={"items": [item(1, "exact", "a", "a")]}, headers=AUTH)
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert r.json()["reason"] == "busy" and "AEPO_REWARD_MAX_INFLIGHT_ITEMS" in r.json()["detail"]
    assert r.json()["retry_after_s"] == 1

    client = RewardClient(url, token=TOKEN, timeout_s=120)
    got = {}
    second = threading.Thread(target=lambda: got.update(r=client.verify_sync([item(1, "exact", "a", "a")])))
    second.start()
    wait_for(lambda: client.retries["HTTP 429"] >= 1, "the client to be told 429")
    gate.touch()
    first.join(timeout=90)
    second.join(timeout=120)
    assert [x["outcome"] for x in held["r"].json()["results"]] == ["correct"] * 4
    assert [x.outcome for x in got["r"]] == ["correct"]
    with httpx.Client(base_url=url) as http:
        assert metric(http, "aepo_reward_rejected_total", 'reason="busy"') >= 2  # ours and the client's


def test_too_many_requests_in_flight_get_429_before_their_body(url, tmp_path):
    gate = tmp_path / "open"
    threads = [threading.Thread(target=httpx.post, args=(url + "/v1/verify",), kwargs=dict(
        json={"items": [gate_item(i, gate)], "timeout_s": 60}, headers=AUTH, timeout=90)) for i in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: inflight(url)["requests"] == 2, "2 requests in flight")
    status, headers, payload = raw_exchange(url, post_head(50_000, f"Bearer {TOKEN}"))  # body never sent
    assert status == 429 and headers["retry-after"] == "1" and b"AEPO_REWARD_MAX_INFLIGHT_REQUESTS" in payload
    gate.touch()
    for t in threads:
        t.join(timeout=90)
    assert inflight(url) == {"requests": 0, "items": 0, "body_bytes": 0}


def test_the_client_does_not_retry_a_4xx_and_raises_the_servers_reason(url):
    wrong = RewardClient(url, token="not-the-token", timeout_s=60)
    with pytest.raises(RewardRequestError, match="wrong bearer token") as err:
        wrong.verify_sync([item(1, "exact", "a", "a")])
    assert err.value.status_code == 401 and not wrong.retries
    big = RewardClient(url, token=TOKEN, timeout_s=60, max_batch_items=10)
    with pytest.raises(RewardRequestError, match="too many items: 5") as err:
        big.verify_sync([item(i, "exact", "a", "a") for i in range(5)])
    assert err.value.status_code == 413 and not big.retries


def test_a_draining_app_answers_503_with_retry_after():
    c = make_client(workers=1)
    try:
        c.app.state.admission.begin_drain()
        r = c.post("/v1/verify", json={"items": [item(1, "exact", "a", "a")]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["reason"] == "draining"
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert c.get("/healthz").status_code == 200  # alive: only new work is refused
        assert metric(c, "aepo_reward_draining") == 1
    finally:
        c.__exit__(None, None, None)


def test_a_request_meets_503_when_the_workers_do_not_come_up():
    # The workers fail at start-up, every time: the request waits start_wait_s for them, then 503
    # (not a `timeout` verdict scoring 0, which a trainer would take for a wrong answer).
    c = start_client(workers=1, plugins=["reward_plugin_no_workers"], start_wait_s=0.5)
    try:
        r = c.post("/v1/verify", json={"items": [item(1, "math", "\\boxed{\\frac{1}{2}}", "0.5")]})
        assert r.status_code == 503 and r.json()["reason"] == "starting", r.text
        assert r.headers["retry-after"] == "1" and "AEPO_REWARD_START_WAIT_S" in r.json()["detail"]
        assert c.get("/readyz").json()["status"] == "starting"
    finally:
        c.__exit__(None, None, None)
