"""Bad rows: each class raises a DataError naming file, row and field, or is skipped and counted."""
from __future__ import annotations

import json

import pytest

from opsd_kit.data.problems import DataError, load_problems

GOOD = {"id": "a", "question": "What is 2+2?", "solution": "2+2 = \\boxed{4}"}


def _jsonl(tmp_path, rows, name="bad.jsonl"):
    """Write rows (dicts, or raw bytes for a broken line) as JSON lines."""
    path = tmp_path / name
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    return path


def _row(i, **changes):
    return {**GOOD, "id": f"r{i}", **changes}


def _raises(path, row, field, reason, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_problems(path, **kwargs)
    error = info.value
    message = str(error)
    assert str(path) in message and f"row {row}," in message and repr(field) in message, message
    assert (error.row, error.field, error.reason) == (row, field, reason)
    return error


def test_truncated_last_jsonl_line(tmp_path):
    path = _jsonl(tmp_path, [_row(0), _row(1), b'{"id": "r2", "question": "What is 3+'])
    _raises(path, 2, "question", "invalid JSON")


def test_latin1_bytes_in_jsonl(tmp_path):
    bad = json.dumps(_row(1, question="Caf\u00e9 bill?"), ensure_ascii=False).encode("latin-1") + b"\n"
    path = _jsonl(tmp_path, [_row(0), bad])
    error = _raises(path, 1, "question", "undecodable")
    assert "UTF-8" in str(error)


def test_latin1_bytes_in_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes("question,solution\nOk?,\\boxed{1}\nCaf\u00e9?,\\boxed{2}\n".encode("latin-1"))
    _raises(path, 1, "question", "undecodable")


def test_missing_column_in_table_raises_in_both_modes(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("problem,answer\nWhat?,1\n", encoding="utf-8")
    for mode in ("raise", "skip"):
        error = _raises(path, 0, "solution", "missing column", on_invalid=mode)
        assert "problem" in str(error), "the message lists the columns that exist"
    _raises(path, 0, "question", "missing column", fields={"question": "prompt"})


def test_missing_key_in_jsonl_row(tmp_path):
    row = _row(1)
    del row["solution"]
    _raises(_jsonl(tmp_path, [_row(0), row]), 1, "solution", "missing field")


@pytest.mark.parametrize("value", ["", "   ", None])
def test_empty_field(tmp_path, value):
    _raises(_jsonl(tmp_path, [_row(0), _row(1, question=value)]), 1, "question", "empty field")


def test_empty_csv_cell(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text('question,solution\nOk?,"\\boxed{1}"\n"",\\boxed{2}\n', encoding="utf-8")
    _raises(path, 1, "question", "empty field")


def test_duplicate_ids(tmp_path):
    error = _raises(_jsonl(tmp_path, [_row(0), _row(1), _row(2, id="r0")]), 2, "id", "duplicate id")
    assert "row 0" in str(error)


def test_unparseable_answer(tmp_path):
    path = _jsonl(tmp_path, [_row(0), _row(1, solution="The answer is four.")])
    _raises(path, 1, "answer", "no answer")
    _raises(_jsonl(tmp_path, [_row(0)], "g.jsonl"), 0, "answer", "no answer", answer_from="gsm8k")


def test_raise_stops_at_the_first_bad_row(tmp_path):
    path = _jsonl(tmp_path, [_row(0), _row(1, question=""), _row(2, solution="none")])
    _raises(path, 1, "question", "empty field")


def test_skip_mode_counts_every_class(tmp_path):
    missing = _row(5)
    del missing["question"]
    rows = [
        _row(0),
        _row(1, question=""),
        json.dumps(_row(2, question="Caf\u00e9?"), ensure_ascii=False).encode("latin-1") + b"\n",
        _row(3, solution="no box here"),
        _row(4, id="r0"),
        missing,
        _row(6),
        b'{"id": "r7", "question": "trunc',
    ]
    problems, report = load_problems(_jsonl(tmp_path, rows), on_invalid="skip")
    assert [p.id for p in problems] == ["r0", "r6"]
    assert report.skipped == {"empty field": 1, "undecodable": 1, "no answer": 1, "duplicate id": 1,
                              "missing field": 1, "invalid JSON": 1}
    assert (report.n_read, report.n_kept, report.n_skipped) == (8, 2, 6)
    assert len(report.examples) == 5 and "row 1" in report.examples[0]
    assert "skipped (duplicate id): 1" in str(report)


def test_bad_mode_names_are_rejected(tmp_path):
    path = _jsonl(tmp_path, [_row(0)])
    with pytest.raises(ValueError, match="on_invalid"):
        load_problems(path, on_invalid="ignore")
    with pytest.raises(ValueError, match="unknown Problem fields"):
        load_problems(path, fields={"prompt": "question"})


def test_row_that_is_not_an_object(tmp_path):
    path = _jsonl(tmp_path, [_row(0), b"[1, 2]\n"])
    with pytest.raises(DataError, match=r"row 1, .*not a JSON object"):
        load_problems(path)


@pytest.mark.parametrize("rows, row, field", [
    ([_row(0), b'{"id": "r1", "question": "What is 3+'], 1, "question"),  # truncated
    ([_row(0), _row(1, solution="no box")], 1, "answer"),  # unparseable answer
    ([_row(0), _row(1, id="r0")], 1, "id"),  # duplicate id
])
def test_trainer_given_bad_train_data_fails_with_the_data_error_before_the_model_loads(
        tmp_path, no_model_loads, rows, row, field):
    from _faults import tiny_config

    from opsd_kit.trainer import Trainer

    path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError) as info:
        Trainer(tiny_config(tmp_path / "run", train_data=str(path)))
    assert str(path) in str(info.value) and f"row {row}," in str(info.value) and info.value.field == field
