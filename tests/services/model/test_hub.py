"""Models by name: a hub name in model.path becomes a local snapshot directory once, before anything
starts, or the run stops with an error that names the model, the cache and the fixes.

No test reaches a hub: each writes the hub cache's layout itself (models--org--name/refs/main and
snapshots/<commit>/...), and the "online" cases point HF_ENDPOINT at a closed loopback port.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from services.config import ModelConfig, TinyModelConfig
from services.model.hub import ModelUnavailable, hub_cache_dir, is_hub_name, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAME = "test-org/tiny-math"
SMALL = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=32, max_position_embeddings=64)


def fake_snapshot(cache: Path, name: str = NAME, files: dict | None = None) -> Path:
    """What `snapshot_download` leaves in a cache: refs/main naming a commit, the files under snapshots/<commit>."""
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    default = {"config.json": json.dumps({"model_type": "qwen2", "max_position_embeddings": 4096}),
               "model.safetensors": "weights", "tokenizer.json": "{}"}
    for rel, text in (default if files is None else files).items():
        (snap / rel).write_text(text)
    return snap


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, but the hub is a loopback port nothing listens on (connection refused at once)."""
    from services.backends.network import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")


def test_a_local_directory_is_returned_unchanged(tmp_path, offline):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    from services.model.tiny import resolve_model_path

    assert resolve_model_path(ModelConfig(path=str(tmp_path))) == str(tmp_path)


def test_a_missing_local_path_is_not_taken_for_a_hub_name(tmp_path, offline):
    assert is_hub_name("Qwen/Qwen2.5-Math-7B") and not is_hub_name(str(tmp_path / "nope")) and not is_hub_name("./m")
    with pytest.raises(ModelUnavailable, match=r"is not a directory on this machine .*not a hub name"):
        resolve_model(str(tmp_path / "no" / "such" / "model"))


def test_offline_a_cached_name_resolves_to_its_snapshot_from_hf_hub_cache(tmp_path, offline, monkeypatch):
    snap = fake_snapshot(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache_dir() == (tmp_path / "hub").resolve()
    assert Path(resolve_model(NAME)) == snap.resolve()


def test_offline_model_cache_dir_wins_over_the_environment(tmp_path, offline, monkeypatch):
    from services.model.tiny import resolve_model_path

    snap = fake_snapshot(tmp_path / "shared")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    path = resolve_model_path(ModelConfig(path=NAME, cache_dir=str(tmp_path / "shared")))
    assert Path(path) == snap.resolve()


def test_offline_an_unknown_name_fails_fast_naming_the_model_the_cache_and_the_fixes(tmp_path, offline):
    fake_snapshot(tmp_path / "hub")  # another model is cached: still not this one
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        resolve_model("test-org/not-downloaded", cache_dir=tmp_path / "hub")
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "'test-org/not-downloaded'" in msg and str((tmp_path / "hub").resolve()) in msg
    assert "HF_HUB_OFFLINE is set" in msg and "models--test-org--not-downloaded" in msg
    assert "hf download test-org/not-downloaded" in msg and "point model.path at a local copy" in msg


def test_a_snapshot_without_weights_is_refused_by_name(tmp_path, offline):
    fake_snapshot(tmp_path / "hub", files={"config.json": "{}", "tokenizer_config.json": "{}"})
    with pytest.raises(ModelUnavailable, match=r"has no weights \(\*\.safetensors or \*\.bin\): an interrupted"):
        resolve_model(NAME, cache_dir=tmp_path / "hub")


def test_without_a_network_a_name_falls_back_to_the_cache_or_fails_clearly(tmp_path, unreachable_hub):
    snap = fake_snapshot(tmp_path / "hub")
    assert Path(resolve_model(NAME, cache_dir=tmp_path / "hub")) == snap.resolve()
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        resolve_model("test-org/never-seen", cache_dir=tmp_path / "hub")
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert "'test-org/never-seen' could not be downloaded into the hub cache" in msg and "HF_TOKEN" in msg
    assert isinstance(err.value.__cause__, Exception)  # the hub's own error stays chained for debugging


def test_on_a_cluster_a_name_needs_a_cache_every_node_sees(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ModelUnavailable, match="set model.cache_dir to a directory every node mounts"):
        resolve_model(NAME)
    snap = fake_snapshot(tmp_path / "shared")
    assert Path(resolve_model(NAME, cache_dir=tmp_path / "shared")) == snap.resolve()


def test_the_driver_resolves_a_name_once_and_every_role_gets_the_local_directory(tmp_path, offline, capsys):
    """A real (tiny) checkpoint inside a fake cache: `prepare_run` gives the snapshot directory, the
    tokenizer and the model load from it, and the context check reads its config.json."""
    from services.cli.config_file import load_config
    from services.cli.train import prepare_run
    from services.model.tiny import build_tiny_model, load_causal_lm, load_tokenizer

    snap = fake_snapshot(tmp_path / "hub", files={})
    build_tiny_model(SMALL, snap, seed=0)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {{path: {NAME}, cache_dir: {tmp_path / 'hub'}}}\n"
                        "data: {type: countdown, num_train: 20, num_eval: 2}\nrollout: {max_tokens: 24}\n")
    path, warm, (train, held_out) = prepare_run(load_config(cfg_file), progress=False)
    assert Path(path) == snap.resolve() and warm == {} and len(train) == 20 and len(held_out) == 2
    out = capsys.readouterr().out
    assert f"model: {NAME} -> {path}" in out and "context: longest prompt" in out and "64 positions" in out
    assert load_tokenizer(path).pad_token == "<pad>" and load_causal_lm(path).config.hidden_size == 32


