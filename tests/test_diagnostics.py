"""Signal or style: the answer-token split on hand-made tokens, and the wrong-hint divergence on
the tiny model."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from opsd_kit.evaluation.diagnostics import answer_token_split


def test_answer_spread_over_several_tokens():
    tokens = ["The", " sum", " is", " \\boxed{", "12", "3", "}"]
    values = [1.0, 1.0, 1.0, 2.0, 4.0, 6.0, 1.0]
    got = answer_token_split(tokens, values, "123")
    assert got["answer_tokens"] == 2
    assert got["answer_share"] == pytest.approx(10.0 / 16.0)
    assert got["answer_mean"] == pytest.approx(5.0)
    assert got["other_mean"] == pytest.approx(6.0 / 5)


def test_a_token_that_straddles_the_answer_counts():
    tokens = ["so it is -", "1", "2", " apples"]  # the answer "-12" starts inside the first token
    got = answer_token_split(tokens, [3.0, 1.0, 1.0, 5.0], None)  # no box: the last number
    assert got["answer_tokens"] == 3
    assert got["answer_share"] == pytest.approx(0.5)
    assert got["other_mean"] == pytest.approx(5.0)


def test_absent_answer():
    got = answer_token_split(["no", " answer", " here"], [1.0, 2.0, 3.0], "99")
    assert got["answer_tokens"] == 0 and got["answer_share"] == 0.0
    assert math.isnan(got["answer_mean"]) and got["other_mean"] == pytest.approx(2.0)
    nothing = answer_token_split(["no", " number"], [1.0, 1.0], None)
    assert nothing["answer_tokens"] == 0 and math.isnan(nothing["answer_mean"])


def test_the_last_occurrence_counts():
    tokens = ["7", " + 0 = ", "7", "."]
    got = answer_token_split(tokens, [10.0, 1.0, 2.0, 1.0], "7")
    assert got["answer_tokens"] == 1 and got["answer_mean"] == pytest.approx(2.0)
    # without an explicit answer, the last boxed answer is found, also at its last occurrence
    boxed = answer_token_split(["4 + 0 = 4", ", so \\boxed{", "4", "} and 5"], [9.0, 1.0, 3.0, 1.0], None)
    assert boxed["answer_tokens"] == 1 and boxed["answer_mean"] == pytest.approx(3.0)


def test_split_needs_one_value_per_token():
    with pytest.raises(ValueError, match="2 tokens but 3 values"):
        answer_token_split(["a", "b"], [1.0, 2.0, 3.0], "a")


def test_wrong_hint_divergence_and_answer_split_on_the_tiny_model():
    from opsd_kit.evaluation.diagnostics import divergence_by_answer_tokens, teacher_student_gap, token_divergences
    from opsd_kit.policy import LoraSettings, Policy
    from opsd_kit.prompts import PromptBuilder, shuffled_hints
    from opsd_kit.rollout.hf import GenerationSettings

    policy = Policy.from_pretrained("tiny", lora=LoraSettings(r=4, alpha=8))
    builder = PromptBuilder(policy.tokenizer)
    problems = [SimpleNamespace(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i), source="test",
                                solution=f"{i} + {i} = {2 * i}, so \\boxed{{{2 * i}}}.") for i in range(1, 4)]
    texts = [f"I think {2 * i} is it: \\boxed{{{2 * i}}}" for i in range(1, 4)]
    completions = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    correct = token_divergences(policy, builder, problems, completions)
    own = token_divergences(policy, builder, problems, completions, hints={p.id: p.solution for p in problems})
    wrong = token_divergences(policy, builder, problems, completions, hints=shuffled_hints(problems, 0))
    assert own == correct and wrong != correct
    assert [len(v) for v in wrong] == [len(c) for c in completions]

    table = divergence_by_answer_tokens(policy, builder, problems, completions, texts)
    assert list(table["problem_id"]) == ["p1", "p2", "p3"] and list(table["answer"]) == ["2", "4", "6"]
    assert table["total"].tolist() == pytest.approx([sum(v) for v in correct])
    assert (table["answer_tokens"] >= 1).all() and (table["answer_share"] > 0).all()

    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, n=1)
    gap = teacher_student_gap(policy, problems, builder=builder, seed=0, settings=settings)
    assert gap["gap/divergence_mean_shuffled"] > 0
    assert gap["gap/style_fraction"] != pytest.approx(1.0)  # another problem's solution is another teacher
    # A wrong hint that reads exactly like the right one gives the same teacher: all of the signal
    # is "style", the fraction is 1 (and the accuracies and rollouts do not change).
    same_text = [SimpleNamespace(**{**vars(p), "solution": "Add the two numbers."}) for p in problems]
    alike = teacher_student_gap(policy, same_text, builder=builder, seed=0, settings=settings)
    assert alike["gap/style_fraction"] == pytest.approx(1.0, rel=1e-6)
    assert alike["gap/divergence_mean_shuffled"] == pytest.approx(alike["gap/divergence_mean"], rel=1e-6)


@pytest.mark.parametrize("overrides", [
    dict(divergence="forward_kl", clip_tau=0.3), dict(divergence="reverse_kl"), dict(divergence="jsd", jsd_beta=0.3),
    dict(divergence="topk", distill_topk=5), dict(divergence="sampled_token", sampled_token_clamp=0.5),
    dict(divergence="hint_contrast", contrast_alpha=0.7), dict(divergence="forward_kl", loss_support="truncated"),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_diagnostic_shows_the_divergence_the_trainer_computes(tmp_path, overrides):
    """`token_divergences` with the run's spec gives the per-token values of the trainer's loss."""
    import torch
    from _numerics import tolerance

    from opsd_kit.config import load_profile
    from opsd_kit.evaluation.diagnostics import token_divergences
    from opsd_kit.trainer import Trainer

    trainer = Trainer(load_profile("tiny", "opsd", run_dir=str(tmp_path / "run"), progress=False,
                                   loss_temperature=0.7, **overrides))
    algorithm = trainer.algorithm
    micro, _ = algorithm.prepare(0)
    batch = micro[0].student
    _, trained_BC = algorithm.divergence(micro[0])
    rows = batch.completion_ids.shape[0]
    completions = [batch.completion_ids[i, : int(batch.completion_mask[i].sum())].tolist() for i in range(rows)]
    shown = token_divergences(trainer.policy, algorithm.prompts.builder, trainer.step_problems(0)[:rows], completions,
                              spec=algorithm.spec, wrong_hints=trainer.shuffled_hints)
    vocab = trainer.policy.config.vocab_size
    for i, values in enumerate(shown):
        want = trained_BC[i, : len(completions[i])]
        assert len(values) == len(completions[i]) > 0
        torch.testing.assert_close(torch.tensor(values, dtype=want.dtype), want,
                                   **tolerance(torch.float32, vocab, scale=float(want.abs().max()) + 1))


# --- the per-token view ---------------------------------------------------------------------------

def _views():
    from opsd_kit.evaluation.diagnostics import TokenDivergence

    special = TokenDivergence(tokens=["<b>", " & ", "\n", "  ", "$x$", "ok"], values=[0.5, 1.0, 2.0, 0.0, 4.0, 0.25],
                              problem_id="p<1>", kind="forward_kl", label="after training, correct hint",
                              teacher_tokens=["<b>", " and", " ", "  ", "$y$", "ok"])
    plain = TokenDivergence(tokens=["12", " apples", "\x15"], values=[1.0, 0.0, 0.5], problem_id="p2",
                            kind="forward_kl", label="before training, shuffled hint",
                            teacher_tokens=["12", " apples", "\x15"])  # a control character: a byte-level token
    return [special, plain]


def test_token_view_html_escapes_keeps_whitespace_and_marks_where_the_teacher_differs():
    import html
    import re

    from opsd_kit.evaluation.plots import token_view_html

    page = token_view_html(_views())
    assert "<b>" not in page.replace("<b>after", "").replace("<b>before", "")  # the token "<b>" is escaped
    assert "&lt;b&gt;" in page and " &amp; " in page and "$x$" in page and "p&lt;1&gt;" in page
    tokens = re.findall(r'<span class="opsd-token"[^>]*>(.*?)</span>', page, re.S)
    assert [html.unescape(t) for t in tokens] == ["<b>", " & ", "\n", "  ", "$x$", "ok", "12", " apples", "\\x15"]
    assert "white-space: pre-wrap" in page  # whitespace tokens keep their spaces and newline
    teacher = [html.unescape(t) for t in re.findall(r'<span class="opsd-teacher"[^>]*>(.*?)</span>', page, re.S)]
    assert teacher == ["\u2423and", "\u2423", "$y$"]  # only where it differs, its whitespace visible
    # one scale for every view: the darkest token is the largest value shown (4.0), 2.0 is half of it
    assert page.count("rgba(220,50,47,1.00)") == 1 and "rgba(220,50,47,0.50)" in page
    assert "after training, correct hint" in page and "before training, shuffled hint" in page


def test_token_view_figure_and_table(tmp_path):
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from opsd_kit.evaluation.plots import _layout, token_view_figure, token_view_table

    views = _views()
    figure = token_view_figure(views, width=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a glyph missing from the font
        figure.savefig(tmp_path / "view.png")  # "$x$" is drawn as text, not parsed as math
    assert (tmp_path / "view.png").stat().st_size > 0 and len(figure.axes) == 2
    cells = _layout(views[0], width=8, max_tokens=100)
    assert [c[1] for c in cells] == [0, 0, 0, 1, 1, 1]  # the newline token ends its row
    assert [c[2] for c in cells][:3] == ["<b>", "\u2423&\u2423", "\u21b5"]
    assert [c[4] for c in cells] == [None, "\u2423and", "\u2423", None, "$y$", None]
    table = token_view_table(views)
    assert list(table.columns) == ["view", "problem_id", "kind", "position", "token", "teacher_token", "differs",
                                   "divergence"]
    assert table["differs"].tolist() == [False, True, True, False, True, False, False, False, False]
    assert table["divergence"].tolist() == [0.5, 1.0, 2.0, 0.0, 4.0, 0.25, 1.0, 0.0, 0.5]
    assert table["token"].tolist()[-1] == "\x15"  # the CSV keeps the token itself


def test_before_after_views_on_the_tiny_model():
    from opsd_kit.evaluation.diagnostics import before_after_views, token_divergences, token_view
    from opsd_kit.policy import LoraSettings, Policy
    from opsd_kit.prompts import PromptBuilder
    from opsd_kit.rollout.hf import GenerationSettings

    policy = Policy.from_pretrained("tiny", lora=LoraSettings(r=4, alpha=8))
    builder = PromptBuilder(policy.tokenizer)
    problem = SimpleNamespace(id="p1", question="What is 1 + 1?", answer="2", source="test",
                              solution="1 + 1 = 2, so \\boxed{2}.")
    views = before_after_views(policy, builder, problem, GenerationSettings(max_new_tokens=6, temperature=1.0, n=1),
                               wrong_hint="3 + 4 = 7, so \\boxed{7}.", seed=0)
    assert [v.label for v in views] == ["before training, correct hint", "before training, shuffled hint",
                                        "after training, correct hint", "after training, shuffled hint"]
    for view in views:
        assert len(view.tokens) == len(view.values) == len(view.teacher_tokens) > 0
    ids = policy.tokenizer("So 1 + 1 = \\boxed{2}.", add_special_tokens=False)["input_ids"]
    view = token_view(policy, builder, problem, ids, label="given")
    assert view.values == token_divergences(policy, builder, [problem], [ids])[0]  # the same rows, one path
    assert len(view.teacher_tokens) == len(ids) and view.label == "given"
    assert views[2].values != views[3].values  # the shuffled hint changes the teacher
