"""Time-bounded grading: is a response's final answer equal to the gold answer?

Answers are read by `opsd_kit.data.answers` (the same parser derives the training answers), then
compared with the gold answer by math_verify, with a normalised string match as fallback.
Two modes:

- ``"strict"``: the last ``\\boxed{}``/``\\fbox{}`` only, as the official OPSD evaluator grades;
  an empty or unclosed last box, a GSM8K ``#### N`` or "the answer is 5" without a box is wrong;
- ``"lenient"``: the marked answer (the last box, else ``#### N``, else "the answer is ..." /
  "final answer: ..."), else the last number of the response (small models often never box).

Two training-reward modes reproduce the official code's rewards (`opsd_kit.data.answers`):
``"first_box_exact"`` (:func:`first_box_exact_match`, the GRPO baseline's) and
``"first_box_after_think"`` (RLSD's: the first box after ``</think>``, math_verify, then a
whitespace-free lower-cased match).

Equivalences are math_verify's: ``1/2 = \\frac{1}{2} = 0.5``, ``\\dfrac``, sets in any order,
intervals, ``18 = 18.00 = \\$18``, ``1,234 = 1234``. A gold ``10\\%`` accepts ``10``,
``10\\%`` and ``0.1`` (math_verify reads ``\\%`` as a unit and also as 1/100; we keep that).
Unicode: NFKC maps fullwidth digits (``３``) to ASCII; other scripts' digits (Arabic-Indic
``٣``) are not numbers to the grader.

Time bounds (docs/algorithm.md, Pitfalls, 6; Math-Verify #50, #55: math_verify's own timeouts
use ``signal.alarm``, main thread only, whole seconds, per call). :func:`grade_many` bounds every item:

- in the main thread: one ``setitimer`` deadline per item (float seconds) around the whole
  extraction + parse + verify, math_verify's own timeouts off;
- elsewhere (or with ``workers >= 1``): grading subprocesses, each grading in its own main
  thread under the same deadline, and the parent kills and replaces a worker that overruns
  ``timeout_s + HARD_KILL_GRACE_S`` (code stuck in C ignores signals).

Before math_verify, hard caps send pathological answers (over ``MAX_ANSWER_CHARS``, brackets
nested deeper than ``MAX_NESTING``, exponent towers like ``10^{10^{10}}`` or
``9**9**9``, powers/factorials/binomials with numbers over ``MAX_OPERAND_DIGITS`` digits or
mixed together) to the string match only, so hostile text is cheap. Extraction is linear
in the text length (see `opsd_kit.data.answers`).

math_verify is imported inside functions.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import unicodedata
from pathlib import Path

from opsd_kit.data.answers import check_mode, extract, matching_brace

MAX_ANSWER_CHARS = 1000
"""Extracted answers longer than this are compared as strings only."""
MAX_NESTING = 12
"""Deeper ``{([`` nesting is compared as strings only."""
MAX_POWERS = 8
MAX_OPERAND_DIGITS = 5
"""With a power, factorial or binomial around, a number over this many digits means string
match only: ``2^{99999}`` goes to sympy, ``2^{123456}`` and ``1000000!`` do not."""
HARD_KILL_GRACE_S = 2.0
"""Extra wall time a worker process gets beyond ``timeout_s`` before it is killed."""
_WORKER_START_TIMEOUT_S = 120.0

# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", re.ASCII)
_TRAILING_ZEROS = re.compile(r"(-?\d+)\.0+", re.ASCII)
_POWER = re.compile(r"\^|\*\*")
_TOWER = re.compile(r"(?:\^|\*\*)\s*[\w.]+\s*(?:\^|\*\*)")  # a^b^c, 9**9**9
_DIGITS = re.compile(r"\d+", re.ASCII)


def _normalize(s: str) -> str:
    """String-match form: no spaces, $, \\text{}, \\left/\\right, thousands commas, trailing .0."""
    s = unicodedata.normalize("NFKC", s)
    s = _TEXT_CMD.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("\\$", ""), ("$", ""), ("\\!", ""), ("\\,", ""), ("\\;", "")):
        s = s.replace(old, new)
    s = "".join(s.split()).rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return _TRAILING_ZEROS.fullmatch(s).group(1) if _TRAILING_ZEROS.fullmatch(s) else s


def _nesting_depth(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return deepest


def _too_risky(answer: str) -> bool:
    """True when sympy could spend unbounded time or memory on ``answer`` (see module doc)."""
    if len(answer) > MAX_ANSWER_CHARS or _nesting_depth(answer) > MAX_NESTING:
        return True
    powers = len(_POWER.findall(answer))
    if powers > MAX_POWERS or _TOWER.search(answer):
        return True
    for m in _POWER.finditer(answer):  # at most MAX_POWERS of them
        start = m.end() + len(answer[m.end():]) - len(answer[m.end():].lstrip())
        if answer[start:start + 1] in ("{", "("):
            close = matching_brace(answer, start) if answer[start] == "{" else None
            exponent = answer[start + 1:len(answer) if close is None else close]
            if _POWER.search(exponent) or "!" in exponent:
                return True  # a tower: 10^{10^{10}}, 9**(9**9)
    big_number = any(len(d) > MAX_OPERAND_DIGITS for d in _DIGITS.findall(answer))
    combinatorial = "!" in answer or "binom" in answer or "choose" in answer
    return (big_number and (powers > 0 or combinatorial)) or (combinatorial and powers > 0)


def _wrap(answer: str) -> str:
    answer = answer.strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$")
    return f"\\boxed{{{answer}}}"


def _math_parse(answer: str) -> list:
    """math_verify parse of an answer (boxed first, raw text as fallback); timeouts are ours."""
    from math_verify import parse

    parsed = parse(_wrap(answer), parsing_timeout=None)
    if not parsed:
        parsed = parse(answer, parsing_timeout=None)
    return parsed


def _answers_match(answer: str, gold: str) -> bool:
    """math_verify equivalence (gold parsed first), then the normalised string match."""
    from math_verify import verify

    if not _too_risky(answer) and not _too_risky(gold):
        gold_parsed = _math_parse(gold)
        pred_parsed = _math_parse(answer)
        if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
            return True
    norm = _normalize(answer)
    return bool(norm) and norm == _normalize(gold)


def _gold_text(gold) -> str:
    """Gold answers as text: numbers via ``str``, None or anything unprintable as ``""``."""
    if isinstance(gold, str):
        return gold
    try:
        return "" if gold is None else str(gold)
    except Exception:  # noqa: BLE001
        return ""


def first_box_exact_match(response, gold) -> bool:
    r"""The official GRPO baseline's reward (grpo_train.py L47-104): the content of the FIRST
    ``\boxed{}`` of ``response`` equals ``gold`` as strings after stripping and lower-casing.
    No math equivalence: ``\frac{1}{2}`` is not ``0.5``, ``1,000`` is not ``1000``. No box, an
    unclosed first box or a non-string response is False.

    >>> first_box_exact_match(r"so \boxed{ 12 } and \boxed{13}", "12"), first_box_exact_match(r"\boxed{X}", " x ")
    (True, True)
    >>> first_box_exact_match(r"\boxed{1} then \boxed{2}", "2"), first_box_exact_match(r"\boxed{0.5}", r"\frac{1}{2}")
    (False, False)
    """
    from opsd_kit.data.answers import extract_first_boxed

    answer = extract_first_boxed(response)
    return answer is not None and answer.strip().lower() == _gold_text(gold).strip().lower()


def _squeezed(s: str) -> str:
    """Whitespace removed, lower-cased: rlsd_train.py L108-112's string fallback."""
    return "".join(s.split()).lower()


def _grade(response, gold, mode: str) -> bool:
    """Unbounded grading of one response (callers bound it)."""
    if mode == "first_box_exact":
        return first_box_exact_match(response, gold)
    gold = _gold_text(gold)
    answer = extract(response, mode)
    if answer is None or not gold.strip():
        return False
    if mode == "first_box_after_think" and _squeezed(answer) and _squeezed(answer) == _squeezed(gold):
        return True
    return _answers_match(answer, gold)


class _GradingTimeout(BaseException):
    """Raised by the per-item deadline; a BaseException so that no ``except Exception`` eats it."""


def _can_use_signals() -> bool:
    import signal

    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _grade_with_deadline(response, gold, mode: str, timeout_s: float) -> tuple[bool, str]:
    """Grade in the main thread under a ``setitimer`` deadline: ``(correct, "ok"|"timeout"|"error")``.

    A caller's pending ``SIGALRM`` timer (e.g. pytest-timeout) is restored afterwards.
    """
    import signal

    def on_alarm(signum, frame):
        raise _GradingTimeout

    start = time.monotonic()
    try:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1e-3))
        try:
            return _grade(response, gold, mode), "ok"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay:
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3),
                                 old_interval)
    except _GradingTimeout:
        return False, "timeout"
    except Exception:  # noqa: BLE001 - grading never crashes the caller
        return False, "error"


