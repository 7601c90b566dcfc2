"""A verifier that holds its item until a file exists: requests stay in flight exactly as long as a test wants.

Loaded through AEPO_REWARD_PLUGINS='["reward_plugin_gate"]'; runs in the worker pool (not inline), so
a stuck item is killed with its worker like any other. The item's `reference` is the gate file's path.
"""

import time
from pathlib import Path

from reward_server.verifiers import correct, incorrect, register_verifier

_GIVE_UP_S = 120.0  # a test that forgot to open its gate must not leave a worker busy forever


def wait_for_gate(response: str, reference: str):
    """Correct once the file named by `reference` exists."""
    end = time.monotonic() + _GIVE_UP_S
    while not Path(str(reference)).exists():
        if time.monotonic() > end:
            return incorrect("the gate never opened")
        time.sleep(0.01)
    return correct("gate opened")


register_verifier("test-gate", wait_for_gate, replace=True, description="test plugin: waits for a file")
