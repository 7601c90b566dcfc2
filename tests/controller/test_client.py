"""The one controller interface: local and Ray clients, the tests' fake, and what gets published."""

from __future__ import annotations

import inspect

import pytest

from controller.actor import ControllerCore, EntropyControllerActor, MemoryStore
from controller.client import ControllerClient, LocalControllerClient, RayControllerClient, publish_entropy
from services.config import AEPOConfig, ControllerConfig, GRPOConfig


def core(algorithm=None):
    return ControllerCore(algorithm or AEPOConfig(), ControllerConfig(), "run", store=MemoryStore())


def test_every_client_implements_the_same_interface():
    methods = {n for n, _ in inspect.getmembers(ControllerClient, inspect.isfunction) if not n.startswith("_")}
    assert methods == {"observe", "publish", "plan", "target", "state", "restore"}
    for cls in (LocalControllerClient, RayControllerClient, EntropyControllerActor):
        assert methods <= {n for n, _ in inspect.getmembers(cls, inspect.isfunction)}, cls
    assert isinstance(LocalControllerClient(core()), ControllerClient)


def test_publish_sends_exact_and_mixed_batch_sampled_entropy():
    c = core()
    stats = {"entropy": 0.41, "entropy_sampled": 0.38, "entropy_sampled_batch": 0.52, "reg_selected": 9.0}
    c.plan(3)
    publish_entropy(LocalControllerClient(c), 3, stats)
    state = c.state()
    last = state["last"]
    assert (last["exact"]["entropy"], last["sampled"]["entropy"]) == (0.41, 0.52)
    assert last["exact"]["step"] == last["sampled"]["step"] == 3
    # the rows trained on travel with the entropy, into the decision log beside the step's plan
    assert state["selected"] == {"step": 3, "n": 9} and state["log"][-1]["selected"] == 9


def test_target_is_none_without_one_and_the_schedule_with_one():
    assert LocalControllerClient(core(GRPOConfig())).target(5) is None
    assert LocalControllerClient(core(AEPOConfig(target={"type": "constant", "value": 0.3}))).target(5) == pytest.approx(0.3)


def test_the_ray_client_reaches_the_named_actor(ray_local):
    from controller.actor import start_controller

    cfg = ControllerConfig(name="client-test-controller")
    handle = start_controller(AEPOConfig(target={"type": "constant", "value": 0.4}), cfg, "client-test")
    try:
        client = RayControllerClient(handle, timeout_s=60)
        publish_entropy(client, 0, {"entropy": 0.5, "entropy_sampled_batch": 0.45})
        plan = client.plan(1)
        assert plan["target"] == pytest.approx(0.4) and plan["direction"] == "down"  # 0.5 > H* = 0.4
        client.publish(1, {"exact": 0.45}, selected=12)
        assert client.state()["selected"] == {"step": 1, "n": 12}
        assert client.target(1) == pytest.approx(0.4)
    finally:
        import ray

        ray.kill(handle, no_restart=True)
