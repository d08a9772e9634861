"""Does OPSD have signal here? The teacher-student gap, and where the teacher disagrees.

OPSD can only teach what the privileged teacher knows better than the student. Before a run,
`teacher_student_gap` measures accuracy of the student (problem only) and of the teacher
(problem + reference solution, frozen/EMA/live weights as configured), and the mean per-token
divergence D(p_T || p_S) on the student's own rollouts: a teacher no better than the student
or a divergence near zero means little to learn.

Signal or style? Part of that divergence is style ("wait", brevity) rather than task content,
and part of the teacher's advantage can be copying the answer. `teacher_student_gap` also
measures the divergence with a wrong (shuffled) hint, and `divergence_by_answer_tokens` splits
each rollout's divergence between the tokens that spell its final answer and the rest.
"""
from __future__ import annotations

from dataclasses import dataclass


class _TeacherPrompts:
    """Adapter so `evaluate_model` samples from teacher prompts."""

    def __init__(self, builder):
        self.builder = builder

    def student_ids(self, problem) -> list[int]:
        return self.builder.teacher_ids(problem)


@dataclass
class TokenDivergence:
    """Per completion token of one rollout: its text and D(p_T || p_S) at that position."""

    tokens: list[str]
    values: list[float]
    problem_id: str
    kind: str
    teacher_tokens: list[str] | None = None
    """The teacher's most likely token at each position (its argmax given the same prefix), None
    when not computed."""
    label: str = ""
    """Which rollout and teacher this is, e.g. 'after training, correct hint'."""


def token_divergences(policy, builder, problems, completions: list[list[int]], *, spec=None, hints: dict | None = None,
                      wrong_hints: dict | None = None, batch_size: int = 8) -> list[list[float]]:
    """The trained divergence at every completion token, one list per (problem, completion) pair.

    ``spec`` is the run's `losses.DivergenceSpec` (default: forward KL at temperature 1); the
    values are those `losses.divergence` gives the trainer for the same rows, from the same
    hidden states (`Policy.completion_hidden`). ``hints`` (problem id -> solution, e.g.
    ``prompts.shuffled_hints``) replaces each problem's reference solution in the teacher
    prompt: the divergence under a wrong hint. ``wrong_hints`` gives the
    wrong-hint teacher that ``spec.kind='hint_contrast'`` needs.
    """
    return _per_token(policy, builder, problems, completions, spec=spec, hints=hints, wrong_hints=wrong_hints,
                      batch_size=batch_size)[0]


def _per_token(policy, builder, problems, completions, *, spec=None, hints=None, wrong_hints=None, batch_size=8,
               teacher_argmax: bool = False) -> tuple[list[list[float]], list[list[int]] | None]:
    """`token_divergences`' values and, with ``teacher_argmax``, the teacher's most likely token id
    at every completion position (the argmax of its logits there, the same rows)."""
    import torch

    from opsd_kit.losses import DivergenceSpec, divergence
    from opsd_kit.prompts import build_batch

    spec = spec or DivergenceSpec()
    if spec.needs_wrong_teacher and wrong_hints is None:
        raise ValueError("spec.kind='hint_contrast' needs wrong_hints (problem id -> a wrong solution)")
    pad = policy.tokenizer.pad_token_id

    out: list[list[float]] = []
    argmax: list[list[int]] | None = [] if teacher_argmax else None
    for s in range(0, len(problems), batch_size):
        probs, comps = problems[s:s + batch_size], completions[s:s + batch_size]
        student = build_batch([builder.student_ids(p) for p in probs], comps, pad)
        teachers = [build_batch([builder.teacher_ids(p, None if h is None else h[p.id]) for p in probs], comps, pad)
                    for h in (hints, wrong_hints if spec.needs_wrong_teacher else None)]
        with policy.teacher():
            teacher_h = policy.completion_hidden(teachers[0])
            wrong_h = policy.completion_hidden(teachers[1]) if spec.needs_wrong_teacher else None
        device = policy.device
        with torch.no_grad():
            _, per_token = divergence(policy.completion_hidden(student), teacher_h, policy.head,
                                      student.completion_mask.to(device), spec,
                                      targets_BT=student.completion_ids.to(device), wrong_teacher_hidden_BTH=wrong_h)
            if argmax is not None:
                top_BT = policy.head(teacher_h).argmax(-1)
                argmax.extend(top_BT[i, : len(c)].tolist() for i, c in enumerate(comps))
        out.extend(per_token[i, : len(c)].tolist() for i, c in enumerate(comps))
    return out, argmax


