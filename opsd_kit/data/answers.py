r"""Answer extraction: the one parser behind training data, grading, rewards and diagnostics.

Everything that reads a final answer out of text goes through here: `opsd_kit.data` derives a
training problem's answer from its reference solution with :func:`extract_boxed`, and
`opsd_kit.evaluation.evaluate` (evaluation, the GRPO reward, the teacher-student gap) grades what
:func:`extract` returns. So the answer a problem is trained towards and the answer the grader
reads are found by the same rules.

The last box wins. :func:`extract_boxed` reads only the last ``\boxed``/``\fbox`` command of the
text; when that box is empty or never closed the answer is None, even if an earlier box had
content (``\boxed{9} then \boxed{}`` gives None; ``\boxed{} but \boxed{9}`` gives ``9``). This is
what the official OPSD evaluator grades (arXiv 2601.18734: the last ``\boxed{}``, with
math_verify). Inside a box, ``\{`` and ``\}`` are literal braces and ``\\`` is a line break, not
an escape of the next brace.

Two evaluation modes (:data:`MODES`):

- ``"strict"``: the last box only (:func:`extract_boxed`);
- ``"lenient"``: the marked answer (:func:`extract_marked`: the last box, else the last GSM8K
  ``#### N``, else the last "the answer is ..." / "final answer: ..."), else the last number
  (:func:`last_number`).

Two more grading modes reproduce the official training rewards (:data:`GRADING_MODES`):

- ``"first_box_exact"``: the FIRST ``\boxed{`` of the text (:func:`extract_first_boxed`),
  compared by exact string match after stripping and lower-casing (official grpo_train.py
  L47-104, the GRPO baseline's reward; `opsd_kit.evaluation.grading.first_box_exact_match`);
- ``"first_box_after_think"``: the first ``\boxed{`` after the last ``</think>`` (the whole
  text without one), math_verify, then a match with whitespace removed and lower-cased
  (official rlsd_train.py L59-115, RLSD's reward).

Every function here takes any object (a non-string gives None), never raises on odd text, and
runs in time linear in the text's length (10k-deep braces and 100 KB strings included).
"""
from __future__ import annotations

import re

MODES = ("strict", "lenient")
"""The evaluation modes: every evaluation grades in both."""
GRADING_MODES = (*MODES, "first_box_exact", "first_box_after_think")
"""Every mode :func:`extract` and the grader accept (a training reward can use any)."""

# A box command; "\boxedfoo" or "\fboxsep" is another command, not a box.
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_BRACE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape pair (\{ \} \\ ...) is consumed whole
_TOKEN = re.compile(r"[^\s${}]+")
_PHRASE = re.compile(r"final\s+answer\s*(?:is\b)?\s*[:：]?|the\s+answer\s+is\b\s*[:：]?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?", re.ASCII)
_SPAN = 300
"""Characters read after a ``####``, an answer phrase or a brace-less ``\\boxed``."""


def matching_brace(text: str, open_index: int) -> int | None:
    r"""Index of the ``}`` closing the ``{`` at ``open_index``, or None when it is never closed.

    Escaped braces do not count: in ``{\{1,2\}}`` the group closes at the last character.
    Linear in the length of the text after ``open_index``.

    >>> matching_brace(r"{a{b}c}d", 0), matching_brace(r"{\}", 0), matching_brace(r"{\\}", 0)
    (6, None, 3)
    """
    depth = 0
    for m in _BRACE.finditer(text, open_index):
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def _last(pattern: re.Pattern, text: str):
    found = None
    for found in pattern.finditer(text):  # noqa: B007 - keep the last match
        pass
    return found


def extract_boxed(text) -> str | None:
    r"""Content of the LAST ``\boxed{...}``/``\fbox{...}`` in ``text``, stripped; None when there is
    no box or the last one is empty or unclosed.

    Nested braces are kept, ``\{``/``\}`` are literal, ``\boxed 5`` (no braces) gives one token;
    in nested boxes the innermost, which comes last, is the answer.

    >>> extract_boxed(r"so \boxed{\frac{1}{2}}"), extract_boxed(r"\fbox{\{1,2\}}"), extract_boxed(r"\boxed 5$.")
    ('\\frac{1}{2}', '\\{1,2\\}', '5')
    >>> extract_boxed(r"\boxed{1} then \boxed{2}"), extract_boxed(r"x \boxed{a\}b}")
    ('2', 'a\\}b')
    >>> extract_boxed(r"\boxed{\boxed{7}}"), extract_boxed(r"\boxed{a\\}b}")  # innermost last; \\ is a line break
    ('7', 'a\\\\')
    >>> [extract_boxed(t) for t in (r"\boxed{9} then \boxed{}", r"\boxed{3}, cut off \boxed{\frac{1", "no box", 7)]
    [None, None, None, None]
    """
    if not isinstance(text, str):
        return None
    try:
        last = _last(_BOX, text)
        if last is None:
            return None
        start = last.end()
        if text.startswith("{", start):
            close = matching_brace(text, start)
            content = text[start + 1:close] if close is not None else ""
        else:
            token = _TOKEN.match(text, start, start + _SPAN)
            content = token.group().rstrip(".,;") if token else ""
        return content.strip() or None
    except Exception:  # noqa: BLE001 - extraction must never take the caller down
        return None


