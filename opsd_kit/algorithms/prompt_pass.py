"""OPSD's speed path: one student pass over the prompts serves both the rollout and the loss.

With ``rollout_backend='fast'`` the student's forward over each micro-batch's prompts runs before
sampling (`SharedPromptPass.before_sampling`); its key/value states start the rollout (instead of
the fused decoder's own pass over the same prompts with the same weights), and the loss continues
from them over the completion, gradients through both (`SharedPromptPass.student_hidden`). The
result equals running the whole row (up to floating-point order; tests/test_prompt_pass.py). It
holds every micro-batch's prompt activations until that micro-batch's backward (setting a built
``OPSD.prompt_pass.enabled`` to False, an internal switch, trades the saved forward for that
memory). Off by itself where the pass would not be the sampling policy's (dropout), could not keep
its cache (gradient checkpointing), or where its graph would see the weights change before
backward (the EMA teacher, and the frozen teacher of a run started from ``init_adapter``, swap
their weights in). A prompt prefix all of a micro-batch's prompts share runs once
(`Policy.hidden_sharing_prefix`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

    from opsd_kit.policy import Policy
    from opsd_kit.prompts import Batch
    from opsd_kit.rollout.fast import Prefill
    from opsd_kit.rollout.sampler import RolloutSampler
    from opsd_kit.run.ledger import TokenLedger


@dataclass
class PromptPass:
    """The student's forward over a micro-batch's left-padded prompts, kept for the loss."""

    cache: DynamicCache
    """Every layer's key/value states of the prompt columns, with their autograd graph."""
    last_hidden_BH: torch.Tensor
    """The last prompt column's final hidden state (it predicts the first completion token)."""
    mask_BP: torch.Tensor
    """The attention mask of the cache's columns (their layout: `Policy.hidden_sharing_prefix`'s
    where the prompts share a prefix, else left padding)."""


def can_share_prompt_pass(policy: Policy, sampler: RolloutSampler | None) -> bool:
    """Whether the pass can be shared: where the fused decoder samples (backend 'fast', a model it
    supports, transformers' modules), the pass in train mode is the sampling policy (no dropout
    anywhere) and its graph lives until backward (no gradient checkpointing, which drops the cache;
    no teacher that writes its weights in before backward: EMA, or frozen at an init adapter,
    `Policy.swaps_teacher_weights`). Read from the policy itself,
    which need not have been built from the run's config."""
    from opsd_kit.rollout.fused_decoder import FusedDecoder

    if sampler is None or sampler.backend != "fast" or policy.swaps_teacher_weights:
        return False
    return policy.can_run_in_pieces(training=True) and FusedDecoder.unsupported(policy.model) is None


class SharedPromptPass:
    """The student's pass over each micro-batch's prompts, run once for the rollout and the loss
    where `can_share_prompt_pass` allows (``enabled``), else nothing: the loss runs whole rows."""

    def __init__(self, policy: Policy, *, sampler: RolloutSampler | None,
                 ledger: TokenLedger, device: torch.device):
        self.policy, self.ledger, self.device = policy, ledger, device
        self.enabled = can_share_prompt_pass(policy, sampler)
        """Whether one student pass over the prompts serves the rollout and the loss."""

    def before_sampling(self, prompt_ids_by_micro_batch: list[list[list[int]]]
                        ) -> tuple[list[PromptPass] | None, Prefill | None]:
        """``(one PromptPass per micro-batch, the Prefill the sampler starts from)``, timed as the
        student's phase; ``(None, None)`` where the pass is not shared."""
        if not self.enabled:
            return None, None
        from opsd_kit.rollout.fast import Prefill

        with self.ledger.phase("student"):
            passes, parts = zip(*(self.run(prompt_ids) for prompt_ids in prompt_ids_by_micro_batch))
        return list(passes), Prefill.concat(parts)

    def run(self, prompt_ids: list[list[int]]) -> tuple[PromptPass, Prefill]:
        """The student's forward over left-padded prompts (one micro-batch), with gradients:
        ``(PromptPass, rollout.Prefill)``, the second detached for sampling (in the left-padded
        layout). A prefix all prompts share runs once (`Policy.hidden_sharing_prefix`)."""
        import torch

        from opsd_kit.prompts import left_padded_columns, position_ids, shared_prefix_length
        from opsd_kit.rollout.fast import Prefill
        from opsd_kit.rollout.hf import left_pad

        ids_BP, mask_BP = (t.to(self.device) for t in left_pad(prompt_ids, self.policy.tokenizer.pad_token_id))
        width, prefix = ids_BP.shape[1], shared_prefix_length(prompt_ids)
        hidden_BWH, cache, cache_mask_BP = self.policy.hidden_sharing_prefix(
            ids_BP, mask_BP, position_ids(mask_BP), width, prefix)
        last_BH = hidden_BWH[:, -1]
        order_BP = left_padded_columns(mask_BP, width, prefix)  # the identity without a prefix

        def left_padded(states_BGPD):
            return states_BGPD.detach().gather(2, order_BP[:, None, :, None].expand_as(states_BGPD))

        with torch.no_grad():
            sampling = Prefill([left_padded(layer.keys) for layer in cache.layers],
                               [left_padded(layer.values) for layer in cache.layers],
                               self.policy.head(last_BH.detach()))
        return PromptPass(cache=cache, last_hidden_BH=last_BH, mask_BP=cache_mask_BP), sampling

    def student_hidden(self, batch: Batch, prompt_pass: PromptPass | None) -> torch.Tensor:
        """The student's hidden states at the columns that predict ``batch``'s completion,
        [B, C, H]: the whole rows (`Policy.completion_hidden`) without a ``prompt_pass``, else the
        completion's columns continuing from it (the last prompt column's state predicts the first
        completion token). The pass's cache grows by the completion's columns: use it once."""
        import torch

        if prompt_pass is None:
            return self.policy.completion_hidden(batch)
        b = batch.to(self.device)
        P, C = b.prompt_width, b.completion_ids.shape[1]
        first_B1H = prompt_pass.last_hidden_BH[:, None]
        if C == 1:
            return first_B1H
        cols = slice(P, P + C - 1)  # completion tokens 0 .. C-2 predict tokens 1 .. C-1
        mask_BT = torch.cat([prompt_pass.mask_BP, b.attention_mask[:, P:P + C - 1]], 1)
        rest_BCH = self.policy.backbone_hidden(b.input_ids[:, cols], mask_BT, b.position_ids[:, cols],
                                               cache=prompt_pass.cache)
        return torch.cat([first_B1H, rest_BCH], dim=1)
