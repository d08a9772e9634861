"""opsd_kit.data.answers: the one answer parser of data loading and grading."""
from __future__ import annotations

import doctest
import json

import pytest

from opsd_kit.data import answers
from opsd_kit.data.answers import extract, extract_boxed, extract_hashes, extract_marked, last_number
from opsd_kit.data.problems import load_problems
from opsd_kit.evaluation import evaluate


def test_docstring_examples():
    result = doctest.testmod(answers)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize("text, expected", [
    (r"a \boxed{1} then \boxed{\frac{a}{b^{2}}} end", r"\frac{a}{b^{2}}"),
    (r"\boxed{1} and \fbox{x_{1}}", "x_{1}"),
    (r"\fbox{1} and \boxed{2}", "2"),
    (r"the answer is $\boxed 2$.", "2"),
    (r"\boxed {3}", "3"),
    (r"x \boxed{a\}b}", r"a\}b"),          # \} is literal: the box closes at the last brace
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{a\\}b}", r"a\\"),             # \\ is a line break, so the next brace does close
    (r"\boxed{\boxed{\boxed{42}}}", "42"),  # the innermost box comes last
    (r"\boxed{  7 }", "7"),
    (r"\boxed{9} then \boxed{}", None),     # the last box wins, even when empty
    (r"\boxed{9} then \boxed{ }", None),
    (r"\boxed{3} then \boxed{unclosed", None),
    (r"\boxed{} but \boxed{9}", "9"),
    (r"\boxed{5} \boxedfoo{6}", "5"),       # \boxedfoo is another command
    (r"\boxed", None),
    ("no box", None),
    ("", None),
    (None, None),
    (b"\\boxed{1}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_an_escaped_brace_stays_in_the_box_and_an_empty_last_box_answers_nothing():
    """Data loading and strict grading read the same answer: the last box, escaped braces kept
    inside it; an empty last box is no answer, even after a box that held one."""
    for text, expected in [(r"x \boxed{a\}b}", r"a\}b"), (r"\boxed{9} then \boxed{}", None)]:
        assert extract_boxed(text) == expected
        assert extract(text, "strict") == expected


@pytest.mark.parametrize("text, strict, lenient", [
    (r"\boxed{5}", "5", "5"),
    ("#### 5", None, "5"),
    ("The answer is 5.", None, "5"),
    ("final answer: $5$", None, "5"),
    ("so we get 5", None, "5"),
    (r"\boxed{4}, or maybe 5", "4", "4"),
    (r"\boxed{5} then \boxed{}", None, "5"),  # no marked answer left: the last number
    ("nothing", None, None),
])
def test_extract_by_mode(text, strict, lenient):
    assert extract(text, "strict") == strict
    assert extract(text, "lenient") == lenient


def test_extract_rejects_unknown_mode():
    with pytest.raises(ValueError):
        extract("42", "loose")


def test_marked_and_hashes_and_numbers():
    assert extract_marked("work\n#### 1,234\n") == "1,234"
    assert extract_marked("#### 1\nthe answer is 2") == "1"  # #### outranks the phrase
    assert extract_hashes("no hashes") is None
    assert last_number("3/4 of 8 is 6, not 1,234.5") == "1,234.5"


def test_evaluate_reexports_the_same_functions():
    assert evaluate.last_number is last_number


def test_training_answer_is_what_the_strict_grader_reads(tmp_path):
    """The answer data loading derives from a solution equals the strict grader's reading of it."""
    solutions = [r"so \boxed{\{1,2\}}", r"x \boxed{a\}b}", r"\boxed{1} and \fbox{\frac{1}{2}}", r"\boxed{\boxed{7}}",
                 r"\boxed{} but \boxed{9}", r"thus \boxed 5."]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "solution": s}) + "\n" for i, s in enumerate(solutions)))
    problems, report = load_problems(path, answer_from="boxed")
    assert report.n_kept == len(solutions)
    for problem in problems:
        assert problem.answer == extract(problem.solution, "strict")
        assert evaluate.is_correct(problem.solution, problem.answer, mode="strict")


def test_solutions_whose_last_box_is_empty_have_no_answer(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "q", "solution": r"\boxed{9} then \boxed{}"}) + "\n")
    problems, report = load_problems(path, answer_from="boxed", on_invalid="skip")
    assert problems == [] and report.skipped == {"no answer": 1}
