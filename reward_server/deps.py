"""FastAPI dependencies: the app's settings, service, metrics, admission, and the bearer-token check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from reward_server.admission import Admission
from reward_server.auth import bearer_problem
from reward_server.metrics import RewardMetrics
from reward_server.service import VerifyService
from reward_server.settings import RewardSettings

_bearer = HTTPBearer(auto_error=False, description="AEPO_REWARD_TOKEN, when the server sets one.")


def get_settings(request: Request) -> RewardSettings:
    """This app's settings."""
    return request.app.state.settings


def get_admission(request: Request) -> Admission:
    """This app's admission control (in-flight counters, drain flag)."""
    return request.app.state.admission


def get_service(request: Request) -> VerifyService:
    """This app's verification service (created by the lifespan)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise get_admission(request).reject(503, "starting", "reward server is starting or stopping; retry", retry=True)
    return service


def get_metrics(request: Request) -> RewardMetrics:
    """This app's metrics."""
    return request.app.state.metrics


SettingsDep = Annotated[RewardSettings, Depends(get_settings)]
ServiceDep = Annotated[VerifyService, Depends(get_service)]
MetricsDep = Annotated[RewardMetrics, Depends(get_metrics)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless the server has no token or the request sends `Authorization: Bearer <token>`.

    The admission middleware already checked this before reading the body; this dependency
    declares the scheme in /openapi.json and keeps the route safe if mounted without it.
    """
    header = request.headers.get("authorization")
    problem = bearer_problem(header.encode("latin-1") if header is not None else None, get_settings(request).token)
    if problem:
        raise get_admission(request).reject(401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"})
