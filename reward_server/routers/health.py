"""GET /healthz (alive), /readyz (verifier workers up), /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reward_server.deps import MetricsDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict:
    """200 while the process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses={503: {"description": "Workers not up yet, or draining"}})
async def readyz(request: Request) -> JSONResponse:
    """200 once verifier worker processes answer, else 503 (also while draining); lists the workers' PIDs."""
    service = getattr(request.app.state, "service", None)
    admission = request.app.state.admission
    pids = (service.pool.worker_pids() or []) if service is not None else []
    ready = bool(service is not None and service.ready and not admission.draining)
    status = "ready" if ready else ("draining" if admission.draining else "starting")
    body = {
        "status": status,
        "workers": len(pids),
        "worker_pids": pids,
        "cache": service.cache.backend if service is not None else None,
        "cache_ok": service.cache.healthy if service is not None else None,
        "inflight": {"requests": admission.requests, "items": admission.items, "body_bytes": admission.bytes},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    """aepo_reward_* metrics in the Prometheus text format."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
