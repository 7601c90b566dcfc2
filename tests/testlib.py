"""Small helpers shared by the test suites (importable because tests/ is on pytest's sys.path)."""

from __future__ import annotations



def wait_for_http(url: str, proc, what: str, timeout_s: float = 60.0, interval_s: float = 0.2) -> None:
    """Poll `url` until it answers 2xx; fail the test if `proc` exits or the deadline passes."""
    import time
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start (exit code {proc.poll()})")
            time.sleep(interval_s)


def prompts_of(batch) -> list[list[int]]:
    """Each row's prompt ids, read back from a padded `TrainBatch`."""
    from services.learner.batch import prompt_lengths

    plen = prompt_lengths(batch.attention_mask, batch.response_mask).tolist()
    return [row[:n] for row, n in zip(batch.tokens.tolist(), plen)]


def responses_of(batch) -> list[list[int]]:
    """Each row's response ids, read back from a padded `TrainBatch`."""
    return [[t for t, m in zip(row, mask) if m] for row, mask in zip(batch.tokens.tolist(), batch.response_mask.tolist())]
