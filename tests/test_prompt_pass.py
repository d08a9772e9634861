"""OPSD's one student pass over the prompts (rollout_backend='fast'): it starts the rollout and the
loss continues from it; both must be what running each separately gives."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from _numerics import tolerance
from test_fused_decoder import _assert_same_greedy

from opsd_kit.config import load_profile
from opsd_kit.rollout import FastEngine, GenerationSettings
from opsd_kit.trainer import Trainer


def _trainer(tmp_path, **overrides):
    cfg = dict(run_dir=str(tmp_path), progress=False, rollout_backend="fast", max_new_tokens=10)
    trainer = Trainer(load_profile("tiny", **{**cfg, **overrides}))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: gradients also flow through the prompt's keys/values
        for name, p in trainer.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return trainer


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


def test_the_loss_from_the_prompt_pass_equals_the_whole_rows(tmp_path):
    trainer = _trainer(tmp_path)
    alg = trainer.algorithm
    assert alg.shares_prompt_pass
    micro_batches, _ = alg.prepare(0)
    assert all(mb.student_prompt is not None for mb in micro_batches)
    widths = [len(alg.prompts.student[p.id]) for p in alg.step_problems(0)]
    assert len(set(widths)) > 1  # left padding inside a micro-batch is exercised
    assert any(mb.student.completion_ids.shape[1] > 1 for mb in micro_batches)
    shared_loss, shared_grads = _loss_and_grads(trainer, micro_batches)
    whole_loss, whole_grads = _loss_and_grads(
        trainer, [dataclasses.replace(mb, student_prompt=None) for mb in micro_batches])
    cfg = trainer.policy.causal_lm.config
    reduction = max(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    torch.testing.assert_close(shared_loss, whole_loss, **tolerance(
        torch.float32, reduction, scale=abs(whole_loss), depth=cfg.num_hidden_layers))
    for got, want in zip(shared_grads, whole_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, **tolerance(
            torch.float32, reduction, scale=float(want.abs().max()), depth=cfg.num_hidden_layers))


def test_rollouts_from_the_prompt_pass_are_the_students(tmp_path):
    trainer = _trainer(tmp_path)
    alg, model, tokenizer = trainer.algorithm, trainer.policy.model, trainer.policy.tokenizer
    prompts = [alg.prompts.student[p.id] for p in alg.step_problems(0)]
    greedy = GenerationSettings(max_new_tokens=10, temperature=0.0, n=1, batch_size=3)  # calls of 3 rows: sliced
    from opsd_kit.rollout import Prefill

    with torch.no_grad():
        prefill = Prefill.concat([alg.student_prompt_pass(prompts[:2])[1], alg.student_prompt_pass(prompts[2:])[1]])
    engine = FastEngine(model, tokenizer)
    _assert_same_greedy(model, prompts, engine.generate(prompts, greedy, prefill=prefill),
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
def test_the_prompt_pass_is_shared_only_where_it_is_the_samplers(tmp_path, overrides, shared):
    trainer = _trainer(tmp_path, **overrides)
    assert trainer.algorithm.shares_prompt_pass is shared
    trainer.train()  # a step, backward included, runs in every combination
    micro_batches, _ = trainer.algorithm.prepare(trainer.step)
    assert all((mb.student_prompt is not None) is shared for mb in micro_batches)