_LOG_FILTER_ADDED = False


def _quiet_math_verify() -> None:
    """Drop math_verify's "timeout is disabled" warning: our deadline replaces its timeouts."""
    global _LOG_FILTER_ADDED
    if _LOG_FILTER_ADDED:
        return
    import logging

    def keep(record) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(keep)
    _LOG_FILTER_ADDED = True


def is_correct(response, gold, mode: str = "strict", timeout_s: float = 5.0) -> bool:
    """True when ``response``'s final answer equals ``gold`` (see the module doc).

    Never raises on odd input (anything unparsable, a timeout or an error is False). Bounded
    by ``timeout_s``; off the main thread this starts a worker process, so batch such calls
    with :func:`grade_many`.
    """
    check_mode(mode)
    return bool(grade_many([response], [gold], mode, timeout_s=timeout_s)[0])


# --------------------------------------------------------------------------------------------
# Many items: in-process (main thread) or worker processes
# --------------------------------------------------------------------------------------------
class Grades(list):
    """``list[bool]`` of verdicts, plus what it cost.

    Attributes: ``timeouts`` and ``errors`` (items graded False for those reasons),
    ``item_seconds`` (wall time per item), ``seconds`` (the whole call), ``backend``
    (``"inline"`` or ``"processes"``).
    """

    def __init__(self, verdicts=(), *, timeouts=0, errors=0, item_seconds=(), seconds=0.0, backend=""):
        super().__init__(verdicts)
        self.timeouts = timeouts
        self.errors = errors
        self.item_seconds = list(item_seconds)
        self.seconds = seconds
        self.backend = backend

    @property
    def max_item_seconds(self) -> float:
        return max(self.item_seconds, default=0.0)


