"""`math`: the final answer (last \\boxed{} or `Answer:` line) against the reference, via math-verify.

math-verify (sympy + latex2sympy) can hang or eat memory on hostile answers such as
`9^{9^{9^{9}}}`, and its own timeout uses SIGALRM, which does nothing off the main thread.
So `verify_math` runs only in the worker pool (a pebble ProcessPool that kills a worker past
the deadline), with math-verify's own signal timeouts switched off. Only `math_fast_path`, which
never touches sympy, runs inline.
"""

from __future__ import annotations

import re
from typing import Any

from reward_server.verifiers.base import Verdict, correct, error, incorrect, unparsable
from reward_server.verifiers.extract import final_math_answer

VERSION = "1"

# Plain integers up to 15 digits: math-verify compares these exactly, so an inline int compare
# gives the same verdict without sympy. (Longer ones: math-verify compares with 15-digit
# precision, which is not plain equality; leave those to it.)
_PLAIN_INT_RE = re.compile(r"^[+-]?\d{1,15}$")
_INT_NOISE_RE = re.compile(r"[\s$]|\\[,;! ]")  # spaces, `$`, LaTeX thin spaces


def _reference_strings(reference: Any) -> list[str] | None:
    if isinstance(reference, bool):
        return None
    if isinstance(reference, (str, int, float)):
        return [str(reference)]
    if isinstance(reference, list) and reference and all(isinstance(r, (str, int, float)) for r in reference):
        return [str(r) for r in reference]  # several acceptable forms: any may match
    return None


def _as_plain_int(text: str) -> int | None:
    text = _INT_NOISE_RE.sub("", text)
    return int(text) if _PLAIN_INT_RE.match(text) else None


def _answer_and_refs(response: str, reference: Any) -> tuple[str, list[str]] | Verdict:
    """(final answer, reference strings), or the verdict when either is missing or malformed."""
    refs = _reference_strings(reference)
    if refs is None:
        return error("math reference must be a string, a number or a list of them")
    answer = final_math_answer(response)
    if answer is None:
        return unparsable("no final answer: expected a \\boxed{...} or an 'Answer: ...' line")
    return answer, refs


def math_fast_path(response: str, reference: Any) -> Verdict | None:
    """Decide inline when it is cheap and certain; None defers to `verify_math` in a worker.

    Decides: no final answer (`unparsable`), a bad reference (`error`), and integer-vs-integer
    answers (DAPO-Math-17k references are integers), which needs no sympy.
    """
    parsed = _answer_and_refs(response, reference)
    if isinstance(parsed, Verdict):
        return parsed
    answer, refs = parsed
    pred = _as_plain_int(answer)
    golds = [_as_plain_int(r) for r in refs]
    if pred is None or any(g is None for g in golds):
        return None
    if pred in golds:
        return correct(f"answer {pred} equals the reference")
    return incorrect(f"answer {pred} != reference {refs[0] if len(refs) == 1 else refs}")


def verify_math(response: str, reference: Any) -> Verdict:
    """Full check with math-verify (runs in a worker process: it may hang; the pool kills it)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    parsed = _answer_and_refs(response, reference)
    if isinstance(parsed, Verdict):
        return parsed
    answer, refs = parsed
    # Wrapping both sides in \boxed{} makes math-verify read exactly the text we extracted.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    pred = parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)
    if not pred:
        return unparsable(f"final answer {answer[:200]!r} is not a math expression")
    golds = [(ref, parse("\\boxed{" + ref + "}", extraction_config=config, parsing_timeout=None)) for ref in refs]
    golds = [(ref, gold) for ref, gold in golds if gold]
    if not golds:
        return error(f"reference {refs[0][:200]!r} could not be parsed as math")
    for ref, gold in golds:
        if verify(gold, pred, timeout_seconds=None):
            return correct(f"answer {answer[:200]!r} is equivalent to reference {ref[:200]!r}")
    return incorrect(f"answer {answer[:200]!r} is not equivalent to reference {refs[0][:200]!r}")
