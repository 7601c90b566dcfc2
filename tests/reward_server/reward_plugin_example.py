"""A user verifier loaded through AEPO_REWARD_PLUGINS (see test_reward_deadlines.py)."""

from reward_server.verifiers import correct, incorrect, register_verifier


def check_reversed(response: str, reference: str):
    """Correct iff the response is the reference spelled backwards (runs in a worker: not inline)."""
    return correct("reversed") if response.strip() == str(reference)[::-1] else incorrect("not reversed")


register_verifier("test-reversed", check_reversed, replace=True, description="test plugin")
