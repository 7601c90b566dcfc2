"""SIGTERM and SIGINT to the driver: finish the step in flight, checkpoint, exit cleanly.

A preempted node (Kubernetes, Slurm, a spot instance) sends SIGTERM and waits a grace period;
Ctrl-C sends SIGINT. Either sets a flag that the training loop reads after every step: it
writes a checkpoint there and raises `Interrupted`, which the CLI turns into a message and the
conventional exit code (128 + the signal). A second signal is not caught: the process ends at
once, and the run resumes from its last checkpoint instead.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()
_signal: list[int] = []


class Interrupted(Exception):
    """The run stopped on a signal after checkpointing; resume it with --resume."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def install() -> None:
    """Catch SIGTERM and SIGINT (main thread only, as Python requires)."""
    _requested.clear()
    _signal.clear()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handler)


def _handler(signum, frame) -> None:
    _signal.append(signum)
    _requested.set()
    signal.signal(signum, signal.SIG_DFL)  # the second one ends the process
    print(f"\n{signal.Signals(signum).name}: finishing this step, then checkpointing and exiting "
          "(send it again to stop at once)", flush=True)


def request(signum: int = signal.SIGTERM) -> None:
    """As if `signum` had arrived (tests; a supervisor thread)."""
    _signal.append(signum)
    _requested.set()


def requested() -> int | None:
    """The signal that asked the run to stop, or None."""
    return _signal[0] if _requested.is_set() and _signal else None


def reset() -> None:
    _requested.clear()
    _signal.clear()
