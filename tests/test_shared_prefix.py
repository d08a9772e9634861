"""A prompt prefix every row of a micro-batch shares runs once (`Policy.hidden_sharing_prefix`):
the layout helpers, and the hidden states, loss and gradients against the whole rows' forward."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from _numerics import trainer_tolerance

from opsd_kit.algorithms.prompt_pass import can_share_prompt_pass
from opsd_kit.prompts import build_batch, columns_after_prefix, left_padded_columns, shared_prefix_length


@pytest.mark.parametrize("prompts, want", [
    ([[1, 2, 3, 4]], 0),  # one row: nothing to share
    ([[1, 2, 3], [1, 2, 3]], 2),  # identical: every row keeps its last token
    ([[1, 2, 3, 4, 5], [1, 2, 3]], 2),  # the shorter row keeps its last token
    ([[1, 2, 3, 9], [1, 2, 4, 9], [1, 2, 3, 9]], 2),
    ([[5, 2, 3], [1, 2, 3]], 0),
    ([[1], [1, 2]], 0),
])
def test_shared_prefix_length(prompts, want):
    assert shared_prefix_length(prompts) == want
    assert build_batch(prompts, [[7]] * len(prompts), pad_id=0).shared_prefix == want


def test_the_two_layouts_are_inverse():
    """``[pads | prefix | rest]`` -> ``[prefix | pads | rest]`` -> back, rows of different widths."""
    prompts = [[1, 2, 3, 10, 11], [1, 2, 3, 20], [1, 2, 3, 30, 31, 32, 33]]
    batch = build_batch(prompts, [[40, 41], [50], [60, 61]], pad_id=0)
    L, P = batch.shared_prefix, batch.prompt_width
    assert L == 3
    cols_BW = columns_after_prefix(batch.attention_mask, P, L)
    rest_BW = batch.input_ids.gather(1, cols_BW)
    for row, prompt in zip(rest_BW.tolist(), prompts):  # [pads | rest of the row]: the prompt ends at P - L
        assert row[P - L - (len(prompt) - L): P - L] == prompt[L:]
    compact_BT = torch.cat([torch.tensor([[1, 2, 3]] * 3), rest_BW], 1)
    back_BT = compact_BT.gather(1, left_padded_columns(batch.attention_mask, P, L))
    torch.testing.assert_close(back_BT, batch.input_ids, rtol=0, atol=0)


def _batch(trainer, role):
    """Two prompts of different lengths with the chat header in common; completions of different lengths."""
    alg = trainer.algorithm
    problems = alg.step_problems(0)[:2]
    prompts = [getattr(alg.prompts, role)[p.id] for p in problems]
    batch = build_batch(prompts, [[5, 6, 7, 8, 9], [10, 11]], trainer.policy.tokenizer.pad_token_id)
    assert batch.shared_prefix > 0 and len(prompts[0]) != len(prompts[1])
    return batch


def test_the_teacher_with_a_shared_prefix_equals_the_whole_rows(fast_trainer, tmp_path):
    trainer = fast_trainer(tmp_path, lora_dropout=0.1)  # eval mode: dropout does not stop the teacher
    batch = _batch(trainer, "teacher")
    with trainer.policy.teacher():
        shared = trainer.policy.completion_hidden(batch)
        whole = trainer.policy.completion_hidden(dataclasses.replace(batch, shared_prefix=0))
    real = batch.completion_mask.bool()
    torch.testing.assert_close(shared[real], whole[real], **trainer_tolerance(trainer, float(whole.abs().max())))


def test_the_student_with_a_shared_prefix_has_the_whole_rows_gradients(fast_trainer, tmp_path):
    trainer = fast_trainer(tmp_path)
    batch = _batch(trainer, "student")
    mask = batch.completion_mask.bool()

    def hidden_and_grads(b):
        for p in trainer.params:
            p.grad = None
        hidden = trainer.policy.completion_hidden(b)
        (hidden[mask].square().mean()).backward()
        return hidden.detach(), [p.grad.clone() for p in trainer.params]

    shared, shared_grads = hidden_and_grads(batch)
    whole, whole_grads = hidden_and_grads(dataclasses.replace(batch, shared_prefix=0))
    torch.testing.assert_close(shared[mask], whole[mask], **trainer_tolerance(trainer, float(whole.abs().max())))
    for got, want in zip(shared_grads, whole_grads):
        assert want.abs().max() > 0
        tol = trainer_tolerance(trainer, float(want.abs().max()), batch.input_ids.numel())
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("overrides, model_config, training, shared", [
    ({}, {}, True, True),
    ({"lora_dropout": 0.1}, {}, True, False),  # each piece would draw its own dropout masks
    ({"lora_dropout": 0.1}, {}, False, True),
    ({"gradient_checkpointing": True}, {}, True, False),  # checkpointed layers drop the cache
    ({"gradient_checkpointing": True}, {}, False, True),
    # transformers places a sliding window by column: the padding between the pieces would shift it
    ({}, {"use_sliding_window": True, "sliding_window": 6}, False, False),
    ({}, {"layer_types": ["sliding_attention", "full_attention"]}, False, False),
    ({}, {"model_type": "gemma3_text"}, False, False),
])
def test_the_prefix_runs_once_only_where_that_equals_the_whole_rows(fast_trainer, tmp_path, monkeypatch, overrides,
                                                                    model_config, training, shared):
    trainer = fast_trainer(tmp_path, **overrides)
    policy = trainer.policy
    for key, value in model_config.items():  # what the switch reads (the tiny model itself stays as it is)
        monkeypatch.setattr(policy.causal_lm.config, key, value, raising=False)
    calls = []
    run = policy.hidden_sharing_prefix
    monkeypatch.setattr(policy, "hidden_sharing_prefix", lambda *a: calls.append(1) or run(*a))
    policy.model.train(training)
    assert policy.can_run_in_pieces() is shared
    if not model_config:  # a changed config would not describe the model that runs
        trainer.policy.completion_hidden(_batch(trainer, "student"))
        assert bool(calls) is shared


def test_a_model_loaded_through_unsloth_runs_whole_rows(fast_trainer, tmp_path):
    trainer = fast_trainer(tmp_path)
    assert trainer.policy.can_run_in_pieces()
    trainer.policy.backend = "unsloth"  # set by Policy.from_pretrained(backend="unsloth") (CUDA only)
    assert not trainer.policy.can_run_in_pieces()
    assert not can_share_prompt_pass(trainer.policy, trainer.algorithm.sampler)


def test_the_prompt_pass_with_a_shared_prefix_hands_the_decoder_the_left_padded_layout(fast_trainer, tmp_path,
                                                                                       monkeypatch):
    """The rollout's key/value states and first logits equal those of a pass over the left-padded
    prompts without the prefix shared, on every real column."""
    import opsd_kit.prompts

    trainer = fast_trainer(tmp_path)
    alg = trainer.algorithm
    prompts = [alg.prompts.student[p.id] for p in alg.step_problems(0)[:3]]
    assert shared_prefix_length(prompts) > 0 and len({len(p) for p in prompts}) > 1
    with torch.no_grad():
        shared = alg.prompt_pass.run(prompts)[1]
        monkeypatch.setattr(opsd_kit.prompts, "shared_prefix_length", lambda rows: 0)
        whole = alg.prompt_pass.run(prompts)[1]
    width = max(map(len, prompts))
    real_BP = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    def parts(prefill):
        return [*prefill.keys, *prefill.values, prefill.logits_BV]

    for got, want in zip(parts(shared), parts(whole)):
        if got.dim() == 4:  # [B, G, P, D]: the real columns only
            got, want = got.transpose(1, 2)[real_BP], want.transpose(1, 2)[real_BP]
        torch.testing.assert_close(got, want, **trainer_tolerance(trainer, float(want.abs().max())))
