"""scripts/gpu_smoke.sh: its CPU check end to end (the same code the GPU run takes, at tiny shapes),
its shapes, MFU arithmetic and peak table, its config, and its error without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _param_count(smoke, shape) -> int:
    import torch
    from transformers import Qwen2ForCausalLM

    from services.model.tiny import build_char_tokenizer

    with torch.device("meta"):
        model = Qwen2ForCausalLM(smoke.qwen_config(shape, build_char_tokenizer()))
    return sum(p.numel() for p in model.parameters())


def test_the_shapes_are_qwen25s_published_ones(smoke):
    # Qwen2.5-0.5B and -1.5B: 494,032,768 and 1,543,714,304 parameters (tied embeddings)
    assert _param_count(smoke, smoke.SHAPES["qwen2.5-0.5b"]) == 494_032_768
    assert _param_count(smoke, smoke.SHAPES["qwen2.5-1.5b"]) == 1_543_714_304


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", None),
])
def test_peak_from_the_gpu_name(smoke, name, peak):
    assert smoke.peak_flops(name, None)[0] == peak


def test_peak_flag_wins_and_mfu_is_6_p_tokens_over_peak(smoke):
    assert smoke.peak_flops("NVIDIA L4", 121.0) == (121e12, "--peak-tflops")
    shape = smoke.SHAPES["qwen2.5-0.5b"]
    got = smoke.mfu_fields(params=500_000_000, shape=shape, seq_len=2048, tokens_per_s=100_000.0, peak=1e15)
    assert got["mfu"] == pytest.approx(6 * 5e8 * 1e5 / 1e15, abs=1e-4)
    attn = 12 * shape.layers * shape.hidden * 2048
    assert got["mfu_with_attention"] == pytest.approx((6 * 5e8 + attn) * 1e5 / 1e15, abs=1e-4)
    assert smoke.mfu_fields(1, shape, 2048, 1.0, None) == {"mfu": None, "mfu_with_attention": None}


def test_the_config_puts_learner_and_hf_engine_on_one_gpu(smoke):
    from services.cli.config_file import load_config

    cfg = load_config(smoke.CONFIG)
    assert cfg.learner.device == "cuda" and cfg.learner.num_workers == 1
    assert cfg.rollout.engine == "hf" and cfg.rollout.gpus_per_actor == 0 and cfg.rollout.num_actors == 1
    small, qwen = cfg.model.small_llm, smoke.SHAPES["qwen2.5-0.5b"]
    assert cfg.model.builtin == "small_llm" and cfg.model.path is None and cfg.warm_start.steps == 0
    assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads, small.intermediate_size) == (
        qwen.hidden, qwen.layers, qwen.heads, qwen.kv_heads, qwen.intermediate)
    cpu = load_config(smoke.CONFIG, smoke.CPU_RL_OVERRIDES)
    assert cpu.learner.device == "cpu" and cpu.trainer.steps == 1 and cpu.model.small_llm.hidden_size == 64


def test_without_a_gpu_it_says_so(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip-rl", "--workdir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "no CUDA device" in proc.stderr and "--cpu-check" in proc.stderr


@pytest.mark.slow
def test_the_cpu_check_runs_every_measurement(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), "--cpu-check", "--workdir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds JSON lines only
    assert [r["measure"] for r in rows] == ["rl_steps", "fwd_bwd", "learner_update", "weight_sync", "done"]
    rl, fb, lu, ws, _ = rows
    assert rl["steps"] == 1 and rl["learner"]["device"] == "cpu" and len(rl["weight_sync_s"]) == 1
    assert rl["time_mean_s"]["rollout"] > 0 and rl["time_mean_s"]["learner"] > 0
    assert fb["shape"] == lu["shape"] == ws["shape"] == "tiny-qwen2" and fb["device"] == "cpu"
    assert fb["tokens_per_s"] > 0 and lu["tokens_per_s"] > 0 and lu["compute"]["device"] == "cpu"
    assert fb["mfu"] is None  # no peak known for a CPU
    # the whole model crossed: every parameter in float32, and the tied head under its own key
    assert ws["bytes"] == 4 * (fb["params"] + fb["vocab"] * fb["hidden"]) and ws["engine_device"] == "cpu"
    assert not any(tmp_path.joinpath("models").glob("*"))  # each shape's checkpoint is removed after it
