"""Bucketed weight sync without Ray: the bucket format, a one-rank learner's export into the hf
engine (bitwise in float32, to bf16 rounding in bfloat16, tied embeddings), the sync dtype, and
the driver's side of a Ray export with a fake that records what the driver fetches."""

from __future__ import annotations

import pytest
import torch

from services.backends.weight_buckets import (ALIGN, BucketedWeights, as_bucketed, iter_bucket_tensors, pack_bucket,
                                              unpack_bucket)
from services.learner.sync import bucket_refs, local_buckets, resolve_sync_dtype
from services.rollout.engines.hf import HFEngine, copy_into


def test_a_bucket_gives_back_every_tensor_bit_for_bit_as_views_of_one_buffer():
    state = {"w": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.int64), "h": torch.randn(2, dtype=torch.float16),
             "bf": torch.randn(7).to(torch.bfloat16), "t": torch.randn(4, 2).t(), "s": torch.tensor(3.5),
             "e": torch.empty(0, 4), "m": torch.tensor([True, False, True])}
    bucket = pack_bucket(state.items())
    assert bucket["data"].dtype.name == "uint8" and all(off % ALIGN == 0 for *_, off, _ in bucket["index"])
    bucket["data"].setflags(write=False)  # Ray's object store hands out read-only views
    back = dict(unpack_bucket(bucket))
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert back["w"].untyped_storage().data_ptr() == back["b"].untyped_storage().data_ptr()  # no copies


def test_a_bfloat16_bucket_holds_the_floats_rounded_and_the_integers_unchanged():
    state = {"w": torch.randn(64, 3), "i": torch.arange(5)}
    back = dict(unpack_bucket(pack_bucket(state.items(), torch.bfloat16)))
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], state["w"].to(torch.bfloat16))
    assert back["i"].dtype == torch.int64 and torch.equal(back["i"], state["i"])


def test_auto_sync_dtype_is_what_the_engines_compute_in(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert resolve_sync_dtype("auto", "cpu", str(tmp_path)) == torch.float32  # CPU engines compute in float32
    assert resolve_sync_dtype("auto", "cuda", str(tmp_path)) == torch.bfloat16  # the checkpoint's dtype on GPU
    (tmp_path / "config.json").write_text('{"dtype": "float16"}')
    assert resolve_sync_dtype("auto", "cuda", str(tmp_path)) == torch.float16
    assert resolve_sync_dtype("bfloat16", "cpu", str(tmp_path)) == torch.bfloat16
    assert resolve_sync_dtype("float32", "cuda", str(tmp_path)) == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_loaded_bucket_by_bucket_holds_the_learners_weights(worker, tiny_model_path, dtype):
    """float32: the engine's weights equal the learner's bit for bit; bfloat16: equal to them
    rounded to bf16. The tiny model ties its embeddings: the alias is not sent (the manifest names
    it) and the engine's lm_head, which shares the embedding's storage, follows."""
    want = {k: v.clone() for k, v in worker.full_state_dict().items()}
    worker.cfg = worker.cfg.model_copy(update={"sync_dtype": dtype})
    sent = local_buckets(worker.export_weights())
    assert len(sent.buckets) > 1 and sent.manifest["buckets"] == len(sent.buckets)  # 1 MiB buckets of a 4 MB model
    assert sent.manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    names = [name for b in sent.buckets for name, *_ in b["index"]]
    assert "lm_head.weight" not in names and len(names) == len(set(names)) == len(want) - 1
    assert sent.nbytes == sum(v.numel() for k, v in want.items() if k != "lm_head.weight") * (4 if dtype == "float32" else 2)
    engine = HFEngine(tiny_model_path, seed=0)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.zero_()
    engine.load_weight_buckets(iter_bucket_tensors(sent))
    got = engine.model.state_dict()
    for k, v in want.items():
        expect = v if dtype == "float32" else v.to(torch.bfloat16).float()
        assert torch.equal(got[k], expect), k
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()


def test_the_engine_refuses_buckets_that_do_not_fit_its_model(tiny_model_path):
    engine = HFEngine(tiny_model_path, seed=0)
    state = {k: v.clone() for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    copy_into(engine.model, [list(state.items())[:3], list(state.items())[3:]])  # all of it, in two buckets: fine
    with pytest.raises(ValueError, match="missing"):
        copy_into(engine.model, [list(state.items())[1:]])
    bad = dict(state, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        copy_into(engine.model, [list(bad.items())])
    with pytest.raises(ValueError, match="unexpected"):
        engine.load_weights(dict(state, extra=torch.ones(1)))
    engine.load_weights(state)  # a plain dict is one bucket
    engine.load_weight_buckets(iter_bucket_tensors(as_bucketed(state)))


class _FakeStream:
    """Stands in for Ray's ObjectRefGenerator of one rank's `export_weights`."""

    def __init__(self, refs):
        self.refs = refs

    def completed(self):
        return ("completed", id(self))

    def __iter__(self):
        return iter(self.refs)


def test_the_driver_passes_bucket_refs_on_and_fetches_only_the_manifest(monkeypatch):
    """`bucket_refs` waits for every rank's export to finish and hands back rank 0's refs as they
    are: the only object it resolves is the manifest (the last ref), never a bucket."""
    import services.backends.remote as remote

    fetched, waited = [], []
    manifest = {"dtype": "bfloat16", "buckets": 3, "bytes": 123, "tensors": 9, "aliases": {}}
    monkeypatch.setattr(remote, "wait_all", lambda refs, *a: waited.extend(refs) or [None] * len(refs))
    monkeypatch.setattr(remote, "get_one", lambda ref, *a: fetched.append(ref) or manifest)
    rank0, rank1 = _FakeStream(["b0", "b1", "b2", "manifest"]), _FakeStream([])
    handle = bucket_refs([rank0, rank1], timeout_s=5.0)
    assert isinstance(handle, BucketedWeights) and handle.buckets == ["b0", "b1", "b2"]
    assert fetched == ["manifest"] and waited == [rank0.completed(), rank1.completed()]
    assert handle.nbytes == 123 and handle.manifest["transport"] == "object_store"
    monkeypatch.setattr(remote, "get_one", lambda ref, *a: dict(manifest, buckets=2))
    with pytest.raises(RuntimeError, match="manifest says 2"):
        bucket_refs([_FakeStream(["b0", "b1", "b2", "manifest"])], timeout_s=5.0)
