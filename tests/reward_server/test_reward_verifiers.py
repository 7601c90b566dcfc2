"""Verifiers called directly (no HTTP): correct / incorrect / unparsable per task."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward_server.verifiers import get_verifier, known_tasks, register_verifier, unregister_verifier
from reward_server.verifiers.countdown import verify_countdown
from reward_server.verifiers.extract import final_expression, final_math_answer
from reward_server.verifiers.math_task import math_fast_path, verify_math
from reward_server.verifiers.simple import verify_exact, verify_numeric

TOY = {"numbers": [9, 8, 3], "target": 69, "use_all": True}


# ---- answer extraction -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),  # nested braces kept whole
        ("\\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # the last box; escaped braces are literal
        ("work...\nAnswer: $\\frac{3}{4}$", "\\frac{3}{4}"),  # DAPO-style last line, $ stripped
        ("**Answer:** \\boxed{5}.", "5"),  # Answer line holding a box -> the box
        ("\\boxed{7}\nAnswer: 8", "8"),  # whichever comes last wins
        ("Answer: 8\n\\boxed{7}", "7"),
        ("\\boxed{unclosed", None),
        ("no answer here", None),
        ("Answer:   ", None),
    ],
)
def test_final_math_answer(text, expected):
    assert final_math_answer(text) == expected


def test_final_expression_prefers_answer_tag_else_last_line():
    assert final_expression("think\n<answer> (9*8)-3 </answer>\nbye") == "(9*8)-3"
    assert final_expression("9,8,3>69|\n9*8=72,72-3=69\n\n") == "9*8=72,72-3=69"
    assert final_expression("   \n") is None


# ---- math ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, reference",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac34"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{[1, 2)}", "[1,2)"),  # half-open interval
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),  # sets are unordered
        ("\\boxed{(x+1)^2}", "x^2+2x+1"),  # symbolic equality
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # MATH-style reference
        ("Let me think.\nAnswer: \\frac{68}{2}", "34"),  # DAPO-Math-17k: integer reference
        ("Answer: 34", 34),  # a numeric reference works too
        ("\\boxed{5}", ["4", "5"]),  # any of several accepted references
    ],
)
def test_math_equivalent_forms_are_correct(response, reference):
    assert verify_math(response, reference).outcome == "correct"


@pytest.mark.parametrize(
    "response, reference",
    [
        ("\\boxed{(1, 2]}", "[1,2)"),  # (1,2] != [1,2): endpoints differ
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("Answer: 35", "34"),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
    ],
)
def test_math_different_values_are_incorrect(response, reference):
    assert verify_math(response, reference).outcome == "incorrect"


def test_math_without_final_answer_is_unparsable():
    assert verify_math("I think it is 5 but I am not sure", "5").outcome == "unparsable"
    assert math_fast_path("I think it is 5", "5").outcome == "unparsable"


def test_math_bad_reference_is_error():
    assert verify_math("\\boxed{1}", {"x": 1}).outcome == "error"


@settings(max_examples=25, deadline=None)
@given(st.integers(-10**14, 10**14), st.integers(-10**14, 10**14), st.booleans())
def test_math_fast_path_agrees_with_math_verify(pred, gold, same):
    """The inline integer shortcut must give math-verify's verdict (it skips the worker)."""
    gold = pred if same else gold
    response = f"...\nAnswer: {pred}"
    fast = math_fast_path(response, str(gold))
    assert fast is not None
    assert fast.outcome == verify_math(response, str(gold)).outcome


def test_math_fast_path_defers_non_integers():
    assert math_fast_path("\\boxed{\\frac{1}{2}}", "0.5") is None


# ---- countdown: step format ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, outcome",
    [
        ("9*8=72,72-3=69", "correct"),  # 9*8=72, 72-3=69 = target; every number once
        ("9 * 8=72, 72-3 = 69", "correct"),  # the toy's optional spaces
        (" 9*8 = 72 ,\t72 - 3=69 ", "correct"),
        ("8*9=72,72-3=69", "correct"),
        ("9*8=72,72-3=68", "incorrect"),  # wrong arithmetic in step 2 (72-3 is 69)
        ("9*8=71,71-3=68", "incorrect"),  # wrong arithmetic in step 1
        ("9*8=72,72-9=63", "incorrect"),  # 9 reused (and target missed)
        ("9*8=72", "incorrect"),  # last result 72 != 69 (and 3 unused)
        ("72-3=69", "incorrect"),  # 72 is neither given nor an earlier result
        ("9*8=72,72-3=69,", "unparsable"),  # an empty step
        ("9*8=72;72-3=69", "unparsable"),
        ("nine times eight=72", "unparsable"),
    ],
)
def test_countdown_steps(response, outcome):
    assert verify_countdown(response, TOY).outcome == outcome


