"""OPSD's one student pass over the prompts (rollout_backend='fast'): it starts the rollout and the
loss continues from it; both must be what running each separately gives."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from _numerics import assert_same_greedy, trainer_tolerance

from opsd_kit.algorithms.opsd import OPSDBatch
from opsd_kit.algorithms.prompt_pass import can_share_prompt_pass
from opsd_kit.config import ConfigError, load_profile
from opsd_kit.prompts import build_batch
from opsd_kit.rollout.fast import FastEngine, Prefill
from opsd_kit.rollout.hf import GenerationSettings


def _loss_and_grads(trainer, micro_batches):
    params = trainer.params
    for p in params:
        p.grad = None
    total = sum(mb.num_loss_tokens for mb in micro_batches)
    loss = 0.0
    for mb in micro_batches:
        loss_sum, _ = trainer.algorithm.loss(mb)
        (loss_sum / total).backward()
        loss += float(loss_sum.detach()) / total
    return loss, [p.grad.clone() for p in params]


def _assert_same_loss_and_grads(trainer, shared, whole):
    shared_loss, shared_grads = _loss_and_grads(trainer, shared)
    whole_loss, whole_grads = _loss_and_grads(trainer, whole)
    torch.testing.assert_close(shared_loss, whole_loss, **trainer_tolerance(trainer, abs(whole_loss)))
    tokens = sum(mb.student.input_ids.numel() for mb in whole)
    for got, want in zip(shared_grads, whole_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, **trainer_tolerance(trainer, float(want.abs().max()), tokens))


def _whole_rows(mb: OPSDBatch) -> OPSDBatch:
    """The reference: every row run whole, no prompt pass and no shared prefix."""
    return dataclasses.replace(mb, student_prompt=None, student=dataclasses.replace(mb.student, shared_prefix=0),
                               teacher=dataclasses.replace(mb.teacher, shared_prefix=0))


def test_the_loss_from_the_prompt_pass_equals_the_whole_rows(fast_trainer, tmp_path):
    """Prompts of different widths inside and across micro-batches (left padding), with and
    without a prefix all of a micro-batch's prompts share, completions of different lengths
    (right padding), a one-token completion (C = 1); gradients reach the adapter through the
    prompt's keys and values."""
    trainer = fast_trainer(tmp_path)
    alg = trainer.algorithm
    problems = alg.step_problems(0)
    student = [alg.prompts.student[p.id] for p in problems]
    teacher = [alg.prompts.teacher[p.id] for p in problems]
    groups = [([student[0], student[1][4:]], [teacher[0], teacher[1]], [[5, 6, 7, 8, 9], [10, 11]]),
              ([student[3], student[1]], [teacher[3], teacher[1]], [[13, 14], [15, 16, 17]]),
              ([student[2][9:]], [teacher[2]], [[12]])]
    assert len(groups[0][0][0]) != len(groups[0][0][1]) and len(groups[2][0][0]) not in map(len, groups[0][0])
    pad = trainer.policy.tokenizer.pad_token_id

    def micro_batches(shared):
        return [OPSDBatch(student=build_batch(s, c, pad), teacher=build_batch(t, c, pad), wrong_teacher=None,
                          num_loss_tokens=sum(map(len, c)),
                          student_prompt=alg.prompt_pass.run(s)[0] if shared else None)
                for s, t, c in groups]

    shared = micro_batches(True)
    assert [mb.student.shared_prefix > 0 for mb in shared] == [False, True, False]
    _assert_same_loss_and_grads(trainer, shared, [_whole_rows(mb) for mb in micro_batches(False)])
    assert all(mb.student_prompt is None for mb in shared)  # used once: its cache has grown
    # a second loss runs the whole row
    _assert_same_loss_and_grads(trainer, shared, [_whole_rows(mb) for mb in micro_batches(False)])


def test_a_step_samples_from_the_prompt_pass_and_learns_what_the_whole_rows_give(fast_trainer, tmp_path):
    trainer = fast_trainer(tmp_path)
    alg = trainer.algorithm
    assert alg.prompt_pass.enabled
    micro_batches, _ = alg.prepare(0)
    assert all(mb.student_prompt is not None and mb.student.shared_prefix > 0 for mb in micro_batches)
    _assert_same_loss_and_grads(trainer, micro_batches, [_whole_rows(mb) for mb in micro_batches])


def test_rollouts_from_the_prompt_pass_are_the_students(fast_trainer, tmp_path):
    trainer = fast_trainer(tmp_path)
    alg, model, tokenizer = trainer.algorithm, trainer.policy.model, trainer.policy.tokenizer
    prompts = [alg.prompts.student[p.id] for p in alg.step_problems(0)]
    greedy = GenerationSettings(max_new_tokens=10, temperature=0.0, n=1, batch_size=3)  # calls of 3 rows: sliced
    with torch.no_grad():
        prefill = Prefill.concat([alg.prompt_pass.run(prompts[:2])[1], alg.prompt_pass.run(prompts[2:])[1]])
        for prompt, logits_V in zip(prompts, prefill.logits_BV):  # the student's own next-token logits
            want_V = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(logits_V, want_V, **trainer_tolerance(trainer, float(want_V.abs().max())))
    engine = FastEngine(model, tokenizer)
    assert_same_greedy(model, prompts, engine.generate(prompts, greedy, prefill=prefill),
                        engine.generate(prompts, greedy))
    with pytest.raises(ValueError, match="settings.n == 1"):
        engine.generate(prompts, dataclasses.replace(greedy, n=2), prefill=prefill)
    with pytest.raises(ValueError, match="for rollout_backend='fast'"):
        trainer.algorithm.sampler.backend = "hf"
        trainer.algorithm.sampler.sample(prompts, greedy, 0, prefill=prefill)


@pytest.mark.parametrize("overrides, shared", [
    ({}, True),
    ({"rollout_backend": "hf"}, False),
    ({"lora_dropout": 0.1}, False),  # the pass would not be the sampling policy's
    ({"gradient_checkpointing": True}, False),  # checkpointing drops the cache
    ({"teacher": "ema"}, False),  # the EMA teacher writes its weights in under the pass's graph
    ({"teacher": "live"}, True),
])
def test_the_prompt_pass_is_shared_only_where_it_is_the_samplers(fast_trainer, tmp_path, overrides, shared):
    trainer = fast_trainer(tmp_path, **overrides)
    assert trainer.algorithm.prompt_pass.enabled is shared
    trainer.train()  # a step, backward included, runs in every combination
    micro_batches, _ = trainer.algorithm.prepare(trainer.step)
    assert all((mb.student_prompt is not None) is shared for mb in micro_batches)


def test_the_prompt_pass_is_an_internal_switch_not_a_config_key(fast_trainer, tmp_path):
    """The algorithm decides; switching it off on a built algorithm runs whole rows (less memory)."""
    with pytest.raises(ConfigError, match="unknown config key 'share_prompt_pass'"):
        load_profile("tiny", share_prompt_pass=False)
    trainer = fast_trainer(tmp_path)
    trainer.algorithm.prompt_pass.enabled = False
    trainer.train()
    micro_batches, _ = trainer.algorithm.prepare(trainer.step)
    assert all(mb.student_prompt is None for mb in micro_batches)


def test_the_switch_reads_the_policy_it_trains(fast_trainer, tmp_path):
    """A policy need not come from the run's config: its own checkpointing turns the pass off."""
    trainer = fast_trainer(tmp_path)
    assert can_share_prompt_pass(trainer.policy, trainer.algorithm.sampler)
    trainer.policy.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not can_share_prompt_pass(trainer.policy, trainer.algorithm.sampler)
