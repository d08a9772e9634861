"""GRPO and SFT against hand-computed values on toy batches."""
import json
import math

import pytest
import torch
from _numerics import tolerance

from opsd_kit.algorithms.grpo import group_advantages, grpo_token_loss
from opsd_kit.config import ConfigError, load_profile
from opsd_kit.trainer import Trainer


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    centred = group_advantages(rewards, 4, scale=False)
    torch.testing.assert_close(centred, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))
    scaled = group_advantages(rewards, 4, scale=True, eps=1e-4)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # unbiased, as TRL
    torch.testing.assert_close(scaled[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.equal(scaled[4:], torch.zeros(4))  # a group that all agrees teaches nothing


def test_grpo_loss_by_hand_first_iteration():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    loss = grpo_token_loss(logp, logp.detach(), adv, mask, clip_eps=0.2)
    # ratio = 1 everywhere: loss = -sum(mask * A) = -(3 * 2 + 2 * -1) = -4
    assert loss.item() == pytest.approx(-4.0)
    loss.backward()
    # d/dlogp of -ratio*A at ratio 1 is -A on unmasked tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -2.0, -2.0], [1.0, 1.0, 0.0]]))


def test_grpo_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    positive = grpo_token_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    # A > 0: min(1.5, 1.2) = 1.2 and min(0.5, 0.8)... min(r*A, clip(r)*A) = min(0.5, 0.8) = 0.5
    assert positive.item() == pytest.approx(-(1.2 + 0.5))
    negative = grpo_token_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2)
    # A < 0: min(-1.5, -1.2) = -1.5 and min(-0.5, -0.8) = -0.8
    assert negative.item() == pytest.approx(1.5 + 0.8)


def test_grpo_per_sequence_normalisation_by_hand():
    """loss_normalisation='sequence' (TRL's loss_type 'grpo'): each row's token mean, summed over
    rows; the trainer divides by the rows. 'token': the token sum, divided by the tokens."""
    old = torch.zeros(2, 4)
    logp = torch.log(torch.tensor([[1.1, 1.5, 1.0, 1.0], [0.5, 1.0, 1.3, 1.0]]))  # the ratios
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    # Row 0, A = 1, eps 0.2: min(r A, clip(r) A) = 1.1, min(1.5, 1.2) = 1.2; mean 1.15, loss -1.15.
    # Row 1, A = -2: min(-1.0, -1.6) = -1.6, -2.0, min(-2.6, -2.4) = -2.6; mean -6.2 / 3, loss 6.2 / 3.
    sequence = grpo_token_loss(logp, old, adv, mask, clip_eps=0.2, normalisation="sequence")
    assert sequence.item() == pytest.approx(-1.15 + 6.2 / 3)
    token = grpo_token_loss(logp, old, adv, mask, clip_eps=0.2)
    assert token.item() == pytest.approx(-(1.1 + 1.2) + 6.2)  # divided by 5 tokens in the trainer


def test_grpo_per_sequence_normalisation_divides_the_step_by_its_rollouts(tmp_path):
    trainer = Trainer(load_profile("tiny", "grpo", run_dir=str(tmp_path), progress=False,
                                   loss_normalisation="sequence"))
    trainer.algorithm.reward = lambda rollouts, problems: ([float(i % 2) for i in range(len(rollouts))], {})
    micro, _ = trainer.algorithm.prepare(0)
    assert not any(mb.zero_gradient for mb in micro)  # every group mixes rewards: every micro-batch has a loss
    assert [mb.loss_units for mb in micro] == [mb.student.completion_mask.shape[0] for mb in micro]
    token = Trainer(load_profile("tiny", "grpo", run_dir=str(tmp_path / "t"), progress=False))
    assert all(mb.loss_units is None for mb in token.algorithm.prepare(0)[0])


def test_grpo_kl_term_is_k3_and_zero_at_the_reference():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    same = grpo_token_loss(logp, logp, torch.tensor([0.0]), mask, clip_eps=0.2, ref_logp_BC=logp, kl_coef=0.5)
    assert same.item() == pytest.approx(0.0)
    ref = torch.tensor([[-1.5, -2.0]])
    d = -0.5
    kl = grpo_token_loss(logp, logp, torch.tensor([0.0]), mask, clip_eps=0.2, ref_logp_BC=ref, kl_coef=0.5)
    assert kl.item() == pytest.approx(0.5 * (math.exp(d) - d - 1))


def test_official_grpo_reward_is_the_first_box_by_normalised_exact_match():
    from opsd_kit.evaluation.grading import first_box_exact_match, grade_many

    responses = [r"so \boxed{ 12 } then \boxed{13}", r"\boxed{13} first, then \boxed{12}", r"\boxed{\frac{1}{2}}",
                 r"\boxed{0.5}", r"\boxed{ABC}", "12", r"\boxed{12", None]
    golds = ["12", "12", r"\frac{1}{2}", r"\frac{1}{2}", " abc ", "12", "12", "12"]
    expected = [True, False, True, False, True, False, False, False]  # no math equivalence, no unboxed answer
    assert [first_box_exact_match(r, g) for r, g in zip(responses, golds)] == expected
    assert list(grade_many(responses, golds, mode="first_box_exact", workers=0)) == expected
    assert list(grade_many(responses[:2], golds[:2], mode="strict", workers=0)) == [False, True]  # the last box


def test_official_rlsd_reward_reads_the_first_box_after_the_thinking():
    from opsd_kit.evaluation.grading import grade_many

    responses = [r"<think>maybe \boxed{3}</think> so \boxed{0.5} and \boxed{7}", r"<think>\boxed{1/2}</think> none",
                 r"no thinking: \boxed{A B}", r"<think>\boxed{9}</think>\boxed{9}"]
    golds = [r"\frac{1}{2}", r"\frac{1}{2}", "ab", "9"]
    # math_verify equivalence, the whitespace-free lower-cased match, the box inside <think> ignored
    assert list(grade_many(responses, golds, mode="first_box_after_think", workers=0)) == [True, False, True, True]


def test_sft_targets_are_the_solution_and_the_prompt_is_masked(tmp_path):
    trainer = Trainer(load_profile("tiny", "sft", run_dir=str(tmp_path), progress=False))
    sft = trainer.algorithm
    micro, _ = sft.prepare(0)
    tok = trainer.policy.tokenizer
    batch = micro[0].student
    problems = trainer.step_problems(0)
    solutions = [tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                 for p in problems[: batch.input_ids.shape[0]]]
    for i, solution in enumerate(solutions):
        n = int(batch.completion_mask[i].sum())
        assert batch.completion_ids[i, :n].tolist() == solution
    # the step normalises by the solution tokens counted from the tokenizer: no prompt token is a target
    assert micro[0].num_loss_tokens == sum(len(solution) for solution in solutions)
    # The loss equals the hand-computed NLL of the solution tokens given the prompt.
    loss_sum, _ = sft.loss(micro[0])
    model = trainer.policy.model
    nll = 0.0
    for i in range(batch.input_ids.shape[0]):
        row = batch.input_ids[i][batch.attention_mask[i].bool()]
        n = int(batch.completion_mask[i].sum())
        logits = model(input_ids=row[None]).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1).gather(-1, row[1:, None])[:, 0]
        nll -= logp[-n:].sum()
    # float32 log-softmax over the logits' vocabulary, summed over the solution tokens
    tokens = int(batch.completion_mask.sum())
    tol = tolerance(torch.float32, logits.shape[-1] + tokens, scale=float(nll.abs()))
    torch.testing.assert_close(loss_sum, nll, **tol)


