"""Prompt builder: alignment, contiguity, truncation (docs/algorithm.md, Pitfalls, 1-2, 3 and 8)."""
from types import SimpleNamespace

import pytest
import torch
from _numerics import tolerance

from opsd_kit.config import load_profile
from opsd_kit.prompts import (
    GRPO_STUDENT_TEMPLATE,
    TRUNCATION_MARK,
    PromptBuilder,
    PromptTooLongError,
    build_batch,
    build_prompts,
    shuffled_hints,
)


def problem(solution="First 2 + 2 = 4, so the answer is \\boxed{4}.", question="What is 2 + 2?", pid="p0"):
    return SimpleNamespace(id=pid, question=question, solution=solution, answer="4", source="test")


def test_student_and_teacher_messages(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer)
    p = problem()
    student = tiny_tokenizer.decode(b.student_ids(p))
    teacher = tiny_tokenizer.decode(b.teacher_ids(p))
    assert student.startswith("<|im_start|>user\nWhat is 2 + 2?")
    assert student.endswith("<|im_start|>assistant\n")  # generation prompt: template kept (Pitfalls, 1)
    assert "\\boxed{}" in student and p.solution not in student  # the student never sees y*
    assert p.question in teacher and p.solution in teacher
    assert teacher.index(p.question) < teacher.index("Reference Solution Begin") < teacher.index(p.solution)
    assert teacher.index(p.solution) < teacher.index("Reference Solution End") < teacher.index("own words")
    assert teacher.rstrip().endswith("<|im_start|>assistant")


def test_thinking_switches_are_separate(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, student_thinking=False, teacher_thinking=True)
    p = problem()
    assert tiny_tokenizer.decode(b.student_ids(p)).endswith("<think>\n\n</think>\n\n")
    assert not tiny_tokenizer.decode(b.teacher_ids(p)).endswith("</think>\n\n")


def test_teacher_input_is_teacher_prompt_then_exact_student_completion(tiny_tokenizer):
    """OPSD #10: whatever precedes it, the teacher's completion ids are the student's, byte for byte."""
    b = PromptBuilder(tiny_tokenizer, student_thinking=False, teacher_thinking=True)
    probs = [problem(), problem(question="What is 10 - 3?", pid="p1", solution="7. \\boxed{7}")]
    completions = [[65, 66, 67, tiny_tokenizer.eos_token_id], [70]]
    s = build_batch([b.student_ids(p) for p in probs], completions, tiny_tokenizer.pad_token_id)
    t = build_batch([b.teacher_ids(p) for p in probs], completions, tiny_tokenizer.pad_token_id)
    assert torch.equal(s.completion_ids, t.completion_ids)
    assert torch.equal(s.completion_mask, t.completion_mask)
    for i, p in enumerate(probs):
        row = t.input_ids[i][t.attention_mask[i].bool()].tolist()
        assert row == b.teacher_ids(p) + completions[i]
        row = s.input_ids[i][s.attention_mask[i].bool()].tolist()
        assert row == b.student_ids(p) + completions[i]


def test_batch_rows_are_contiguous_with_correct_positions(tiny_tokenizer, tiny_model):
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    completions = [[9, 10], [11, 12, 13, 14]]
    batch = build_batch(prompts, completions, tiny_tokenizer.pad_token_id)
    for i in range(2):
        mask = batch.attention_mask[i].tolist()
        first, last = mask.index(1), len(mask) - 1 - mask[::-1].index(1)
        assert all(mask[first: last + 1])  # no gap inside a row
        assert batch.position_ids[i, first: last + 1].tolist() == list(range(last - first + 1))
    logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits
    for i, (p, c) in enumerate(zip(prompts, completions)):
        alone = tiny_model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: len(p) - 1 + len(c)]
        got = logits[i, batch.predicting_slice()][: len(c)]
        cfg = tiny_model.config  # float32, different blockings: the longest dot product through every layer
        tol = tolerance(torch.float32, cfg.intermediate_size, scale=float(alone.abs().max()),
                        depth=cfg.num_hidden_layers + 1)
        torch.testing.assert_close(got, alone, **tol)


