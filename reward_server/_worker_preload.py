"""Imported once by the forkserver that forks verifier workers (see pool.py).

Importing sympy/math-verify and running one verification of each common answer shape here
(the first call of many sympy paths costs 0.1-0.6 s: lazy imports, caches) means every worker,
including one that replaces a killed worker, is forked warm, in milliseconds.
"""

import logging

# math-verify warns once per process that its signal timeout is off; the pool is the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)

from reward_server.verifiers.math_task import verify_math  # noqa: E402

_WARM_UP = [
    ("\\boxed{\\frac{4}{2}}", "2"),  # fraction vs integer (DAPO)
    ("Answer: 2.5", "\\frac{5}{2}"),  # decimal vs fraction
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),  # radicals
    ("\\boxed{[1, 2)}", "[1,2)"),  # intervals
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}"),  # sets
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # tuples, pi
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),  # polynomials (simplify)
    ("\\boxed{x = 5}", "5"),  # equations
    ("\\boxed{10\\%}", "10"),  # percent
    ("\\boxed{\\text{(C)}}", "C"),  # text answers
]
for _response, _reference in _WARM_UP:
    verify_math(_response, _reference)

# Move everything imported so far out of the garbage collector's reach: otherwise the first
# collections in each forked worker walk (and copy-on-write) the whole sympy heap, ~0.4 s.
import gc  # noqa: E402

gc.freeze()
