"""Verifier registry. Built-ins: `math`, `countdown`, `numeric`, `exact`.

Add your own with `register_verifier("mytask", my_module.check)` in a module listed in
AEPO_REWARD_PLUGINS (imported by the server and by every worker process).
"""

from reward_server.verifiers.base import (
    Verdict,
    Verifier,
    correct,
    error,
    get_verifier,
    incorrect,
    known_tasks,
    register_verifier,
    run_verifier,
    unparsable,
    unregister_verifier,
)
from reward_server.verifiers.countdown import VERSION as _COUNTDOWN_VERSION
from reward_server.verifiers.countdown import verify_countdown
from reward_server.verifiers.math_task import VERSION as _MATH_VERSION
from reward_server.verifiers.math_task import math_fast_path, verify_math
from reward_server.verifiers.simple import EXACT_VERSION, NUMERIC_VERSION, verify_exact, verify_numeric

register_verifier(
    "math",
    verify_math,
    version=_MATH_VERSION,
    fast_path=math_fast_path,
    description="final \\boxed{} / 'Answer:' line vs reference, equivalence by math-verify (worker pool)",
)
register_verifier(
    "countdown",
    verify_countdown,
    version=_COUNTDOWN_VERSION,
    inline=True,
    description="expression or 'a op b=c' steps over {numbers, target, use_all}, exact arithmetic",
)
register_verifier("numeric", verify_numeric, version=NUMERIC_VERSION, inline=True, description="number within tolerance")
register_verifier("exact", verify_exact, version=EXACT_VERSION, inline=True, description="normalised string equality")

__all__ = [
    "Verdict",
    "Verifier",
    "correct",
    "error",
    "get_verifier",
    "incorrect",
    "known_tasks",
    "register_verifier",
    "run_verifier",
    "unparsable",
    "unregister_verifier",
]
