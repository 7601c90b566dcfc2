"""The reward server's FastAPI app factory and the `aepo serve-reward` entry point."""

from __future__ import annotations

import argparse
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from reward_server.admission import Admission, AdmissionMiddleware, Rejection, rejection_handler
from reward_server.metrics import RewardMetrics
from reward_server.routers import health, verify
from reward_server.service import VerifyService
from reward_server.settings import RewardSettings

log = logging.getLogger("aepo.reward")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing each problem as `where: what`, without echoing (possibly huge) inputs back."""
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()[:50]
    ]
    summary = "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors[:10])
    request.app.state.metrics.rejected.labels("invalid").inc()
    return JSONResponse({"detail": errors, "reason": "invalid", "message": f"invalid request: {summary}"},
                        status_code=422)


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
    app.state.admission = admission = Admission(settings, metrics)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Rejection, rejection_handler)
    app.add_middleware(
        AdmissionMiddleware, admission=admission, is_started=lambda: getattr(app.state, "service", None) is not None
    )
    app.include_router(verify.router)
    app.include_router(health.router)
    return app


def serve_main(args: argparse.Namespace) -> int:
    """`aepo serve-reward`: this app under uvicorn, draining on SIGTERM (flags override the environment)."""
    from reward_server.serving import serve

    return serve(args)
