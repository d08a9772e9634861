"""Evaluation: pass@k, evaluate_model and its steps (sample, grade, tabulate), the re-exports."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from opsd_kit.evaluation import evaluate
from opsd_kit.evaluation.evaluate import EvalResult, pass_at_k


def problem(i, answer):
    return SimpleNamespace(id=f"p{i}", question=f"What is {answer}?", solution=f"It is {answer}.",
                           answer=answer, source="test")


# -- pass@k -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 0.7), (5, 0, 3, 0.0), (5, 4, 2, 1.0), (5, 5, 5, 1.0), (1, 1, 1, 1.0),
    (16, 3, 4, 1 - (13 * 12 * 11 * 10) / (16 * 15 * 14 * 13)),
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_large_n_is_stable():
    assert 0.0 < pass_at_k(10_000, 1, 10) < 1.0


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# -- evaluate_model -----------------------------------------------------------------------------
SUMMARY_KEYS = {"eval/avg@k", "eval/pass@1", "eval/pass@k", "eval/mean_response_tokens",
                "eval/max_response_tokens", "eval/truncation_rate", "eval/boxed_rate", "eval/n_problems",
                "eval/k", "eval/mode", "eval/generated_tokens", "eval/seconds", "eval/grading_timeouts",
                "eval/grading_errors", "eval/strict/avg@k", "eval/lenient/avg@k"}


def test_evaluate_model_on_tiny_model(tiny_model, tiny_tokenizer, tmp_path):
    from opsd_kit.rollout.hf import GenerationSettings

    problems = [problem(i, str(i)) for i in range(3)]
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, n=1, batch_size=8)
    result = evaluate_model_tiny(tiny_model, tiny_tokenizer, problems, settings)
    assert SUMMARY_KEYS <= set(result.summary)
    assert result.summary["eval/k"] == 2 and result.summary["eval/n_problems"] == 3
    assert result.summary["eval/mode"] == "strict"
    assert 0.0 <= result.summary["eval/avg@k"] <= 1.0
    assert result.summary["eval/max_response_tokens"] <= 8
    assert len(result.table) == 3 and len(result.samples) == 6
    assert list(result.table["n"]) == [2, 2, 2]
    assert sorted(result.samples["sample"].tolist()) == [0, 0, 0, 1, 1, 1]

    folder = result.save(tmp_path / "eval")
    assert {p.name for p in folder.iterdir()} == {"summary.json", "problems.csv", "samples.jsonl"}
    assert json.loads((folder / "summary.json").read_text()) == result.summary
    back = EvalResult.load(folder)
    assert back.summary == result.summary
    assert list(back.table["id"]) == ["p0", "p1", "p2"]
    assert list(back.samples["response"]) == list(result.samples["response"])


def evaluate_model_tiny(model, tokenizer, problems, settings):
    return evaluate.evaluate_model(model, tokenizer, problems, settings=settings, k=2, seed=0,
                                   progress=False, timeout_s=5.0)


def test_evaluate_model_grading_end_to_end(monkeypatch, tiny_tokenizer):
    """A fake generator with known texts: avg@k, pass@k and both modes computed end to end."""
    from opsd_kit.rollout import hf as rollout
    from opsd_kit.rollout.hf import GenerationSettings, Rollouts

    texts = {  # problem -> its k=4 responses
        0: [r"\boxed{\frac{1}{2}}", r"\boxed{0.5}", r"\boxed{2}", "so it is 1/2"],  # strict 2/4
        1: [r"\boxed{7}", "no idea", "it is 3", "The answer is 3."],               # strict 0/4, lenient 2/4
        2: ["nope", "nope", "nope", r"\boxed{1}"],                                # 0/4
    }
    golds = [r"\frac{1}{2}", "3", "5"]

    def fake_generate(model, tokenizer, prompt_ids, settings, *, seed=None, progress=False):
        assert settings.n == 4 and len(prompt_ids) == 3
        index = [i for i in range(3) for _ in range(4)]
        out = [texts[i][j] for i in range(3) for j in range(4)]
        return Rollouts(prompt_index=index, completion_ids=[[1] * (len(t) % 5 + 1) for t in out],
                        texts=out, finished=[j != 3 for i in range(3) for j in range(4)], seconds=0.1)

    monkeypatch.setattr(rollout, "generate", fake_generate)
    problems = [problem(i, g) for i, g in enumerate(golds)]
    settings = GenerationSettings(n=4)
    result = evaluate.evaluate_model(None, tiny_tokenizer, problems, settings=settings, progress=False, engine="hf")
    s = result.summary
    assert s["eval/k"] == 4
    assert s["eval/avg@k"] == pytest.approx((2 / 4 + 0 + 0) / 3)
    assert s["eval/pass@1"] == pytest.approx(s["eval/avg@k"])
    assert s["eval/pass@k"] == pytest.approx(1 / 3)
    assert s["eval/lenient/avg@k"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert s["eval/boxed_rate"] == pytest.approx(5 / 12)
    assert s["eval/truncation_rate"] == pytest.approx(3 / 12)
    assert list(result.table["c"]) == [2, 0, 0]
    assert list(result.table["c_lenient"]) == [3, 2, 0]
    assert result.table["first_answer"].iloc[0] == r"\frac{1}{2}"
    assert result.samples["correct"].tolist()[:4] == [True, True, False, False]

    lenient = evaluate.evaluate_model(None, tiny_tokenizer, problems, settings=settings, mode="lenient",
                                      progress=False, engine="hf")
    assert lenient.summary["eval/mode"] == "lenient"
    assert lenient.summary["eval/avg@k"] == pytest.approx(s["eval/lenient/avg@k"])


def test_steps_compose_to_evaluate_model(monkeypatch, tiny_tokenizer):
    """sample_responses -> grade_responses -> tabulate, called one by one, give evaluate_model's result."""
    from opsd_kit.rollout import hf as rollout
    from opsd_kit.rollout.hf import GenerationSettings, Rollouts

    texts = [r"\boxed{2}", "it is 2", r"\boxed{3}", "The answer is 4."]
    made = Rollouts(prompt_index=[0, 0, 1, 1], completion_ids=[[1, 2], [1], [3], [4, 5, 6]], texts=texts,
                    finished=[True, False, True, True], seconds=0.5)
    monkeypatch.setattr(rollout, "generate", lambda *args, **kwargs: made)
    problems = [problem(0, "2"), problem(1, "4")]
    settings = GenerationSettings(n=2)

    rollouts = evaluate.sample_responses(None, tiny_tokenizer, problems, settings=settings, progress=False,
                                         engine="hf")
    verdicts = evaluate.grade_responses(rollouts.texts, ["2", "2", "4", "4"])
    assert verdicts.strict == [True, False, False, False]
    assert verdicts.lenient == [True, True, False, True]
    assert verdicts.answers_strict == ["2", None, "3", None]
    assert verdicts.answers_lenient == ["2", "2", "3", "4"]
    assert verdicts.timeouts == 0 and verdicts.errors == 0
    result = evaluate.tabulate(problems, rollouts, verdicts, mode="lenient")
    assert result.summary["eval/k"] == 2 and result.summary["eval/avg@k"] == pytest.approx(0.75)
    assert list(result.table["c"]) == [2, 1]

    whole = evaluate.evaluate_model(None, tiny_tokenizer, problems, settings=settings, mode="lenient",
                                    progress=False, engine="hf")
    timing = {"eval/grading_seconds", "eval/seconds"}
    assert {k: v for k, v in whole.summary.items() if k not in timing} == \
        {k: v for k, v in result.summary.items() if k not in timing}
    assert whole.table.equals(result.table) and whole.samples.equals(result.samples)


