"""Task synthesis: reasoning-gym problems with worked reference solutions.

reasoning-gym entries carry a question and an answer but no worked solution; OPSD's teacher
needs one. For chain_sum and basic_arithmetic a solution is worked out from the entry's
expression by a safe arithmetic evaluator (``+ - * /`` and parentheses on exact fractions,
no ``eval``), one operation per line; other tasks get the bare fallback
``The answer is \\boxed{X}``. Rows are validated like every loader's
(`opsd_kit.data.problems.build_problems`).

`opsd_kit.data.sources.load_source` reads ``"reasoning_gym:<task>?options"`` specs through
:func:`load_reasoning_gym`. reasoning_gym is imported inside it.
"""
from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from fractions import Fraction

from opsd_kit.data.problems import DataError, LoadReport, Problem, build_problems

_OPS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub),
        ast.Mult: ("*", operator.mul), ast.Div: ("/", operator.truediv)}


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _worked_arithmetic(expression: str) -> tuple[list[str], Fraction]:
    """Evaluate + - * / and parentheses safely (no eval), one line per operation."""
    steps: list[str] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            result = -inner if isinstance(node.op, ast.USub) else inner
            if not isinstance(node.operand, ast.Constant):
                steps.append(f"-({_fmt(inner)}) = {_fmt(result)}")
            return result
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            symbol, op = _OPS[type(node.op)]
            result = op(left, right)
            steps.append(f"{_fmt(left)} {symbol} {_fmt(right)} = {_fmt(result)}")
            return result
        raise ValueError(f"unsupported expression element {ast.dump(node)}")

    return steps, value(ast.parse(expression, mode="eval").body)


def synthesise_solution(task: str, entry: Mapping) -> str | None:
    r"""A short worked solution of a reasoning-gym ``entry`` of ``task``, ending in
    ``\boxed{answer}``, or None when none can be made (a pure function of its arguments).

    chain_sum and basic_arithmetic are worked out from ``metadata["expression"]``, one
    operation per line; a result that disagrees with the entry's answer gives None.
    """
    expression = (entry.get("metadata") or {}).get("expression")
    if task not in ("chain_sum", "basic_arithmetic") or not expression:
        return None
    try:
        steps, result = _worked_arithmetic(expression)
    except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
        return None
    answer = str(entry["answer"]).strip()
    if _fmt(result) != answer:
        return None
    return "\n".join(steps + [f"So {expression} = {answer}. The answer is \\boxed{{{answer}}}"])


def load_reasoning_gym(
    task: str, size: int, seed: int = 0, on_invalid: str = "raise", check=None, **options
) -> tuple[list[Problem], LoadReport]:
    r"""``size`` generated problems of a reasoning-gym task, with reference solutions.

    reasoning-gym entries carry a question and an answer but no worked solution. One is
    synthesised for chain_sum and basic_arithmetic; every other task (or an entry whose
    working cannot be reproduced) gets the bare fallback ``The answer is \boxed{X}``, which
    gives the teacher the answer only. ``report.n_fallback_solutions`` counts those.
    Ids are ``f"reasoning_gym/{task}-{seed}-{i}"``, so different seeds never share ids.
    ``options`` go to the task's config (e.g. ``max_terms=3, max_digits=2`` for chain_sum).
    ``check``: as in `opsd_kit.data.problems.load_problems`.
    """
    import reasoning_gym

    label = f"reasoning_gym/{task}"
    report = LoadReport(source=label)
    try:
        entries = reasoning_gym.create_dataset(task, size=size, seed=seed, **options)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise DataError(label, None, None, f"cannot create the task with options {options}", str(err)) from err

    def rows():
        for i, entry in enumerate(entries):
            answer = "" if entry.get("answer") is None else str(entry["answer"]).strip()
            solution = synthesise_solution(task, entry) if answer else None
            if answer and solution is None:
                report.count_derived("fallback solution")
                solution = f"The answer is \\boxed{{{answer}}}"
            yield i, {"id": f"{label}-{seed}-{i}", "question": entry.get("question"),
                      "solution": solution, "answer": answer, "source": label}

    return build_problems(rows=rows(), where=label, label=label, answer_from=None, on_invalid=on_invalid,
                          report=report,
                          check=check)


