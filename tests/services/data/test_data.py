"""Datasets and the resumable prompt stream (services/data/datasets.py)."""

import json

import pytest

from services.config import CountdownDataConfig, FileDataConfig
from services.data.datasets import PromptItem, PromptStream, load_items


def _items(n):
    return [PromptItem(str(i), f"p{i}", i, "exact") for i in range(n)]


def test_the_stream_is_seeded_and_covers_each_epoch_once():
    a, b = PromptStream(_items(10), 4, seed=3), PromptStream(_items(10), 4, seed=3)
    batches = [a.next_batch() for _ in range(5)]  # 20 prompts = 2 epochs
    assert batches == [b.next_batch() for _ in range(5)]
    first_epoch = [it.id for bt in batches for it in bt][:10]
    assert sorted(first_epoch, key=int) == [str(i) for i in range(10)]
    # the wrap to the next epoch happens lazily, on the next draw
    assert (a.state_dict()["epoch"], a.state_dict()["offset"]) == (1, 10)


def test_a_resumed_stream_continues_with_the_same_prompts():
    s = PromptStream(_items(7), 3, seed=1)
    for _ in range(4):
        s.next_batch()
    state = s.state_dict()
    want = [s.next_batch() for _ in range(3)]
    r = PromptStream(_items(7), 3, seed=1)
    r.load_state_dict(state)
    assert [r.next_batch() for _ in range(3)] == want


def test_resuming_onto_a_different_dataset_is_refused():
    s = PromptStream(_items(7), 3, seed=1)
    with pytest.raises(ValueError, match="dataset or seed changed"):
        PromptStream(_items(8), 3, seed=1).load_state_dict(s.state_dict())


def test_countdown_items_carry_the_verifier_reference():
    train, held_out = load_items(CountdownDataConfig(num_train=50, num_eval=10))
    assert len(train) == 50 and len(held_out) == 10
    it = train[0]
    assert it.task == "countdown" and it.prompt.endswith("|") and it.reference["use_all"] is True


def test_jsonl_and_parquet_files_load_including_dapo_chat_prompts(tmp_path):
    rows = [
        {"prompt": "What is 1+1? Answer: $Answer", "answer": "2"},
        {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Solve x=3."}],
         "answer": {"ground_truth": "3"}},
    ]
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": "2+2?", "solution": "4"}]), tmp_path / "eval.parquet")
    cfg = FileDataConfig(train_path=str(jl), eval_path=str(tmp_path / "eval.parquet"))
    with pytest.raises(ValueError, match="missing field 'prompt'"):
        load_items(cfg)
    cfg = FileDataConfig(train_path=str(jl))
    train, held_out = load_items(cfg)
    assert [t.prompt for t in train] == ["What is 1+1? Answer: $Answer", "Solve x=3."]
    assert [t.reference for t in train] == ["2", "3"] and held_out == []
    cfg2 = FileDataConfig(train_path=str(tmp_path / "eval.parquet"), prompt_key="problem", answer_key="solution")
    assert load_items(cfg2)[0][0].reference == "4"


def test_bad_files_get_clear_errors(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        load_items(FileDataConfig(train_path=str(bad)))
    with pytest.raises(ValueError, match="unsupported dataset format"):
        load_items(FileDataConfig(train_path=str(_touch(tmp_path / "y.csv"))))
    with pytest.raises(FileNotFoundError):
        load_items(FileDataConfig(train_path=str(tmp_path / "missing.jsonl")))


def _touch(p):
    p.write_text("a,b\n")
    return p
