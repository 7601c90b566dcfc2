"""`countdown`: reach the target from the given numbers with + - * / and parentheses.

Two answer formats, picked automatically (a `=` means steps):
- expression: `(9*8)-3`, parsed by a whitelist walk over Python's `ast` (never evaluated as
  code: no names, calls, `**`, unary operators) and computed with exact `Fraction`s;
- steps: `9*8=72,72-3=69` (the toy task), each step `int op int = int`, spaces ignored.

Runs inline in the server process. That is safe because the cost is bounded: the candidate is
at most MAX_CANDIDATE_CHARS, the reference at most MAX_NUMBERS numbers of at most
MAX_NUMBER_DIGITS digits, an expression may not hold more literals than there are numbers, and
every operand is a given number or an earlier result, so no value grows beyond the product
of the given numbers. No sympy, no recursion deeper than 2 * MAX_NUMBERS.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from reward_server.verifiers.base import Verdict, correct, error, incorrect, unparsable
from reward_server.verifiers.extract import final_expression

VERSION = "1"
MAX_NUMBERS = 64
MAX_NUMBER_DIGITS = 18
MAX_CANDIDATE_CHARS = 4096

_TRANSLATE = str.maketrans({"×": "*", "÷": "/", "−": "-", "–": "-", "·": "*"})
_LATEX_OPS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\\left", ""), ("\\right", ""))
_STEP_RE = re.compile(r"^(-?\d{1,40})([-+*/])(-?\d{1,40})=(-?\d{1,40})$")
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _parse_reference(reference: Any) -> tuple[list[int], int, bool] | str:
    """(numbers, target, use_all) or a reason the reference is unusable."""
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except ValueError:
            return "countdown reference must be an object {numbers, target, use_all?} (or its JSON text)"
    if not isinstance(reference, dict):
        return "countdown reference must be an object {numbers, target, use_all?}"
    numbers, target, use_all = reference.get("numbers"), reference.get("target"), reference.get("use_all", False)
    ints_ok = isinstance(numbers, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
    if not ints_ok or not 1 <= len(numbers) <= MAX_NUMBERS:
        return f"countdown reference 'numbers' must be a list of 1..{MAX_NUMBERS} integers"
    if not isinstance(target, int) or isinstance(target, bool):
        return "countdown reference 'target' must be an integer"
    if any(len(str(abs(n))) > MAX_NUMBER_DIGITS for n in [*numbers, target]):
        return f"countdown numbers must have at most {MAX_NUMBER_DIGITS} digits"
    if not isinstance(use_all, bool):
        return "countdown reference 'use_all' must be true or false"
    return numbers, target, use_all


def _normalise(candidate: str) -> str:
    for latex, op in _LATEX_OPS:
        candidate = candidate.replace(latex, op)
    return candidate.translate(_TRANSLATE)


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


class _Reject(Exception):
    """Expression is valid Python syntax but not a countdown expression (-> unparsable)."""


def _eval_node(node: ast.AST) -> Fraction:
    """Exact value of a whitelisted node; division by zero raises ZeroDivisionError."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        op = _BINOPS[type(node.op)]
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            return left * right
        return left / right
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    raise AssertionError("unreachable: the tree was whitelisted first")