def grade_many(responses, golds, mode: str = "strict", timeout_s: float = 5.0,
               workers: int | None = None) -> Grades:
    """Grade ``responses[i]`` against ``golds[i]`` in ``mode`` (``"strict"``: the last box only;
    ``"lenient"``: also ``####``, "the answer is", the last number; see the module doc); every
    item bounded in time; odd responses or golds never raise (a bad mode or lengths do).

    ``workers``: None picks in-process grading in the main thread and ``min(4, cpu_count)``
    grading subprocesses elsewhere; 0 forces in-process (main thread only); ``n >= 1`` forces
    ``n`` subprocesses (``python -c``, POSIX; the caller's ``__main__`` is never re-run). A
    subprocess that overruns its item is killed and replaced (counted in ``timeouts``).
    """
    check_mode(mode)
    responses, golds = list(responses), list(golds)
    if len(responses) != len(golds):
        raise ValueError(f"grade_many: {len(responses)} responses but {len(golds)} golds")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if workers is None:
        workers = 0 if _can_use_signals() else min(4, os.cpu_count() or 1)
    if workers == 0 and not _can_use_signals():
        raise ValueError("grade_many(workers=0) needs the main thread (signal-based deadline)")
    start = time.monotonic()
    items = list(zip(responses, golds))
    if not items:
        return Grades(backend="none")
    if workers == 0:
        _quiet_math_verify()
        results = []
        for response, gold in items:
            t0 = time.monotonic()
            ok, status = _grade_with_deadline(response, gold, mode, timeout_s)
            results.append((ok, status, time.monotonic() - t0))
        backend = "inline"
    else:
        safe = [(r if isinstance(r, str) else None, _gold_text(g)) for r, g in items]
        results = _grade_in_subprocesses(safe, mode, timeout_s, min(workers, len(items)))
        backend = "processes"
    return Grades([ok for ok, _, _ in results],
                  timeouts=sum(s == "timeout" for _, s, _ in results),
                  errors=sum(s == "error" for _, s, _ in results),
                  item_seconds=[t for _, _, t in results],
                  seconds=time.monotonic() - start, backend=backend)


