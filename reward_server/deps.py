"""FastAPI dependencies: the app's settings, service, metrics, and the bearer-token check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from reward_server.metrics import RewardMetrics
from reward_server.service import VerifyService
from reward_server.settings import RewardSettings

_bearer = HTTPBearer(auto_error=False, description="AEPO_REWARD_TOKEN, when the server sets one.")


def get_settings(request: Request) -> RewardSettings:
    """This app's settings."""
    return request.app.state.settings


def get_service(request: Request) -> VerifyService:
    """This app's verification service (created by the lifespan)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "reward server is starting or stopping")
    return service


def get_metrics(request: Request) -> RewardMetrics:
    """This app's metrics."""
    return request.app.state.metrics


SettingsDep = Annotated[RewardSettings, Depends(get_settings)]
ServiceDep = Annotated[VerifyService, Depends(get_service)]
MetricsDep = Annotated[RewardMetrics, Depends(get_metrics)]


def require_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless the server has no token or the request sends `Authorization: Bearer <token>`."""
    if settings.token is None:
        return
    expected = settings.token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not secrets.compare_digest(given, expected):
        reason = "missing bearer token" if credentials is None else "wrong bearer token"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"{reason}: send 'Authorization: Bearer <token>' with the server's AEPO_REWARD_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )
