#!/usr/bin/env python
"""Benchmark the reward server: items/s and request latency for 512-item batches.

Starts `aepo serve-reward` (uvicorn, --workers verifier processes) on a free 127.0.0.1 port and
sends batches the way the RL driver does (one request at a time):

  math-dapo uncached   DAPO-style answers ("Answer: N" / \\boxed{}), half correct; about 60 % need
                       sympy (\\frac, \\dfrac, decimals), the rest are plain integers (inline path)
  math-dapo cached     the same batches again (Redis if --redis, else the in-process LRU)
  math + 1% hostile    5 of 512 items are exponent towers / huge factorials / deep nesting
                       (deadline 10 s, then a tight 3 s deadline)
  numeric plain        task `numeric`, plain numbers
  math plain ints      task `math`, "Answer: N" vs N (the inline integer path)
  countdown steps      the toy task's "a op b=c" answers

    .venv/bin/python scripts/bench_reward.py [--batches 6] [--workers 2] [--redis]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.backends.network import free_port  # noqa: E402

BATCH = 512
HOSTILE = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10^{10})!}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit("server not ready")


def dapo_item(rng: random.Random, i: int, nonce: str) -> dict:
    r = rng.randint(2, 999)
    kind = i % 5
    thinking = f"[{nonce}-{i}] Let me work through this carefully. " * 3
    if kind == 0:
        text = f"{thinking}\nAnswer: {r}"  # correct, integer: inline
    elif kind == 1:
        text = f"{thinking}\nAnswer: {r + 1}"  # incorrect, integer: inline
    elif kind == 2:
        text = f"{thinking} so the result is \\boxed{{\\frac{{{2 * r}}}{{2}}}}"  # correct, sympy
    elif kind == 3:
        text = f"{thinking}\nAnswer: {r}.5"  # incorrect, sympy
    else:
        text = f"{thinking}\nAnswer: $\\dfrac{{{3 * r}}}{{3}}$"  # correct, sympy
    return {"id": str(i), "task": "math", "response": text, "reference": str(r)}


def run(http: httpx.Client, batches: list[list[dict]], timeout_s: float) -> dict:
    lat, outcomes = [], {}
    for items in batches:
        t0 = time.perf_counter()
        r = http.post("/v1/verify", json={"items": items, "timeout_s": timeout_s}, timeout=timeout_s + 30)
        lat.append(time.perf_counter() - t0)
        r.raise_for_status()
        for res in r.json()["results"]:
            outcomes[res["outcome"]] = outcomes.get(res["outcome"], 0) + 1
    lat.sort()
    n = sum(len(b) for b in batches)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return {"items/s": n / sum(lat), "p50_s": statistics.median(lat), "p99_s": p99, "max_s": lat[-1], "outcomes": outcomes}


def show(name: str, stats: dict, extra: str = "") -> None:
    print(f"{name:<28} {stats['items/s']:>9.0f} items/s   p50 {stats['p50_s']:.3f} s   p99 {stats['p99_s']:.3f} s"
          f"   max {stats['max_s']:.3f} s   {stats['outcomes']} {extra}", flush=True)


def start_redis() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("--redis needs redis-server: run `bash scripts/setup.sh --test`")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6, help="512-item batches per scenario (default 6)")
    ap.add_argument("--workers", type=int, default=2, help="verifier worker processes (default 2)")
    ap.add_argument("--redis", action="store_true", help="cache in a local redis-server instead of the LRU")
    args = ap.parse_args()
    rng = random.Random(0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    redis_proc, extra = None, []
    if args.redis:
        redis_proc, redis_url = start_redis()
        extra = ["--redis-url", redis_url]
    cmd = [sys.executable, "-m", "services.cli", "serve-reward", "--port", str(port), "--workers", str(args.workers),
           "--log-level", "warning", *extra]
    env = {k: v for k, v in os.environ.items() if k != "AEPO_REWARD_TOKEN"}
    server = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        wait_ready(url, server)
        print(f"server: {' '.join(cmd[1:])}  ({os.cpu_count()} CPUs, batch {BATCH}, {args.batches} batches each)")
        with httpx.Client(base_url=url) as http:
            run(http, [[dapo_item(rng, i, "warm") for i in range(64)]], 30)  # first sympy calls are slow
            math = [[dapo_item(rng, i, f"b{b}") for i in range(BATCH)] for b in range(args.batches)]
            show("math-dapo uncached", run(http, math, 30))
            show("math-dapo cached", run(http, math, 30), "(redis)" if args.redis else "(in-process LRU)")
            for deadline, n in ((10.0, max(2, args.batches // 2)), (3.0, 2)):
                hostile = []
                for b in range(n):
                    items = [dapo_item(rng, i, f"h{deadline}-{b}") for i in range(BATCH)]
                    for k, text in enumerate(HOSTILE):  # 5 of 512 ~ 1 %
                        items[50 + 100 * k]["response"] = text
                    hostile.append(items)
                stats = run(http, hostile, deadline)
                within = "never past the deadline" if stats["max_s"] <= deadline + 0.25 else "PAST THE DEADLINE"
                show(f"math + 1% hostile (dl {deadline:g}s)", stats, f"-> {within}")
            numeric = [[{"id": str(i), "task": "numeric", "response": f"The answer is {v}.", "reference": v}
                        for i, v in enumerate(rng.randint(0, 10**6) for _ in range(BATCH))] for _ in range(args.batches)]
            show("numeric plain", run(http, numeric, 30))
            ints = [[{"id": str(i), "task": "math", "response": f"[{b}-{i}] ...\nAnswer: {v}", "reference": str(v)}
                     for i, v in enumerate(rng.randint(0, 10**6) for _ in range(BATCH))] for b in range(args.batches)]
            show("math plain ints (inline)", run(http, ints, 30))
            toy = []
            for _ in range(args.batches):
                batch = []
                for i in range(BATCH):
                    a, b2, c = (rng.randint(1, 9) for _ in range(3))
                    batch.append({"id": str(i), "task": "countdown", "response": f"{a} * {b2}={a * b2}, {a * b2}+{c} = {a * b2 + c}",
                                  "reference": {"numbers": [a, b2, c], "target": a * b2 + c, "use_all": True}})
                toy.append(batch)
            show("countdown steps", run(http, toy, 30))
    finally:
        server.terminate()
        server.wait(timeout=15)
        if redis_proc is not None:
            redis_proc.terminate()


if __name__ == "__main__":
    main()
