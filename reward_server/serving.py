"""`aepo serve-reward`: the app under uvicorn; no public bind without a token; a graceful drain on SIGTERM.

Drain: the first SIGTERM or SIGINT does not stop uvicorn at once. The server keeps its socket
open and answers new POST /v1/verify with 503 + Retry-After (and /readyz with 503 `draining`,
so a load balancer takes it out), lets the requests in flight finish for up to
`drain_timeout_s`, then shuts down and exits 0. Clients (reward_server.client) retry a 503 and a
refused connection alike, so a restart costs them a pause, never a failed training step. A
second signal stops at once (uvicorn's own handling).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn

from reward_server.admission import Admission
from reward_server.auth import token_required_problem
from reward_server.main import create_app
from reward_server.settings import RewardSettings

log = logging.getLogger("aepo.reward")
_SHORT_TOKEN = 16


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains (503 to new work, finish the rest) before it exits 0."""

    def __init__(self, config: uvicorn.Config, admission: Admission) -> None:
        super().__init__(config)
        self.admission = admission
        self._signalled: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs inside a signal handler: only set a flag. Logging and metrics take locks the
        # interrupted code may hold; on_tick does that work on the event loop.
        if self._signalled is None and not self.should_exit:
            self._signalled = sig
            return
        super().handle_exit(sig, frame)  # second signal: stop now

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s (uvicorn's main loop): start the drain after a signal, end it when idle or timed out."""
        if self._signalled is not None and not self.should_exit:
            adm = self.admission
            if not adm.draining:
                log.warning("%s received", signal.Signals(self._signalled).name)
                adm.begin_drain()
            waited = time.monotonic() - (adm.drain_started or time.monotonic())
            if adm.requests == 0:
                log.warning("drained after %.1fs: no request in flight; stopping", waited)
                self.should_exit = True
            elif waited >= adm.settings.drain_timeout_s:
                log.error("drain timeout (%gs, AEPO_REWARD_DRAIN_TIMEOUT_S) with %d request(s) still in flight; "
                          "stopping anyway", adm.settings.drain_timeout_s, adm.requests)
                self.should_exit = True
        return await super().on_tick(counter)


def settings_from_args(args: argparse.Namespace) -> RewardSettings:
    """RewardSettings from the environment, overridden by the CLI's flags (those it has)."""
    overrides: dict = {"workers": args.workers}
    if getattr(args, "redis_url", None):
        overrides["redis_url"] = args.redis_url
    if getattr(args, "timeout_s", None) is not None:
        overrides["default_timeout_s"] = args.timeout_s
    # Flags the CLI may grow (services/cli); read defensively so either side can change first.
    if getattr(args, "drain_timeout_s", None) is not None:
        overrides["drain_timeout_s"] = args.drain_timeout_s
    if getattr(args, "token_file", None):
        overrides["token"] = Path(args.token_file).read_text().strip()
    return RewardSettings(**overrides)


def serve(args: argparse.Namespace) -> int:
    """Run the server until a signal drains it; 0 after a clean drain, 2 if refused to start."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings_from_args(args)
    problem = token_required_problem(args.host, settings.token)
    if problem:
        log.error(problem)
        print(f"aepo serve-reward: {problem}", file=sys.stderr)
        return 2
    if settings.token is not None and len(settings.token.get_secret_value()) < _SHORT_TOKEN:
        log.warning("AEPO_REWARD_TOKEN is shorter than %d characters: easy to guess", _SHORT_TOKEN)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        # the drain already waited for requests; this only bounds the last goodbyes
        timeout_graceful_shutdown=1, limit_concurrency=settings.max_connections,
    )
    log.info("reward server on http://%s:%d (%d verifier workers, cache: %s, token: %s)", args.host, args.port,
             settings.workers, "redis" if settings.redis_url else "lru", "required" if settings.token else "none")
    server = DrainingServer(config, app.state.admission)
    server.run()
    return 0 if server.started else 1
