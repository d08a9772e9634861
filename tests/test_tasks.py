"""Task synthesis (opsd_kit.data.tasks): the safe arithmetic evaluator and reasoning-gym solutions."""
from __future__ import annotations

from fractions import Fraction

import pytest

from opsd_kit.data.problems import Problem
from opsd_kit.data.tasks import _worked_arithmetic, load_reasoning_gym, synthesise_solution


def test_worked_arithmetic_is_exact_and_step_by_step():
    steps, result = _worked_arithmetic("2 * (3 - 5) / -(4 + 2)")
    assert result == Fraction(2, 3)
    assert steps == ["3 - 5 = -2", "2 * -2 = -4", "4 + 2 = 6", "-(6) = -6", "-4 / -6 = 2/3"]


@pytest.mark.parametrize("expression", ["__import__('os')", "2 ** 3", "1.5 + 1", "x + 1", "True + 1"])
def test_worked_arithmetic_refuses_anything_else(expression):
    with pytest.raises(ValueError):
        _worked_arithmetic(expression)


def test_synthesised_solution_must_agree_with_the_answer():
    entry = {"answer": "7", "metadata": {"expression": "3 + 4"}}
    assert synthesise_solution("chain_sum", entry).endswith("The answer is \\boxed{7}")
    assert synthesise_solution("chain_sum", {**entry, "answer": "8"}) is None
    assert synthesise_solution("leg_counting", entry) is None
    assert synthesise_solution("basic_arithmetic", {"answer": "1", "metadata": {"expression": "1 / 0"}}) is None


def _chain_sum_steps_are_right(problem: Problem) -> None:
    """Each line "a op b = c" is right, the last partial sum is the answer, and so is the question's sum."""
    *steps, last = problem.solution.splitlines()
    for line in steps:
        left, result = line.split(" = ")
        a, op, b = left.split(" ")
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(result)
    assert steps[-1].endswith(f"= {problem.answer}")
    assert last.endswith(f"\\boxed{{{problem.answer}}}")
    terms = problem.question.split(": ", 1)[1].rstrip(" =").split(" ")
    total = int(terms[0]) + sum(int(n) if op == "+" else -int(n) for op, n in zip(terms[1::2], terms[2::2]))
    assert total == int(problem.answer)


def test_reasoning_gym_chain_sum_solutions_and_determinism():
    problems, report = load_reasoning_gym("chain_sum", size=30, seed=7)
    assert report.n_kept == 30 and report.n_fallback_solutions == 0
    for p in problems:
        _chain_sum_steps_are_right(p)
        assert p.source == "reasoning_gym/chain_sum"
    again, _ = load_reasoning_gym("chain_sum", size=30, seed=7)
    other, _ = load_reasoning_gym("chain_sum", size=30, seed=8)
    assert again == problems
    assert [p.question for p in other] != [p.question for p in problems]
    assert not {p.id for p in other} & {p.id for p in problems}


def test_reasoning_gym_basic_arithmetic_and_fallback():
    problems, report = load_reasoning_gym("basic_arithmetic", size=40, seed=0)
    worked = [p for p in problems if "\n" in p.solution]
    assert len(worked) == 40 - report.n_fallback_solutions and len(worked) >= 30
    assert all(p.solution.endswith(f"\\boxed{{{p.answer}}}") for p in problems)
    legs, report = load_reasoning_gym("leg_counting", size=3, seed=0)
    assert report.n_fallback_solutions == 3
    assert legs[0].solution == f"The answer is \\boxed{{{legs[0].answer}}}"
