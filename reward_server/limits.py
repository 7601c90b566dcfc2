"""Per-request and per-field limits of a parsed POST /v1/verify body (413/422 with the reason and the items)."""

from __future__ import annotations

import json
from typing import Any, Callable

from reward_server.admission import Admission
from reward_server.schemas import VerifyItem, VerifyRequest


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _field_checks(admission: Admission) -> list[tuple[Callable[[VerifyItem], bool], str]]:
    """(is this item over?, what the limit is) for each per-field limit."""
    s = admission.settings
    return [
        (lambda it: len(it.response) > s.max_response_chars,
         f"response(s) longer than {s.max_response_chars} characters (AEPO_REWARD_MAX_RESPONSE_CHARS)"),
        # a cheap length bound first: only big references pay for the JSON encoding
        (lambda it: not isinstance(it.reference, (int, float, bool, type(None)))
         and _json_bytes(it.reference) > s.max_reference_bytes,
         f"reference(s) larger than {s.max_reference_bytes} bytes as JSON (AEPO_REWARD_MAX_REFERENCE_BYTES)"),
        (lambda it: it.metadata is not None and len(it.metadata) > s.max_metadata_keys,
         f"metadata with more than {s.max_metadata_keys} keys (AEPO_REWARD_MAX_METADATA_KEYS)"),
        (lambda it: bool(it.metadata) and _json_bytes(it.metadata) > s.max_metadata_bytes,
         f"metadata larger than {s.max_metadata_bytes} bytes as JSON (AEPO_REWARD_MAX_METADATA_BYTES)"),
    ]


def check_limits(body: VerifyRequest, admission: Admission) -> float:
    """The request's deadline in seconds; a Rejection for a request over a configured limit."""
    s = admission.settings
    if len(body.items) > s.max_items:
        raise admission.reject(
            413, "too_large",
            f"too many items: {len(body.items)} in one request, the limit is {s.max_items} "
            "(AEPO_REWARD_MAX_ITEMS); split the batch",
        )
    for over, what in _field_checks(admission):
        bad = [item.id for item in body.items if over(item)]
        if bad:
            shown = ", ".join(repr(i[:40]) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise admission.reject(413, "too_large", f"{len(bad)} {what}: items {shown}")
    timeout_s = body.timeout_s if body.timeout_s is not None else s.default_timeout_s
    if timeout_s > s.max_timeout_s:
        raise admission.reject(
            422, "invalid",
            f"timeout_s={timeout_s} is over this server's limit of {s.max_timeout_s}s (AEPO_REWARD_MAX_TIMEOUT_S)",
        )
    return timeout_s