def _tidy(rest: str) -> str | None:
    """The answer that follows a marker: a ``$...$`` span or the rest of the sentence."""
    rest = rest[:_SPAN].split("\n", 1)[0].strip().strip("*").strip()
    if rest.startswith("$"):
        inner = rest.lstrip("$")
        end = inner.find("$")
        rest = inner[:end] if end >= 0 else inner
    else:
        rest = re.split(r"\.\s", rest, maxsplit=1)[0]
    rest = rest.strip().strip("*").strip().rstrip(".,;").strip()
    return rest or None


def extract_hashes(text) -> str | None:
    r"""The answer after the last GSM8K ``####`` (its line, up to the end of the sentence), or None.

    >>> extract_hashes("work\n#### 1,234\n"), extract_hashes("#### $5$. Done"), extract_hashes("#### ")
    ('1,234', '5', None)
    """
    if not isinstance(text, str):
        return None
    hashes = text.rfind("####")
    return _tidy(text[hashes + 4:]) if hashes >= 0 else None


def extract_marked(text) -> str | None:
    r"""The marked final answer: :func:`extract_boxed`, else :func:`extract_hashes`, else what follows
    the last "the answer is" / "final answer:" (a ``$...$`` span or the rest of the sentence).

    >>> extract_marked(r"\boxed{41}, or maybe 42"), extract_marked("The answer is 42."), extract_marked("so 42")
    ('41', '42', None)
    >>> extract_marked(r"Final Answer: The final answer is $\frac{3}{4}$. I hope it is correct.")
    '\\frac{3}{4}'
    """
    if not isinstance(text, str):
        return None
    try:
        found = extract_boxed(text) or extract_hashes(text)
        if found is None:
            phrase = _last(_PHRASE, text)
            found = _tidy(text[phrase.end():]) if phrase else None
        return found
    except Exception:  # noqa: BLE001 - extraction must never take the caller down
        return None


def last_number(text) -> str | None:
    """The last number in ``text`` (ASCII digits; ``-3``, ``1,234``, ``2.5``, ``3/4``), or None.

    >>> last_number("we get 3 then 1,234."), last_number("x = -2.5"), last_number("٣"), last_number(None)
    ('1,234', '-2.5', None, None)
    """
    if not isinstance(text, str):
        return None
    found = _last(_NUMBER, text)
    return found.group() if found else None


def extract_first_boxed(text, after_think: bool = False) -> str | None:
    r"""Content of the FIRST ``\boxed{...}`` of ``text``, stripped (an empty box gives ``""``);
    None when there is none or it never closes. ``after_think``: only the text after the last
    ``</think>`` is read (all of it when there is none). Only the literal ``\boxed{`` opens a
    box here (no ``\fbox``, no space before the brace), as in the official training rewards
    (grpo_train.py L47-67, rlsd_train.py L59-78).

    >>> extract_first_boxed(r"\boxed{1} then \boxed{2}"), extract_first_boxed(r"\boxed{\frac{1}{2}}")
    ('1', '\\frac{1}{2}')
    >>> extract_first_boxed(r"<think>\boxed{1}</think> so \boxed{3}", after_think=True)
    '3'
    >>> [extract_first_boxed(t) for t in ("no box", r"\boxed{ }", r"\boxed{3", None)]
    [None, '', None, None]
    """
    if not isinstance(text, str):
        return None
    if after_think:
        think_end = text.rfind("</think>")
        if think_end >= 0:
            text = text[think_end + len("</think>"):]
    start = text.find("\\boxed{")
    if start < 0:
        return None
    open_index = start + len("\\boxed")
    close = matching_brace(text, open_index)
    return None if close is None else text[open_index + 1:close].strip()


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`GRADING_MODES`."""
    if mode not in GRADING_MODES:
        raise ValueError(f"mode must be one of {GRADING_MODES}, got {mode!r}")


def extract(text, mode: str) -> str | None:
    r"""The answer graded in ``mode``: ``"strict"`` the last box only; ``"lenient"`` the marked
    answer, else the last number. Raises ValueError for an unknown mode only.

    >>> [extract(t, "strict") for t in ("#### 5", "The answer is 5.", "so 5", r"\boxed{5}")]
    [None, None, None, '5']
    >>> [extract(t, "lenient") for t in ("#### 5", "The answer is 5.", "so 5", r"\boxed{5}")]
    ['5', '5', '5', '5']
    """
    check_mode(mode)
    if mode == "strict":
        return extract_boxed(text)
    if mode in ("first_box_exact", "first_box_after_think"):
        return extract_first_boxed(text, after_think=mode == "first_box_after_think")
    return extract_marked(text) or last_number(text)
