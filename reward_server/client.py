"""A small async client for the reward server that outlasts a server restart.

Per-item `timeout`/`error` outcomes arrive as reward 0 and are counted in `counts`: they never
raise. What is retried, with jittered exponential backoff, until the overall deadline
(`timeout_s`, default 600 s or $AEPO_REWARD_CLIENT_TIMEOUT_S, long enough for a replica to be
restarted): connection errors, 408, 429 and 502/503/504, waiting at least the server's
Retry-After. Other 5xx are retried a few times only (a server bug would answer the same
again). Other 4xx (401, 413, 422, ...) are not retried: they raise RewardRequestError with the
server's reason. A server that gives no usable answer by the deadline raises
RewardServerUnavailable naming the last error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import httpx

from reward_server.schemas import VerifyItem, VerifyResponse, VerifyResult

log = logging.getLogger("aepo.reward.client")
DEFAULT_TIMEOUT_S = 600.0
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0  # a broken or hostile server must not park the client for hours
MAX_SERVER_ERRORS = 3  # attempts answered by another 5xx (or by mismatched results) before giving up


class RewardServerUnavailable(RuntimeError):
    """The server did not answer successfully before the client's deadline."""


class RewardRequestError(RuntimeError):
    """The server rejected the request (4xx other than 408/429): retrying would not help."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"reward server rejected the request ({status_code}): {detail}")
        self.status_code = status_code
        self.detail = detail


class _Retry(Exception):
    """An answer worth another try, after at least `after_s` seconds."""

    def __init__(self, message: str, after_s: float = 0.0, server_error: bool = False) -> None:
        super().__init__(message)
        self.after_s = after_s
        self.server_error = server_error


def _default_timeout_s() -> float:
    raw = os.environ.get("AEPO_REWARD_CLIENT_TIMEOUT_S")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        log.warning("AEPO_REWARD_CLIENT_TIMEOUT_S=%r is not a number; using %gs", raw, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S


def _retry_after(response: httpx.Response) -> float:
    """The Retry-After header in seconds (0 if absent or an HTTP date: backoff applies then)."""
    try:
        return min(max(float(response.headers.get("retry-after", "0")), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0


def _reason(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text[:500]


class RewardClient:
    """`await client.verify(items)` or `client.verify_sync(items)` -> list[VerifyResult] in item order."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float | None = None,
        item_timeout_s: float | None = None,
        max_batch_items: int = 2048,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        attempt_timeout_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s if timeout_s is not None else _default_timeout_s()
        self.item_timeout_s = item_timeout_s
        self.max_batch_items = max_batch_items
        # One attempt may take the request's deadline plus the server's warm-up wait; a hung
        # server must not eat the whole overall deadline in one attempt.
        self.attempt_timeout_s = attempt_timeout_s or (item_timeout_s or 300.0) + 60.0
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._transport = transport  # tests may inject an httpx transport here
        self.counts: Counter[str] = Counter()  # outcomes seen so far, e.g. counts["timeout"]
        self.retries: Counter[str] = Counter()  # retried answers by cause, e.g. retries["429"], retries["ConnectError"]
        self._ssl: ssl.SSLContext | None = None

    async def verify(self, items: Iterable[VerifyItem | Mapping[str, Any]], timeout_s: float | None = None) -> list[VerifyResult]:
        """Verdicts for `items` (batches over max_batch_items are split and sent concurrently)."""
        payload = [i.model_dump(exclude_none=True) if isinstance(i, VerifyItem) else dict(i) for i in items]
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        chunks = [payload[i : i + self.max_batch_items] for i in range(0, len(payload), self.max_batch_items)]
        if self._ssl is None:  # built once: a fresh client would load the CA bundle again (~7 ms a call)
            self._ssl = ssl.create_default_context()
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, transport=self._transport, verify=self._ssl
        ) as http:
            parts = await asyncio.gather(*(self._post(http, chunk, deadline) for chunk in chunks))
        results = [r for part in parts for r in part]
        self.counts.update(r.outcome for r in results)
        bad = sum(r.outcome in ("timeout", "error") for r in results)
        if bad:
            log.warning("%d of %d items scored 0 for timeout/error (totals: %s)", bad, len(results), dict(self.counts))
        return results

    def verify_sync(self, items: Iterable[VerifyItem | Mapping[str, Any]], timeout_s: float | None = None) -> list[VerifyResult]:
        """Blocking `verify`; works inside a running event loop too (uses a helper thread there)."""
        items = list(items)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.verify(items, timeout_s))
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.verify(items, timeout_s)).result()

    async def _post(self, http: httpx.AsyncClient, chunk: list[dict], deadline: float) -> list[VerifyResult]:
        body: dict[str, Any] = {"items": chunk}
        if self.item_timeout_s is not None:
            body["timeout_s"] = self.item_timeout_s
        attempts, server_errors, since = 0, 0, time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RewardServerUnavailable(
                    f"reward server at {self.base_url} gave no usable answer within the client's deadline "
                    f"({attempts} attempt(s) over {time.monotonic() - since:.0f}s)")
            attempts += 1
            try:
                response = await http.post("/v1/verify", json=body, timeout=min(remaining, self.attempt_timeout_s))
                return self._parse(response, chunk)
            except (httpx.TransportError, _Retry) as exc:
                cause = str(exc.args[0]).split(":")[0] if isinstance(exc, _Retry) else type(exc).__name__
                self.retries[cause] += 1
                server_errors += isinstance(exc, _Retry) and exc.server_error
                if server_errors >= MAX_SERVER_ERRORS:
                    raise RewardServerUnavailable(
                        f"reward server at {self.base_url} failed {server_errors} times: {exc}") from exc
                wait = self._backoff(attempts, exc.after_s if isinstance(exc, _Retry) else 0.0)
                if wait >= deadline - time.monotonic():
                    raise RewardServerUnavailable(
                        f"reward server at {self.base_url} gave no usable answer within the client's deadline "
                        f"({attempts} attempt(s) over {time.monotonic() - since:.0f}s); last error: {exc!r}"
                    ) from exc
                if attempts == 1 or attempts % 10 == 0:
                    log.warning("reward server at %s: %r; retrying (attempt %d, %.0fs left of the client's deadline)",
                                self.base_url, exc, attempts, deadline - time.monotonic())
                await asyncio.sleep(wait)

    def _backoff(self, attempts: int, retry_after_s: float) -> float:
        """Exponential backoff with jitter (trainers must not retry in lockstep), at least Retry-After."""
        step = min(self.retry_initial_s * 2 ** (attempts - 1), self.retry_max_s)
        return max(step + random.uniform(0, self.retry_initial_s), retry_after_s)

    @staticmethod
    def _parse(response: httpx.Response, chunk: list[dict]) -> list[VerifyResult]:
        code = response.status_code
        if code in RETRY_STATUSES:
            raise _Retry(f"HTTP {code}: {_reason(response)}", after_s=_retry_after(response))
        if code >= 500:
            raise _Retry(f"HTTP {code}: {_reason(response)}", after_s=_retry_after(response), server_error=True)
        if code != 200:
            raise RewardRequestError(code, _reason(response))
        results = VerifyResponse.model_validate_json(response.content).results
        if [r.id for r in results] != [str(item.get("id")) for item in chunk]:
            raise _Retry("mismatch: server returned results that do not match the request's items", server_error=True)
        return results

    async def ready(self) -> bool:
        """True if GET /readyz answers 200 now."""
        try:
            async with httpx.AsyncClient(base_url=self.base_url, transport=self._transport) as http:
                return (await http.get("/readyz", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False
