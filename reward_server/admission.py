"""Admission control: who gets in, decided before FastAPI parses a byte of the body.

A pure ASGI middleware in front of POST /v1/verify checks, in this order and from the headers
alone: the bearer token (401), a declared Content-Length over the limit (413), the server not
started yet or draining (503 + Retry-After), too many requests or body bytes in flight (429 +
Retry-After). Only then is the body read, here and not by FastAPI: its size is counted as it
streams (413 past the limit, chunked uploads included), a chunked body is charged to the bytes
budget as it arrives (429), and the whole body must arrive within `body_timeout_s` (408), so a
slow sender cannot hold a slot forever. The app then gets the body in one piece.

The item budget (429 when the queue of items is full) is taken by the route, the first place
that knows a request's item count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from reward_server.auth import bearer_problem
from reward_server.metrics import RewardMetrics
from reward_server.settings import RewardSettings

log = logging.getLogger("aepo.reward")
VERIFY_PATH = "/v1/verify"
# nginx's code for "the client closed the connection before the server answered"
CLIENT_GONE = 499


class Rejection(HTTPException):
    """A refused request: HTTP status, a reason code for machines, a reason in words, maybe a Retry-After."""

    def __init__(
        self, status_code: int, reason: str, detail: str, retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = dict(headers or {})
        if retry_after_s is not None:
            headers["Retry-After"] = str(retry_after_s)
        super().__init__(status_code, detail, headers=headers or None)
        self.reason = reason
        self.retry_after_s = retry_after_s

    def payload(self) -> dict[str, Any]:
        """The JSON body: {"detail": why, "reason": code, "retry_after_s": n (429/503 only)}."""
        body: dict[str, Any] = {"detail": self.detail, "reason": self.reason}
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body


async def rejection_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI exception handler: a Rejection raised by a route or dependency, as JSON."""
    assert isinstance(exc, Rejection)
    return JSONResponse(exc.payload(), status_code=exc.status_code, headers=exc.headers)


