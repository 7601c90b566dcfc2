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


def start_redis(port: int, workdir):
    """A real redis-server on 127.0.0.1:`port`, answering when this returns."""
    import shutil
    import socket
    import subprocess
    import time

    import pytest

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `bash scripts/setup.sh --test` (it installs it with apt-get)")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
    return proc