def _train_args(cfg_file: Path, out: Path) -> argparse.Namespace:
    from services.cli.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--config", str(cfg_file), "--backend", "local", "--no-progress", "--output-dir", str(out)])


def test_aepo_train_with_an_unknown_name_offline_exits_2_with_the_message(tmp_path, offline, capsys):
    from services.cli.train import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {{path: test-org/not-downloaded, cache_dir: {tmp_path / 'hub'}}}\n"
                        "data: {type: countdown, num_train: 20, num_eval: 2}\n")
    assert main(_train_args(cfg_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("aepo train: model 'test-org/not-downloaded' is not in the hub cache")
    assert "Traceback" not in err


def test_aepo_plan_reads_a_cached_names_config_json_without_downloading(tmp_path, offline, capsys):
    from services.cli.main import main

    shape = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 96}
    snap = fake_snapshot(tmp_path / "hub", files={"config.json": json.dumps(shape)})
    cpu_default = str(Path(__file__).resolve().parents[3] / "deploy/configs/cpu_default.yaml")
    argv = ["plan", cpu_default, f"model.path={NAME}", f"model.cache_dir={tmp_path / 'hub'}", "rollout.max_tokens=90",
            "--cpus", "2", "--memory-gib", "8"]
    rc = main(argv)
    out = capsys.readouterr().out
    assert f"[{snap.resolve() / 'config.json'} (hub cache)]" in out and "96 positions" in out
    # countdown's prompt length is only assumed (12 tokens): 12 + 90 > 96 is a warning
    assert rc == 0 and "rollout: prompt (assumed; --prompt-tokens or rollout.max_prompt_tokens) 12 + " \
        "rollout.max_tokens 90 = 102 tokens > the model's 96 positions" in out
    rc = main([*argv, "--prompt-tokens", "12"])  # a given length: refused, as aepo train would refuse it
    assert rc == 1 and "refused: rollout: prompt 12 + rollout.max_tokens 90 = 102 tokens" in capsys.readouterr().out


def test_aepo_eval_with_an_unknown_name_offline_exits_2_with_the_message(tmp_path, offline, monkeypatch, capsys):
    from services.cli.main import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["eval", "--model", "test-org/not-downloaded", "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aepo eval: model 'test-org/not-downloaded' is not in the hub cache {tmp_path / 'hub'}")
