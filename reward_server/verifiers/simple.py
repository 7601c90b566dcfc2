"""`numeric` (number equality with tolerance) and `exact` (normalised string equality).

What `numeric` accepts: the *final answer* must be one number. The final answer is the last
`\\boxed{}`, `Answer:` line, GSM8K `#### N` line or `<answer>` tag; a response with none of
them counts only if the whole response is the number. Around the number only decoration is
allowed: math delimiters, a currency sign, `\\text{}` or a unit in letters, `%`. A number
picked out of arbitrary text ("the last number anywhere") would score any text that happens to
end in the right digits, e.g. a file path `.../pytest-0/...` against reference 0: that is how
a policy games a numeric reward, so such text is `unparsable`.

Both run inline in the server process: regexes without nested quantifiers over input bounded
by max_response_chars, and float/Fraction arithmetic on numbers of at most MAX_NUMBER_CHARS
characters. No sympy.
"""

from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction
from typing import Any

from reward_server.verifiers.base import Verdict, correct, error, incorrect, unparsable
from reward_server.verifiers.extract import final_expression, final_math_answer

NUMERIC_VERSION = "2"  # 2: only a marked final answer that is one number
EXACT_VERSION = "1"
MAX_NUMBER_CHARS = 100
DEFAULT_REL_TOL = 1e-6
DEFAULT_ABS_TOL = 1e-9

# A number: sign, digits (optionally with thousands commas), decimals, exponent, optionally
# "/ another number". _to_fraction then refuses exponents over three digits, so no token can
# ask for 10**999999999.
_NUMBER = r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SIMPLE_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?")
_FRAC_RE = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


def _to_fraction(token: str) -> Fraction | None:
    """Exact value of "12", "-1,000.5", "3e-2", "1/3"; None if it is not such a number."""
    token = token.replace(",", "").replace(" ", "").replace("\t", "")
    if not token or len(token) > MAX_NUMBER_CHARS:
        return None
    parts = token.split("/")
    if len(parts) > 2 or not all(_SIMPLE_NUMBER_RE.fullmatch(p) for p in parts):
        return None
    try:
        value = Fraction(parts[0])
        return value / Fraction(parts[1]) if len(parts) == 2 else value
    except (ValueError, ZeroDivisionError):
        return None


# A GSM8K reference solution (and a model trained on them) ends in "#### 42".
_HASH_ANSWER_RE = re.compile(r"^[ \t]*####[ \t]*(.*)$", re.MULTILINE)
# Decoration allowed around the one number: LaTeX spacing/text wrappers and $ are stripped first,
# then an optional currency sign before and a unit (letters, spaces, ^2, /) or % after.
_DECORATION_RE = re.compile(r"\\[,;:! ]|\\\$|\$|\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")
_DECORATED_RE = re.compile(
    rf"(?:[£€¥] ?|USD ?)?({_NUMBER}(?: ?/ ?{_NUMBER})?)(?: ?(?:%|[A-Za-z][A-Za-z ^2/]{{0,40}}))?\.?"
)
MAX_ANSWER_CHARS = 200  # one number and its unit; also bounds the regexes' work


def final_numeric_answer(text: str) -> str | None:
    """The marked final answer (\\boxed{}, `Answer:`, `####`, `<answer>`), else the whole text."""
    hashed = None
    for hashed in _HASH_ANSWER_RE.finditer(text):
        pass
    if hashed is not None:
        after = text[hashed.start():].lower()
        if "\\boxed" not in after and "answer" not in after:  # no later marker overrides it
            return hashed.group(1).strip() or None
    marked = final_math_answer(text)
    if marked is not None:
        return marked
    if "</answer>" in text.lower():
        return final_expression(text)
    return text


def answer_number(answer: str) -> Fraction | None:
    """The value of an answer that is one number (with decoration only), else None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return None
    answer = _FRAC_RE.sub(r"\1/\2", answer)
    answer = " ".join(_DECORATION_RE.sub(lambda m: m.group(1) or " ", answer).split())
    m = _DECORATED_RE.fullmatch(answer)
    return _to_fraction(m.group(1)) if m else None


def _numeric_reference(reference: Any) -> tuple[Fraction, float, float] | str:
    rel, abs_ = DEFAULT_REL_TOL, DEFAULT_ABS_TOL
    if isinstance(reference, dict):
        rel = reference.get("rel_tol", rel)
        abs_ = reference.get("abs_tol", abs_)
        reference = reference.get("value")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < math.inf for t in (rel, abs_)):
            return "numeric tolerances rel_tol/abs_tol must be non-negative numbers"
    if isinstance(reference, bool) or not isinstance(reference, (int, float, str)):
        return 'numeric reference must be a number, a numeric string or {"value", "rel_tol"?, "abs_tol"?}'
    if isinstance(reference, float) and not math.isfinite(reference):
        return "numeric reference must be finite"
    value = _to_fraction(reference.strip()) if isinstance(reference, str) else Fraction(reference)
    if value is None:
        return f"numeric reference {str(reference)[:50]!r} is not a number"
    return value, float(rel), float(abs_)


def verify_numeric(response: str, reference: Any) -> Verdict:
    """The final answer, if it is one number, vs the reference (see the module docstring)."""
    ref = _numeric_reference(reference)
    if isinstance(ref, str):
        return error(ref)
    gold, rel_tol, abs_tol = ref
    answer = final_numeric_answer(response)
    pred = answer_number(answer) if answer else None
    if pred is None:
        return unparsable("the final answer is not one number (mark it: \\boxed{N}, 'Answer: N' or '#### N')")
    # Exact rational arithmetic (floats would overflow on 1e999): |p - g| <= max(rel * max(|p|, |g|), abs).
    allowed = max(Fraction(rel_tol) * max(abs(pred), abs(gold)), Fraction(abs_tol))
    if abs(pred - gold) <= allowed:
        return correct(f"{_show(pred)} matches {_show(gold)}")
    return incorrect(f"{_show(pred)} != {_show(gold)} (rel_tol={rel_tol:g}, abs_tol={abs_tol:g})")


def _show(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)[:40]
    try:
        return f"{float(value):.10g}"
    except OverflowError:
        return f"{value.numerator}/{value.denominator}"[:40]


def normalise_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, trailing period dropped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split()).rstrip(".").strip()


def verify_exact(response: str, reference: Any) -> Verdict:
    """Normalised equality of the final answer (\\boxed{}, `Answer:`, <answer>, else the whole text)."""
    if isinstance(reference, str):
        refs = [reference]
    elif isinstance(reference, list) and reference and all(isinstance(r, str) for r in reference):
        refs = reference
    else:
        return error("exact reference must be a string or a list of strings")
    answer = final_math_answer(response)
    if answer is None:
        answer = final_expression(response) if "</answer>" in response.lower() else response
    got = normalise_text(answer or "")
    if not got:
        return unparsable("empty answer")
    if got in {normalise_text(r) for r in refs}:
        return correct(f"{got[:100]!r} matches")
    return incorrect(f"{got[:100]!r} != {normalise_text(refs[0])[:100]!r}")
