"""Finding the final answer in a response.

Everything here is a linear-time scan (no backtracking-prone regexes, no quadratic slicing):
it runs inline in the server process on untrusted text of up to max_response_chars.
"""

from __future__ import annotations

import re

# DAPO-Math-17k prompts ask for a last line "Answer: $Answer"; tolerate markdown around "Answer".
_ANSWER_LINE_RE = re.compile(r"^[ \t>*_#]*answer[ \t*_]*[:：](.*)$", re.IGNORECASE | re.MULTILINE)
_OPEN_TAG_RE = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG_RE = re.compile(r"</answer>", re.IGNORECASE)
_BRACE_TOKEN_RE = re.compile(r"\\(?:boxed|fbox)[ \t]*\{|\\[{}]|[{}]")


def _last_boxed_span(text: str) -> tuple[int, int, int] | None:
    """(start, content start, content end) of the complete `\\boxed{...}` that starts last.

    One pass with a brace stack, so even a response made of nested `\\boxed{` stays linear.
    """
    best: tuple[int, int, int] | None = None
    stack: list[tuple[int, int] | None] = []  # per open brace: (boxed start, content start) or None
    for m in _BRACE_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok in ("\\{", "\\}"):
            continue  # an escaped brace is a literal, not nesting
        if tok == "}":
            opened = stack.pop() if stack else None
            if opened is not None and (best is None or opened[0] > best[0]):
                best = (opened[0], opened[1], m.start())
        elif tok == "{":
            stack.append(None)
        else:
            stack.append((m.start(), m.end()))
    return best


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), or None."""
    span = _last_boxed_span(text)
    return text[span[1] : span[2]] if span else None


def _strip_math_delimiters(ans: str) -> str:
    ans = ans.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(ans) >= len(left) + len(right) and ans.startswith(left) and ans.endswith(right):
            ans = ans[len(left) : len(ans) - len(right)].strip()
    return ans.rstrip(".").strip()


def final_math_answer(text: str) -> str | None:
    """The final answer: the last `\\boxed{}` or the last `Answer:` line, whichever comes later.

    An `Answer:` line that itself contains `\\boxed{}` yields the boxed content.
    Returns None when neither exists or the answer is empty.
    """
    boxed = _last_boxed_span(text)
    line = None
    for line in _ANSWER_LINE_RE.finditer(text):
        pass
    if line is not None and (boxed is None or line.start() > boxed[0]):
        body = line.group(1)
        inner = last_boxed(body)
        ans = inner if inner is not None else body
    elif boxed is not None:
        ans = text[boxed[1] : boxed[2]]
    else:
        return None
    ans = _strip_math_delimiters(ans)
    return ans or None


def final_expression(text: str) -> str | None:
    """Countdown's candidate: the last `<answer>...</answer>` content, else the last non-empty line."""
    # Fixed-string scans (not a lazy `<answer>(.*?)</answer>`, which is quadratic on unclosed tags).
    end = max((m.start() for m in _CLOSE_TAG_RE.finditer(text)), default=-1)
    start = max((m.end() for m in _OPEN_TAG_RE.finditer(text, 0, max(end, 0))), default=-1)
    if start >= 0:
        candidate = text[start:end]
    else:
        candidate = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
    candidate = _strip_math_delimiters(candidate)
    return candidate or None