def _worker_loop() -> None:
    """Grading subprocess: JSON lines ``[index, response, gold, mode, timeout_s]`` on stdin,
    ``[index, correct, status, seconds]`` on stdout; "ready" once math_verify is imported."""
    import sys

    _quiet_math_verify()
    import math_verify  # noqa: F401 - imported before "ready" so no item pays for it

    print('"ready"', flush=True)
    for line in sys.stdin:
        index, response, gold, mode, timeout_s = json.loads(line)
        start = time.monotonic()
        ok, status = _grade_with_deadline(response, gold, mode, timeout_s)
        print(json.dumps([index, ok, status, time.monotonic() - start]), flush=True)


class _Worker:
    """One grading subprocess (``python -c``: nothing of the caller's ``__main__`` is re-run)."""

    def __init__(self):
        import subprocess
        import sys

        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from opsd_kit.evaluation.grading import _worker_loop; _worker_loop()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8", env=env)
        self.task = None  # (index, started) while busy

    def ready(self, timeout_s: float) -> bool:
        return self.readable(timeout_s) and self.proc.stdout.readline().strip() == '"ready"'

    def readable(self, timeout_s: float) -> bool:
        import select

        return bool(select.select([self.proc.stdout], [], [], max(0.0, timeout_s))[0])

    def send(self, index: int, response, gold, mode: str, timeout_s: float) -> None:
        self.proc.stdin.write(json.dumps([index, response, gold, mode, timeout_s]) + "\n")
        self.proc.stdin.flush()
        self.task = (index, time.monotonic())

    def receive(self) -> tuple[bool, str, float]:
        _, ok, status, seconds = json.loads(self.proc.stdout.readline())
        self.task = None
        return bool(ok), status, seconds

    def close(self, kill: bool = False) -> None:
        try:
            if kill:
                self.proc.kill()
            else:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - best effort; a stuck worker is killed below
            self.proc.kill()
            self.proc.wait()


def _grade_in_subprocesses(items: list, mode: str, timeout_s: float, workers: int) -> list:
    """``(correct, status, seconds)`` per item, graded by ``workers`` subprocesses.

    A worker that has not answered ``timeout_s + HARD_KILL_GRACE_S`` after it got its item is
    killed and replaced (the item: ``"timeout"``); one that dies or sends garbage: ``"error"``.
    """
    import select

    results: list = [(False, "error", 0.0)] * len(items)
    hard_limit = timeout_s + HARD_KILL_GRACE_S

    def fresh():
        try:
            worker = _Worker()
        except Exception:  # noqa: BLE001 - cannot start a process: items become errors
            return None
        if worker.ready(_WORKER_START_TIMEOUT_S):
            return worker
        worker.close(kill=True)
        return None

    pool = [w for w in (fresh() for _ in range(workers)) if w is not None]
    todo = list(range(len(items)))[::-1]  # pop() from the end: first item first
    try:
        while pool and (todo or any(w.task for w in pool)):
            for i, worker in enumerate(pool):
                if worker.task is None and todo:
                    index = todo.pop()
                    response, gold = items[index]
                    try:
                        worker.send(index, response, gold, mode, timeout_s)
                    except Exception:  # noqa: BLE001 - the worker died
                        worker.close(kill=True)
                        pool[i] = fresh()
            pool = [w for w in pool if w is not None]
            busy = [w for w in pool if w.task]
            if not busy:
                continue
            oldest = min(w.task[1] for w in busy)
            select.select([w.proc.stdout for w in busy], [], [],
                          max(0.0, oldest + hard_limit - time.monotonic()))
            for i, worker in enumerate(pool):
                if not worker.task:
                    continue
                index, started = worker.task
                if worker.readable(0):
                    try:
                        results[index] = worker.receive()
                        continue
                    except Exception:  # noqa: BLE001 - the worker died (e.g. out of memory)
                        results[index] = (False, "error", time.monotonic() - started)
                elif time.monotonic() - started >= hard_limit:
                    results[index] = (False, "timeout", time.monotonic() - started)
                else:
                    continue
                worker.close(kill=True)
                pool[i] = fresh()
            pool = [w for w in pool if w is not None]
    finally:
        for worker in pool:
            worker.close(kill=bool(worker.task))
    return results