def test_grading_names_are_re_exported():
    from opsd_kit.data import answers
    from opsd_kit.evaluation import grading

    assert evaluate.is_correct is grading.is_correct and evaluate.grade_many is grading.grade_many
    assert evaluate.last_number is answers.last_number


# -- the sampling engines: the fast engine and generate (the reference) -------------------------
def _greedy():
    from opsd_kit.rollout.hf import GenerationSettings

    return GenerationSettings(max_new_tokens=12, temperature=0.0, n=1, batch_size=2)


def _with_random_adapter(model, tokenizer):
    """``model`` with a LoRA adapter whose ``lora_B`` is random (peft starts it at zero), so that
    merging it changes the greedy tokens."""
    import torch

    from opsd_kit.policy import LoraSettings, Policy

    policy = Policy(model, tokenizer, lora=LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return policy.model


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
def test_fast_greedy_evaluation_equals_generate(adapter, tiny_model, tiny_tokenizer, monkeypatch):
    """The fused decoder (no fallback: no warning, generate never called) gives generate's greedy
    tokens, tie-aware, on the base model and on a LoRA adapter; equal tokens give equal accuracies."""
    import warnings

    from _numerics import assert_same_greedy

    from opsd_kit.prompts import PromptBuilder
    from opsd_kit.rollout import hf as rollout

    model = _with_random_adapter(tiny_model, tiny_tokenizer) if adapter else tiny_model
    problems = [problem(i, str(i)) for i in range(5)]
    prompts = [PromptBuilder(tiny_tokenizer).student_ids(p) for p in problems]
    run = dict(settings=_greedy(), progress=False, timeout_s=5.0)
    reference = evaluate.evaluate_model(model, tiny_tokenizer, problems, engine="hf", **run)

    def no_generate(*args, **kwargs):
        raise AssertionError("engine='fast' called generate")

    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("error")
        patch.setattr(rollout, "generate", no_generate)
        fast = evaluate.evaluate_model(model, tiny_tokenizer, problems, engine="fast", **run)
    ids = [list(c) for c in fast.samples["completion_ids"]]
    ref_ids = [list(c) for c in reference.samples["completion_ids"]]
    assert_same_greedy(model, prompts, SimpleNamespace(completion_ids=ids), SimpleNamespace(completion_ids=ref_ids))
    if ids == ref_ids:
        timing = {"eval/generation_seconds", "eval/grading_seconds", "eval/seconds"}
        assert {k: v for k, v in fast.summary.items() if k not in timing} == \
            {k: v for k, v in reference.summary.items() if k not in timing}
    if adapter:  # the adapter is merged: the base model's tokens differ
        with model.disable_adapter():
            base = evaluate.sample_responses(model, tiny_tokenizer, problems, settings=_greedy(), progress=False)
        assert base.completion_ids != ref_ids


def test_fast_sampled_evaluation_repeats_with_its_seed(tiny_model, tiny_tokenizer):
    from opsd_kit.rollout.hf import GenerationSettings

    problems = [problem(i, str(i)) for i in range(3)]
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, n=2, batch_size=4)

    def sample(seed):
        return evaluate.sample_responses(tiny_model, tiny_tokenizer, problems, settings=settings, seed=seed,
                                         progress=False, engine="fast").completion_ids

    first = sample(0)
    assert len(first) == 6 and first == sample(0) != sample(1)