def test_truncation_cuts_the_middle_of_the_reference_solution_and_keeps_its_final_answer(tiny_tokenizer):
    long = problem(solution="First we set up. " + "step. " * 400 + "Hence the answer is \\boxed{4}")
    b = PromptBuilder(tiny_tokenizer, max_prompt_tokens=600)
    ids = b.teacher_ids(long)
    text = tiny_tokenizer.decode(ids)
    assert len(ids) <= 600
    assert long.question in text and "own words" in text and b.instruction in text
    solution = text.split("=== Reference Solution Begin ===\n")[1].split("\n=== Reference Solution End ===")[0]
    head, tail = solution.split(TRUNCATION_MARK.strip())
    assert head.startswith("First we set up.") and tail.rstrip().endswith("Hence the answer is \\boxed{4}")
    assert solution.count("step.") < 400  # the middle of the reasoning went
    assert b.stats == {"teacher_prompts": 1, "teacher_middle_cut": 1}
    b.teacher_ids(problem())
    assert b.stats == {"teacher_prompts": 2, "teacher_middle_cut": 1}


def test_plain_student_prompt_is_the_bare_message_and_the_teacher_stays_chat_templated(tiny_tokenizer):
    p = problem()
    b = PromptBuilder(tiny_tokenizer, student_prompt_format="plain", student_template=GRPO_STUDENT_TEMPLATE)
    expected = f"Problem: {p.question}\n Please reason step by step, and put your final answer within \\boxed{{}}."
    assert b.student_ids(p) == tiny_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(b.student_ids(p)) == expected  # no chat template, no special token
    chat = PromptBuilder(tiny_tokenizer, student_template=GRPO_STUDENT_TEMPLATE)
    assert tiny_tokenizer.decode(chat.student_ids(p)).startswith("<|im_start|>")
    assert b.teacher_ids(p) == chat.teacher_ids(p)  # the teacher's prompt is chat-templated in both
    cfg = load_profile("tiny", student_prompt_format="plain", student_template=GRPO_STUDENT_TEMPLATE)
    assert build_prompts(cfg, tiny_tokenizer).student_ids(p) == b.student_ids(p)
    with pytest.raises(ValueError, match="student_prompt_format"):
        PromptBuilder(tiny_tokenizer, student_prompt_format="raw")


def test_prompt_that_cannot_fit_names_the_problem(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, max_prompt_tokens=200)
    with pytest.raises(PromptTooLongError, match="problem 'big'"):
        b.teacher_ids(problem(question="x" * 300, pid="big"))
    with pytest.raises(PromptTooLongError, match="problem 'big'"):
        b.student_ids(problem(question="x" * 300, pid="big"))


def test_overridable_templates_are_checked(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, teacher_template="Q: {question}\nS: {solution}\n{instruction}")
    assert "S: First" in tiny_tokenizer.decode(b.teacher_ids(problem()))
    with pytest.raises(ValueError, match="solution"):
        PromptBuilder(tiny_tokenizer, teacher_template="{question}")


def test_teacher_hint_override_replaces_the_solution_and_is_truncated_like_it(tiny_tokenizer):
    b = PromptBuilder(tiny_tokenizer, max_prompt_tokens=600)
    p = problem()
    other = "Other problem: 5 - 2 = 3, so \\boxed{3}."
    text = tiny_tokenizer.decode(b.teacher_ids(p, other))
    assert other in text and p.solution not in text and p.question in text
    long = "step. " * 400 + "\\boxed{3}"
    ids = b.teacher_ids(p, long)
    text = tiny_tokenizer.decode(ids)
    assert len(ids) <= 600 and "[...]" in text and "step. step." in text and p.solution not in text
    assert b.stats == {"teacher_prompts": 2, "teacher_middle_cut": 1}


