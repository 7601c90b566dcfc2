"""Helpers shared by the reward-server tests."""

from __future__ import annotations

import time

import httpx
from fastapi.testclient import TestClient

from reward_server.main import create_app
from reward_server.settings import RewardSettings


def wait_ready(client, timeout_s: float = 60.0) -> None:
    """Poll GET /readyz (TestClient or httpx.Client) until 200."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("reward server not ready")


def verify(client, items, timeout_s=None, **kw):
    """POST /v1/verify and return the results list (asserting 200)."""
    body = {"items": items}
    if timeout_s is not None:
        body["timeout_s"] = timeout_s
    r = client.post("/v1/verify", json=body, **kw)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def item(i, task, response, reference):
    """An item dict."""
    return {"id": str(i), "task": task, "response": response, "reference": reference}


def make_client(**settings) -> TestClient:
    """An entered TestClient (lifespan started) of an app with these settings, once ready."""
    client = TestClient(create_app(RewardSettings(**settings)))
    client.__enter__()
    wait_ready(client)
    return client
