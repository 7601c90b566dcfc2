#!/usr/bin/env python
"""Load and abuse test of the reward server: many concurrent clients, a seeded mix of good and hostile requests.

Starts `aepo serve-reward` on a free 127.0.0.1 port (or targets --url) and drives it from
--clients concurrent asyncio clients (httpx) for --duration seconds. Each client loops over a
seeded mix of:

  valid      a fresh batch of --batch items (math needing sympy, numeric, countdown) whose right
             verdicts are known: a wrong verdict under load is counted
  cached     a batch sent before, again (the verdict cache answers)
  hostile    bad or missing token, malformed JSON, wrong types, unknown fields, a response /
             reference / metadata over its limit, too many items, 100k-deep nesting, a 10k-digit
             number, exponent towers (valid, but each item is killed at its limit), and slow
             ("slowloris") bodies
  oversized  bodies over the body limit, declared by Content-Length or streamed chunked

A client told 429 waits the Retry-After, as reward_server.client does. At the end it prints a
table and one JSON line: requests/s, p50/p99 latency of valid requests, the share of 429s, each
hostile kind with how it was answered, the 5xx count, and whether the server process crashed.
Nothing leaves 127.0.0.1 unless --url says so.

    .venv/bin/python scripts/load_reward.py --duration 60 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.backends.network import free_port  # noqa: E402

TOWER = "\\boxed{9^{9^{9^{9}}}}"
# status codes that are the right answer to each hostile kind ("closed": the server hung up first,
# which is fine for a body it refused to read)
EXPECTED = {
    "bad_token": {"401"}, "no_token": {"401"}, "malformed_json": {"422"}, "wrong_types": {"422"},
    "unknown_field": {"422"}, "huge_response": {"413"}, "huge_reference": {"413"}, "metadata_keys": {"413"},
    "too_many_items": {"413"}, "deep_nesting": {"400", "422"}, "huge_number": {"400", "422"},
    "math_bomb": {"200"}, "slow_body": {"408", "closed"},
    "oversized_declared": {"413", "closed"}, "oversized_chunked": {"413", "closed"},
}
# 429 is also right for these when the server is full: admission refuses them before their body.
# Not for a bad token or a declared oversize: those checks come first, whatever the load.
NOT_SHEDDABLE = {"bad_token", "no_token", "oversized_declared"}


@dataclass
class Target:
    """Where the server is and the limits the hostile requests are sized against."""

    url: str
    token: str | None
    max_body_bytes: int
    body_timeout_s: float
    proc: subprocess.Popen | None = None


@dataclass
class Record:
    """One request's fate."""

    kind: str
    sub: str
    status: str
    seconds: float
    items: int = 0
    wrong: int = 0
    timeouts: int = 0


@dataclass
class Shared:
    """State all clients share: prebuilt hostile bodies and the batches `cached` may resend."""

    target: Target
    bodies: dict[str, bytes]
    sent: list[tuple[list[dict], list[str]]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)


def start_server(args: argparse.Namespace) -> Target:
    """`aepo serve-reward` on a free loopback port with a fresh token and the load test's limits."""
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "AEPO_REWARD_TOKEN": token, "AEPO_REWARD_MAX_BODY_BYTES": str(args.max_body_bytes),
           "AEPO_REWARD_BODY_TIMEOUT_S": str(args.body_timeout_s)}
    for pair in args.server_env:
        key, _, value = pair.partition("=")
        env[key] = value
    cmd = [sys.executable, "-m", "services.cli", "serve-reward", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers), "--log-level", "error"]
    if args.redis_url:
        cmd += ["--redis-url", args.redis_url]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return Target(url, token, args.max_body_bytes, args.body_timeout_s, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("server not ready after 120 s")


def valid_batch(rng: random.Random, nonce: str, n: int) -> tuple[list[dict], list[str]]:
    """n items whose verdicts are known: math (sympy and inline), numeric, countdown."""
    items, expected = [], []
    for i in range(n):
        r, kind = rng.randint(2, 999), i % 5
        head = f"[{nonce}-{i}] working it out step by step. "
        if kind == 0:
            it, want = ("math", f"{head}so \\boxed{{\\frac{{{2 * r}}}{{2}}}}", str(r)), "correct"
        elif kind == 1:
            it, want = ("math", f"{head}\nAnswer: {r}.5", str(r)), "incorrect"
        elif kind == 2:
            it, want = ("math", f"{head}\nAnswer: {r + 1}", str(r)), "incorrect"
        elif kind == 3:
            it, want = ("numeric", f"{head}\\boxed{{{r}}}", r), "correct"
        else:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            it, want = ("countdown", f"{head}\n{a}*{b}={a * b}", {"numbers": [a, b], "target": a * b}), "correct"
        items.append({"id": str(i), "task": it[0], "response": it[1], "reference": it[2]})
        expected.append(want)
    return items, expected


def hostile_bodies(target: Target) -> dict[str, bytes]:
    """Prebuilt bodies (built once: the load generator must not spend its CPU on them)."""
    one = {"id": "1", "task": "exact", "response": "a", "reference": "a"}

    def body(items, **extra) -> bytes:
        return json.dumps({"items": items, **extra}).encode()

    return {
        "valid_one": body([one]),
        "malformed_json": b'{"items": [{"id": "1", "task": ',
        "wrong_types": body([{"id": 1, "task": 5, "response": ["x"], "reference": None}]),
        "unknown_field": body([one], evil=True),
        "huge_response": body([{**one, "response": "x" * 200_001}]),
        "huge_reference": body([{**one, "reference": "y" * 70_000}]),
        "metadata_keys": body([{**one, "metadata": {f"k{i}": i for i in range(100)}}]),
        "too_many_items": body([{**one, "id": str(i)} for i in range(4097)]),
        "deep_nesting": b'{"items": [{"id": "1", "task": "exact", "response": "a", "reference": '
        + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        "huge_number": b'{"items": [{"id": "1", "task": "numeric", "response": "1", "reference": '
        + b"9" * 10_000 + b"}]}",
        "math_bomb": body([{**one, "task": "math", "response": TOWER, "reference": "1", "id": str(i)}
                           for i in range(3)], timeout_s=3),
        "oversized": b'{"items": [{"id": "1", "task": "exact", "reference": "a", "response": "'
        + b"z" * (target.max_body_bytes + 1) + b'"}]}',
    }


def request_for(sub: str, shared: Shared) -> dict:
    """httpx.post keyword arguments for one hostile or oversized request."""
    token = shared.target.token
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    json_ct = {"content-type": "application/json"}
    b = shared.bodies
    if sub == "bad_token":
        return {"content": b["valid_one"], "headers": {**json_ct, "Authorization": "Bearer not-the-token"}}
    if sub == "no_token":
        return {"content": b["valid_one"], "headers": json_ct}
    if sub == "slow_body":
        return {"content": _slow_body(b["valid_one"], shared.target.body_timeout_s), "headers": {**json_ct, **auth}}
    if sub == "oversized_declared":
        return {"content": b["oversized"], "headers": {**json_ct, **auth}}
    if sub == "oversized_chunked":
        return {"content": _chunks(b["oversized"], 64 * 1024), "headers": {**json_ct, **auth}}
    return {"content": b[sub], "headers": {**json_ct, **auth}}


async def _slow_body(body: bytes, timeout_s: float):
    """The body a byte at a time, slower than the server's body timeout allows (a slowloris)."""
    end = time.monotonic() + timeout_s + 2
    for i in range(len(body)):
        yield body[i:i + 1]
        if time.monotonic() > end:
            break
        await asyncio.sleep(0.5)


async def _chunks(body: bytes, size: int):
    for i in range(0, len(body), size):
        yield body[i:i + size]


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(float(response.headers.get("retry-after", "1")), 5.0)
    except ValueError:
        return 1.0


async def send(http: httpx.AsyncClient, shared: Shared, rng: random.Random, kind: str, sub: str,
               nonce: str, batch: int) -> tuple[Record, float]:
    """One request; its Record and how long the client should pause (Retry-After on 429)."""
    auth = {"Authorization": f"Bearer {shared.target.token}"} if shared.target.token else {}
    items, expected = None, None
    if kind == "valid" or (kind == "cached" and not shared.sent):
        kind, (items, expected) = "valid", valid_batch(rng, nonce, batch)
        if len(shared.sent) < 256:
            shared.sent.append((items, expected))
        kwargs = {"json": {"items": items, "timeout_s": 10}, "headers": auth}
    elif kind == "cached":
        items, expected = rng.choice(shared.sent)
        kwargs = {"json": {"items": items, "timeout_s": 10}, "headers": auth}
    else:
        kwargs = request_for(sub, shared)
    t0 = time.perf_counter()
    try:
        response = await http.post("/v1/verify", timeout=60, **kwargs)
    except httpx.HTTPError as exc:
        status = "closed" if isinstance(exc, (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError)) \
            else f"error:{type(exc).__name__}"
        return Record(kind, sub, status, time.perf_counter() - t0), 0.0
    record = Record(kind, sub, str(response.status_code), time.perf_counter() - t0)
    if response.status_code == 200 and expected is not None:
        outcomes = [r["outcome"] for r in response.json()["results"]]
        record.items = len(outcomes)
        record.timeouts = outcomes.count("timeout")
        record.wrong = sum(o != e and o != "timeout" for o, e in zip(outcomes, expected))
    return record, (_retry_after(response) if response.status_code == 429 else 0.0)


def pick(rng: random.Random, mix: dict[str, float], hostile: list[str]) -> tuple[str, str]:
    """(kind, sub-kind) drawn with the mix's weights; hostile and oversized draw a sub-kind uniformly."""
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "hostile":
        return kind, rng.choice(hostile)
    if kind == "oversized":
        return kind, rng.choice(["oversized_declared", "oversized_chunked"])
    return kind, kind


async def client_loop(index: int, shared: Shared, args: argparse.Namespace, deadline: float) -> None:
    """One simulated client: its own connection, its own seeded stream of requests."""
    rng = random.Random(args.seed * 1_000_003 + index)
    hostile = [k for k in EXPECTED if not k.startswith("oversized")
               and (shared.target.token or k not in ("bad_token", "no_token"))]
    mix = {"valid": args.valid, "cached": args.cached, "hostile": args.hostile, "oversized": args.oversized}
    n = 0
    async with httpx.AsyncClient(base_url=shared.target.url, limits=httpx.Limits(max_connections=2)) as http:
        while time.monotonic() < deadline:
            kind, sub = pick(rng, mix, hostile)
            n += 1
            record, pause = await send(http, shared, rng, kind, sub, f"c{index}-{n}", args.batch)
            shared.records.append(record)
            if pause:
                await asyncio.sleep(pause * rng.uniform(0.5, 1.5))


async def peak_rss_mb(pid: int | None, stop: asyncio.Event) -> float:
    """Highest resident memory of the server process (its main process, not the workers), sampled each 0.5 s."""
    peak = 0.0
    while pid is not None and not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            break
        await asyncio.sleep(0.5)
    return peak


async def drive(shared: Shared, args: argparse.Namespace) -> tuple[float, float]:
    """Run every client until the duration is over; (seconds taken, server's peak RSS in MiB)."""
    stop = asyncio.Event()
    pid = shared.target.proc.pid if shared.target.proc else None
    rss = asyncio.create_task(peak_rss_mb(pid, stop))
    t0 = time.monotonic()
    deadline = t0 + args.duration
    await asyncio.gather(*(client_loop(i, shared, args, deadline) for i in range(args.clients)))
    elapsed = time.monotonic() - t0
    stop.set()
    return elapsed, await rss


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 4)