def test_countdown_steps_use_all_and_intermediate_rules():
    # use_all: 3 unused -> incorrect; without use_all the same steps reach 72 correctly.
    assert verify_countdown("9*8=72", {"numbers": [9, 8, 3], "target": 72, "use_all": True}).outcome == "incorrect"
    assert verify_countdown("9*8=72", {"numbers": [9, 8, 3], "target": 72}).outcome == "correct"
    # intermediate 6 used twice: 2*3=6, 6+6=12 -> only one 6 exists
    assert verify_countdown("2*3=6,6+6=12", {"numbers": [2, 3, 4], "target": 12}).outcome == "incorrect"
    # division must be exact: 7/2 = 3.5, not 3
    assert verify_countdown("7/2=3,3+1=4", {"numbers": [7, 2, 1], "target": 4}).outcome == "incorrect"
    assert verify_countdown("8/2=4,4+1=5", {"numbers": [8, 2, 1], "target": 5}).outcome == "correct"
    # negative intermediate: 3-8=-5, -5+9=4
    assert verify_countdown("3-8=-5,-5+9=4", {"numbers": [3, 8, 9], "target": 4, "use_all": True}).outcome == "correct"
    # division by zero: 3-3=0, 9/0
    assert verify_countdown("3-3=0,9/0=0", {"numbers": [3, 3, 9], "target": 0}).outcome == "incorrect"
    # use_all with a dangling intermediate: 9+8=17 never used, 3*1=3 is the target
    ref = {"numbers": [9, 8, 3, 1], "target": 3, "use_all": True}
    assert verify_countdown("9+8=17,3*1=3", ref).outcome == "incorrect"
    # a repeated given number may be used as often as it is given: [4, 4, 1]
    assert verify_countdown("4*1=4,4+4=8", {"numbers": [4, 4, 1], "target": 8, "use_all": True}).outcome == "correct"


def test_countdown_random_toy_answers_with_spaces_are_correct():
    """Toy problems (three numbers 1-9, two steps) answered correctly, spaces sprinkled: all 1."""
    rng = random.Random(0)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for _ in range(300):
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        o1, o2 = rng.choice("+-*"), rng.choice("+-*")
        r1 = ops[o1](a, b)
        r2 = ops[o2](r1, c)
        text = f"{a}{o1}{b}={r1},{r1}{o2}{c}={r2}"
        spaced = "".join(ch + (" " if rng.random() < 0.2 else "") for ch in text)
        ref = {"numbers": [a, b, c], "target": r2, "use_all": True}
        assert verify_countdown(spaced, ref).outcome == "correct", (spaced, ref)
        assert verify_countdown(f"{a}{o1}{b}={r1 + 1},{r1 + 1}{o2}{c}={r2}", ref).outcome == "incorrect"


# ---- countdown: expression format ---------------------------------------------------------------
@pytest.mark.parametrize(
    "response, reference, outcome",
    [
        ("<answer>(9*8)-3</answer>", TOY, "correct"),  # 72 - 3 = 69
        ("9×8−3", TOY, "correct"),  # unicode operators
        ("9 \\times 8 - 3", TOY, "correct"),
        ("<answer>9*8+3</answer>", TOY, "incorrect"),  # = 75
        ("(9+8)*3", TOY, "incorrect"),  # = 51
        ("9*8", {"numbers": [9, 8, 3], "target": 72}, "correct"),  # at most once: 3 may stay unused
        ("9*8", TOY | {"target": 72}, "incorrect"),  # use_all: 3 unused
        ("9*9-12", TOY, "incorrect"),  # 9 twice and 12 not given
        ("9*8-3.0", TOY, "incorrect"),  # 3.0 is not a given integer
        ("9/(3-3)", {"numbers": [9, 3, 3], "target": 1}, "incorrect"),  # division by zero
        ("(8/3)*9-3", {"numbers": [8, 3, 9, 3], "target": 21}, "correct"),  # exact rationals: 8/3*9 = 24
        ("9**2", {"numbers": [9, 2], "target": 81}, "unparsable"),  # ** is not allowed
        ("-9+8", {"numbers": [9, 8], "target": -1}, "unparsable"),  # unary minus is not allowed
        ("abs(9)", {"numbers": [9], "target": 9}, "unparsable"),
        ("I give up", TOY, "unparsable"),
    ],
)
def test_countdown_expressions(response, reference, outcome):
    assert verify_countdown(response, reference).outcome == outcome


