"""Grading: answer extraction, equivalences, strict vs lenient, time bounds (in process and workers)."""
from __future__ import annotations

import threading

import pytest

from opsd_kit.data.answers import extract_marked, last_number
from opsd_kit.evaluation import grading
from opsd_kit.evaluation.grading import grade_many, is_correct


# -- extraction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{\sqrt{2}}{2}}.", r"\frac{\sqrt{2}}{2}"),
    (r"\fbox{7}", "7"),
    (r"thus \boxed 5$.", "5"),
    (r"\boxed{3} and a cut-off \boxed{\frac{1", None),  # the last box wins, unclosed: no answer
    (r"\boxed{} but \boxed{9}", "9"),
    (r"\boxed{9} then \boxed{}", None),  # the last box wins, empty: no answer
    ("work\n#### 1,234\n", "1,234"),
    ("The answer is 42.", "42"),
    ("Final answer: 3.5", "3.5"),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
    ("so we get 42", None),
    (r"\boxed{}", None),
    ("", None),
    (None, None),
    (42, None),
])
def test_extract_marked(text, expected):
    assert extract_marked(text) == expected


def test_last_number():
    assert last_number("we get 3 then 1,234.") == "1,234"
    assert last_number("x = -2.5") == "-2.5"
    assert last_number("no digits") is None
    assert last_number(None) is None


# -- grading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, gold", [
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{1}{2}}", "0.5"),
    (r"\boxed{\frac{\sqrt2}{2}}", r"\sqrt{2}/2"),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}"),
    (r"\boxed{(0, 1]}", "(0,1]"),
    (r"\boxed{18.00}", "18"),
    (r"\boxed{\$18}", "18"),
    (r"\boxed{18}", "$18$"),
    (r"\boxed{1,234}", "1234"),
    (r"\boxed{10}", r"10\%"),  # percent: 10, 10\% and 0.1 all accepted for a gold 10\%
    (r"\boxed{0.1}", r"10\%"),
    (r"\boxed{\text{(B)}}", r"\text{(B)}"),
])
def test_equivalent_forms_grade_correct(response, gold):
    assert is_correct(response, gold)


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{17}", "18"), (r"\boxed{\frac{1}{3}}", "0.5"), (r"\boxed{(0,1)}", "(0,1]"),
    (r"\boxed{\{1,3\}}", r"\{1,2\}"), ("no answer", "18"), (r"\boxed{18}", ""), (r"\boxed{18}", None),
    (None, "18"), (b"\\boxed{18}", "18"),
])
def test_wrong_or_odd_grades_false(response, gold):
    assert is_correct(response, gold) is False


# strict: the last box only (the official evaluator); lenient: the marked answer, else the last number
STRICT_VS_LENIENT = [  # response, gold, strict, lenient
    (r"\boxed{5}", "5", True, True),
    (r"\fbox{5}", "5", True, True),
    (r"so $\boxed{\frac{1}{2}}$.", "0.5", True, True),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}", True, True),  # nested braces
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", True, True),  # escaped braces are literal
    (r"x \boxed{a\}b}", r"a\}b", True, True),  # an escaped brace does not close the box
    (r"\boxed{\boxed{7}}", "7", True, True),
    (r"thus \boxed 5.", "5", True, True),
    (r"\boxed{} but \boxed{5}", "5", True, True),
    (r"\boxed{5} then \boxed{}", "5", False, True),  # empty last box; lenient: the last number
    (r"\boxed{5}, cut off \boxed{\frac{1", "5", False, False),  # unclosed last box; last number 1
    (r"\boxed{4}, or maybe 5", "5", False, False),  # the box wins in both modes
    ("The answer is 5.", "5", False, True),
    ("Final answer: 5", "5", False, True),
    ("#### 5", "5", False, True),
    ("#### 1234", "1,234", False, True),
    ("so we get 5", "5", False, True),
    ("no number", "5", False, False),
]


@pytest.mark.parametrize("response, gold, strict, lenient", STRICT_VS_LENIENT)
def test_strict_is_the_last_box_only(response, gold, strict, lenient):
    assert is_correct(response, gold, mode="strict") is strict
    assert is_correct(response, gold, mode="lenient") is lenient


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        is_correct("42", "42", mode="loose")
    with pytest.raises(ValueError):
        grade_many(["42"], ["42"], mode="loose")


def test_numeric_gold_and_string_fallback():
    assert is_correct(r"\boxed{7}", 7)
    assert is_correct(r"\boxed{\text{odd}}", r"\text{odd}")


def test_pathological_answer_is_cheap_and_false():
    grades = grade_many([r"\boxed{10^{10^{10^{10}}}}", "\\boxed{9**9**9**9}"], ["42", "42"], timeout_s=2)
    assert list(grades) == [False, False]
    assert grades.max_item_seconds < 1.0  # hard caps: sympy never sees these


# -- time bounds off the main thread (docs/algorithm.md, Pitfalls, 6) ---------------------------
def test_grade_many_from_a_worker_thread():
    out = {}

    def run():
        try:
            out["grades"] = grade_many([r"\boxed{\frac12}", r"\boxed{3}", "garbage", None],
                                       ["0.5", "4", "1", "1"], timeout_s=5)
        except BaseException as err:  # noqa: BLE001 - surfaced by the assert below
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not thread.is_alive() and "error" not in out
    grades = out["grades"]
    assert list(grades) == [True, False, False, False]
    assert grades.backend == "processes" and grades.errors == 0 and grades.timeouts == 0


def test_is_correct_from_a_worker_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("ok", is_correct(r"\boxed{2}", "2")))
    thread.start()
    thread.join(120)
    assert out == {"ok": True}


def test_overrunning_worker_is_killed_and_replaced(monkeypatch):
    monkeypatch.setattr(grading, "HARD_KILL_GRACE_S", -0.999)  # parent gives up after ~1 ms
    grades = grade_many([r"\boxed{1}", r"\boxed{2}", r"\boxed{3}"], ["1", "2", "3"], timeout_s=1.0, workers=1)
    assert list(grades) == [False, False, False]
    assert grades.timeouts == 3


def test_workers_zero_needs_main_thread():
    out = {}

    def run():
        try:
            grade_many(["1"], ["1"], workers=0)
        except ValueError as err:
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert "error" in out


def test_grade_many_checks_lengths():
    with pytest.raises(ValueError):
        grade_many(["1", "2"], ["1"])
    assert list(grade_many([], [])) == []


def test_deadline_cuts_sympy_when_caps_are_bypassed(monkeypatch):
    """Without the hard caps, 10^{10^{10}} reaches sympy: the per-item deadline still ends it."""
    monkeypatch.setattr(grading, "_too_risky", lambda answer: False)
    grades = grade_many([r"\boxed{10^{10^{10}}}"], ["42"], timeout_s=0.5)
    assert list(grades) == [False]
    assert grades.timeouts == 1 and grades.max_item_seconds < 1.5
