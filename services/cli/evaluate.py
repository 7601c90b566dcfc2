"""`aepo eval`: avg@n and unbiased pass@k of a checkpoint on a benchmark file, verified by the reward server.

    aepo eval --model runs/x/policy --data data/math500.jsonl --preset math500 --samples 8
    aepo eval --model DIR --data gsm8k.parquet --preset gsm8k --engine vllm-cpu --chat-template

The prompts are read like a run's data (`FileDataConfig`: presets, dotted keys), sampled with
the chosen engine in this process (`RolloutService`, no Ray), and verified over HTTP by the reward
server: one started on a free loopback port for the run (`aepo serve-reward`), or `--reward-url`.
`--samples n` responses per prompt at `--temperature` give avg@n (the mean accuracy) and pass@k for
k = 1, 2, 4, ... <= n with the unbiased estimator; every item's verdict counts (timeouts and errors
are failures and are reported as such).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. a run's policy/) or hub name "
                   "(downloaded once into the hub cache: $HF_HUB_CACHE, or read from it with HF_HUB_OFFLINE=1)")
    p.add_argument("--data", required=True, help="benchmark file (.jsonl / .parquet) or hub dataset name")
    p.add_argument("--preset", choices=["dapo_math", "math500", "gsm8k"], help="field layout of a published dataset")
    p.add_argument("--prompt-key", help="dotted path of the prompt (default: the preset's, else 'prompt')")
    p.add_argument("--answer-key", help="dotted path of the reference answer (default: the preset's, else 'answer')")
    p.add_argument("--split", default="test", help="split of a hub dataset (default test)")
    p.add_argument("--task", default="math", help="reward-server verifier (default math)")
    p.add_argument("--samples", type=int, default=8, help="n: responses per prompt (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest response in tokens (default 512)")
    p.add_argument("--limit", type=int, help="first N prompts only")
    p.add_argument("--engine", choices=["hf", "vllm", "vllm-cpu"], default="hf", help="generation engine (default hf)")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--system-prompt", help="with --chat-template: the system turn (default: the template's own)")
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts per engine call (default 64)")
    p.add_argument("--reward-url", help="an existing reward server (default: start one on loopback)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from services.config import FileDataConfig
    from services.data.datasets import file_items
    from services.model.hub import ModelUnavailable, resolve_model

    if args.samples < 1 or args.max_tokens < 1 or args.batch_prompts < 1:
        print("aepo eval: --samples, --max-tokens and --batch-prompts must be >= 1", file=sys.stderr)
        return 2
    name = args.model
    try:
        args.model = resolve_model(name, on_cluster=False)  # a local directory: this process runs the engine
    except ModelUnavailable as exc:
        print(f"aepo eval: {exc}", file=sys.stderr)
        return 2
    data = FileDataConfig(train_path=args.data, preset=args.preset, prompt_key=args.prompt_key,
                          answer_key=args.answer_key, task=args.task, split=args.split)
    items = file_items(args.data, data, "eval")
    items = items[: args.limit] if args.limit else items
    t0 = time.monotonic()
    samples = generate(args, items)
    t_gen = time.monotonic() - t0
    verify_all(args, samples)
    result = {"model": name, "data": args.data, "prompts": len(items), "samples_per_prompt": args.samples,
              "temperature": args.temperature, "engine": args.engine, **score(samples, len(items), args.samples),
              "generation_seconds": round(t_gen, 2), "wall_seconds": round(time.monotonic() - t0, 2)}
    print(json.dumps(result))
    if args.output:
        from services.loop.outputs import write_json

        write_json(args.output, result)
    return 0


def generate(args: argparse.Namespace, items: list) -> list:
    """`--samples` responses of every prompt, prompt-major, decoded."""
    from tqdm import tqdm

    from services.config import RolloutConfig
    from services.model.tiny import decode_response, encode_prompt, load_tokenizer
    from services.rollout.service import RolloutService

    from services.backends.network import VLLM_LOCAL_ENV

    for var, value in VLLM_LOCAL_ENV:  # the engine runs in this process: keep it on this machine too
        os.environ.setdefault(var, value)
    tok = load_tokenizer(args.model)
    prompts = [(it, encode_prompt(tok, it.prompt, args.chat_template, args.system_prompt)) for it in items]
    service = RolloutService(args.model, RolloutConfig(engine=args.engine, max_tokens=args.max_tokens), seed=args.seed)
    samples = []
    try:
        bar = tqdm(total=len(prompts), desc="eval", unit="prompt", disable=args.no_progress)
        for start in range(0, len(prompts), args.batch_prompts):
            chunk = prompts[start : start + args.batch_prompts]
            samples += service.generate(chunk, args.samples, args.temperature, seed=args.seed + start)
            bar.update(len(chunk))
        bar.close()
    finally:
        service.close()
    for s in samples:
        s.text = decode_response(tok, s.response_ids)
    return samples


def verify_all(args: argparse.Namespace, samples: list) -> None:
    """Every sample's verdict from the reward server (started here unless --reward-url)."""
    from services.backends.ray_cluster import RewardAdapter, RewardProcess
    from services.loop.steps import verify

    server = None if args.reward_url else RewardProcess()
    try:
        reward = RewardAdapter(args.reward_url or server.url, timeout_s=30.0, token=os.environ.get("AEPO_REWARD_TOKEN"))
        for start in range(0, len(samples), 1024):  # bounded requests
            verify(reward, samples[start : start + 1024], 0, f"eval{start}")
    finally:
        if server is not None:
            server.close()


def score(samples: list, n_prompts: int, n: int) -> dict:
    """avg@n, pass@k (k = 1, 2, 4, ... <= n), outcome counts, response length and truncation."""
    from services.loop.evaluation import avg_at_k, correct_matrix, pass_at_powers

    correct = correct_matrix(samples, n_prompts, n)
    out = {f"avg@{n}": avg_at_k(correct), **{f"pass@{k}": v for k, v in pass_at_powers(correct).items()}}
    outcomes: dict[str, int] = {}
    for s in samples:
        outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1
    out["outcomes"] = outcomes
    out["response_length_mean"] = sum(len(s.response_ids) for s in samples) / len(samples)
    out["truncation_rate"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
    return out
