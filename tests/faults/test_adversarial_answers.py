"""Hostile responses: grading completes, returns bools, and stays bounded per item.

See docs/algorithm.md, Pitfalls, 6 (Math-Verify #50, #55).

A generated corpus (over 1,000 strings: huge exponents, exponent towers, 10k-deep braces,
100 KB responses, unbalanced LaTeX, control characters, NUL bytes, other scripts' digits,
RTL marks, emoji, very long numbers, empty and repeated boxes) is graded against a few golds.
The per-item time bound is a hang check, not a speed benchmark: it is the timeout plus slack.
"""
from __future__ import annotations

import itertools
import threading
import time

from opsd_kit.data.answers import extract_boxed, extract_marked
from opsd_kit.evaluation.evaluate import grade_many, last_number
from opsd_kit.evaluation.grading import HARD_KILL_GRACE_S

TIMEOUT_S = 2.0
GOLDS = ["42", r"\frac{1}{2}", r"\{1,2\}", "(0,1]", "10^{10}"]


def hostile_corpus() -> list:
    deep = "{" * 10_000 + "1" + "}" * 10_000
    big = "x" * 100_000
    cores = [
        r"10^{10^{10^{10}}}", r"10^{10^{10}}", "9**9**9**9", "9**(9**9)", "2^{2^{40}}", r"(10^{100000})!",
        "1000000!", r"2^{123456}", r"\binom{10^{9}}{5\cdot 10^{8}}", r"e^{e^{e^{99}}}", r"\sqrt[10^{9}]{2}",
        r"\frac{", r"\frac{1}{", r"\left(", r"\right)", "{", "}", "}{", r"\{", r"\}", r"\\\\", "$", "$$", "",
        " ", "\x00", "\x00" * 100, "\x07\x1b[31m", "\u200f42\u200e", "\u202e24", "٣", "٤٢", "３", "４２",
        "🙂", "🙂" * 1000, "\ud800", "9" * 5000, "1" * 50_000, "-" + "0" * 3000 + "1", "1e999999",
        "0." + "3" * 4000, "NaN", "inf", r"\infty", "-\\infty", r"\emptyset", "x=", "=", "==", "<=>",
        r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{matrix", r"\text{" * 50, r"\sqrt{" * 200,
        "(" * 5000, "[" * 3000 + "]", "1/0", "0/0", r"\frac{1}{0}", "a" * 2000, deep[:2000], "42" * 3000,
        r"\boxed{\boxed{\boxed{42}}}", r"\fbox{", "#### ", "#### 42" * 100, "The answer is " * 500,
        "final answer:" + " " * 50_000, "x^" * 2000, "**" * 3000, "^{" * 3000, "!" * 5000,
    ]
    wrappers = [  # "@" marks where the core goes
        "@", r"\boxed{@}", "The answer is @.", "#### @", r"\fbox{@}", r"$\boxed{@}$", r"so \boxed @ end",
        r"\boxed{} then \boxed{@}", "@" + big, big + r"\boxed{@}", "Final answer: @", r"\boxed{@} so we get @",
        "@\n" * 3, "step 1: 7\n" * 200 + "@",
    ]
    corpus: list = [w.replace("@", c) for c, w in itertools.product(cores, wrappers)]
    corpus += [
        deep, r"\boxed" + deep, r"\boxed{" * 10_000, "}" * 10_000 + r"\boxed{42}", r"\boxed{}" * 5000,
        r"\boxed{1}" * 5000, r"\boxed " * 5000, "\\" * 100_000, big, "\x00" * 100_000,
        "٣" * 100_000, "\u200f" * 50_000 + r"\boxed{42}", r"\boxed{" + "1" * 99_000 + "}",
        None, 42, 4.2, b"\\boxed{42}", ["42"], object(),
    ]
    return corpus


def test_corpus_is_large_enough():
    assert len(hostile_corpus()) >= 1000


def test_extraction_never_raises_and_is_fast():
    start = time.monotonic()
    for text in hostile_corpus():
        for answer in (extract_boxed(text), extract_marked(text)):
            assert answer is None or isinstance(answer, str)
        number = last_number(text)
        assert number is None or isinstance(number, str)
    assert time.monotonic() - start < 30  # linear-time extraction; quadratic would take minutes


def test_hostile_corpus_grades_bounded_in_main_thread():
    corpus = hostile_corpus()
    responses = corpus
    golds = [GOLDS[i % len(GOLDS)] for i in range(len(responses))]
    for mode in ("strict", "lenient"):
        grades = grade_many(responses, golds, mode, timeout_s=TIMEOUT_S)
        assert grades.backend == "inline"
        assert len(grades) == len(responses)
        assert all(type(g) is bool for g in grades)
        assert grades.max_item_seconds < TIMEOUT_S + 1.0, grades.max_item_seconds
    assert grade_many([r"\boxed{42}", r"\boxed{\dfrac12}"], ["42", r"\frac{1}{2}"]) == [True, True]


def test_hostile_sample_grades_bounded_off_main_thread():
    corpus = hostile_corpus()
    sample = corpus[::25] + corpus[-19:]
    golds = [GOLDS[i % len(GOLDS)] for i in range(len(sample))]
    out = {}

    def run():
        out["grades"] = grade_many(sample, golds, "lenient", timeout_s=TIMEOUT_S, workers=2)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(300)
    assert not thread.is_alive()
    grades = out["grades"]
    assert grades.backend == "processes" and len(grades) == len(sample)
    assert all(type(g) is bool for g in grades)
    assert grades.max_item_seconds < TIMEOUT_S + HARD_KILL_GRACE_S + 1.0
