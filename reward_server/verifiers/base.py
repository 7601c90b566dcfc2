"""Verdicts, the verifier record and the registry the `task` field picks from."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

OUTCOMES = ("correct", "incorrect", "unparsable", "timeout", "error")


@dataclass(frozen=True)
class Verdict:
    """What a verifier decided about one response (picklable: it crosses the worker pipe)."""

    outcome: str
    detail: str

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")


def reward_of(outcome: str) -> int:
    """The reward an outcome earns: 1 for `correct`, 0 for everything else (the one place this is said)."""
    return 1 if outcome == "correct" else 0


def correct(detail: str) -> Verdict:
    """A `correct` verdict."""
    return Verdict("correct", detail)


def incorrect(detail: str) -> Verdict:
    """An `incorrect` verdict."""
    return Verdict("incorrect", detail)


def unparsable(detail: str) -> Verdict:
    """An `unparsable` verdict: no final answer could be read."""
    return Verdict("unparsable", detail)


def error(detail: str) -> Verdict:
    """An `error` verdict: the item (usually its reference) could not be checked."""
    return Verdict("error", detail)


VerifyFn = Callable[[str, Any], Verdict]
FastPathFn = Callable[[str, Any], "Verdict | None"]


@dataclass(frozen=True)
class Verifier:
    """A named check of a response against a reference.

    `verify(response, reference)` runs in a worker process unless `inline` is True; it must
    then be a module-level function (the pool pickles it by reference). `inline=True` is only
    for checks with provably bounded cost on bounded input (no sympy, no unbounded loops):
    they run in the server process, which has no way to interrupt them. `fast_path`, if set,
    is such a bounded inline pre-check that may decide an item (return a Verdict) or defer
    to `verify` (return None). Bump `version` whenever a verdict could change: it is part of
    the cache key.
    """

    name: str
    verify: VerifyFn
    version: str = "1"
    inline: bool = False
    fast_path: FastPathFn | None = None
    description: str = ""


_REGISTRY: dict[str, Verifier] = {}
_LOCK = threading.Lock()
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def register_verifier(
    name: str,
    verify: VerifyFn,
    *,
    version: str = "1",
    inline: bool = False,
    fast_path: FastPathFn | None = None,
    description: str = "",
    replace: bool = False,
) -> Verifier:
    """Add a verifier under `name` (lower-case); a second registration needs `replace=True`."""
    if not _NAME_RE.match(name):
        raise ValueError(f"verifier name {name!r} must match {_NAME_RE.pattern}")
    verifier = Verifier(name, verify, version, inline, fast_path, description)
    with _LOCK:
        if name in _REGISTRY and not replace and _REGISTRY[name] != verifier:
            raise ValueError(f"verifier {name!r} is already registered (pass replace=True to override)")
        _REGISTRY[name] = verifier
    return verifier


def unregister_verifier(name: str) -> None:
    """Remove `name` from the registry (no error if absent)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def get_verifier(name: str) -> Verifier | None:
    """The verifier registered under `name`, or None."""
    return _REGISTRY.get(name)


def known_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def run_verifier(verify: VerifyFn, response: str, reference: Any) -> Verdict:
    """Call `verify` and turn any exception into an `error` verdict (one item never fails a batch)."""
    try:
        verdict = verify(response, reference)
    except MemoryError:
        return error("verifier ran out of memory")
    except RecursionError:
        return error("verifier hit the recursion limit (input nested too deeply)")
    except Exception as exc:  # noqa: BLE001 - the verdict carries the reason
        return error(f"verifier raised {type(exc).__name__}: {str(exc)[:300]}")
    if not isinstance(verdict, Verdict):
        return error(f"verifier returned {type(verdict).__name__}, not a Verdict")
    return verdict
