"""POST /v1/verify and GET /v1/tasks."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, HTTPException, status

from reward_server.deps import ServiceDep, SettingsDep, require_token
from reward_server.schemas import VerifyRequest, VerifyResponse
from reward_server.settings import RewardSettings
from reward_server.verifiers import get_verifier, known_tasks

router = APIRouter(prefix="/v1", tags=["verify"])


def _check_limits(body: VerifyRequest, settings: RewardSettings) -> float:
    """The request's deadline in seconds; HTTP errors for requests over the configured limits."""
    if len(body.items) > settings.max_items:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"too many items: {len(body.items)} in one request, the limit is {settings.max_items} "
            "(AEPO_REWARD_MAX_ITEMS); split the batch",
        )
    too_long = [item.id for item in body.items if len(item.response) > settings.max_response_chars]
    if too_long:
        shown = ", ".join(repr(i[:40]) for i in too_long[:5]) + (" ..." if len(too_long) > 5 else "")
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(too_long)} response(s) longer than {settings.max_response_chars} characters "
            f"(AEPO_REWARD_MAX_RESPONSE_CHARS): items {shown}",
        )
    timeout_s = body.timeout_s if body.timeout_s is not None else settings.default_timeout_s
    if timeout_s > settings.max_timeout_s:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"timeout_s={timeout_s} is over this server's limit of {settings.max_timeout_s}s (AEPO_REWARD_MAX_TIMEOUT_S)",
        )
    return timeout_s


@router.post(
    "/verify",
    dependencies=[Depends(require_token)],
    summary="Verify a batch of responses",
    responses={
        401: {"description": "Missing or wrong bearer token"},
        413: {"description": "Too many items, a response too long, or a body too large"},
        422: {"description": "Malformed JSON, wrong types, or timeout_s over the limit"},
    },
)
async def verify(body: VerifyRequest, service: ServiceDep, settings: SettingsDep) -> VerifyResponse:
    """Verdicts for every item, in request order. A bad item gets outcome `error`; it never fails the batch."""
    t0 = time.monotonic()
    timeout_s = _check_limits(body, settings)
    return VerifyResponse(results=await service.verify(body.items, timeout_s, t0))


@router.get("/tasks", summary="Registered verifiers")
async def tasks() -> list[dict]:
    """Name, version, where it runs, and a description of each verifier."""
    out = []
    for name in known_tasks():
        v = get_verifier(name)
        if v is not None:
            out.append({"name": name, "version": v.version, "inline": v.inline, "description": v.description})
    return out