def summarize(records: list[Record], elapsed: float, crashed: bool, rss: float, server: dict) -> dict:
    """The figures of the run, as one JSON-able dict."""
    status = Counter(r.status for r in records)
    good = [r for r in records if r.kind in ("valid", "cached") and r.status == "200"]
    hostile: dict[str, dict] = defaultdict(lambda: {"sent": 0, "answers": Counter(), "as_expected": 0})
    for r in records:
        if r.kind in ("hostile", "oversized"):
            h = hostile[r.sub]
            h["sent"] += 1
            h["answers"][r.status] += 1
            h["as_expected"] += r.status in EXPECTED[r.sub] or (r.status == "429" and r.sub not in NOT_SHEDDABLE)
    return {
        "duration_s": round(elapsed, 1), "requests": len(records), "requests_per_s": round(len(records) / elapsed, 1),
        "valid": {
            "sent": sum(r.kind in ("valid", "cached") for r in records), "ok": len(good),
            "p50_s": _pct([r.seconds for r in good], 0.5), "p99_s": _pct([r.seconds for r in good], 0.99),
            "items_per_s": round(sum(r.items for r in good) / elapsed, 1),
            "wrong_verdicts": sum(r.wrong for r in good), "item_timeouts": sum(r.timeouts for r in good),
        },
        "share_429": round(status["429"] / max(len(records), 1), 4),
        "status_counts": dict(sorted(status.items())),
        "hostile_sent": sum(h["sent"] for h in hostile.values()),
        "hostile_as_expected": sum(h["as_expected"] for h in hostile.values()),
        "hostile": {k: {**v, "answers": dict(v["answers"])} for k, v in sorted(hostile.items())},
        "5xx": sum(n for s, n in status.items() if s.isdigit() and s.startswith("5")),
        "server_crashed": crashed, "server_peak_rss_mb": round(rss, 1), "server_rejected": server,
    }


