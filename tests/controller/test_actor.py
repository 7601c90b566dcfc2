"""The entropy controller: state, persistence (real Redis) and the Ray actor (real Ray)."""

import pytest

from controller.actor import ControllerCore, MemoryStore, RedisStore, start_controller
from controller.rule import ConstantTarget, LinearTarget
from services.config import AEPOConfig, ControllerConfig, GRPOConfig

AEPO = AEPOConfig(target=ConstantTarget(value=0.35))


class RecordingMetrics:
    def __init__(self):
        self.events = []

    def observed(self, source, entropy, target):
        self.events.append(("observed", source, entropy, target))

    def planned(self, plan):
        self.events.append(("planned", plan.direction, plan.temperature, plan.m))

    def selected(self, n):
        self.events.append(("selected", n))


def test_first_plan_goes_up_then_follows_the_published_entropy():
    metrics = RecordingMetrics()
    core = ControllerCore(AEPO, ControllerConfig(), "run", metrics=metrics)
    assert core.plan(0)["temperature"] == 1.2  # nothing observed yet
    core.observe(0, 0.50, "exact")
    p = core.plan(1)
    assert (p["temperature"], p["m"], p["direction"], p["entropy"]) == (0.8, 30, "down", 0.50)
    core.observe(1, 0.30, "exact")
    assert core.plan(2)["direction"] == "up"
    assert ("observed", "exact", 0.30, 0.35) in metrics.events
    assert metrics.events.count(("planned", "down", 0.8, 30)) == 1


def test_the_configured_source_decides_and_the_other_is_only_recorded():
    core = ControllerCore(AEPO, ControllerConfig(entropy_source="sampled"), "run")
    core.observe(0, 0.9, "exact")
    core.observe(0, 0.2, "sampled")
    assert core.plan(1)["direction"] == "up"  # sampled 0.2 <= 0.35, exact 0.9 ignored
    assert set(core.state()["last"]) == {"exact", "sampled"}


def test_bad_observations_are_refused_and_change_nothing():
    core = ControllerCore(AEPO, ControllerConfig(), "run")
    core.observe(3, 0.4)
    for args, msg in [((4, float("nan")), "finite"), ((4, -1.0), ">= 0"), ((2, 0.3), "after step 3"),
                      ((4, 0.3, "guess"), "unknown entropy source")]:
        with pytest.raises(ValueError, match=msg):
            core.observe(*args)
    assert core.state()["last"]["exact"]["entropy"] == 0.4


def test_a_moving_target_is_applied_at_the_planned_step():
    alg = AEPOConfig(target=LinearTarget(start=0.6, end=0.2, steps=10))
    core = ControllerCore(alg, ControllerConfig(), "run")
    core.observe(0, 0.5)
    assert core.plan(1)["direction"] == "up" and core.plan(10)["direction"] == "down"


def test_grpo_has_no_plan_but_its_entropy_is_still_recorded():
    core = ControllerCore(GRPOConfig(), ControllerConfig(), "run")
    core.observe(0, 0.5)
    with pytest.raises(ValueError, match="no entropy target"):
        core.plan(1)


def test_the_decision_log_keeps_a_bounded_tail_with_selections():
    core = ControllerCore(AEPO, ControllerConfig(), "run", log_tail=3)
    for s in range(5):
        core.plan(s)
        core.publish(s, {"exact": 0.3}, selected=10 + s)
    log = core.state()["log"]
    assert [e["step"] for e in log] == [2, 3, 4] and log[-1]["selected"] == 14


def test_a_restarted_controller_on_the_same_store_makes_the_same_next_decision():
    store = MemoryStore()
    a = ControllerCore(AEPO, ControllerConfig(), "run", store=store)
    a.observe(7, 0.42)
    b = ControllerCore(AEPO, ControllerConfig(), "run", store=store)
    assert b.plan(8) == a.plan(8)
    with pytest.raises(ValueError, match="belongs to run"):
        ControllerCore(AEPO, ControllerConfig(), "other-run", store=store)


def test_redis_state_survives_a_new_controller_process(redis_url):
    cfg = ControllerConfig(redis_url=redis_url)
    first = ControllerCore(AEPO, cfg, "redis-run", store=RedisStore(redis_url, "redis-run"))
    first.observe(11, 0.61)
    first.plan(12)
    second = ControllerCore(AEPO, cfg, "redis-run", store=RedisStore(redis_url, "redis-run"))
    assert second.state()["last"]["exact"]["entropy"] == 0.61
    assert second.plan(12)["direction"] == "down" and second.state()["store"] == "redis"


def test_an_unreachable_redis_fails_at_start_with_its_url():
    with pytest.raises(RuntimeError, match=r"Redis at redis://127.0.0.1:1/0 unreachable for 1 s"):
        RedisStore("redis://127.0.0.1:1/0", "x", timeout_s=0.5, retry_s=1.0)


def test_a_redis_outage_is_retried_then_reported_with_the_url(tmp_path):
    import threading
    import time

    from testlib import start_redis
    from services.backends.network import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    store = RedisStore(url, "outage", timeout_s=0.5, retry_s=20.0)
    store.save({"run_id": "outage", "n": 1})
    server.kill()
    server.wait()
    restarted = []
    timer = threading.Timer(1.5, lambda: restarted.append(start_redis(port, tmp_path)))
    timer.start()
    t0 = time.monotonic()
    store.save({"run_id": "outage", "n": 2})  # waits out the outage (the new server is empty: --save "")
    assert time.monotonic() - t0 >= 1.0 and store.load() == {"run_id": "outage", "n": 2}
    restarted[0].kill()
    restarted[0].wait()
    store.retry_s = 1.0
    with pytest.raises(RuntimeError, match=rf"Redis at {url} unreachable for 1 s: could not save the controller state aepo:controller:outage"):
        store.save({"run_id": "outage", "n": 3})


