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


# -- prompts that cannot fit, found when the data loads -------------------------------------
LONG = "What is 1+1? " + "x" * 100_000  # a question of 100k characters: over any max_prompt_tokens


def _one_line_exit_2(argv, capsys, *fragments) -> str:
    from opsd_kit.apps.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.mark.parametrize("algorithm", ["opsd", "sft"])
def test_trainer_refuses_a_question_too_long_for_its_prompt_before_the_model_loads(
        tmp_path, no_model_loads, algorithm):
    from _faults import tiny_config

    from opsd_kit.trainer import Trainer

    path = _jsonl(tmp_path, [_row(0), _row(1), _row(2, question=LONG)])
    with pytest.raises(DataError) as info:
        Trainer(tiny_config(tmp_path / "run", algorithm, train_data=str(path)))
    error = info.value
    assert (error.row, error.field, error.reason) == (2, "question", "prompt too long")
    assert str(path) in str(error) and "max_prompt_tokens=768" in str(error) and "on_invalid='skip'" in str(error)
    # problems given in memory are checked the same way, by their position
    with pytest.raises(DataError, match=r"<list>: row 1, .*prompt has \d+ tokens"):
        Trainer(tiny_config(tmp_path / "run2", algorithm), problems=[_row(0), _row(1, question=LONG)])


def test_long_questions_are_skipped_and_counted_with_on_invalid_skip(tmp_path, tiny_tokenizer):
    from opsd_kit.data.sources import load_source
    from opsd_kit.prompts import PromptBuilder

    builder = PromptBuilder(tiny_tokenizer, max_prompt_tokens=768)
    path = _jsonl(tmp_path, [_row(0), _row(1, question=LONG), _row(2), _row(3, question=LONG)])
    problems, report = load_source(str(path), on_invalid="skip", check=builder.length_error)
    assert [p.id for p in problems] == ["r0", "r2"]
    assert report.skipped == {"prompt too long": 2} and "row 1," in report.examples[0]
    # a teacher prompt that cannot fit even without its solution is refused; the solution alone is cut later
    short = PromptBuilder(tiny_tokenizer, max_prompt_tokens=200)
    one = load_problems(_jsonl(tmp_path, [_row(0, question="q" * 60)], "t.jsonl"))[0][0]
    assert short.length_error(one, teacher=False) is None
    assert "teacher prompt needs" in short.length_error(one, teacher=True)


def test_a_subset_is_drawn_before_the_check_and_is_the_unchecked_subset(tmp_path, tiny_tokenizer):
    """load_source(size=k) checks only the k rows drawn, not every row, and draws the same k as
    without a check (`random_subset` of the valid rows by the seed); a refused row of the subset
    still names its file and row, or is skipped and counted."""
    import random

    from opsd_kit.data.sources import load_source
    from opsd_kit.prompts import PromptBuilder

    builder = PromptBuilder(tiny_tokenizer, max_prompt_tokens=768)
    checked = []

    def check(problem):
        checked.append(problem.id)
        return builder.length_error(problem)

    path = _jsonl(tmp_path, [_row(i) for i in range(20)])
    expected = [f"r{i}" for i in sorted(random.Random(3).sample(range(20), 5))]
    problems, _ = load_source(str(path), size=5, seed=3, check=check)
    assert [p.id for p in problems] == expected == checked
    assert [p.id for p in load_source(str(path), size=5, seed=3)[0]] == expected
    refused = int(expected[2][1:])
    path = _jsonl(tmp_path, [_row(i, question=LONG) if i == refused else _row(i) for i in range(20)], "long.jsonl")
    with pytest.raises(DataError) as info:
        load_source(str(path), size=5, seed=3, check=builder.length_error)
    assert (info.value.row, info.value.reason) == (refused, "prompt too long") and str(path) in str(info.value)
    kept, report = load_source(str(path), size=5, seed=3, on_invalid="skip", check=builder.length_error)
    assert [p.id for p in kept] == [i for i in expected if i != f"r{refused}"]
    assert report.skipped == {"prompt too long": 1} and f"row {refused}," in report.examples[0]


def test_cli_train_and_eval_print_one_line_for_a_question_too_long(tmp_path, no_model_loads, capsys):
    from _faults import tiny_config

    path = _jsonl(tmp_path, [_row(0), _row(1, question=LONG)])
    _one_line_exit_2(["train", "--profile", "tiny", "--set", f"run_dir={tmp_path / 'run'}", f"train_data={path}"],
                     capsys, str(path), "row 1,", "prompt too long")
    run = tmp_path / "finished"  # a run folder as eval reads it: its config and an adapter folder
    (run / "adapter").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(tiny_config(run).to_dict()))
    _one_line_exit_2(["eval", str(run), "--eval-profile", "tiny", "--data", str(path)],
                     capsys, str(path), "row 1,", "prompt too long")


# -- rows that load but look wrong: warnings in the report ----------------------------------
def test_answer_disagreeing_with_its_solution_or_nan_is_kept_and_warned(tmp_path):
    path = tmp_path / "answers.csv"
    path.write_text("question,solution,answer,notes,Answer_key\n"
                    "q0?,so \\boxed{4},4,a,x\n"
                    "q1?,so \\boxed{\\dfrac{1}{2}},\\frac{1}{2},b,x\n"  # the same answer, written otherwise
                    "q2?,\"so \\boxed{1{,}000}\",1000,c,x\n"
                    "q3?,so \\boxed{7},8,d,x\n"  # disagrees
                    "q4?,so \\boxed{5},NaN,e,x\n"  # NaN (and disagrees)
                    "q5?,no box here,9,f,x\n", encoding="utf-8")
    problems, report = load_problems(path)
    assert [p.answer for p in problems] == ["4", "\\frac{1}{2}", "1000", "8", "NaN", "9"]  # the answer column wins
    assert report.n_skipped == 0
    assert report.warnings == {"answer disagrees with the solution": 2, "answer is NaN": 1}
    assert report.unused_columns == ["notes", "Answer_key"]
    text = str(report)
    assert f"{path}: row 3, field 'answer'" in text and "'8'" in text and "'7'" in text
    assert "unused columns (no field reads them): 'notes', 'Answer_key'" in text
    assert "warning (answer is NaN): 1" in text


def test_unused_keys_of_json_rows_are_listed(tmp_path):
    _, report = load_problems(_jsonl(tmp_path, [_row(0, level=3), _row(1, meta={"a": 1})]))
    assert report.unused_columns == ["level", "meta"] and report.warnings == {}


def test_trainer_prints_the_load_warnings(tmp_path, no_model_loads, capsys):
    from _faults import tiny_config

    from opsd_kit.trainer import Trainer

    path = _jsonl(tmp_path, [_row(0, answer="5"), _row(1)])
    with pytest.raises(AssertionError, match="a model was loaded"):  # the warning comes before the model
        Trainer(tiny_config(tmp_path / "run", train_data=str(path)))
    err = capsys.readouterr().err
    assert "warning (answer disagrees with the solution): 1" in err and "row 0," in err


def test_csv_row_with_too_many_cells(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("question,solution\nq0?,\\boxed{1}\nq1?,so \\boxed{1,000}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"invalid CSV: .*line 3") as info:
        load_problems(path, on_invalid="skip")
    assert str(path) in str(info.value)
