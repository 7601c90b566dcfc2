"""The word-problem task: every reference solution is right, ends in \\boxed{answer}, and the math verifier agrees."""

from __future__ import annotations

import random
import re

from services.config import WordProblemDataConfig
from services.data.datasets import load_items
from services.data.wordproblems import TEMPLATES, make_splits, sample_problem


def _check(problem) -> None:
    """Recompute the solution from its own lines: each `a op b = c` holds, the last c is the boxed answer."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
    lines = problem.solution.splitlines()
    result = None
    for line in lines[:-1]:
        a, op, b, c = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line).groups()
        assert ops[op](int(a), int(b)) == int(c) and (op != "/" or int(a) % int(b) == 0)
        result = int(c)
    assert lines[-1] == f"The answer is \\boxed{{{problem.answer}}}." and result == problem.answer >= 0


def test_every_template_yields_correct_worked_solutions():
    rng = random.Random(0)
    seen = set()
    for _ in range(600):
        p = sample_problem(rng, max_number=50)
        _check(p)
        seen.add(p.question.split()[1])
    assert len(TEMPLATES) >= 5 and len(seen) >= 4  # several templates drawn


def test_splits_are_disjoint_and_deterministic():
    train, held_out = make_splits(300, 50, seed=3)
    assert len(train) == 300 and len(held_out) == 50
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert make_splits(300, 50, seed=3) == (train, held_out) and make_splits(300, 50, seed=4) != (train, held_out)


def test_items_are_math_items_with_the_answer_as_text():
    train, held_out = load_items(WordProblemDataConfig(num_train=20, num_eval=5))
    assert all(it.task == "math" and it.reference.isdigit() for it in train + held_out)


def test_the_math_verifier_accepts_the_reference_solutions_and_rejects_wrong_ones():
    from reward_server.verifiers import get_verifier, run_verifier

    verify = get_verifier("math").verify
    for p in make_splits(20, 0, seed=5)[0]:
        assert run_verifier(verify, p.solution, str(p.answer)).outcome == "correct"
        wrong = p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")
        assert run_verifier(verify, wrong, str(p.answer)).outcome == "incorrect"


def test_the_written_files_read_back_through_each_preset(tmp_path):
    """scripts/write_wordproblems.py's layouts are the presets' layouts: same questions and answers back."""
    import subprocess
    import sys
    from pathlib import Path

    from services.config import FileDataConfig

    root = Path(__file__).resolve().parents[3]
    want = load_items(WordProblemDataConfig(num_train=30, num_eval=6))[1]
    for fmt, suffix in (("math500", "jsonl"), ("gsm8k", "parquet"), ("dapo_math", "parquet")):
        out = tmp_path / f"{fmt}.{suffix}"
        subprocess.run([sys.executable, "scripts/write_wordproblems.py", "--format", fmt, "--out", str(out),
                        "--num-train", "30", "--num-eval", "6"], cwd=root, check=True, capture_output=True)
        got, _ = load_items(FileDataConfig(train_path=str(out), preset=fmt))
        assert [(g.prompt, g.reference) for g in got] == [(w.prompt, w.reference) for w in want], fmt