def teacher_student_gap(policy, problems, *, builder, settings, spec=None, mode: str = "lenient", seed: int = 0,
                        progress: bool = False) -> dict:
    """Accuracy of student and privileged teacher on ``problems`` (k = settings.n samples each),
    and the mean and max per-token divergence (``spec``, the run's) on the student's rollouts.

    ``gap/divergence_mean_shuffled`` is the mean per-token divergence on the same rollouts with
    the teacher given another problem's solution (``prompts.shuffled_hints(problems, seed)``);
    ``gap/style_fraction`` = shuffled / correct mean: near 1, the teacher's signal is mostly
    style that any hint brings; near 0, it comes from the correct solution. Both are None when
    no two problems have different answers (no wrong hint exists), the correct mean is 0, or the
    spec is 'hint_contrast' (whose divergence already subtracts the wrong-hint teacher).
    """
    from opsd_kit.evaluation.evaluate import evaluate_model
    from opsd_kit.losses import DivergenceSpec
    from opsd_kit.prompts import shuffled_hints

    spec = spec or DivergenceSpec()
    student = evaluate_model(policy.model, policy.tokenizer, problems, builder=builder, settings=settings,
                             mode=mode, seed=seed, progress=progress)
    with policy.teacher():
        teacher = evaluate_model(policy.model, policy.tokenizer, problems, builder=_TeacherPrompts(builder),
                                 settings=settings, mode=mode, seed=seed, progress=progress)
    first = student.samples[student.samples["sample"] == 0]
    by_id = {str(p.id): p for p in problems}
    chosen = [by_id[i] for i in first["problem_id"]]
    completions = [list(ids) for ids in first["completion_ids"]]  # the sampled ids, never re-tokenised text
    try:
        wrong = shuffled_hints(problems, seed)
    except ValueError:  # every problem has the same answer: no wrong hint to compare with
        wrong = None
    if spec.needs_wrong_teacher and wrong is None:
        raise ValueError("spec.kind='hint_contrast' needs problems with at least two different answers")
    flat = [v for row in token_divergences(policy, builder, chosen, completions, spec=spec, wrong_hints=wrong)
            for v in row]
    mean = sum(flat) / max(1, len(flat))
    mean_shuffled = None
    if wrong is not None and not spec.needs_wrong_teacher:
        shuffled = token_divergences(policy, builder, chosen, completions, spec=spec, hints=wrong)
        mean_shuffled = sum(v for row in shuffled for v in row) / max(1, len(flat))
    return {
        "gap/mode": mode,
        "gap/k": settings.n,
        "gap/n_problems": len(problems),
        "gap/student_accuracy": student.summary["eval/avg@k"],
        "gap/teacher_accuracy": teacher.summary["eval/avg@k"],
        "gap/student_accuracy_strict": student.summary["eval/strict/avg@k"],
        "gap/teacher_accuracy_strict": teacher.summary["eval/strict/avg@k"],
        "gap/student_accuracy_lenient": student.summary["eval/lenient/avg@k"],
        "gap/teacher_accuracy_lenient": teacher.summary["eval/lenient/avg@k"],
        "gap/divergence_mean": mean,
        "gap/divergence_max": max(flat, default=0.0),
        "gap/divergence_mean_shuffled": mean_shuffled,
        "gap/style_fraction": mean_shuffled / mean if mean_shuffled is not None and mean > 0 else None,
        "gap/kind": spec.kind,
    }


def token_view(policy, builder, problem, completion_ids: list[int], *, spec=None, hint: str | None = None,
               label: str = "") -> TokenDivergence:
    """One rollout as the per-token view shows it: each completion token, the divergence there
    (``spec``, the run's; a 'hint_contrast' spec is shown as forward KL, what the correct hint
    teaches on its own) and the teacher's most likely token. ``hint`` replaces the problem's
    reference solution in the teacher prompt (e.g. a shuffled one)."""
    import dataclasses

    from opsd_kit.losses import DivergenceSpec

    spec = spec or DivergenceSpec()
    if spec.needs_wrong_teacher:
        spec = dataclasses.replace(spec, kind="forward_kl")
    hints = None if hint is None else {problem.id: hint}
    values, argmax = _per_token(policy, builder, [problem], [list(completion_ids)], spec=spec, hints=hints,
                                teacher_argmax=True)
    decode = policy.tokenizer.decode
    return TokenDivergence([decode([t]) for t in completion_ids], values[0], str(problem.id), spec.kind,
                           teacher_tokens=[decode([t]) for t in argmax[0]], label=label)


