"""Evaluation: pass@k and avg@k of a model on problems (arXiv 2601.18734, evaluation protocol).

:func:`evaluate_model` runs three steps, each callable alone:

- :func:`sample_responses`: student prompts -> ``k`` rollouts per problem (the fast engine, or
  ``generate`` as the reference);
- :func:`grade_responses`: responses + golds -> both modes' answers and verdicts (`Verdicts`);
- :func:`tabulate`: -> `EvalResult` (summary metrics, per-problem and per-sample tables).

Grading itself (modes, equivalences, time bounds) lives in `opsd_kit.evaluation.grading` and answer
extraction in `opsd_kit.data.answers`; ``is_correct``, ``grade_many`` and ``last_number`` are
re-exported here for callers of this module.

pandas and torch are imported inside functions.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opsd_kit.data.answers import (
    MODES,
    check_mode,
    extract,
    extract_boxed,
    last_number,  # noqa: F401 - re-exported for callers
)
from opsd_kit.evaluation.grading import Grades, grade_many, is_correct  # noqa: F401 - is_correct re-exported

if TYPE_CHECKING:
    import pandas

    from opsd_kit.rollout.hf import Rollouts


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1..n} (1 - k/i)`` (no huge binomials).
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 1 <= k <= n and 0 <= c <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class EvalResult:
    """What :func:`evaluate_model` measured.

    ``summary``: flat ``eval/...`` metrics (headline mode in ``eval/mode``; both modes under
    ``eval/strict/...`` and ``eval/lenient/...``). ``table``: one row per problem.
    ``samples``: one row per sample, with both modes' answers and verdicts.
    """

    summary: dict
    table: pandas.DataFrame
    samples: pandas.DataFrame

    def save(self, folder) -> Path:
        """Write ``summary.json``, ``problems.csv`` and ``samples.jsonl`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
        # every text field quoted: a response may hold a bare carriage return, which ends an unquoted row
        self.table.to_csv(folder / "problems.csv", index=False, quoting=csv.QUOTE_NONNUMERIC)
        self.samples.to_json(folder / "samples.jsonl", orient="records", lines=True, force_ascii=False)
        return folder

    @classmethod
    def load(cls, folder) -> EvalResult:
        import pandas as pd

        folder = Path(folder)
        return cls(summary=json.loads((folder / "summary.json").read_text()),
                   table=pd.read_csv(folder / "problems.csv", dtype={"id": str, "gold": str},
                                     keep_default_na=False),
                   samples=pd.read_json(folder / "samples.jsonl", orient="records", lines=True,
                                        dtype={"problem_id": str}))


@dataclass
class Verdicts:
    """Both modes' answers and verdicts for a list of responses (row r: response r), and the
    `Grades` of the two grading calls (their cost: seconds, timeouts, errors)."""

    answers_strict: list
    answers_lenient: list
    strict: list[bool]
    lenient: list[bool]
    grades: tuple[Grades, ...]

    @property
    def seconds(self) -> float:
        return sum(g.seconds for g in self.grades)

    @property
    def timeouts(self) -> int:
        return sum(g.timeouts for g in self.grades)

    @property
    def errors(self) -> int:
        return sum(g.errors for g in self.grades)


def sample_responses(model, tokenizer, problems, *, settings, k: int | None = None, builder=None, seed: int = 0,
                     progress: bool = True, engine: str = "fast") -> Rollouts:
    """``k`` (default ``settings.n``) sampled responses per problem, from its student prompt.

    ``engine``: ``"fast"`` samples with `FastEngine` (the fused decoder, the adapter if any merged
    into a copy of the weights; a model it does not support samples with ``generate`` after a
    warning, and a quantized base with plain ``generate``, also after a warning) or ``"hf"``
    (transformers' ``generate``, the reference). Greedy decoding gives the same tokens on both up
    to floating-point ties (bench/eval.py measures the match rate); sampled responses follow the
    same distribution but not the same random draws.
    """
    import dataclasses

    from opsd_kit.prompts import PromptBuilder
    from opsd_kit.rollout import hf

    check_engine(engine)
    if k is not None and k != settings.n:
        settings = dataclasses.replace(settings, n=k)
    builder = builder or PromptBuilder(tokenizer)
    prompts = [builder.student_ids(p) for p in problems]
    if engine == "fast":
        from opsd_kit.rollout.fast import FastEngine, is_quantized

        if not is_quantized(model):
            return FastEngine(model, tokenizer).generate(prompts, settings, seed=seed, progress=progress)
        import warnings

        warnings.warn("engine='fast': a quantized base cannot be merged exactly; sampling with generate "
                      "(engine='hf') instead", stacklevel=2)
    return hf.generate(model, tokenizer, prompts, settings, seed=seed, progress=progress)


def check_engine(engine: str) -> None:
    """Refuse an unknown evaluation engine."""
    from opsd_kit.config import EVAL_ENGINES

    if engine not in EVAL_ENGINES:
        raise ValueError(f"engine={engine!r} is not an evaluation engine; choose one of {list(EVAL_ENGINES)}")


def grade_responses(texts, golds, *, timeout_s: float = 5.0, workers: int | None = None) -> Verdicts:
    """Grade ``texts[r]`` against ``golds[r]`` in both modes (``timeout_s``, ``workers``: :func:`grade_many`).

    Where the last box has content, the lenient answer is that box and the strict verdict
    stands; the lenient mode re-grades only the other responses.
    """
    texts, golds = list(texts), list(golds)
    strict = grade_many(texts, golds, "strict", timeout_s=timeout_s, workers=workers)
    answers_strict = [extract_boxed(t) for t in texts]
    unboxed = [r for r, a in enumerate(answers_strict) if a is None]
    loose = grade_many([texts[r] for r in unboxed], [golds[r] for r in unboxed], "lenient",
                       timeout_s=timeout_s, workers=workers)
    lenient = list(strict)
    for r, ok in zip(unboxed, loose):
        lenient[r] = ok
    return Verdicts(answers_strict=answers_strict, answers_lenient=[extract(t, "lenient") for t in texts],
                    strict=[bool(ok) for ok in strict], lenient=[bool(ok) for ok in lenient],
                    grades=(strict, loose))


def tabulate(problems, rollouts: Rollouts, verdicts: Verdicts, *, mode: str = "strict") -> EvalResult:
    """`EvalResult` of graded rollouts (row r answers ``problems[rollouts.prompt_index[r]]``).

    avg@k (the paper's metric) is the mean over problems of each problem's accuracy over its k
    samples; ``eval/pass@1`` equals it (the unbiased pass@1 is c/n) and ``eval/pass@k`` is the
    unbiased pass@k. ``mode`` picks the headline. ``eval/boxed_rate`` is the fraction of
    samples whose last box is non-empty (those the strict mode can grade).
    """
    import pandas as pd

    check_mode(mode)
    problems = list(problems)
    rows_of: dict[int, list[int]] = {i: [] for i in range(len(problems))}
    rows = []
    for r, pi in enumerate(rollouts.prompt_index):
        rows.append({
            "problem_id": str(problems[pi].id), "sample": len(rows_of[pi]), "response": rollouts.texts[r],
            "answer_strict": verdicts.answers_strict[r], "answer_lenient": verdicts.answers_lenient[r],
            "correct_strict": verdicts.strict[r], "correct_lenient": verdicts.lenient[r],
            "tokens": len(rollouts.completion_ids[r]), "finished": bool(rollouts.finished[r]),
            "completion_ids": list(rollouts.completion_ids[r]),
        })
        rows_of[pi].append(r)
    samples = pd.DataFrame(rows)
    samples["correct"] = samples[f"correct_{mode}"]
    samples["answer"] = samples[f"answer_{mode}"]

    table_rows = []
    for pi, problem in enumerate(problems):
        own = samples.iloc[rows_of[pi]]
        n = len(own)
        row = {"id": str(problem.id), "gold": problem.answer, "n": n}
        for m in MODES:
            c = int(own[f"correct_{m}"].sum())
            row[f"c_{m}"] = c
            row[f"avg_{m}"] = c / n
            row[f"pass@k_{m}"] = pass_at_k(n, c, n)
        row.update(c=row[f"c_{mode}"], avg=row[f"avg_{mode}"], pass_at_k=row[f"pass@k_{mode}"],
                   mean_tokens=float(own["tokens"].mean()), first_response=own["response"].iloc[0],
                   first_answer=own["answer"].iloc[0])
        table_rows.append(row)
    table = pd.DataFrame(table_rows)

    summary = {"eval/mode": mode, "eval/k": int(table["n"].max()), "eval/n_problems": len(problems),
               "eval/n_samples": len(samples)}
    for m in MODES:
        summary[f"eval/{m}/avg@k"] = float(table[f"avg_{m}"].mean())
        summary[f"eval/{m}/pass@k"] = float(table[f"pass@k_{m}"].mean())
    summary.update({
        "eval/avg@k": summary[f"eval/{mode}/avg@k"],
        "eval/pass@1": summary[f"eval/{mode}/avg@k"],
        "eval/pass@k": summary[f"eval/{mode}/pass@k"],
        "eval/boxed_rate": float(samples["answer_strict"].notna().mean()),
        "eval/mean_response_tokens": float(samples["tokens"].mean()),
        "eval/max_response_tokens": int(samples["tokens"].max()),
        "eval/truncation_rate": float((~samples["finished"]).mean()),
        "eval/generated_tokens": int(rollouts.num_generated_tokens),
        "eval/generation_seconds": float(rollouts.seconds),
        "eval/grading_seconds": float(verdicts.seconds),
        "eval/grading_timeouts": verdicts.timeouts,
        "eval/grading_errors": verdicts.errors,
    })
    summary["eval/seconds"] = summary["eval/generation_seconds"] + summary["eval/grading_seconds"]
    return EvalResult(summary=summary, table=table, samples=samples)


def evaluate_model(model, tokenizer, problems, *, builder=None, settings, k: int | None = None,
                   mode: str = "strict", seed: int = 0, progress: bool = True, timeout_s: float = 5.0,
                   workers: int | None = None, engine: str = "fast") -> EvalResult:
    """Sample ``k`` answers per problem (student prompts), grade them in both modes, report avg@k.

    :func:`sample_responses` (``engine``: ``"fast"`` or ``"hf"``, the reference), then
    :func:`grade_responses` (``timeout_s``, ``workers``: see :func:`grade_many`), then
    :func:`tabulate` (``mode`` picks the headline; the metrics are documented there).
    """
    check_mode(mode)
    check_engine(engine)
    problems = list(problems)
    if not problems:
        raise ValueError("evaluate_model needs at least one problem")
    rollouts = sample_responses(model, tokenizer, problems, settings=settings, k=k, builder=builder, seed=seed,
                                progress=progress, engine=engine)
    golds = [problems[i].answer for i in rollouts.prompt_index]
    verdicts = grade_responses(rollouts.texts, golds, timeout_s=timeout_s, workers=workers)
    return tabulate(problems, rollouts, verdicts, mode=mode)
