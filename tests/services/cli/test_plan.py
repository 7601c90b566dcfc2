"""`aepo plan`: what each role needs, checked against a cluster; refusals name the role, the need and what exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(ROOT / "deploy/configs/gpu_qwen25_math_7b_dapo.yaml")
CPU_DEFAULT = str(ROOT / "deploy/configs/cpu_default.yaml")
SIXTEEN = ("refused: rollout needs 8 GPUs (8 actors × 1) and learner 8 (8 workers × 1): 16 GPUs, "
           "the cluster has 8")


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(["plan", *argv])
    return rc, capsys.readouterr().out


def test_the_gpu_recipe_on_8_gpus_is_refused_with_the_16_gpu_message(capsys):
    # the recipe as it was: split placement, 4 rows per micro-batch, no gradient checkpointing, the plain head
    old = ("rollout.placement=split", "rollout.gpu_memory_utilization=0.6", "learner.micro_batch_size=4",
           "learner.gradient_checkpointing=false", "learner.chunked_head=false", "learner.entropy_chunk_size=4096")
    rc, out = run(capsys, RECIPE, *old, "--gpus", "8", "--gpu-memory-gib", "80")
    assert rc == 1
    assert SIXTEEN in out
    assert "verdict: REFUSED" in out and "refused: learner needs 173.6 GiB per GPU" in out
    assert "rows:    prompt 1024 + response 3072 = 4096 tokens: L = 4096" in out and "rollout: prompt" not in out


def test_the_fixed_recipes_fit_colocated_on_one_8_gpu_node_and_split_on_two(capsys):
    rc, out = run(capsys, RECIPE, "--gpus", "8", "--gpu-memory-gib", "80", "--cpus", "96", "--memory-gib", "1024")
    assert rc == 0 and "verdict: fits" in out, out
    assert "8 CPU, 8 GPU" in next(line for line in out.splitlines() if line.startswith("learner"))
    split = RECIPE.replace(".yaml", "_split.yaml")
    rc, out = run(capsys, split, "--gpus", "8", "--gpu-memory-gib", "80")
    assert rc == 1 and SIXTEEN in out
    rc, out = run(capsys, split, "--nodes", "2", "--gpus", "8", "--gpu-memory-gib", "80", "--cpus", "96",
                  "--memory-gib", "1024")
    assert rc == 0 and "verdict: fits" in out, out


def test_a_colocated_engine_must_leave_room_for_its_learner_ranks_resting_state(capsys):
    rc, out = run(capsys, RECIPE, "rollout.gpu_memory_utilization=0.9", "--gpus", "8", "--gpu-memory-gib", "80")
    assert rc == 1
    assert ("refused: colocated: the vLLM engine reserves 72.0 GiB (0.9 x 80.0 GiB) beside its learner rank's resting "
            "16.2 GiB (16 P / N + CUDA contexts): lower rollout.gpu_memory_utilization to 0.80 or less") in out


def test_responses_that_do_not_fit_the_models_positions_are_refused_as_the_run_refuses_them(capsys):
    # Qwen2.5-Math-7B has 4,096 positions: the paper's 8,192-token responses do not fit them
    old = ("rollout.max_tokens=8192", "rollout.max_model_len=null", "--gpus", "16", "--gpu-memory-gib", "141")
    rc, out = run(capsys, RECIPE, *old)
    assert rc == 1
    assert ("refused: rollout: prompt 1024 + rollout.max_tokens 8192 = 9216 tokens > the model's 4096 positions "
            "(qwen2.5-math-7b's max_position_embeddings): lower rollout.max_tokens to 3072 or less") in out
    # a prompt length only assumed (no rollout.max_prompt_tokens, no --prompt-tokens) gives a warning
    rc, out = run(capsys, RECIPE, "rollout.max_prompt_tokens=null", *old)
    assert "refused: rollout: prompt" not in out
    assert "rollout: prompt (assumed; --prompt-tokens or rollout.max_prompt_tokens) 512 + rollout.max_tokens 8192" in out


def test_cpu_default_fits_the_local_2_cpu_description(capsys):
    from services.cli.config_file import load_config
    from services.cli.train import cpus_needed

    rc, out = run(capsys, CPU_DEFAULT, "--cpus", "2", "--memory-gib", "8")
    assert rc == 0, out
    assert "verdict: fits" in out and "refused" not in out
    # the plan's CPU total is what `aepo train` reserves
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert f"{cpus_needed(load_config(CPU_DEFAULT))} CPU, 0 GPU" in total


def test_cpu_default_with_more_cpus_than_the_cluster_names_both_roles(capsys):
    rc, out = run(capsys, CPU_DEFAULT, "learner.cpus_per_worker=2", "--cpus", "2", "--memory-gib", "8")
    assert rc == 1
    assert ("refused: rollout needs 1 CPU (1 actor × 1) and learner 4 (2 workers × 2): 5 CPUs, "
            "the cluster has 2") in out


def test_a_hand_worked_learner_and_vllm_estimate():
    """A small shape, worked by hand (Qwen2 layout: q/k/v biases, SwiGLU, two RMSNorms a layer).

    h = 64, 2 layers, 4 heads (head dim 16), 2 kv heads (kv = 32), I = 128, V = 100, tied head.
      layer: q 64*64 + 64 = 4160; k, v 2*(64*32 + 32) = 4160; o 64*64 = 4096; MLP 3*64*128 = 24576;
             norms 2*64 = 128                                     -> P_layer = 37120
      root:  embedding 100*64 + final norm 64                     -> P_root = 6464
      P = 2*37120 + 6464 = 80704
    Learner on cuda (c = 2), N = 2, b = 2 rows of L = 10, 2 micro-batches, chunk 8 rows, fused:
      sharded states 16 P / N              = 645632
      gathered root + 2 layers, c (6464 + 74240) = 161408
      unsharded fp32 grads 4 P             = 322816
      a_layer = 8*64 + 2*(7*64 + 32 + 4*128) = 512 + 1984 = 2496 B per token
      activations b L (n a_layer + 4h + c h) = 20 * (4992 + 256 + 128) = 107520
      mask b L^2                           = 200
      logits b L V (c + 4 + 2c), 3 chunks  = 2000 * 10 = 20000
      chunk temporaries (3 + 1) 4 * 8 * 100 = 12800
      update = 1270376; load 4 P = 322816 < update; + CUDA 1 GiB
    vLLM on a 16 GiB GPU at 0.5: R = 8 GiB; weights 2 P = 161408; overhead 2 GiB;
      KV = 8589934592 - 161408 - 2147483648 = 6442289536 bytes; per token 2 * 2 layers * 32 * 2 = 256 B
      -> 25165193 tokens.
    """
    from services.config import LearnerConfig, RolloutConfig
    from services.model.plan_memory import GiB, LearnerLayout, ModelShape, engine_memory, learner_memory

    shape = ModelShape("hand", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=100, tied=True,
                       max_positions=64, dtype_bytes=2)
    assert (shape.layer_params, shape.root_params, shape.params) == (37120, 6464, 80704)
    lc = LearnerConfig(num_workers=2, micro_batch_size=2, entropy_chunk_size=8, share_prefix=False, chunked_head=False)
    layout = LearnerLayout(rows=4, micro=2, micro_batches=2, seq_len=10, fused=True)
    est = learner_memory(shape, lc, False, "cuda", 2, layout)
    assert [t[2] for t in est.terms if t[3] == "update"] == [645632, 161408, 322816, 107520, 200, 20000, 12800]
    assert est.phase("update") == 1270376 and est.phase("start") == 322816
    assert est.peak == GiB + 1270376
    # the chunked head: one chunk's 5 fp32 buffers 5 * 4 * 8 * 100 = 16000, its weight gradient 4 V h = 25600
    chunked = learner_memory(shape, lc.model_copy(update={"chunked_head": True}), False, "cuda", 2, layout)
    assert [t[2] for t in chunked.terms if t[3] == "update"][-2:] == [16000, 25600]
    assert chunked.phase("update") == 1270376 - 20000 - 12800 + 16000 + 25600
    rc = RolloutConfig(engine="vllm", gpu_memory_utilization=0.5)
    eng = engine_memory(shape, rc, "cuda", 16 * GiB, rows=16, seq_len=32)
    assert eng.facts["kv_bytes"] == 6442289536 and eng.facts["kv_tokens"] == 25165193
    assert eng.facts["kv_bytes_per_token"] == 256


def test_the_presets_match_the_published_parameter_counts():
    from services.model.plan_memory import PRESETS

    # Qwen2.5 model cards: 0.49 B, 1.54 B, 7.61 B
    assert round(PRESETS["qwen2.5-0.5b"].params / 1e9, 2) == 0.49
    assert round(PRESETS["qwen2.5-1.5b"].params / 1e9, 2) == 1.54
    assert round(PRESETS["qwen2.5-7b"].params / 1e9, 2) == 7.62


def test_the_flags_offer_every_preset():
    from services.cli.plan import PRESET_NAMES
    from services.model.plan_memory import PRESETS

    assert tuple(PRESETS) == PRESET_NAMES


def test_the_tiny_shape_is_the_built_model(tiny_model_path):
    from services.config import ModelConfig
    from services.model.plan_memory import resolve_shape
    from services.model.tiny import load_causal_lm

    shape, _ = resolve_shape(ModelConfig())
    from_dir, _ = resolve_shape(ModelConfig(path=tiny_model_path))
    real = sum(p.numel() for p in load_causal_lm(tiny_model_path).parameters())
    assert shape.params == from_dir.params == real


def test_a_7b_learner_on_one_24_gib_gpu_is_refused_out_of_memory(capsys):
    rc, out = run(capsys, CPU_DEFAULT, "model.path=Qwen/Qwen2.5-7B", "learner.num_workers=1", "learner.device=cuda",
                  "learner.cpus_per_worker=1", "--gpus", "1", "--gpu-memory-gib", "24", "--cpus", "8", "--memory-gib", "256")
    assert rc == 1
    refusal = next(line for line in out.splitlines() if "refused: learner needs" in line)
    assert "GiB per GPU" in refusal and "the GPUs have 24.0 GiB" in refusal
    assert "sharded params, grads, AdamW" in refusal  # 16 P alone is 113 GiB
    assert "GPUs, the cluster has" not in out  # the one GPU is there: it is the memory that is refused


def test_json_output(capsys):
    rc, out = run(capsys, RECIPE, "rollout.placement=split", "--gpus", "8", "--gpu-memory-gib", "80", "--json")
    assert rc == 1
    plan = json.loads(out)
    assert plan["fits"] is False and SIXTEEN in plan["refusals"]
    assert plan["totals"] == {"CPU": 16.0, "GPU": 16.0}
    assert plan["model"]["params"] == 7615616512 and plan["model"]["max_positions"] == 4096
    roles = {r["role"]: r for r in plan["roles"]}
    assert roles["rollout"]["gpus"] == 8 and roles["learner"]["gpus"] == 8 and roles["reward"]["cpus"] == 0
    terms = plan["memory"]["learner"]["terms"]
    assert all(isinstance(t["bytes"], int) for t in terms)
    assert plan["memory"]["learner"]["peak"] == roles["learner"]["memory_peak"]


def test_the_recipe_fits_two_h200_nodes_with_checkpointing_until_dev_shm_is_too_small(capsys, monkeypatch):
    from services.model import plan_host

    argv = [RECIPE, "learner.gradient_checkpointing=true", "--nodes", "2", "--gpus", "8", "--gpu-memory-gib", "141",
            "--cpus", "64", "--memory-gib", "1024"]
    rc, out = run(capsys, *argv)
    assert rc == 0, out
    # one bucket file per engine at a time: 64 MiB of fp32 parameters + the embedding that closes a
    # bucket (4 x 152064 x 3584 B), in bf16: 1,123,549,184 B = 1.05 GiB; Ray may pack all 8 engines on a node
    monkeypatch.setattr(plan_host, "vllm_layerwise_reload", lambda: True)
    rc, out = run(capsys, *argv, "--shm-gib", "64")
    assert rc == 0, out
    rc, out = run(capsys, *argv, "--shm-gib", "4")
    assert rc == 1
    assert "up to 8 vLLM engines on a node write weight files (1.0 GiB each)" in out and "8.4 GiB, /dev/shm has 4.0 GiB" in out
    # a vLLM without the layerwise reload writes the whole bf16 model: 8 x 2 x 7,615,616,512 B
    monkeypatch.setattr(plan_host, "vllm_layerwise_reload", lambda: False)
    rc, out = run(capsys, *argv, "--shm-gib", "64")
    assert rc == 1 and "(14.2 GiB each)" in out and "113.5 GiB, /dev/shm has 64.0 GiB" in out


def test_the_weight_sync_terms_follow_the_sync_dtype_and_the_bucket(monkeypatch):
    from services.cli.config_file import load_config
    from services.model import plan_host
    from services.model.plan_memory import PRESETS

    monkeypatch.setattr(plan_host, "vllm_layerwise_reload", lambda: None)
    shape = PRESETS["qwen2.5-0.5b"]
    cfg = load_config(CPU_DEFAULT, ["learner.sync_bucket_mb=16"])
    cpu = plan_host.sync_sizes(cfg, shape, "cpu")
    # float32 on CPU (auto): 16 MiB + the embedding 4 x 151936 x 896 B; tied: its copy in each engine's file
    assert cpu.dtype_bytes == 4 and cpu.bucket == 16 * 2**20 + 4 * 151936 * 896
    assert cpu.shm_per_engine == cpu.bucket + 4 * 151936 * 896 and cpu.layerwise
    gpu = plan_host.sync_sizes(cfg, shape, "cuda")
    assert gpu.dtype_bytes == 2 and gpu.bucket == cpu.bucket // 2
    forced = plan_host.sync_sizes(load_config(CPU_DEFAULT, ["learner.sync_dtype=bfloat16"]), shape, "cpu")
    assert forced.dtype_bytes == 2


def test_a_vllm_reservation_without_room_for_one_sequence_is_refused(capsys):
    # 0.1 x 141 GiB = 14.1 GiB, less than the bf16 weights (14.2 GiB) and vLLM's overhead
    rc, out = run(capsys, RECIPE, "rollout.gpu_memory_utilization=0.1", "learner.gradient_checkpointing=true",
                  "--gpus", "16", "--gpu-memory-gib", "141")
    assert rc == 1
    assert "refused: rollout: vLLM reserves 14.1 GiB" in out and "vLLM refuses to start" in out
    rc, out = run(capsys, RECIPE, "rollout.max_model_len=8704", "--gpus", "16", "--gpu-memory-gib", "141")
    assert "refused: rollout: rollout.max_model_len 8704 is over the model's 4096 positions" in out


def test_strict_pack_learners_that_fit_in_total_but_on_no_node_are_refused(capsys):
    rc, out = run(capsys, CPU_DEFAULT, "learner.num_workers=8", "learner.device=cuda", "learner.cpus_per_worker=1",
                  "learner.placement_strategy=STRICT_PACK", "--nodes", "2", "--gpus", "4", "--cpus", "16",
                  "--gpu-memory-gib", "80", "--memory-gib", "64")
    assert rc == 1
    assert "refused: learner (8 bundles together) needs 8 CPU and 8 GPU on one node" in out


def test_a_hub_model_without_a_shape_is_planned_without_memory(capsys):
    rc, out = run(capsys, CPU_DEFAULT, "model.path=someone/unknown-model", "--cpus", "2", "--memory-gib", "8")
    assert rc == 0
    assert "memory not estimated" in out and "--model-shape" in out
    rc, out = run(capsys, CPU_DEFAULT, "model.path=someone/unknown-model", "--model-shape", "qwen2.5-0.5b",
                  "--cpus", "2", "--memory-gib", "64")
    assert "preset qwen2.5-0.5b" in out and "memory not estimated" not in out


def test_this_machine_oversubscribed_is_a_note_not_a_refusal():
    from services.cli.config_file import load_config
    from services.cli.plan import Cluster, make_plan

    cfg = load_config(CPU_DEFAULT, ["learner.num_workers=4", "learner.cpus_per_worker=1"])
    here = Cluster("this machine", [{"CPU": 2.0, "GPU": 0.0, "memory": 16 * 2**30}], strict_cpus=False)
    plan = make_plan(cfg, here)
    assert plan.fits
    assert any("5 CPUs, the cluster has 2: aepo train oversubscribes" in w for w in plan.warnings)


@pytest.mark.parametrize("device,gpus,workers", [("auto", 8, 8), ("auto", 0, 2), ("cpu", 8, 2), ("cuda", 0, 2)])
def test_the_learner_device_is_the_groups_own_rule(monkeypatch, device, gpus, workers):
    import ray

    from services.cli.plan import learner_device
    from services.config import LearnerConfig
    from services.learner.group import _resolve_device

    lc = LearnerConfig(device=device, num_workers=workers)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": float(gpus)})
    assert learner_device(lc, gpus) == _resolve_device(lc)


def test_auto_with_too_few_gpus_is_refused_not_moved_to_the_cpu(capsys, monkeypatch):
    """7 GPUs for 8 workers: the group refuses to start (it used to train on the CPUs, silently) and
    the plan refuses the GPU count."""
    import ray

    from services.config import LearnerConfig
    from services.learner.group import _resolve_device

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 7.0})
    with pytest.raises(ValueError, match="7 GPUs for 8 learner workers; set learner.num_workers to 7 or fewer"):
        _resolve_device(LearnerConfig(device="auto", num_workers=8))
    rc, out = run(capsys, RECIPE, "--gpus", "7", "--gpu-memory-gib", "80")
    assert rc == 1 and "refused: learner needs 8 GPUs" in out, out


def test_the_ray_cluster_is_read_from_ray(ray_local):
    import argparse

    from services.cli.plan import cluster_from_ray

    cl = cluster_from_ray(argparse.Namespace(gpu_memory_gib=None))
    assert cl.total("CPU") == ray_local.cluster_resources()["CPU"]
    assert cl.total("memory") > 0 and cl.total("GPU") == ray_local.cluster_resources().get("GPU", 0)


def test_plan_help_imports_neither_torch_nor_ray():
    code = ("import sys; from services.cli.main import main\n"
            "try:\n    main(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_roles_custom_resources_must_be_declared_by_the_clusters_nodes():
    from services.cli.config_file import load_config
    from services.cli.plan import Cluster, make_plan

    cfg = load_config(CPU_DEFAULT, ["learner.resources={learners_node: 1}", "rollout.resources={rollout_node: 1}"])
    nodes = [{"CPU": 4.0, "GPU": 0.0, "memory": 16 * 2**30, "custom": {"learners_node": 2.0}},
             {"CPU": 4.0, "GPU": 0.0, "memory": 16 * 2**30, "custom": {"rollout_node": 1.0}}]
    assert make_plan(cfg, Cluster("ray", nodes)).fits  # 2 workers x 1 on one node, 1 actor x 1 on the other
    nodes[0]["custom"] = {"learners_node": 1.0}
    plan = make_plan(cfg, Cluster("ray", nodes))
    assert not plan.fits
    assert plan.refusals == ["refused: learner asks for learners_node: 1 per worker (2 × 1), the cluster's nodes "
                             "declare 1 (custom resources: learners_node, rollout_node; `ray start --resources`)"]
    flags = [{k: v for k, v in n.items() if k != "custom"} for n in nodes]  # not read from Ray: not checked
    assert make_plan(cfg, Cluster("flags", flags)).fits