def before_after_views(policy, builder, problem, settings, *, wrong_hint: str, spec=None,
                       seed: int = 0) -> list[TokenDivergence]:
    """The per-token views of one problem, side by side: a rollout of the student before training
    (the adapter off) and one after (the adapter on), each against the teacher with the correct
    reference solution and with ``wrong_hint`` (another problem's, e.g. from
    ``prompts.shuffled_hints``). Four views, labelled; the teacher is the policy's."""
    import dataclasses

    from opsd_kit.rollout.hf import generate

    one = dataclasses.replace(settings, n=1)
    prompt = [builder.student_ids(problem)]
    with policy.model.disable_adapter():
        before = generate(policy.model, policy.tokenizer, prompt, one, seed=seed).completion_ids[0]
    after = generate(policy.model, policy.tokenizer, prompt, one, seed=seed).completion_ids[0]
    views = []
    for when, ids in (("before training", before), ("after training", after)):
        for which, hint in (("correct hint", None), ("shuffled hint", wrong_hint)):
            views.append(token_view(policy, builder, problem, ids, spec=spec, hint=hint, label=f"{when}, {which}"))
    return views


def _final_answer(text: str) -> str | None:
    """The answer the lenient grader reads (`opsd_kit.data.answers.extract` in lenient mode): the
    marked answer, else the last number in ``text``."""
    from opsd_kit.data.answers import extract

    return extract(text, "lenient")


def answer_token_split(tokens: list[str], values: list[float], answer: str | None = None) -> dict:
    """Split per-token ``values`` between the tokens that spell the final answer and the rest.

    The answer's characters are located at their LAST occurrence in ``"".join(tokens)``; the
    answer tokens are those whose characters overlap that span (an answer split over several
    tokens takes them all). ``answer`` defaults to the final answer of the joined text (last
    boxed answer, else last number). Returns ``answer_tokens`` (how many), ``answer_share``
    (sum of values on them / sum of all values; NaN when that sum is 0), ``answer_mean`` and
    ``other_mean`` (means over the answer tokens and over the rest; NaN when empty). An answer
    that does not occur gives 0 answer tokens and a share of 0.
    """
    if len(tokens) != len(values):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values")
    text = "".join(tokens)
    answer = _final_answer(text) if answer is None else answer
    start = text.rfind(answer) if answer else -1
    inside: set[int] = set()
    if start >= 0:
        end, pos = start + len(answer), 0
        for i, token in enumerate(tokens):
            if pos < end and pos + len(token) > start:
                inside.add(i)
            pos += len(token)
    on = [v for i, v in enumerate(values) if i in inside]
    off = [v for i, v in enumerate(values) if i not in inside]
    total = sum(values)
    nan = float("nan")
    return {"answer_tokens": len(on), "answer_share": sum(on) / total if total else nan,
            "answer_mean": sum(on) / len(on) if on else nan, "other_mean": sum(off) / len(off) if off else nan}


def divergence_by_answer_tokens(policy, builder, problems, completions: list[list[int]], texts: list[str],
                                **divergence):
    """Per rollout, how much of the divergence sits on the tokens that spell its final answer.

    ``completions`` are the sampled ids and ``texts`` their decoded text (the final answer is
    read from it: last boxed answer, else last number); ``divergence`` goes to
    :func:`token_divergences` (``spec``, the run's `losses.DivergenceSpec`; ``batch_size``;
    ``hints`` for a wrong-hint teacher). One row per rollout: ``problem_id``, ``answer``,
    ``tokens``, ``total`` (sum of the per-token divergence) and :func:`answer_token_split`'s
    fields. A high ``answer_share`` means the teacher mostly teaches the answer itself.
    """
    import pandas as pd

    if not len(problems) == len(completions) == len(texts):
        raise ValueError(f"{len(problems)} problems, {len(completions)} completions and {len(texts)} texts: "
                         "one of each per rollout")
    values = token_divergences(policy, builder, problems, completions, **divergence)
    rows = []
    for problem, ids, text, row_values in zip(problems, completions, texts, values):
        tokens = [policy.tokenizer.decode([t]) for t in ids]
        answer = _final_answer(text)
        rows.append({"problem_id": str(problem.id), "answer": answer, "tokens": len(ids), "total": sum(row_values),
                     **answer_token_split(tokens, row_values, answer)})
    return pd.DataFrame(rows)