def _sft_targets(tmp_path, **overrides):
    """The SFT algorithm's targets on the tiny profile, and the step's problems."""
    trainer = Trainer(load_profile("tiny", "sft", run_dir=str(tmp_path), progress=False, **overrides))
    return trainer.algorithm, trainer.policy.tokenizer, trainer.problems


def test_sft_targets_are_not_cut_at_the_rollout_cap(tmp_path):
    """SFT samples nothing: the rollout cap is not its to set, and the profile's cap does not cut its targets."""
    with pytest.raises(ConfigError, match="max_new_tokens=4 applies to algorithm .*not algorithm='sft'"):
        load_profile("tiny", "sft", max_new_tokens=4)
    sft, tok, problems = _sft_targets(tmp_path / "uncapped")
    whole = {p.id: tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in problems}
    rollout_cap = load_profile("tiny").max_new_tokens
    assert max(len(t) for t in whole.values()) > rollout_cap  # the rollout cap would cut these solutions
    assert {p.id: sft.targets.ids[p.id] for p in problems} == whole
    assert sft.targets.truncated == 0


def test_sft_targets_are_cut_at_max_target_tokens(tmp_path):
    sft, tok, problems = _sft_targets(tmp_path / "capped", max_target_tokens=5)
    whole = {p.id: tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in problems}
    assert {p.id: sft.targets.ids[p.id] for p in problems} == {k: v[:5] for k, v in whole.items()}
    assert sft.targets.truncated == sum(len(v) > 5 for v in whole.values()) > 0
    _, metrics = sft.prepare(0)
    assert metrics["sft/solutions_truncated"] == sft.targets.truncated