def test_countdown_bad_reference_is_error():
    assert verify_countdown("1+2", {"numbers": "1,2", "target": 3}).outcome == "error"
    assert verify_countdown("1+2", '{"numbers": [1, 2], "target": 3}').outcome == "correct"  # JSON text is fine


def test_countdown_code_injection_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (f"__import__('os').system('touch {marker}')", f"<answer>open('{marker}', 'w')</answer>"):
        assert verify_countdown(payload, TOY).outcome == "unparsable"
    assert not marker.exists()


# ---- numeric / exact -----------------------------------------------------------------------------
def test_numeric():
    assert verify_numeric("\\boxed{1,000}", "1000").outcome == "correct"
    assert verify_numeric("0.3333333", "1/3").outcome == "correct"  # within rel_tol 1e-6
    assert verify_numeric("0.33", "1/3").outcome == "incorrect"
    assert verify_numeric("3.14", {"value": 3.14159, "rel_tol": 1e-3}).outcome == "correct"  # |diff| = 5e-4 * pi
    assert verify_numeric("no digits", 1).outcome == "unparsable"
    assert verify_numeric("1e99999", 1).outcome == "unparsable"  # exponents over 3 digits are refused
    assert verify_numeric("5", "five").outcome == "error"


@pytest.mark.parametrize("response, reference, outcome", [
    # the final answer, marked, is one number (with decoration at most)
    ("so the total is \\boxed{42}", 42, "correct"),
    ("Answer: 42", 42, "correct"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72, "correct"),  # GSM8K
    ("<answer>72</answer>", 72, "correct"),
    ("42", 42, "correct"),  # nothing but the number
    ("Answer: $42$.", 42, "correct"),
    ("\\boxed{\\$1,250.50}", 1250.5, "correct"),
    ("\\boxed{42 \\text{ apples}}", 42, "correct"),
    ("\\boxed{12 cm^2}", 12, "correct"),
    ("Answer: 50%", 50, "correct"),
    ("\\boxed{\\frac{1}{3}}", "1/3", "correct"),
    ("#### 7\nAnswer: 8", 8, "correct"),  # the later marker wins
    ("\\boxed{8}\n#### 7", 7, "correct"),
    # not one number: a number picked out of text is how a policy games the reward
    ("The answer is 42.", 42, "unparsable"),
    ("\\boxed{3 + 4 = 7}", 7, "unparsable"),
    ("\\boxed{7 or 8}", 7, "unparsable"),
    ("Answer: x = 5", 5, "unparsable"),
    ("rm -rf /tmp/pytest-0/x", 0, "unparsable"),
    ("\\boxed{__import__('os').system('touch /tmp/pytest-0/x')}", 0, "unparsable"),
    ("Answer: 2024-01-05", 5, "unparsable"),
    ("\\boxed{" + "1" * 300 + "}", 1, "unparsable"),  # longer than any one number and unit
])
def test_numeric_accepts_only_a_final_answer_that_is_one_number(response, reference, outcome):
    assert verify_numeric(response, reference).outcome == outcome


def test_exact():
    assert verify_exact("  PARIS. ", "paris").outcome == "correct"
    assert verify_exact("Answer: New   York", ["new york", "nyc"]).outcome == "correct"
    assert verify_exact("Lyon", "Paris").outcome == "incorrect"
    assert verify_exact("   ", "x").outcome == "unparsable"


# ---- registry ------------------------------------------------------------------------------------
def test_registry_builtins_and_custom():
    assert {"math", "countdown", "numeric", "exact"} <= set(known_tasks())
    v = register_verifier("test-upper", _upper_equals, inline=True, replace=True)
    try:
        assert get_verifier("test-upper") is v
        assert v.verify("ABC", "abc").outcome == "correct"
        with pytest.raises(ValueError):
            register_verifier("test-upper", verify_exact)  # already taken
        with pytest.raises(ValueError):
            register_verifier("Bad Name", verify_exact)
    finally:
        unregister_verifier("test-upper")
    assert get_verifier("test-upper") is None


def _upper_equals(response, reference):
    from reward_server.verifiers import correct, incorrect

    return correct("same") if response.upper() == str(reference).upper() else incorrect("different")