def server_rejections(target: Target) -> dict[str, float]:
    """aepo_reward_rejected_total by reason, from the server's /metrics."""
    out = {}
    try:
        for line in httpx.get(target.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("aepo_reward_rejected_total{"):
                out[line.split('reason="')[1].split('"')[0]] = float(line.split()[-1])
    except httpx.HTTPError:
        pass
    return out


def alive(target: Target) -> bool:
    """The server process still runs and answers /healthz."""
    if target.proc is not None and target.proc.poll() is not None:
        return False
    try:
        return httpx.get(target.url + "/healthz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def print_table(s: dict, args: argparse.Namespace) -> None:
    v = s["valid"]
    print(f"\n{args.clients} clients, {s['duration_s']} s, seed {args.seed}")
    print(f"  requests            {s['requests']:>8}   ({s['requests_per_s']} req/s)")
    print(f"  valid/cached        {v['sent']:>8}   200: {v['ok']}, p50 {v['p50_s']} s, p99 {v['p99_s']} s, "
          f"{v['items_per_s']} items/s, wrong verdicts {v['wrong_verdicts']}, item timeouts {v['item_timeouts']}")
    print(f"  429 share           {s['share_429']:>8.2%}")
    print(f"  5xx                 {s['5xx']:>8}")
    print(f"  hostile sent        {s['hostile_sent']:>8}   answered as expected: {s['hostile_as_expected']}")
    for name, h in s["hostile"].items():
        answers = ", ".join(f"{k}: {n}" for k, n in sorted(h["answers"].items()))
        shed = "" if name in NOT_SHEDDABLE else ", or 429 when full"
        print(f"    {name:<20} {h['sent']:>5}   {answers}   (expected {'/'.join(sorted(EXPECTED[name]))}{shed})")
    print(f"  server crashed      {str(s['server_crashed']):>8}   peak RSS {s['server_peak_rss_mb']} MiB")
    print(f"  server rejections   {s['server_rejected']}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="target this server instead of starting one (its token: --token or $AEPO_REWARD_TOKEN)")
    ap.add_argument("--token", default=os.environ.get("AEPO_REWARD_TOKEN"), help="bearer token for --url")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every client's request mix (default 0)")
    ap.add_argument("--batch", type=int, default=16, help="items per valid request (default 16)")
    ap.add_argument("--valid", type=float, default=0.5, help="weight of fresh valid batches (default 0.5)")
    ap.add_argument("--cached", type=float, default=0.2, help="weight of resent batches (default 0.2)")
    ap.add_argument("--hostile", type=float, default=0.25, help="weight of hostile requests (default 0.25)")
    ap.add_argument("--oversized", type=float, default=0.05, help="weight of oversized bodies (default 0.05)")
    ap.add_argument("--workers", type=int, default=2, help="verifier workers of the started server (default 2)")
    ap.add_argument("--max-body-bytes", type=int, default=1024 * 1024,
                    help="the server's body limit (set on the started one; with --url, give the server's)")
    ap.add_argument("--body-timeout-s", type=float, default=5.0, help="the server's body timeout (as above)")
    ap.add_argument("--redis-url", help="verdict cache of the started server (default: its in-process LRU)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the started server, e.g. AEPO_REWARD_MAX_INFLIGHT_REQUESTS=32")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    target = (Target(args.url.rstrip("/"), args.token, args.max_body_bytes, args.body_timeout_s) if args.url
              else start_server(args))
    print(f"target {target.url} ({'started here' if target.proc else 'given'}), {args.clients} clients, "
          f"{args.duration:g} s, mix valid {args.valid} / cached {args.cached} / hostile {args.hostile} / "
          f"oversized {args.oversized}", flush=True)
    shared = Shared(target, hostile_bodies(target))
    try:
        elapsed, rss = asyncio.run(drive(shared, args))
        crashed = not alive(target)
        summary = summarize(shared.records, elapsed, crashed, rss, server_rejections(target))
    finally:
        if target.proc is not None:
            target.proc.terminate()
            target.proc.wait(timeout=60)
    print_table(summary, args)
    print(json.dumps(summary, sort_keys=True))
    return 1 if summary["server_crashed"] or summary["5xx"] else 0


if __name__ == "__main__":
    sys.exit(main())