def test_fast_evaluation_of_an_unsupported_model_falls_back_to_generate(tiny_model, tiny_tokenizer, monkeypatch):
    from opsd_kit.rollout.fused_decoder import FusedDecoder

    problems = [problem(i, str(i)) for i in range(3)]
    reference = evaluate.sample_responses(tiny_model, tiny_tokenizer, problems, settings=_greedy(), progress=False,
                                          engine="hf")
    monkeypatch.setattr(FusedDecoder, "unsupported", staticmethod(lambda model: "a reason the test gives"))
    with pytest.warns(UserWarning, match="a reason the test gives.*sampling with generate"):
        fast = evaluate.sample_responses(tiny_model, tiny_tokenizer, problems, settings=_greedy(), progress=False,
                                         engine="fast")
    assert fast.completion_ids == reference.completion_ids


def test_fast_evaluation_of_a_quantized_base_falls_back_to_generate(tiny_model, tiny_tokenizer, monkeypatch):
    """A quantized base cannot be merged exactly: the fast engine refuses it, evaluation then
    samples with plain generate (after a warning) instead of failing."""
    from opsd_kit.rollout import fast as fast_module

    problems = [problem(i, str(i)) for i in range(3)]
    reference = evaluate.sample_responses(tiny_model, tiny_tokenizer, problems, settings=_greedy(), progress=False,
                                          engine="hf")
    monkeypatch.setattr(fast_module, "is_quantized", lambda model, bits=(4, 8): True)
    with pytest.warns(UserWarning, match="quantized base"):
        fast = evaluate.sample_responses(tiny_model, tiny_tokenizer, problems, settings=_greedy(), progress=False,
                                         engine="fast")
    assert fast.completion_ids == reference.completion_ids


def test_an_unknown_engine_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="engine='vllm' is not an evaluation engine"):
        evaluate.evaluate_model(None, tiny_tokenizer, [problem(0, "1")], settings=_greedy(), engine="vllm")