def test_sft_without_a_cap_refuses_targets_beyond_the_context(tmp_path):
    from opsd_kit.config import ConfigError
    from opsd_kit.data.problems import Problem

    long = Problem(id="long", question="1 + 1?", solution="two " * 2100 + "\\boxed{2}", answer="2",
                   source="test")
    with pytest.raises(ConfigError, match="max_target_tokens=None: 1 reference solutions .*'long'"):
        Trainer(load_profile("tiny", "sft", run_dir=str(tmp_path), progress=False), problems=[long])


@pytest.mark.parametrize("algorithm", ["grpo", "rlsd"])
@pytest.mark.parametrize("rewarded", ["none", "first group"])
def test_micro_batches_whose_advantages_are_all_zero_skip_their_passes_and_learn_the_same(
        tmp_path, monkeypatch, algorithm, rewarded):
    """Skipping a zero-advantage micro-batch's forward and backward leaves the adapter, the loss
    and the grad norm bit-identical to running them (tiny: 4 micro-batches of one group each,
    each batch of rollouts reused for 2 optimizer steps)."""
    from opsd_kit.algorithms.grpo import GRPO

    def reward(completions, problems):  # no reward, or a mixed first group (its micro-batch carries a gradient)
        return [float(rewarded == "first group" and i == 0) for i in range(len(completions))]

    def run(name, skip):
        if not skip:
            monkeypatch.setattr(GRPO, "_zero_gradient", lambda self, adv_B: False)
        trainer = Trainer(load_profile("tiny", algorithm, run_dir=str(tmp_path / name), progress=False,
                                       max_steps=2, learning_rate=1e-2), reward_funcs=[reward])
        before = trainer.policy.lora_state_dict()
        result = trainer.train()
        monkeypatch.undo()
        rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        return before, trainer.policy.lora_state_dict(), rows

    before, lora, rows = run("skip", skip=True)
    _, lora_ref, rows_ref = run("reference", skip=False)
    expected_skips = [4, 4] if rewarded == "none" else [3, 3]
    assert [r["train/zero_gradient_micro_batches"] for r in rows] == expected_skips
    assert [r["train/zero_gradient_micro_batches"] for r in rows_ref] == [0, 0]
    for key in ("loss/total", "train/grad_norm"):
        assert [r[key] for r in rows] == [r[key] for r in rows_ref], key
    assert all(torch.equal(lora[k], lora_ref[k]) for k in lora)
    moved = any(not torch.equal(lora[k], before[k]) for k in lora)
    assert moved == (rewarded == "first group")  # only the mixed group moves the adapter
