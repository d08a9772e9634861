"""Deterministic train/eval splits and the leakage check between them.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from opsd_kit.data.problems import Problem


def split_problems(
    problems: Sequence[Problem], *, eval_fraction: float | None = None, eval_size: int | None = None,
    seed: int = 0,
) -> tuple[list[Problem], list[Problem]]:
    """Deterministic random (train, eval) split; give exactly one of eval_fraction, eval_size.

    Both parts keep the input order.
    """
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction and eval_size")
    if eval_fraction is not None:
        if not 0 <= eval_fraction <= 1:
            raise ValueError(f"eval_fraction must lie in [0, 1], got {eval_fraction}")
        eval_size = round(len(problems) * eval_fraction)
    if not 0 <= eval_size <= len(problems):
        raise ValueError(f"eval_size must lie in [0, {len(problems)}], got {eval_size}")
    chosen = set(random.Random(seed).sample(range(len(problems)), eval_size))
    train = [p for i, p in enumerate(problems) if i not in chosen]
    evals = [p for i, p in enumerate(problems) if i in chosen]
    return train, evals


_LATEX_SPACING = re.compile(r"\\(?:[,;:! ]|q?quad\b|[tdc]?frac\b(?=\{)|left\b|right\b)")
_PUNCTUATION = re.compile(r"[.,;:!?'\"`$]")


def normalise_question(text: str) -> str:
    """Lowercase, drop LaTeX spacing and sentence punctuation, collapse whitespace.

    ``\\dfrac``/``\\tfrac``/``\\frac`` become one form; spaces next to symbols are dropped so
    ``1 + 2`` and ``1+2`` compare equal.
    """
    text = _LATEX_SPACING.sub(lambda m: "frac" if "frac" in m.group(0) else " ", text.lower())
    text = _PUNCTUATION.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ?([^\w ]) ?", r"\1", text)


@dataclass
class LeakageReport:
    """Overlap between a training and an evaluation set.

    ``shared_ids``: ids in both; ``exact_question`` and ``normalised_question``: (train id,
    eval id) pairs whose questions are equal as is / after `normalise_question` (the second
    includes the first).
    """

    n_train: int
    n_eval: int
    shared_ids: list[str]
    exact_question: list[tuple[str, str]]
    normalised_question: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not (self.shared_ids or self.exact_question or self.normalised_question)

    @property
    def leaked_train_ids(self) -> set[str]:
        return set(self.shared_ids) | {train_id for train_id, _ in self.normalised_question}

    def __str__(self) -> str:
        status = "ok" if self.ok else f"LEAK: {len(self.leaked_train_ids)} train problems overlap eval"
        return (f"leakage check (train {self.n_train}, eval {self.n_eval}): {status}\n"
                f"  shared ids: {len(self.shared_ids)} {self.shared_ids[:5]}\n"
                f"  exact question: {len(self.exact_question)} {self.exact_question[:5]}\n"
                f"  normalised question: {len(self.normalised_question)} {self.normalised_question[:5]}")


def check_leakage(train: Sequence[Problem], evals: Sequence[Problem]) -> LeakageReport:
    """Find eval problems present in the training set by id, exact question or normalised question."""
    eval_ids = {p.id for p in evals}
    by_question: dict[str, list[str]] = {}
    by_normalised: dict[str, list[str]] = {}
    for p in evals:
        by_question.setdefault(p.question, []).append(p.id)
        by_normalised.setdefault(normalise_question(p.question), []).append(p.id)
    exact, normalised = [], []
    for p in train:
        exact += [(p.id, e) for e in by_question.get(p.question, [])]
        normalised += [(p.id, e) for e in by_normalised.get(normalise_question(p.question), [])]
    shared = sorted({p.id for p in train} & eval_ids)
    return LeakageReport(len(train), len(evals), shared, exact, normalised)


def dedupe_against(train: Sequence[Problem], evals: Sequence[Problem]) -> tuple[list[Problem], list[str]]:
    """Drop training problems that leak into ``evals``; returns (kept train, dropped ids)."""
    leaked = check_leakage(train, evals).leaked_train_ids
    kept = [p for p in train if p.id not in leaked]
    return kept, [p.id for p in train if p.id in leaked]
