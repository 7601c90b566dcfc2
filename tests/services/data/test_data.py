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


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# One row in each published layout (field names and nesting as the datasets publish them).
DAPO_ROW = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve $x+1=3$."}], "ability": "MATH",
            "reward_model": {"ground_truth": "2", "style": "rule-based"}, "extra_info": {"index": "a1"}}
MATH500_ROW = {"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?", "solution": "... \\boxed{1}", "answer": "1",
               "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}
GSM8K_ROW = {"question": "Tom has 3 boxes of 400 pens. How many pens?", "answer": "3 * 400 = <<3*400=1200>>1200\n#### 1,200"}


def test_presets_read_dapo_math500_and_gsm8k_as_published(tmp_path):
    dapo = _parquet(tmp_path / "dapo.parquet", [DAPO_ROW])  # DAPO-Math-17k ships parquet
    math500 = _jsonl(tmp_path / "test.jsonl", [MATH500_ROW])
    gsm8k = _parquet(tmp_path / "gsm8k.parquet", [GSM8K_ROW])
    train, held_out = load_items(FileDataConfig(train_path=dapo, preset="dapo_math", eval_path=math500, eval_preset="math500"))
    assert (train[0].prompt, train[0].reference, train[0].task) == ("Solve $x+1=3$.", "2", "math")
    assert (held_out[0].prompt, held_out[0].reference) == (MATH500_ROW["problem"], "1")
    # GSM8K: the reference is what follows '####', thousands separators dropped
    (g,), _ = load_items(FileDataConfig(train_path=gsm8k, preset="gsm8k"))
    assert (g.prompt, g.reference) == (GSM8K_ROW["question"], "1200")
    # without an eval preset the eval file is read like the train file
    _, same = load_items(FileDataConfig(train_path=gsm8k, eval_path=gsm8k, preset="gsm8k"))
    assert same[0].reference == "1200"


def test_explicit_dotted_keys_win_over_the_preset_and_eval_keys_are_separate(tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"q": {"text": "1+1?"}, "sol": {"final": "2"}}])
    ev = _jsonl(tmp_path / "e.jsonl", [{"question": "2+2?", "answer": "4"}])
    cfg = FileDataConfig(train_path=train, prompt_key="q.text", answer_key="sol.final", preset="math500",
                         eval_path=ev, eval_prompt_key="question", eval_answer_key="answer")
    tr, he = load_items(cfg)
    assert (tr[0].prompt, tr[0].reference) == ("1+1?", "2")
    assert (he[0].prompt, he[0].reference) == ("2+2?", "4")
    # an eval key left unset is read like the train file's
    with pytest.raises(ValueError, match=r"e.jsonl row 0: missing field 'sol.final'"):
        load_items(cfg.model_copy(update={"eval_answer_key": None}))


def test_json_values_reach_the_verifier_as_written(tmp_path):
    """A column mixing strings and objects: "2" stays the string "2" (datasets' JSON builder made it 2)."""
    path = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "answer": "2"}, {"prompt": "b", "answer": {"ground_truth": "007"}}])
    train, _ = load_items(FileDataConfig(train_path=path))
    assert [t.reference for t in train] == ["2", "007"]


def test_missing_fields_name_the_file_the_row_and_the_field(tmp_path):
    rows = [DAPO_ROW, {**DAPO_ROW, "reward_model": {"style": "rule-based"}}]
    path = _parquet(tmp_path / "dapo.parquet", rows)
    with pytest.raises(ValueError, match=r"dapo.parquet row 1: missing field 'reward_model.ground_truth' \(it is null\)"):
        load_items(FileDataConfig(train_path=path, preset="dapo_math"))
    bad_gsm = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no marker"}])
    nested = _jsonl(tmp_path / "n.jsonl", [{"prompt": "p", "reward_model": {"style": "rule-based"}}])
    with pytest.raises(ValueError, match=r"n.jsonl row 0: missing field 'reward_model.ground_truth' \(reward_model has \['style'\]\)"):
        load_items(FileDataConfig(train_path=nested, preset="dapo_math"))
    with pytest.raises(ValueError, match=r"g.jsonl row 0: a GSM8K answer ends in '#### <number>'"):
        load_items(FileDataConfig(train_path=bad_gsm, preset="gsm8k"))
    with pytest.raises(ValueError, match=r"x.jsonl:1: a row is a JSON object, got list"):
        load_items(FileDataConfig(train_path=_jsonl(tmp_path / "x.jsonl", [[1, 2]])))


def test_a_hub_name_is_loaded_through_datasets_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"no-such-owner/no-such-set \(split train\): could not be loaded with datasets.load_dataset"):
        load_items(FileDataConfig(train_path="no-such-owner/no-such-set", preset="gsm8k"))


def test_every_preset_named_by_the_config_exists():
    import typing

    from services.config import DatasetPreset
    from services.data.datasets import PRESETS

    assert set(typing.get_args(DatasetPreset)) == set(PRESETS)
