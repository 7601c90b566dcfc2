"""The `aepo` console script.

Arguments are parsed before anything heavy is imported, so `aepo --help` and every
`aepo <command> --help` answer instantly; each command's implementation is imported lazily
from the "module:function" string it names.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    """One `aepo` subcommand: its name, help, entrypoint (module:function) and argument setup."""

    name: str
    help: str
    target: str  # "package.module:function", called with the parsed argparse.Namespace
    add_arguments: Callable[[argparse.ArgumentParser], None]


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=400, help="RL steps per run (default 400)")
    p.add_argument("--arms", type=int, default=16, help="bandit arms (default 16)")
    p.add_argument("--lr", type=float, default=0.5, help="step size on the logits (default 0.5)")
    p.add_argument("--seed", type=int, default=0)


def _check_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="YAML run configs to validate")


def _serve_reward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=2, help="verifier worker processes (default 2)")
    p.add_argument("--redis-url", default=None, help="verdict cache in Redis (default: $REDIS_URL, else in-process LRU)")
    p.add_argument("--timeout-s", type=float, default=None, help="default per-request deadline, seconds (default 10)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--token-file", default=None,
                   help="read the bearer token from this file (default $AEPO_REWARD_TOKEN); required unless --host is loopback")
    p.add_argument("--drain-timeout-s", type=float, default=None,
                   help="on SIGTERM, seconds to let in-flight requests finish before exiting 0 (default 30)")


def _train_args(p: argparse.ArgumentParser) -> None:
    from services.cli.train import add_arguments  # stdlib-only module: keeps --help instant

    add_arguments(p)


def _eval_args(p: argparse.ArgumentParser) -> None:
    from services.cli.evaluate import add_arguments  # stdlib-only at import: keeps --help instant

    add_arguments(p)


def _plan_args(p: argparse.ArgumentParser) -> None:
    from services.cli.plan import add_arguments  # stdlib-only at import: keeps --help instant

    add_arguments(p)


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="experiment spec (YAML), e.g. deploy/experiments/toy_claims.yaml")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already there")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and which are done), run nothing")
    p.add_argument("--parallel", type=int, help="runs at once (overrides the spec)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


COMMANDS: list[Command] = [
    Command(
        "train",
        "run an RL job (GRPO, AEPO or a baseline) from a YAML config; writes metrics, summary, plot, checkpoints",
        "services.cli.train:main",
        _train_args,
    ),
    Command(
        "eval",
        "avg@n and unbiased pass@k of a checkpoint (e.g. a run's policy/) on a benchmark file, verified by the reward server",
        "services.cli.evaluate:main",
        _eval_args,
    ),
    Command(
        "plan",
        "what each role of a run config needs (CPUs, GPUs, memory), checked against a cluster; refuses what cannot fit",
        "services.cli.plan:main",
        _plan_args,
    ),
    Command(
        "experiment",
        "run a grid of short runs (algorithms x targets x seeds) on the toy and write a report folder",
        "services.experiments.runner:main",
        _experiment_args,
    ),
    Command(
        "demo",
        "AEPO's mechanism on a softmax bandit: positives drawn at T>1 raise entropy, T<1 lower it",
        "services.cli.demo:main",
        _demo_args,
    ),
    Command(
        "check-config",
        "validate run configs (YAML) against the schema and print the resolved config",
        "services.cli.config_file:check_config_main",
        _check_config_args,
    ),
    Command(
        "serve-reward",
        "run the reward server (POST /v1/verify) under uvicorn; limits and token from AEPO_REWARD_* env",
        "reward_server.main:serve_main",
        _serve_reward_args,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aepo",
        description="Ray-native RL for LLM reasoners with AEPO (Arbitrary Entropy Policy Optimization).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_target=cmd.target)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_target", None):
        parser.print_help()
        return 2
    module_name, func_name = args._target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    rc = func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
