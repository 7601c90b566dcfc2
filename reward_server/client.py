"""A small async client for the reward server, with retries, backoff and an overall deadline.

Per-item `timeout`/`error` outcomes arrive as reward 0 and are counted in `counts`: they never
raise. Only a server that stays unreachable (or keeps answering 5xx) past the deadline raises
RewardServerUnavailable; a request the server rejects (401/413/422) raises RewardRequestError.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from reward_server.schemas import VerifyItem, VerifyResponse, VerifyResult

log = logging.getLogger("aepo.reward.client")


class RewardServerUnavailable(RuntimeError):
    """The server did not answer successfully before the client's deadline."""


class RewardRequestError(RuntimeError):
    """The server rejected the request (4xx): retrying would not help."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"reward server rejected the request ({status_code}): {detail}")
        self.status_code = status_code
        self.detail = detail


class _Retryable(Exception):
    """A 5xx or 429 answer: worth another try."""


class RewardClient:
    """`await client.verify(items)` or `client.verify_sync(items)` -> list[VerifyResult] in item order."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 120.0,
        item_timeout_s: float | None = None,
        max_batch_items: int = 2048,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.item_timeout_s = item_timeout_s
        self.max_batch_items = max_batch_items
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        # exponential backoff with jitter, so many trainers do not retry in lockstep
        self._wait = wait_exponential(multiplier=retry_initial_s, max=retry_max_s) + wait_random(0, retry_initial_s)
        self._transport = transport  # tests inject httpx.MockTransport here
        self.counts: Counter[str] = Counter()  # outcomes seen so far, e.g. counts["timeout"]
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
        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(max(deadline - time.monotonic(), 0)),
                wait=self._wait,
                retry=retry_if_exception_type((httpx.TransportError, _Retryable)),
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise httpx.TimeoutException("client deadline passed")
                    response = await http.post("/v1/verify", json=body, timeout=remaining)
                    return self._parse(response, chunk)
        except (httpx.TransportError, _Retryable) as exc:
            raise RewardServerUnavailable(
                f"reward server at {self.base_url} gave no usable answer within the client's deadline "
                f"({attempts} attempt(s)); last error: {exc!r}"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _parse(response: httpx.Response, chunk: list[dict]) -> list[VerifyResult]:
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code != 200:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            raise RewardRequestError(response.status_code, detail)
        results = VerifyResponse.model_validate_json(response.content).results
        if [r.id for r in results] != [str(item.get("id")) for item in chunk]:
            raise _Retryable("server returned results that do not match the request's items")
        return results

    async def ready(self) -> bool:
        """True if GET /readyz answers 200 now."""
        try:
            async with httpx.AsyncClient(base_url=self.base_url, transport=self._transport) as http:
                return (await http.get("/readyz", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False
