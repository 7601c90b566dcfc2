"""The collective weight-sync transport (`learner.sync_transport: collective`, gloo on CPU).

Without Ray: a one-rank learner broadcasts into an hf engine (two threads, one standalone gloo group
on a file store); the engine ends up with the learner's weights bit for bit (float32) or rounded
(bfloat16), and a receiver that fails leaves the sender with an error instead of a hang. With Ray:
a LearnerGroup (2 FSDP ranks) and a RolloutPool (2 hf actors); after a collective sync the engines
decode like the learner's model, the group's sockets stay on loopback, and an actor that Ray
restarts is re-synced through a new group (the object-store twin: test_weight_sync.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from reference_decoding import hf_model_with, reference_greedy

from services.config import GRPOConfig, LearnerConfig, RecoveryConfig, RolloutConfig
from services.learner.collective import (CollectiveWeights, SyncMember, SyncTicket, is_collective, open_rendezvous)
from services.model.tiny import encode_prompt
from services.rollout.engines.hf import HFEngine

PROMPTS = ["9,8,3>69|", "1,2,3>6|", "4,5,6>120|", "7,7,7>1|"]


def _sync_in_threads(worker, engine, rdv=None, timeout_s: float = 60.0):
    """Learner rank 0 and one engine in one group of two (a new one unless `rdv`), each on its own
    thread; (manifest, bytes received or the receiver's exception)."""
    rdv = rdv or open_rendezvous("gloo", 2, timeout_s, "127.0.0.1")[0]
    got: dict = {}

    def receive():
        try:
            got["bytes"] = engine.receive_weight_buckets(SyncTicket(rdv, 1, "127.0.0.1"))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            got["bytes"] = exc

    t = threading.Thread(target=receive)
    t.start()
    manifest = worker.export_weights_collective(rdv)
    t.join(timeout_s)
    assert not t.is_alive()
    return manifest, got["bytes"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_broadcast_sync_gives_the_engine_the_learners_weights(worker, tiny_model_path, dtype):
    """Bucket by bucket through the group: bitwise in float32, rounded to bf16 in bfloat16; the
    tied lm_head is not sent and follows the embedding; the learner's own group is untouched."""
    import torch.distributed as dist

    want = {k: v.clone() for k, v in worker.full_state_dict().items()}
    worker.cfg = worker.cfg.model_copy(update={"sync_dtype": dtype})
    engine = HFEngine(tiny_model_path, seed=0)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.zero_()
    default_group = dist.group.WORLD
    manifest, received = _sync_in_threads(worker, engine)
    assert "error" not in manifest and manifest["buckets"] > 1 and manifest["transport"] == "collective"
    assert received == manifest["bytes"]
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    got = engine.model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v if dtype == "float32" else v.to(torch.bfloat16).float()), k
    assert dist.group.WORLD is default_group and dist.get_world_size() == 1
    pg = worker._sync_member.pg
    manifest2, _ = _sync_in_threads(worker, engine)  # a new generation: rank 0 leaves the old group, joins it
    assert "error" not in manifest2 and worker._sync_member.pg is not pg


def test_an_engine_that_refuses_a_bucket_drains_the_round_and_the_group_stays_usable(worker, tiny_model_path):
    """The engine raises on the first bucket: the receiver still takes the rest of the round, so
    learner rank 0 finishes its broadcast cleanly and the same group serves the next sync."""
    worker.cfg = worker.cfg.model_copy(update={"sync_dtype": "float32"})
    rdv, _ = open_rendezvous("gloo", 2, 60.0, "127.0.0.1")
    engine = HFEngine(tiny_model_path, seed=0)
    load = engine.load_weight_buckets

    def refuse(buckets):
        next(iter(buckets))
        raise ValueError("no fit")

    engine.load_weight_buckets = refuse
    manifest, received = _sync_in_threads(worker, engine, rdv)
    assert isinstance(received, ValueError) and "error" not in manifest
    pg = engine._sync_member.pg
    engine.load_weight_buckets = load
    manifest, received = _sync_in_threads(worker, engine, rdv)
    assert "error" not in manifest and received == manifest["bytes"] and engine._sync_member.pg is pg


def test_a_receiver_that_vanishes_mid_sync_fails_the_sender_at_once(worker):
    """A receiver that leaves after one bucket (as a killed actor's sockets close): rank 0's next
    broadcast fails within seconds, not at the 60 s group timeout, and the manifest says so; rank 0
    leaves the broken group."""
    from services.learner.collective import receive_buckets

    worker.cfg = worker.cfg.model_copy(update={"sync_dtype": "float32"})
    rdv, _ = open_rendezvous("gloo", 2, 60.0, "127.0.0.1")

    def vanish():
        member = SyncMember()
        stream = receive_buckets(member.group(rdv, 1, "127.0.0.1", torch.device("cpu")), torch.device("cpu"))
        next(stream)
        stream.close()
        member.drop()

    t = threading.Thread(target=vanish)
    t.start()
    t0 = time.monotonic()
    manifest = worker.export_weights_collective(rdv)
    t.join(60)
    assert "error" in manifest and time.monotonic() - t0 < 30
    assert worker._sync_member.pg is None


def test_a_kept_collective_handle_refuses_a_resync_once_the_learners_moved_on():
    class Source:
        workers = ["w"]
        updates = 3

    handle = CollectiveWeights(Source(), updates=2, manifest={"backend": "gloo"})
    assert is_collective(handle)
    with pytest.raises(RuntimeError, match="updated or replaced"):
        handle.start_send(None)


def test_nccl_with_colocated_engines_is_refused_before_any_actor_starts():
    from services.learner.group import check_transport

    collective = LearnerConfig(sync_transport="collective")
    with pytest.raises(ValueError, match="NCCL refuses two ranks on one GPU"):
        check_transport(collective, "cuda", colocated=True)
    check_transport(collective, "cuda", colocated=False)  # split: each engine on its own GPU
    check_transport(collective, "cpu", colocated=True)  # gloo
    check_transport(LearnerConfig(), "cuda", colocated=True)  # the object store


def test_a_member_joins_a_new_generation_and_leaves_the_old():
    rdv, _ = open_rendezvous("gloo", 1, 10.0, "127.0.0.1")
    member = SyncMember()
    pg = member.group(rdv, 0, "127.0.0.1", torch.device("cpu"))
    assert member.group(rdv, 0, "127.0.0.1", torch.device("cpu")) is pg
    rdv2, _ = open_rendezvous("gloo", 1, 10.0, "127.0.0.1")
    assert rdv2.name != rdv.name and rdv2.path != rdv.path
    assert member.group(rdv2, 0, "127.0.0.1", torch.device("cpu")) is not pg


# ----------------------------------------------------------------------------- through Ray


@pytest.fixture(scope="module")
def ray_parts(ray_local, tiny_model_path):
    from services.learner.group import LearnerGroup
    from services.rollout.pool import RolloutPool

    recovery = RecoveryConfig(sync_timeout_s=120)
    pool = RolloutPool(tiny_model_path, RolloutConfig(engine="hf", num_actors=2, cpus_per_actor=0.25, max_tokens=10),
                       seed=0, recovery=recovery)
    cfg = LearnerConfig(num_workers=2, cpus_per_worker=0.25, lr=3e-3, micro_batch_size=8, sync_transport="collective",
                        sync_bucket_mb=1)
    group = LearnerGroup(tiny_model_path, cfg, GRPOConfig(), seed=0, recovery=recovery)
    yield pool, group
    group.shutdown()
    pool.shutdown()


class _LoopbackWatch:
    """Samples the machine's sockets while a block runs; the Ray processes' must all be on loopback."""

    def __enter__(self):
        from services.backends.network import all_sockets, violations

        self.bad, self.samples, self._stop = [], 0, threading.Event()

        def watch():
            while not self._stop.is_set():
                self.bad.extend(violations(all_sockets()))
                self.samples += 1
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _greedy_like(pool, prompts, weights, tiny_model_path, eos_id) -> None:
    model = hf_model_with(tiny_model_path, weights)
    want = [reference_greedy(model, ids, 10, eos_id) for _, ids in prompts]
    assert [s.response_ids for s in pool.generate(prompts, 1, 0.0)] == want


def test_after_a_collective_sync_the_engines_decode_like_the_learners_model(ray_parts, tiny_model_path, tokenizer):
    """Update the learners, sync through the group (the handle carries no weights: the driver starts
    the broadcast and the receives together), then every actor's greedy output equals the learners'
    model's, the samples carry the new version, and every socket of the sync stayed on loopback."""
    from services.learner.batch import TrainBatch

    pool, group = ray_parts
    prompts = [(i, encode_prompt(tokenizer, t)) for i, t in enumerate(PROMPTS)]
    rows = pool.generate(prompts, 2, 1.0, seed=1)
    batch = TrainBatch.from_sequences([s.prompt_ids for s in rows], [s.response_ids for s in rows],
                                      [1.0 if i % 2 == 0 else -1.0 for i in range(len(rows))], [False] * len(rows),
                                      tokenizer.pad_token_id)
    for _ in range(3):
        group.update(batch)
    handle = group.weight_buckets()
    assert is_collective(handle) and handle.manifest == {"transport": "collective", "backend": "gloo"}
    with _LoopbackWatch() as watch:
        sync = pool.load_weights(1, handle)
    assert watch.samples > 0 and watch.bad == []
    assert sync["policy_version"] == 1 and handle.manifest["buckets"] > 1
    assert sync["sync_bytes"] == 2 * handle.nbytes > 0
    assert pool._weights is handle
    weights = group.get_full_state_dict()
    _greedy_like(pool, prompts, weights, tiny_model_path, tokenizer.eos_token_id)
    assert {s.policy_version for s in pool.generate(prompts, 1, 0.0)} == {1}
    again = pool.load_weights(2, group.weight_buckets())  # the same group, kept: no new rendezvous
    assert again["sync_bytes"] == sync["sync_bytes"]


def test_a_killed_actor_is_revived_and_resynced_through_a_new_group(ray_parts, tiny_model_path, tokenizer):
    """SIGKILL one actor after a collective sync: Ray restarts it on the checkpoint's weights; the
    pool re-syncs it (learner rank 0 broadcasts again, in a group of two), its share is drawn again
    from the synced weights, and the next full sync makes a group of all three again."""
    import os
    import signal

    pool, group = ray_parts
    prompts = [(i, encode_prompt(tokenizer, t)) for i, t in enumerate(PROMPTS)]
    weights = group.get_full_state_dict()
    pool.load_weights(pool.version + 1, group.weight_buckets())
    first = pool._rounds._group[1]
    restarts = pool.restarts
    os.kill(pool.pids()[0], signal.SIGKILL)
    _greedy_like(pool, prompts, weights, tiny_model_path, tokenizer.eos_token_id)
    assert pool.restarts == restarts + 1
    revived = pool._rounds._group[1]
    assert revived.world_size == 2 and revived.name != first.name
    pool.load_weights(pool.version + 1, group.weight_buckets())
    assert pool._rounds._group[1].world_size == 3
    _greedy_like(pool, prompts, weights, tiny_model_path, tokenizer.eos_token_id)