def _whitelist(tree: ast.Expression) -> list[Any]:
    """Literal values of the tree; raise _Reject on any node outside + - * / ( ) and numbers."""
    literals = []
    for node in ast.walk(tree.body):  # iterative: safe on long chains
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise _Reject(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            literals.append(node.value)
        elif not isinstance(node, ast.operator):
            raise _Reject(f"{type(node).__name__} is not allowed (only numbers, + - * / and parentheses)")
    return literals


def _check_usage(used: list[Any], numbers: list[int], use_all: bool) -> str | None:
    """Why the used numbers break the rules, or None."""
    available = Counter(numbers)
    for value in used:
        if type(value) is not int or available[value] <= 0:
            given = "more often than given" if type(value) is int and value in numbers else "not a given number"
            return f"{value!r} is {given} (numbers: {numbers})"
        available[value] -= 1
    if use_all and +available:
        return f"unused numbers {sorted((+available).elements())} (every number must be used once)"
    return None


def _verify_expression(candidate: str, numbers: list[int], target: int, use_all: bool) -> Verdict:
    try:
        tree = ast.parse(candidate, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return unparsable(f"{candidate[:100]!r} is not an arithmetic expression")
    try:
        literals = _whitelist(tree)
    except _Reject as exc:
        return unparsable(f"{candidate[:100]!r}: {exc}")
    # Checked before evaluating: this is what bounds the evaluation's size and depth.
    why = _check_usage(literals, numbers, use_all)
    if why:
        return incorrect(why)
    try:
        value = _eval_node(tree.body)
    except ZeroDivisionError:
        return incorrect("division by zero")
    if value == target:
        return correct(f"{candidate} = {target}")
    return incorrect(f"{candidate} = {_fmt(value)}, not the target {target}")


def _apply(a: int, op: str, b: int) -> Fraction | None:
    if op == "+":
        return Fraction(a + b)
    if op == "-":
        return Fraction(a - b)
    if op == "*":
        return Fraction(a * b)
    return None if b == 0 else Fraction(a, b)


def _verify_steps(candidate: str, numbers: list[int], target: int, use_all: bool) -> Verdict:
    steps = "".join(candidate.split()).split(",")  # spaces anywhere are ignored
    if len(steps) > MAX_NUMBERS:
        return incorrect(f"{len(steps)} steps: more than the numbers allow")
    parsed = []
    for step in steps:
        m = _STEP_RE.match(step)
        if not m:
            return unparsable(f"step {step[:60]!r} is not 'a op b=c' with integers a, b, c")
        parsed.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    givens = Counter(numbers)
    results: Counter[int] = Counter()  # intermediate results not yet consumed
    for i, (a, op, b, c) in enumerate(parsed, 1):
        for operand in (a, b):
            # Prefer an earlier result over a given number of the same value: for the verdict
            # the choice never matters (both are tokens of one value), see the module tests.
            if results[operand] > 0:
                results[operand] -= 1
            elif givens[operand] > 0:
                givens[operand] -= 1
            else:
                return incorrect(f"step {i}: {operand} is neither an unused given number nor an unused earlier result")
        value = _apply(a, op, b)
        if value is None:
            return incorrect(f"step {i}: division by zero")
        if value.denominator != 1:
            return incorrect(f"step {i}: {a}/{b} is not exact")
        if value != c:
            return incorrect(f"step {i}: {a}{op}{b} = {_fmt(value)}, not {c}")
        results[c] += 1
    last = parsed[-1][3]
    if last != target:
        return incorrect(f"last result {last} is not the target {target}")
    if use_all:
        results[last] -= 1
        if +givens:
            return incorrect(f"unused numbers {sorted((+givens).elements())} (every number must be used once)")
        if +results:
            return incorrect(f"intermediate results {sorted((+results).elements())} are never used")
    return correct(f"{len(parsed)} steps reach {target}")


def verify_countdown(response: str, reference: Any) -> Verdict:
    """Check the response's final expression or step list against {numbers, target, use_all}."""
    ref = _parse_reference(reference)
    if isinstance(ref, str):
        return error(ref)
    numbers, target, use_all = ref
    candidate = final_expression(response)
    if candidate is None:
        return unparsable("empty response: no expression")
    if len(candidate) > MAX_CANDIDATE_CHARS:
        return unparsable(f"final expression has {len(candidate)} characters (max {MAX_CANDIDATE_CHARS})")
    candidate = _normalise(candidate)
    if "=" in candidate:
        return _verify_steps(candidate, numbers, target, use_all)
    return _verify_expression(candidate, numbers, target, use_all)
