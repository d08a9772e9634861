"""Does OPSD have signal here? The teacher-student gap, and where the teacher disagrees.

OPSD can only teach what the privileged teacher knows better than the student. Before a run,
`teacher_student_gap` measures accuracy of the student (problem only) and of the teacher
(problem + reference solution, frozen/EMA/live weights as configured), and the mean per-token
divergence D(p_T || p_S) on the student's own rollouts: a teacher no better than the student
or a divergence near zero means little to learn.
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


def token_divergences(policy, builder, problems, completions: list[list[int]], *, kind: str = "forward_kl",
                      temperature: float = 1.0, chunk_size: int = 128, batch_size: int = 8) -> list[list[float]]:
    """D(p_T || p_S) at every completion token, one list per (problem, completion) pair."""
    import torch

    from .losses import chunked_divergence
    from .prompts import build_batch

    pad = policy.tokenizer.pad_token_id
    out: list[list[float]] = []
    for s in range(0, len(problems), batch_size):
        probs, comps = problems[s:s + batch_size], completions[s:s + batch_size]
        student = build_batch([builder.student_ids(p) for p in probs], comps, pad).to(policy.device)
        teacher = build_batch([builder.teacher_ids(p) for p in probs], comps, pad).to(policy.device)
        with policy.teacher():
            h_t = policy.backbone_hidden(teacher.input_ids, teacher.attention_mask, teacher.position_ids)
        with torch.no_grad():
            h_s = policy.backbone_hidden(student.input_ids, student.attention_mask, student.position_ids)
            _, per_token = chunked_divergence(h_s[:, student.predicting_slice()], h_t[:, teacher.predicting_slice()],
                                              policy.head, student.completion_mask, kind=kind,
                                              temperature=temperature, chunk_size=chunk_size)
        out.extend(per_token[i, : len(c)].tolist() for i, c in enumerate(comps))
    return out


def teacher_student_gap(policy, problems, *, builder, settings, mode: str = "lenient", seed: int = 0,
                        kind: str = "forward_kl", progress: bool = False) -> dict:
    """Accuracy of student and privileged teacher on ``problems`` (k = settings.n samples each),
    and the mean and max per-token divergence on the student's rollouts."""
    from .evaluate import evaluate_model

    student = evaluate_model(policy.model, policy.tokenizer, problems, builder=builder, settings=settings,
                             mode=mode, seed=seed, progress=progress)
    with policy.teacher():
        teacher = evaluate_model(policy.model, policy.tokenizer, problems, builder=_TeacherPrompts(builder),
                                 settings=settings, mode=mode, seed=seed, progress=progress)
    first = student.samples[student.samples["sample"] == 0]
    by_id = {str(p.id): p for p in problems}
    chosen = [by_id[i] for i in first["problem_id"]]
    completions = [list(ids) for ids in first["completion_ids"]]  # the sampled ids, never re-tokenised text
    divergences = token_divergences(policy, builder, chosen, completions, kind=kind,
                                    temperature=settings.temperature or 1.0)
    flat = [v for row in divergences for v in row]
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
        "gap/divergence_mean": sum(flat) / max(1, len(flat)),
        "gap/divergence_max": max(flat, default=0.0),
        "gap/kind": kind,
    }


def most_disagreed_rollout(policy, builder, problem, settings, *, kind: str = "forward_kl",
                           seed: int = 0) -> TokenDivergence:
    """Sample one student rollout for ``problem`` and return its per-token divergence."""
    import dataclasses

    from .rollout import generate

    one = dataclasses.replace(settings, n=1)
    rollout = generate(policy.model, policy.tokenizer, [builder.student_ids(problem)], one, seed=seed)
    ids = rollout.completion_ids[0]
    values = token_divergences(policy, builder, [problem], [ids], kind=kind,
                               temperature=settings.temperature or 1.0)[0]
    tokens = [policy.tokenizer.decode([t]) for t in ids]
    return TokenDivergence(tokens, values, str(problem.id), kind)
