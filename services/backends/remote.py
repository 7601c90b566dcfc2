"""Waiting on Ray actors with a deadline, and telling a dead actor from a bug.

`wait_all` is how the driver waits on a role: it returns every result, in order, or raises as
soon as it knows the role cannot answer: `RoleFailure` when an actor died (killed, OOM, node
lost), `RoleTimeout` when the deadline passed. An exception *raised by the code* on a live actor
is a bug or bad input, not a failure to recover from, and propagates as it is, unless one of the
other actors turns out to be dead (a survivor of a dead peer sees its collective fail first).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from services.contracts import RoleFailure, RoleTimeout

# how long, after one task raised, the other tasks get to show whether a peer died
PEER_GRACE_S = 5.0


def wait_all(refs: Sequence[Any], timeout_s: float, role: str, what: str) -> list[Any]:
    """`ray.get(refs)` with a deadline, returning on the first dead actor instead of hanging on
    its peers (a learner rank blocked in a collective with a dead one never answers)."""
    import ray

    refs = list(refs)
    done: dict[int, Any] = {}
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RoleTimeout(role, f"{what}: {len(pending)} of {len(refs)} calls unanswered after {timeout_s:g} s")
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 10.0))
        for ref in ready:
            done[index[ref]] = _get_one(ref, pending, role, what)
    return [done[i] for i in range(len(refs))]


def _get_one(ref, others: list, role: str, what: str) -> Any:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        raise RoleFailure(role, f"{what}: an actor died ({_first_line(exc)})") from exc
    except ray.exceptions.RayTaskError as exc:
        dead = _dead_peer(others)
        if dead is not None:
            raise RoleFailure(role, f"{what}: an actor died ({dead}); a peer then failed with {_first_line(exc)}") from exc
        if isinstance(getattr(exc, "cause", None), RoleFailure):  # e.g. a controller that lost its state
            raise exc.cause from None
        raise exc.as_instanceof_cause() from None


def _dead_peer(others: list) -> str | None:
    """The first of `others` that resolves to a dead actor within PEER_GRACE_S, described."""
    import ray

    if not others:
        return None
    ready, _ = ray.wait(others, num_returns=len(others), timeout=PEER_GRACE_S)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            return _first_line(exc)
        except Exception:  # noqa: BLE001 - another peer's own error: keep looking for a death
            continue
    return None


def get_one(ref, timeout_s: float, role: str, what: str) -> Any:
    """One call's result with a deadline (`wait_all` of one)."""
    return wait_all([ref], timeout_s, role, what)[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
