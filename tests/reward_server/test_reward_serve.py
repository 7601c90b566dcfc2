"""The Ray Serve deployment answers exactly like the standalone app (real Ray on 127.0.0.1)."""

from __future__ import annotations

import httpx
import pytest

from reward_server.settings import RewardSettings
from reward_testlib import item, verify

ITEMS = [
    item("m1", "math", "\\boxed{\\frac{1}{2}}", "0.5"),
    item("m2", "math", "Answer: 41", "42"),
    item("m3", "math", "nothing boxed", "1"),
    item("c1", "countdown", "9*8=72,72-3=69", {"numbers": [9, 8, 3], "target": 69, "use_all": True}),
    item("c2", "countdown", "9*8=72,72-9=63", {"numbers": [9, 8, 3], "target": 63}),
    item("n1", "numeric", "3.1416", {"value": 3.14159, "rel_tol": 1e-4}),
    item("x1", "nope", "a", "a"),
]


@pytest.fixture(scope="module")
def ray_serve_url(ray_local):
    """The app on Ray Serve in the session's real local Ray (tests/conftest.py)."""
    from ray import serve

    from reward_server.serve_deploy import deploy

    try:
        yield deploy(replicas=1, route_prefix="/", settings=RewardSettings(workers=1, token="t0k"))
    finally:
        serve.shutdown()


def test_serve_deployment_matches_standalone(ray_serve_url, client):
    assert ray_serve_url.startswith("http://127.0.0.1:")
    served = httpx.post(ray_serve_url + "/v1/verify", json={"items": ITEMS, "timeout_s": 20},
                        headers={"Authorization": "Bearer t0k"}, timeout=60)
    assert served.status_code == 200, served.text
    standalone = verify(client, ITEMS, timeout_s=20)

    def strip(results):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in results]

    assert strip(served.json()["results"]) == strip(standalone)
    assert [r["reward"] for r in standalone] == [1, 0, 0, 1, 0, 1, 0]
    assert httpx.post(ray_serve_url + "/v1/verify", json={"items": ITEMS}).status_code == 401
    assert httpx.get(ray_serve_url + "/metrics").text.count("aepo_reward_requests_total") >= 1
