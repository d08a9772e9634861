"""GRPO baseline (the paper's comparison): G rollouts per problem, a reward per rollout (the
run's `rewards.RewardSet`; by default 0/1 correctness in ``grading_mode``), group-relative
advantages, PPO-clipped importance ratio reused for `num_iterations` optimizer steps, token-level
or per-sequence normalisation (`loss_normalisation`), optional KL to the reference (adapter-off)
model, off by default as in the paper.

Shares the policy, rollout sampler, ledger, checkpoints, logging and accelerate path with OPSD
through `Algorithm` and the trainer; only the advantage and the surrogate loss live here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from opsd_kit.algorithms.base import Algorithm

if TYPE_CHECKING:
    import torch

    from opsd_kit.prompts import Batch


def group_advantages(rewards_N, group_size: int, scale: bool = True, eps: float = 1e-4):
    """A_i = r_i - mean(group), divided by the group's (unbiased, as in TRL) std + eps when
    ``scale``. Rows of one group are contiguous: ``rewards_N`` has N = problems x group_size."""
    grouped = rewards_N.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # group baseline
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # per-group scale
    return centred.reshape(-1)


def grpo_token_loss(logp_BC, old_logp_BC, adv, mask_BC, *, clip_eps: float, ref_logp_BC=None,
                    kl_coef: float = 0.0, normalisation: str = "token"):
    """The negated PPO-clipped surrogate (+ kl_coef * k3 KL) l_it, summed: for
    ``normalisation='token'`` the SUM over unmasked tokens, sum_i sum_t l_it; for 'sequence'
    the sum over rows of each row's token MEAN, sum_i (sum_t l_it) / |y_i| (a row without
    tokens counts 0).

    ``adv``: one advantage per sequence, [B] (GRPO), or one per token, [B, C] (RLSD,
    `opsd_kit.algorithms.rlsd.rlsd_token_advantages`).

    The trainer divides this sum by the step's `loss_units` (`GRPOBatch`): its completion tokens
    ('token': every token weighs the same, long answers are not down-weighted per sequence) or
    its rollouts ('sequence': the mean over rollouts of each rollout's token mean, TRL's
    loss_type 'grpo', which the official run_grpo.sh L28 sets)."""
    import torch

    ratio = torch.exp(logp_BC - old_logp_BC)  # 1 at the first iteration; grad flows via logp
    adv = adv[:, None] if adv.dim() == 1 else adv  # a sequence's advantage holds at each of its tokens
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # pessimistic bound
    per_token = -surrogate  # minimise the negative objective
    if kl_coef:
        delta = ref_logp_BC - logp_BC  # k3 estimator of KL(pi || ref): e^d - d - 1 >= 0
        per_token = per_token + kl_coef * (torch.exp(delta) - delta - 1)
    if normalisation == "sequence":
        return ((per_token * mask_BC).sum(dim=1) / mask_BC.sum(dim=1).clamp(min=1)).sum()
    return (per_token * mask_BC).sum()  # sum only; normalised by the step's token count


@dataclass
class GRPOBatch:
    """One micro-batch of GRPO (and RLSD) rollouts, reused over the batch's ``num_iterations``
    optimizer steps; the log-probs are computed once, without grad, when it is built."""

    student: Batch
    """[student prompt ++ rollout]."""
    adv_B: torch.Tensor
    """Group-relative advantage of each rollout: [B]."""
    num_loss_tokens: int
    loss_units: int | None = None
    """What the step's loss is divided by, summed over micro-batches: the rows here for
    ``loss_normalisation='sequence'``; None: ``num_loss_tokens`` (token normalisation)."""
    zero_gradient: bool = False
    """True when every advantage is 0 and no KL term is on: the loss and its gradient are then
    exactly 0, so no forward pass is run for it (`GRPO.loss` returns None; the trainer's zero
    gradients give the optimizer step it would have had)."""
    old_logp_BC: torch.Tensor | None = None
    """Log-probs of the rollout tokens under the sampling policy (num_iterations > 1), else None."""
    ref_logp_BC: torch.Tensor | None = None
    """Log-probs under the reference (adapter-off) model (kl_coef > 0), else None."""
    teacher: Batch | None = None
    """RLSD: [teacher prompt ++ the same rollout]."""
    teacher_logp_BC: torch.Tensor | None = None
    """RLSD: log-probs of the rollout tokens under the teacher on ``teacher``."""
    student_score_logp_BC: torch.Tensor | None = None
    """RLSD: log-probs of the rollout tokens under the current policy on ``student``, in the
    teacher's mode (eval, no grad): the student side of delta_t."""

    BATCHES: ClassVar[tuple[str, ...]] = ("student", "teacher")

    def state_dict(self) -> dict:
        """Tensors and plain containers only (checkpoints load with ``weights_only=True``)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        for role in self.BATCHES:
            state[role] = None if state[role] is None else vars(state[role]).copy()
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> GRPOBatch:
        from opsd_kit.prompts import Batch

        batches = {role: None if state[role] is None else Batch(**state[role]) for role in cls.BATCHES}
        return cls(**{**state, **batches})


NO_REWARD_BATCHES = 3
"""Batches of rollouts after which a run whose groups never had mixed rewards is warned about."""


class GRPO(Algorithm):
    """GRPO's step: ``num_generations`` rollouts per problem, reused for ``num_iterations`` steps.
    Collaborators: `Algorithm`'s (``sampler`` samples the rollouts), plus ``reward_funcs`` (None:
    the config's named rewards; `rewards.reward_set`). State: the batch in flight."""

    def __init__(self, config, policy, *, reward_funcs=None, **collaborators):
        from opsd_kit.algorithms.rewards import reward_set

        super().__init__(config, policy, **collaborators)
        self.rewards = reward_set(config, reward_funcs)
        self._builtin_rewards = reward_funcs is None
        self._batch: tuple[int, list[GRPOBatch], dict] | None = None  # (batch index, micro-batches, metrics)
        self._signal_seen = [0, 0]  # [batches sampled, batches with a mixed group] (early warning)

    def prepare(self, step: int):
        batch_index = step // self.config.num_iterations
        if self._batch is None or self._batch[0] != batch_index:
            self._batch = (batch_index, *self._sample(batch_index))
        _, micro, metrics = self._batch
        return micro, dict(metrics, **{"grpo/iteration": step % self.config.num_iterations})

    def _sample(self, batch_index: int):
        import torch

        cfg = self.config
        problems = self.step_problems(batch_index)
        rollouts = self.rollouts(problems, batch_index, n=cfg.num_generations)
        answered = [problems[i] for i in rollouts.prompt_index]
        total, terms = self.reward(rollouts, answered)
        # rollout/correct is the built-in 'correct' term where the run has it (no second grading)
        correct = terms["correct"] if self._builtin_rewards and "correct" in terms else self.grade(rollouts, problems)
        rewards = torch.tensor(total, dtype=torch.float32)
        adv = group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards)
        metrics = self.rollout_metrics(rollouts, correct)
        metrics["grpo/reward_mean"] = float(rewards.mean())
        all_same = float((rewards.view(-1, cfg.num_generations).std(dim=1) == 0).float().mean())
        metrics["grpo/groups_all_same"] = all_same
        metrics["grpo/mixed_groups"] = 1.0 - all_same
        metrics.update({f"reward/{name}": sum(v) / max(1, len(v)) for name, v in terms.items()})
        self._warn_without_signal(rollouts, answered, rewards, mixed=all_same < 1.0)
        micro = [self._micro_batch([problems[rollouts.prompt_index[r]] for r in rows],
                                   [rollouts.completion_ids[r] for r in rows], adv[list(rows)])
                 for rows in self.chunks(len(rollouts))]
        return micro, metrics

    def reward(self, rollouts, answered: list) -> tuple[list[float], dict[str, list[float]]]:
        """``(total, terms)`` of the rollouts: the run's `rewards.RewardSet` on their texts, where
        ``answered[r]`` is the problem rollout r answers."""
        return self.rewards(rollouts.texts, answered)

    def _warn_without_signal(self, rollouts, answered, rewards, *, mixed: bool) -> None:
        """Warn once when the first `NO_REWARD_BATCHES` batches of rollouts had no group with mixed
        rewards (every advantage 0: nothing trains), saying what the rollouts looked like."""
        import warnings

        from opsd_kit.algorithms.rewards import no_reward_diagnosis

        seen = self._signal_seen
        seen[0] += 1
        seen[1] += int(mixed)
        if seen[0] != NO_REWARD_BATCHES or seen[1]:
            return
        earned = "earned no reward" if not bool(rewards.any()) else "gave every rollout of a group the same reward"
        warnings.warn(
            f"{self.config.algorithm}: the first {NO_REWARD_BATCHES} batches of rollouts {earned} (rewards="
            f"{tuple(self.rewards.names)}): every advantage is 0 and nothing trains. In the last batch: "
            f"{no_reward_diagnosis(rollouts.texts, rollouts.finished, answered)}. Consider rewards="
            "('correct_lenient',) or ('correct', 'format'), a larger num_generations or max_new_tokens, or "
            "init_adapter from a format warm-up", RuntimeWarning, stacklevel=2)

    def _micro_batch(self, problems, completions, adv_B) -> GRPOBatch:
        """The rows' student batch and advantages, with the log-probs the loss reuses over the
        batch's iterations computed now, without grad."""
        import torch

        from opsd_kit.prompts import build_batch

        cfg = self.config
        student = build_batch([self.prompts.student[p.id] for p in problems], completions,
                              self.tokenizer.pad_token_id)
        self.ledger.book_prompt_tokens(student)
        per_sequence = cfg.loss_normalisation == "sequence"
        mb = GRPOBatch(student=student, adv_B=adv_B, num_loss_tokens=int(student.completion_mask.sum()),
                       loss_units=len(completions) if per_sequence else None,
                       zero_gradient=self._zero_gradient(adv_B))
        if mb.zero_gradient:
            return mb
        with torch.no_grad():
            if cfg.num_iterations > 1:
                mb.old_logp_BC = self._logp(student).detach().cpu()
            if cfg.kl_coef:
                with self.policy.start_weights():  # reference = the model the run started from
                    mb.ref_logp_BC = self._logp(student).detach().cpu()
        return mb

    def _zero_gradient(self, adv_B) -> bool:
        """Whether a micro-batch with these advantages has an exactly-zero loss and gradient."""
        return not self.config.kl_coef and not bool(adv_B.any())

    def _logp(self, batch):
        """log p(completion token) under the current weights at the rollout temperature: [B, C]."""
        from opsd_kit.losses import chunked_token_logprobs

        targets = batch.completion_ids.to(self.device)
        return chunked_token_logprobs(self.policy.completion_hidden(batch), self.policy.head, targets,
                                      temperature=self.config.temperature, chunk_size=self.config.loss_chunk_size)

    def advantages(self, mb: GRPOBatch, old_logp_BC) -> tuple:
        """``(advantages, metrics)`` for the loss, given the sampling policy's log-probs
        ``old_logp_BC``: GRPO's one advantage per sequence, [B]."""
        return mb.adv_B.to(old_logp_BC.device), {}

    def loss(self, mb: GRPOBatch):
        """The summed clipped surrogate, or ``(None, {})`` for a micro-batch whose advantages are
        all 0 without a KL term: -ratio * 0 sums to exactly 0 and so does its gradient, so its
        forward and backward passes are skipped (on a hard task most groups all fail early on)."""
        cfg, device = self.config, self.device
        if mb.zero_gradient:
            return None, {}
        with self.ledger.phase("student"):
            logp = self._logp(mb.student)
            old = mb.old_logp_BC.to(device) if mb.old_logp_BC is not None else logp.detach()
            ref = mb.ref_logp_BC.to(device) if mb.ref_logp_BC is not None else None
            adv, metrics = self.advantages(mb, old)
            loss_sum = grpo_token_loss(logp, old, adv, mb.student.completion_mask.to(device),
                                       clip_eps=cfg.ratio_clip_eps, ref_logp_BC=ref, kl_coef=cfg.kl_coef,
                                       normalisation=cfg.loss_normalisation)
        return loss_sum, metrics

    def state_dict(self) -> dict:
        """The batch of rollouts in flight (reused by the next iterations), as plain containers."""
        if self._batch is None:
            return {"batch": None}
        index, micro, metrics = self._batch
        return {"batch": {"index": index, "micro": [mb.state_dict() for mb in micro], "metrics": metrics}}

    def load_state_dict(self, state: dict) -> None:
        batch = state.get("batch")
        self._batch = None if batch is None else (
            batch["index"], [GRPOBatch.from_state_dict(mb) for mb in batch["micro"]], batch["metrics"])