def test_build_prompts_from_a_config_and_from_an_old_config_json(tiny_tokenizer):
    cfg = load_profile("tiny", instruction="End with ANSWER: n.",
                       teacher_template="{question}\nHint: {solution}\n{instruction}")
    p = problem()
    b = build_prompts(cfg, tiny_tokenizer)
    student = tiny_tokenizer.decode(b.student_ids(p))
    assert "End with ANSWER: n." in student and "\\boxed{}" not in student
    assert "Hint: First" in tiny_tokenizer.decode(b.teacher_ids(p))
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("student_template", "teacher_template", "instruction")}
    default = PromptBuilder(tiny_tokenizer, max_prompt_tokens=cfg.max_prompt_tokens)
    assert build_prompts(old, tiny_tokenizer).teacher_ids(p) == default.teacher_ids(p)
    assert build_prompts(old, tiny_tokenizer).student_ids(p) == default.student_ids(p)


def problems_with_answers(answers):
    return [SimpleNamespace(id=f"p{i}", question=f"q{i}", solution=f"solution {i}: \\boxed{{{a}}}", answer=a,
                            source="test") for i, a in enumerate(answers)]


def donors(problems, hints):
    """problem id -> the problem whose solution it was given (solutions here are unique)."""
    by_solution = {p.solution: p for p in problems}
    return {pid: by_solution[solution] for pid, solution in hints.items()}


@pytest.mark.parametrize("answers", [[str(i) for i in range(9)], ["1", "1", "2", "2", "3", "3", "3"],
                                     ["7", "7", " 8", "8 "]])
def test_shuffled_hints_are_a_seeded_derangement_with_different_answers(answers):
    probs = problems_with_answers(answers)
    hints = shuffled_hints(probs, seed=3)
    assert hints == shuffled_hints(list(probs), seed=3)  # deterministic given the seed
    assert any(shuffled_hints(probs, seed) != hints for seed in range(4, 12))  # and the seed matters
    given = donors(probs, hints)
    assert sorted(d.id for d in given.values()) == sorted(p.id for p in probs)  # each solution used once
    for p in probs:
        assert given[p.id].id != p.id
        assert given[p.id].answer.strip() != p.answer.strip()


def test_shuffled_hints_compare_answers_as_the_data_module_does():
    """``1,000`` and ``1000`` are one answer (`opsd_kit.data.problems.answer_key`): neither is a
    wrong hint for the other."""
    probs = problems_with_answers(["1,000", "1000", "2", "3"])
    for seed in range(8):
        given = donors(probs, shuffled_hints(probs, seed=seed))
        assert all(given[p.id].answer.replace(",", "") != p.answer.replace(",", "") for p in probs), seed


def test_shuffled_hints_share_an_answer_only_when_unavoidable():
    probs = problems_with_answers(["1"] * 5 + ["2", "3"])  # 5 of 7 share an answer: 2 * 5 - 7 = 3 must
    given = donors(probs, shuffled_hints(probs, seed=0))
    assert all(given[p.id].id != p.id for p in probs)
    assert sum(given[p.id].answer == p.answer for p in probs) == 3


def test_shuffled_hints_need_two_different_answers():
    with pytest.raises(ValueError, match="only 1 problem \\('p0'\\)"):
        shuffled_hints(problems_with_answers(["4"]), seed=0)
    with pytest.raises(ValueError, match="all 3 problems, problem 'p0' among them, have the answer '4'"):
        shuffled_hints(problems_with_answers(["4", "4", " 4"]), seed=0)


def test_the_prompt_check_and_the_cache_tokenise_each_prompt_once(tmp_path, monkeypatch):
    """The trainer's prompt check (`PromptBuilder.length_error`) and its `PromptCache` share one
    builder: the student ids the check tokenised are the cache's, no text is tokenised twice."""
    from collections import Counter

    from opsd_kit.config import load_profile
    from opsd_kit.trainer import Trainer

    encoded = Counter()
    encode = PromptBuilder._encode

    def counting(self, text):
        encoded[text] += 1
        return encode(self, text)

    monkeypatch.setattr(PromptBuilder, "_encode", counting)
    trainer = Trainer(load_profile("tiny", "opsd", run_dir=str(tmp_path), progress=False))
    assert trainer.config.max_prompt_tokens and encoded
    assert max(encoded.values()) == 1, encoded.most_common(1)
    fresh = build_prompts(trainer.config, trainer.policy.tokenizer)
    assert all(trainer.algorithm.prompts.student[p.id] == fresh.student_ids(p) for p in trainer.problems)
