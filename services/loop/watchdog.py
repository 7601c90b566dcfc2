"""The step watchdog: says which role a step is waiting on, while it waits.

Every remote wait has its own timeout (`recovery.*_timeout_s` in the run config), which ends
the wait; those are long (a 7B update takes minutes). The watchdog is what a person watching the
run sees first: once a phase has run `recovery.watchdog_s`, and every interval after, it logs the
step, the role, what it is doing and for how long, so a stuck rollout is not mistaken for a slow
learner.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("aepo")


class Watchdog:
    """A daemon thread that reports the phase in flight once it is overdue."""

    def __init__(self, interval_s: float, report=None) -> None:
        self.interval_s = interval_s
        self.report = report or (lambda msg: log.warning("%s", msg))
        self._phase: tuple[int, str, str, float] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.warnings: list[str] = []
        self._thread = threading.Thread(target=self._run, name="aepo-step-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def phase(self, step: int, role: str, what: str) -> Iterator[None]:
        """The step is waiting on `role` doing `what` for the duration of the block."""
        with self._lock:
            self._phase = (step, role, what, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._phase = None

    def _run(self) -> None:
        warned_for = None
        while not self._stop.wait(min(1.0, self.interval_s / 4)):
            with self._lock:
                phase = self._phase
            if phase is None:
                continue
            step, role, what, since = phase
            waited = time.monotonic() - since
            due = int(waited // self.interval_s)
            if due >= 1 and warned_for != (phase, due):
                warned_for = (phase, due)
                msg = f"step {step}: waiting on the {role} ({what}) for {waited:.0f} s"
                self.warnings.append(msg)
                self.report(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