def test_a_restarted_controller_without_state_refuses_to_plan_until_restored():
    from services.contracts import ControllerStateLost

    before = ControllerCore(AEPO, ControllerConfig(), "run")
    before.observe(3, 0.2)
    before.plan(4)
    blank = ControllerCore(AEPO, ControllerConfig(), "run", restarted=True)
    for call in (lambda: blank.plan(4), lambda: blank.observe(4, 0.1), lambda: blank.state(),
                 lambda: blank.publish(4, {"exact": 0.1})):
        with pytest.raises(ControllerStateLost, match="restarted with an empty MemoryStore"):
            call()
    blank.restore(before.state())
    assert blank.plan(4) == before.plan(4)
    # a restart that finds its state in the store (Redis) serves at once
    store = MemoryStore()
    store.save(before.state())
    assert ControllerCore(AEPO, ControllerConfig(), "run", store=store, restarted=True).plan(4) == before.plan(4)


def test_a_killed_in_memory_controller_actor_says_so_and_serves_again_once_restored(ray_local):
    from controller.client import RayControllerClient
    from services.contracts import ControllerStateLost

    ray = ray_local
    actor = start_controller(AEPO, ControllerConfig(name="test-controller-memory"), "mem-run")
    client = RayControllerClient(actor, timeout_s=60)
    client.observe(0, 0.5)
    client.plan(1)
    saved = client.state()
    assert saved["store"] == "memory"  # the default config: no controller.redis_url, no Redis anywhere
    pid = ray.get(actor.pid.remote())
    import os
    import signal

    os.kill(pid, signal.SIGKILL)  # a crash: Ray restarts the actor, blank
    with pytest.raises(ControllerStateLost):
        client.plan(1)
    client.restore(saved)
    assert client.plan(1)["direction"] == "down" and client.state()["last"] == saved["last"]
    ray.kill(actor, no_restart=True)


def test_the_named_ray_actor_is_found_by_name_and_resumes_after_a_crash(ray_local, redis_url):
    ray = ray_local
    cfg = ControllerConfig(redis_url=redis_url, name="test-controller")
    actor = start_controller(AEPO, cfg, "ray-run")
    ray.get(actor.observe.remote(0, 0.5))
    same = ray.get_actor("test-controller")
    assert ray.get(same.plan.remote(1))["direction"] == "down"
    ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts); its state comes back from Redis
    for _ in range(100):
        try:
            state = ray.get(same.state.remote(), timeout=30)
            break
        except ray.exceptions.RayActorError:
            import time

            time.sleep(0.2)
    assert state["last"]["exact"]["entropy"] == 0.5
    assert ray.get(same.plan.remote(1))["direction"] == "down"
    ray.kill(same, no_restart=True)


def test_no_redis_is_needed_by_default_or_by_any_cpu_config():
    """controller.redis_url defaults to None (state in memory), and the CPU configs keep it so: a bare
    `ray job submit` cluster or a laptop runs them without a Redis."""
    from pathlib import Path

    from services.cli.config_file import load_config

    assert ControllerConfig().redis_url is None
    configs = sorted((Path(__file__).resolve().parents[2] / "deploy/configs").glob("cpu_*.yaml"))
    assert configs and all(load_config(c).controller.redis_url is None for c in configs)


def test_a_checkpointed_state_restores_into_a_fresh_in_memory_controller():
    a = ControllerCore(AEPO, ControllerConfig(), "run")
    a.observe(4, 0.2)
    a.plan(5)
    b = ControllerCore(AEPO, ControllerConfig(), "run")
    b.restore(a.state())
    assert b.plan(5) == a.plan(5) and b.state()["last"] == a.state()["last"]
    with pytest.raises(ValueError, match="belongs to run"):
        ControllerCore(AEPO, ControllerConfig(), "other").restore(a.state())


def test_the_pi_integral_is_counted_once_per_step_and_survives_a_restart():
    from controller.rule import PIRule

    algo = AEPOConfig(target=ConstantTarget(value=0.35), rule=PIRule(kp=10.0, ki=1.0, u_max=4.0))
    store = MemoryStore()
    core = ControllerCore(algo, ControllerConfig(), "run", store=store)
    core.observe(0, 0.30, "exact")
    first = core.plan(1)
    assert first["integral"] == pytest.approx(0.05) and first["weight"] == pytest.approx(0.55)
    assert core.plan(1)["integral"] == pytest.approx(0.05)  # a retried step: not integrated twice
    core.observe(1, 0.25, "exact")
    again = ControllerCore(algo, ControllerConfig(), "run", store=store)  # a restarted controller
    second = again.plan(2)
    assert second["integral"] == pytest.approx(0.15)  # 0.05 + 0.10
    assert second["weight"] == pytest.approx(10 * 0.10 + 0.15)
    fresh = ControllerCore(algo, ControllerConfig(), "run")
    fresh.restore(again.state())  # the checkpoint path
    assert fresh.plan(3)["integral"] == pytest.approx(0.25)
