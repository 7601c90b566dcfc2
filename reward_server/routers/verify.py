"""POST /v1/verify and GET /v1/tasks."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from reward_server.deps import AdmissionDep, ServiceDep, require_token
from reward_server.limits import check_limits
from reward_server.schemas import VerifyRequest, VerifyResponse
from reward_server.service import VerifyService
from reward_server.verifiers import get_verifier, known_tasks

router = APIRouter(prefix="/v1", tags=["verify"])

_RETRY = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


async def _wait_for_workers(service: VerifyService, admission) -> None:
    """Hold an admitted request while the verifier workers start (up to start_wait_s), else 503.

    Without this, items sent to a pool that is still starting would run into their per-item
    limit and score 0 as `timeout` although nothing was wrong with them.
    """
    if service.ready:
        return
    try:
        await service.pool.wait_ready(admission.settings.start_wait_s)
    except TimeoutError:
        raise admission.reject(
            503, "starting", f"verifier workers not up after {admission.settings.start_wait_s:g}s "
            "(AEPO_REWARD_START_WAIT_S); retry", retry=True,
        ) from None


@router.post(
    "/verify",
    dependencies=[Depends(require_token)],
    summary="Verify a batch of responses",
    responses={
        400: {"description": "Malformed body (bad Content-Length, unparsable numbers)"},
        401: {"description": "Missing or wrong bearer token (checked before the body is read)"},
        408: {"description": "The body did not arrive within AEPO_REWARD_BODY_TIMEOUT_S"},
        413: {"description": "Too many items, a field too large (response, reference, metadata), or a body too large"},
        422: {"description": "Malformed JSON, wrong types, or timeout_s over the limit"},
        429: {"description": "Server busy: too many requests, body bytes or items in flight", "headers": _RETRY},
        503: {"description": "Starting or draining", "headers": _RETRY},
    },
)
async def verify(body: VerifyRequest, service: ServiceDep, admission: AdmissionDep) -> VerifyResponse:
    """Verdicts for every item, in request order. A bad item gets outcome `error`; it never fails the batch."""
    timeout_s = check_limits(body, admission)
    with admission.hold_items(len(body.items)):
        await _wait_for_workers(service, admission)
        # the deadline runs from when verification can start (arrival, or the workers' warm-up)
        t0 = time.monotonic()
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
