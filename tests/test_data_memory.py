"""Data as researchers have it: an in-memory Dataset, a DataFrame or a list of dicts, TRL's
column conventions (SDFT's prompt + privileged_context, prompt + completion, chat-format prompts)."""
from __future__ import annotations

import datasets
import pandas as pd
import pytest

from opsd_kit.config import load_profile
from opsd_kit.data.problems import DataError, Problem, as_problems, load_problems
from opsd_kit.data.sources import load_source
from opsd_kit.trainer import train

ROWS = [
    {"question": "What is 1+1?", "solution": "1+1 = \\boxed{2}"},
    {"question": "What is 2+3?", "solution": "2+3 = \\boxed{5}"},
]
KINDS = {
    "list": (lambda rows: rows, "<list>"),
    "DataFrame": (pd.DataFrame, "<DataFrame>"),
    "Dataset": (datasets.Dataset.from_list, "<in-memory Dataset>"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_in_memory_data_loads_like_a_file(kind):
    make, where = KINDS[kind]
    problems, report = load_problems(make(ROWS))
    assert [(p.question, p.answer) for p in problems] == [("What is 1+1?", "2"), ("What is 2+3?", "5")]
    assert report.source == where and report.n_kept == 2
    assert len({p.id for p in problems}) == 2
    subset, _ = load_source(make(ROWS), size=1, seed=0)
    assert len(subset) == 1 and subset[0] in problems


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_row_in_memory_names_the_data_the_row_and_the_field(kind):
    make, where = KINDS[kind]
    rows = ROWS + [{"question": "What is 4+4?", "solution": None}]
    with pytest.raises(DataError, match=rf"^{where}: row 2, field 'solution': empty field") as err:
        load_problems(make(rows))
    assert (err.value.where, err.value.row, err.value.field) == (where, 2, "solution")
    problems, report = load_problems(make(rows), on_invalid="skip")
    assert len(problems) == 2 and report.skipped == {"empty field": 1}


def test_a_list_item_that_is_not_a_dict_is_named():
    with pytest.raises(DataError, match=r"<list>: row 1, field \?: invalid row: item is a str"):
        load_problems([ROWS[0], "What is 2+3?"])


def test_sdft_prompt_and_privileged_context_need_no_mapping():
    rows = [{"prompt": "What is 6*7?", "privileged_context": "6*7 = 42, so \\boxed{42}"}]
    problems, report = load_problems(datasets.Dataset.from_list(rows))
    assert (problems[0].question, problems[0].solution, problems[0].answer) == (
        "What is 6*7?", "6*7 = 42, so \\boxed{42}", "42")
    assert report.columns == {"question": "prompt", "solution": "privileged_context", "answer": None,
                              "id": None, "source": None}
    assert "question <- 'prompt', solution <- 'privileged_context', answer <- derived" in str(report)


@pytest.mark.parametrize("column", ["completion", "solution"])
def test_prompt_with_completion_or_solution(column):
    problems, report = load_problems(pd.DataFrame([{"prompt": "What is 1+2?", column: "\\boxed{3}", "answer": "3"}]))
    assert (problems[0].question, problems[0].solution, problems[0].answer) == ("What is 1+2?", "\\boxed{3}", "3")
    assert report.columns["solution"] == column and report.columns["answer"] == "answer"


def test_chat_format_prompt_gives_the_last_user_message():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"},
              {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 2+2?"}]
    completion = [{"role": "assistant", "content": "2+2 = \\boxed{4}"}]
    for data in ([{"prompt": prompt, "completion": completion}],
                 datasets.Dataset.from_list([{"prompt": prompt, "completion": completion}])):
        (problem,), _ = load_problems(data)
        assert (problem.question, problem.solution, problem.answer) == ("And 2+2?", "2+2 = \\boxed{4}", "4")
    with pytest.raises(DataError, match=r"row 0, field 'question': empty field: column 'prompt' has no user"):
        load_problems([{"prompt": prompt[:1], "completion": completion}])
    with pytest.raises(DataError, match=r"row 0, field 'question': not text"):
        load_problems([{"prompt": ["a", "b"], "completion": completion}])


def test_as_problems_keeps_problems_and_reads_the_rest():
    kept = [Problem("a", "q", "\\boxed{1}", "1", "s")]
    assert as_problems(kept) == kept
    assert [p.answer for p in as_problems(pd.DataFrame(ROWS))] == ["2", "5"]


def test_train_accepts_a_list_of_dicts(tmp_path):
    rows = [{"id": f"r{i}", "question": f"What is {i}+1?", "solution": f"\\boxed{{{i + 1}}}"} for i in range(4)]
    result = train(load_profile("tiny", "opsd", run_dir=str(tmp_path / "r"), max_steps=1, progress=False),
                   problems=rows)
    assert result.steps == 1
    assert "problems: 4" in (result.adapter_dir / "README.md").read_text()
