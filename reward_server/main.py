"""The reward server's FastAPI app factory and the `aepo serve-reward` entry point."""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from reward_server.metrics import RewardMetrics
from reward_server.routers import health, verify
from reward_server.service import VerifyService
from reward_server.settings import RewardSettings

log = logging.getLogger("aepo.reward")
VERIFY_PATH = "/v1/verify"


class GuardMiddleware:
    """Pure ASGI: request-body size limit (413) for every request; counts and times /v1/verify.

    Pure ASGI rather than BaseHTTPMiddleware so the body is limited while it streams in
    (a chunked upload without Content-Length cannot get past the limit either).
    """

    def __init__(self, app, max_body_bytes: int, metrics: RewardMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = f"request body over {limit} bytes (AEPO_REWARD_MAX_BODY_BYTES); split the batch"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._respond(scope, send, 413, too_large)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # FastAPI re-raises HTTPExceptions from body reading; its handler answers 413.
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, too_large)
            return message

        if scope.get("path") != VERIFY_PATH:
            await self.app(scope, limited_receive, send)
            return
        code = 500

        async def recording_send(message):
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        t0 = time.monotonic()
        self.metrics.inflight.inc()
        try:
            await self.app(scope, limited_receive, recording_send)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(str(code)).inc()
            self.metrics.request_seconds.observe(time.monotonic() - t0)

    async def _respond(self, scope, send, code: int, detail: str) -> None:
        if scope.get("path") == VERIFY_PATH:
            self.metrics.requests.labels(str(code)).inc()
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing each problem as `where: what`, without echoing (possibly huge) inputs back."""
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()[:50]
    ]
    summary = "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors[:10])
    return JSONResponse({"detail": errors, "message": f"invalid request: {summary}"}, status_code=422)


def create_app(settings: RewardSettings | None = None) -> FastAPI:
    """A reward-server app. Settings default to the environment (AEPO_REWARD_*, REDIS_URL).

    The verifier workers start in the app's lifespan (uvicorn, Ray Serve and `with TestClient(app)`
    all run it); GET /readyz turns 200 once they answer.
    """
    settings = settings or RewardSettings()
    metrics = RewardMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = VerifyService(settings, metrics)
        await service.start()
        app.state.service = service
        try:
            yield
        finally:
            app.state.service = None
            await service.close()

    app = FastAPI(
        title="aepo reward server",
        version="1.0.0",
        summary="Verifies model responses (math, countdown, numeric, exact) for RL and evaluation.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    app.include_router(verify.router)
    app.include_router(health.router)
    return app


def serve_main(args: argparse.Namespace) -> int:
    """`aepo serve-reward`: this app under uvicorn (flags override the environment)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides: dict = {"workers": args.workers}
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    if args.timeout_s is not None:
        overrides["default_timeout_s"] = args.timeout_s
    settings = RewardSettings(**overrides)
    log.info("reward server on http://%s:%d (%d verifier workers, cache: %s)", args.host, args.port,
             settings.workers, "redis" if settings.redis_url else "lru")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