class Admission:
    """What one app has in flight (requests, body bytes, items), the drain flag, and the 429/503 decisions.

    Only the event loop's thread touches the counters, so they need no lock.
    """

    def __init__(self, settings: RewardSettings, metrics: RewardMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.requests = 0
        self.bytes = 0
        self.items = 0
        self.draining = False
        self.drain_started: float | None = None

    def reject(self, status_code: int, reason: str, detail: str, retry: bool = False,
               headers: dict[str, str] | None = None) -> Rejection:
        """A Rejection to raise, counted in aepo_reward_rejected_total{reason}."""
        self.metrics.rejected.labels(reason).inc()
        return Rejection(status_code, reason, detail, self.settings.retry_after_s if retry else None, headers)

    def begin_drain(self) -> None:
        """Stop admitting: from now on POST /v1/verify gets 503 and /readyz says `draining`."""
        if not self.draining:
            self.draining, self.drain_started = True, time.monotonic()
            self.metrics.draining.set(1)
            log.warning("draining: new requests get 503, waiting for %d in flight (at most %gs)",
                        self.requests, self.settings.drain_timeout_s)

    def check_request(self, declared_bytes: int | None) -> None:
        """Raise 503 while draining, 429 when requests or body bytes in flight are at their limit."""
        s = self.settings
        if self.draining:
            raise self.reject(503, "draining", "reward server is draining before it stops; retry (the restarted "
                              "server or another replica will answer)", retry=True)
        if self.requests >= s.max_inflight_requests:
            raise self.reject(429, "busy", f"server busy: {self.requests} requests in flight, the limit is "
                              f"{s.max_inflight_requests} (AEPO_REWARD_MAX_INFLIGHT_REQUESTS); retry later", retry=True)
        if declared_bytes:
            self.charge_bytes(declared_bytes)

    def charge_bytes(self, n: int) -> None:
        """Hold `n` more body bytes, or raise 429 if that would pass max_inflight_bytes."""
        limit = self.settings.max_inflight_bytes
        if self.bytes + n > limit:
            raise self.reject(429, "busy", f"server busy: {self.bytes} body bytes in flight, the limit is {limit} "
                              "(AEPO_REWARD_MAX_INFLIGHT_BYTES); retry later", retry=True)
        self.bytes += n

    @contextmanager
    def hold_items(self, n: int) -> Iterator[None]:
        """Keep `n` items in the admission queue for the duration, or raise 429 if it is too full."""
        limit = self.settings.max_inflight_items
        if self.items + n > limit:
            raise self.reject(429, "busy", f"server busy: {self.items} items in flight and this request's {n} would "
                              f"pass the limit of {limit} (AEPO_REWARD_MAX_INFLIGHT_ITEMS); retry later", retry=True)
        self.items += n
        self.metrics.inflight_items.set(self.items)
        try:
            yield
        finally:
            self.items -= n
            self.metrics.inflight_items.set(self.items)


def route_of(scope: dict) -> str:
    """The request's path inside the app (a mount's root_path removed, no trailing slash)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


async def send_rejection(send: Callable, exc: Rejection) -> None:
    """Answer `exc` directly on the ASGI channel. `Connection: close`: the body may be unread."""
    body = json.dumps(exc.payload()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    """Pure ASGI: token, size, drain and capacity checks from the headers, then the body read under limits.

    Pure ASGI rather than BaseHTTPMiddleware so nothing reads the body before these checks and
    the size limit holds while the body streams in. Also counts and times POST /v1/verify.
    """

    def __init__(self, app, admission: Admission, is_started: Callable[[], bool]) -> None:
        self.app = app
        self.admission = admission
        self.is_started = is_started

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if route_of(scope) != VERIFY_PATH:
            await self.app(scope, self._capped(receive), send)
            return
        metrics, status = self.admission.metrics, [CLIENT_GONE]

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.monotonic()
        metrics.inflight.inc()
        try:
            await self._verify(scope, receive, recording_send)
        finally:
            metrics.inflight.dec()
            metrics.requests.labels(str(status[0])).inc()
            metrics.request_seconds.observe(time.monotonic() - t0)

    async def _verify(self, scope, receive, send) -> None:
        adm = self.admission
        try:
            declared = self._admit(dict(scope.get("headers") or []))
        except Rejection as exc:
            await send_rejection(send, exc)
            return
        adm.requests += 1
        held = [declared or 0]  # bytes this request holds in the budget

        def charge_chunk(n: int) -> None:  # a chunked body is charged as it arrives
            if declared is None:
                adm.charge_bytes(n)
                held[0] += n

        try:
            try:
                body = await self._read_body(receive, charge_chunk)
            except Rejection as exc:
                await send_rejection(send, exc)
                return
            if body is not None:  # None: the client went away mid-body
                await self.app(scope, _replay(body, receive), send)
        finally:
            adm.requests -= 1
            adm.bytes -= held[0]

    def _admit(self, headers: dict[bytes, bytes]) -> int | None:
        """The declared body size; raises the Rejection the headers alone already call for."""
        adm, s = self.admission, self.admission.settings
        problem = bearer_problem(headers.get(b"authorization"), s.token)
        if problem:
            raise adm.reject(401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"})
        raw = headers.get(b"content-length")
        declared = None
        if raw is not None:
            if not raw.strip().isdigit():
                raise adm.reject(400, "invalid", f"invalid Content-Length header {raw[:40]!r}")
            declared = int(raw)
            if declared > s.max_body_bytes:
                raise adm.reject(413, "too_large", _too_large(s.max_body_bytes))
        if not self.is_started():
            raise adm.reject(503, "starting", "reward server is starting; retry", retry=True)
        adm.check_request(declared)
        return declared

    async def _read_body(self, receive, charge: Callable[[int], None]) -> bytes | None:
        """The whole body, or None if the client disconnected; Rejection past the size or time limit."""
        adm, s = self.admission, self.admission.settings
        chunks, seen, more = [], 0, True
        try:
            async with asyncio.timeout(s.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > s.max_body_bytes:
                        raise adm.reject(413, "too_large", _too_large(s.max_body_bytes))
                    charge(len(chunk))
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            raise adm.reject(408, "body_timeout", f"request body not received within {s.body_timeout_s:g}s "
                             "(AEPO_REWARD_BODY_TIMEOUT_S); send it faster or split the batch") from None
        return b"".join(chunks)

    def _capped(self, receive):
        """Any other route: the body-size limit still holds while it streams (FastAPI answers the 413)."""
        limit, seen = self.admission.settings.max_body_bytes, [0]

        async def capped_receive():
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > limit:
                # FastAPI re-raises HTTPExceptions from body reading; the Rejection handler answers.
                raise Rejection(413, "too_large", _too_large(limit))
            return message

        return capped_receive


def _too_large(limit: int) -> str:
    return f"request body over {limit} bytes (AEPO_REWARD_MAX_BODY_BYTES); split the batch"


def _replay(body: bytes, receive):
    """A receive() that hands the buffered body over once, then listens for the disconnect as usual."""
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
