"""Distillation losses for OPSD (arXiv 2601.18734; docs/algorithm.md, Divergences), per token and chunked.

Conventions, used everywhere in this module:

- P = p_T is the teacher (the model conditioned on the reference solution), Q = p_S the
  student. Both come from logits divided by the same ``temperature`` (the rollout's).
- Every divergence is computed per position over the vocabulary (the last dim) and is >= 0
  unless pointwise clipping is on. Gradients flow through the student only: teacher inputs
  are detached inside every function here, so a teacher tensor that requires grad never
  receives one.
- Arithmetic is done in float32 (float64 inputs stay float64), whatever the input dtype.
- Vocabulary entries with probability 0 contribute 0 (0 * log 0 = 0). Mask entries with a
  large finite negative logit (``truncate_logits`` does; docs/algorithm.md, Pitfalls, 10); ``-inf`` is tolerated
  (it is floored to the dtype's most negative finite value), but if one side puts mass where
  the other has none the divergence is infinite by definition and its gradient is not usable.

Normalisation: sum over completion tokens of the whole optimizer step / their count; a
per-micro-batch mean is wrong under gradient accumulation (TRL #4719). ``chunked_divergence``
therefore returns a *sum* over the micro-batch's completion tokens; the trainer divides by the
step's total completion-token count. Every loss returns ``(loss_sum, per_token_BT)``: the sum,
and the detached per-token values it summed.

One spec: ``DivergenceSpec`` holds every loss setting, built once from the config; ``divergence``
computes the OPSD loss of a micro-batch under it, for the trainer and for every diagnostic.

Contrast: ``hint_contrast_divergence`` takes a second teacher, the same model with a wrong
(shuffled) hint, and trains towards what the correct hint adds over it (its docstring has the
equation); ``chunked_divergence(kind="hint_contrast", wrong_teacher_hidden_BTH=...)`` is its
chunked form.

Memory: ``chunked_divergence`` and ``chunked_token_logprobs`` start from hidden states and the
output layer, and work along the sequence in chunks under activation checkpointing, so no
[B, T, V] logits tensor exists in forward or backward; each chunk's logits are recomputed in
backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

KINDS = ("forward_kl", "reverse_kl", "jsd")

#: The contrastive kind (``hint_contrast_divergence``): it needs a second, wrong-hint teacher.
HINT_CONTRAST = "hint_contrast"

#: The logit given to entries outside a truncated support: finite, so no inf - inf = NaN.
MASKED_LOGIT = -1e9


def _check_divergence_args(kind: str, beta: float, temperature: float, clip: float | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    _check_temperature_and_clip(temperature, clip)


def _check_temperature_and_clip(temperature: float, clip: float | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip (tau) must be > 0 or None, got {clip}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32, or as itself when it is already float32/float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scaled(logits_V: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, upcast; -inf floored to finite (no division at temperature 1: one
    vocabulary-sized pass less, forward and backward)."""
    scaled_V = _upcast(logits_V) if temperature == 1 else _upcast(logits_V) / temperature
    return scaled_V.clamp(min=torch.finfo(scaled_V.dtype).min)


def _log_probs(logits_V: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) over the last dim, upcast; -inf floored to finite."""
    return torch.log_softmax(_scaled(logits_V, temperature), dim=-1)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _contributions(logp_V: torch.Tensor, logq_V: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Each vocabulary entry's term l_v of the divergence (docs/algorithm.md, Divergences); they sum to it.

    forward_kl: P(v) (log P(v) - log Q(v)); reverse_kl: Q(v) (log Q(v) - log P(v));
    jsd: beta P(v) (log P(v) - log M(v)) + (1 - beta) Q(v) (log Q(v) - log M(v)) with
    M = beta P + (1 - beta) Q mixed in probability space: log M = logaddexp(log P + log beta,
    log Q + log(1 - beta)). At beta = 0 or 1, log M equals log Q or log P exactly, so the
    value is 0: continuous in beta, no special case.
    """
    if kind == "forward_kl":
        return logp_V.exp() * (logp_V - logq_V)
    if kind == "reverse_kl":
        return logq_V.exp() * (logq_V - logp_V)
    logm_V = torch.logaddexp(logp_V + _log(beta), logq_V + _log(1.0 - beta))
    return beta * logp_V.exp() * (logp_V - logm_V) + (1.0 - beta) * logq_V.exp() * (logq_V - logm_V)


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """Divergence between teacher P and student Q at every position: [..., V] -> [...].

    ``kind``: ``"forward_kl"`` KL(P || Q) (the paper's v3 default), ``"reverse_kl"``
    KL(Q || P), or ``"jsd"`` the generalised Jensen-Shannon divergence
    beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q (docs/algorithm.md, Divergences; 0 at
    beta = 0 and 1). ``clip = tau`` is the paper's v3 pointwise clipping: sum_v min(l_v, tau)
    over the entries' contributions l_v (see ``_contributions``); negative entries are not
    clipped from below, so a clipped loss can be negative, and clipped entries get no gradient.
    The teacher is detached. Returns float32 (float64 for float64 inputs).
    """
    _check_divergence_args(kind, beta, temperature, clip)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    logq_V = _log_probs(student_logits, temperature)
    logp_V = _log_probs(teacher_logits.detach(), temperature)
    contrib_V = _contributions(logp_V, logq_V, kind, beta)
    if clip is not None:
        contrib_V = contrib_V.clamp(max=clip)
    return contrib_V.sum(dim=-1)


def hint_contrast_divergence(
    student_logits: torch.Tensor,
    correct_logits: torch.Tensor,
    wrong_logits: torch.Tensor,
    alpha: float = 1.0,
    temperature: float = 1.0,
    clip: float | None = None,
    log_ratio_clip: float | None = None,
) -> torch.Tensor:
    """What the correct hint adds over a wrong one, as a per-position loss: [..., V] -> [...].

    With q = p_S (student), c = p_T(. | x, y*) (teacher with the problem's own solution) and
    w = p_T(. | x, y_wrong) (teacher with another problem's solution), all at ``temperature``,
    the target tilts the detached student by the (clipped) log-ratio of the two teachers:

        d_v     = clip(log c_v - log w_v, -L, L)            (L = ``log_ratio_clip``; None: no clip)
        log r_v = log sg(q_v) + alpha d_v - logsumexp_u(log sg(q_u) + alpha d_u)

    and the loss is KL(r || q) = sum_v r_v (log r_v - log q_v) >= 0. Whatever both teachers
    share (style: "wait", brevity, format) cancels in c / w. The tilt is relative, not
    pointwise: r_v > q_v exactly when e^{alpha d_v} > sum_u q_u e^{alpha d_u}, i.e. when the
    token's tilt beats the student-weighted mean tilt. So
    c_v > w_v alone does not raise a token: when the correct hint raises other likely tokens
    more, a token with c_v > w_v still loses mass (and one with c_v < w_v can gain). Minimising
    the loss moves q towards r: it raises q_v where r_v > q_v and lowers it elsewhere.

    Bound: every tilt factor e^{alpha d_v} lies in [e^{-alpha L}, e^{alpha L}], so
    r_v <= q_v e^{2 alpha L} (and r_v >= q_v e^{-2 alpha L}): a token the wrong-hint teacher
    all but rules out (w_v = 1e-12, an unclipped log-ratio of about 27) cannot take the mass of
    the tokens the student finds likely; with L = None the tilt is unbounded and such a token can
    take almost all of it. The clip is on the log-ratio, as RLSD clips its token weights
    (`opsd_kit.algorithms.rlsd`).

    r is a fixed target: gradients reach the student only through the last log q_v,
    d loss / d logits = (q - r) / temperature. When c == w, r == q and the loss is exactly 0.
    ``alpha`` > 0 scales the contrast. ``clip = tau`` clips each entry r_v (log r_v - log q_v)
    from above at tau, as in ``per_token_divergence``. Returns float32 (float64 for float64 inputs).
    """
    _check_temperature_and_clip(temperature, clip)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if log_ratio_clip is not None and not log_ratio_clip > 0:
        raise ValueError(f"log_ratio_clip must be None or > 0, got {log_ratio_clip}")
    if not student_logits.shape == correct_logits.shape == wrong_logits.shape:
        raise ValueError(
            f"student, correct and wrong teacher logits differ in shape: {tuple(student_logits.shape)}, "
            f"{tuple(correct_logits.shape)}, {tuple(wrong_logits.shape)}"
        )
    student_V = _scaled(student_logits, temperature)
    logq_V = torch.log_softmax(student_V, dim=-1)
    log_ratio_V = _log_probs(correct_logits.detach(), temperature) - _log_probs(wrong_logits.detach(), temperature)
    if log_ratio_clip is not None:
        log_ratio_V = log_ratio_V.clamp(-log_ratio_clip, log_ratio_clip)
    contrast_V = alpha * log_ratio_V
    # softmax is shift-invariant: tilting the scaled logits gives the same r as tilting log q, and
    # when c == w the two log-softmaxes run on the same numbers, so log r == log q bit for bit.
    finfo = torch.finfo(student_V.dtype)
    logr_V = torch.log_softmax((student_V.detach() + contrast_V).clamp(min=finfo.min, max=finfo.max), dim=-1)
    contrib_V = logr_V.exp() * (logr_V - logq_V)
    if clip is not None:
        contrib_V = contrib_V.clamp(max=clip)
    return contrib_V.sum(dim=-1)


def truncate_logits(
    logits: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    reference: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``logits`` with entries outside the top-k / top-p set of ``reference`` set to MASKED_LOGIT.

    The kept set is what a sampler with these settings draws from (docs/algorithm.md, Pitfalls, 5): top-k on
    ``reference`` (default ``logits``; ties with the k-th value are kept, as in HF generate),
    then the nucleus of softmax(reference / temperature) restricted to that set: the
    highest-probability tokens until their mass reaches ``top_p`` (the token that crosses it
    is kept). ``temperature`` only matters for top-p; pass the sampling temperature.
    ``top_p = 1`` or ``None`` disables the nucleus. Masking is finite (docs/algorithm.md, Pitfalls, 10), in the
    dtype of ``logits``; gradients of the masked entries are 0.

    For a loss on the truncated distribution, truncate both roles with the student as
    reference: ``per_token_divergence(truncate_logits(s, k, p, s), truncate_logits(t, k, p, s))``.
    """
    reference = logits if reference is None else reference
    if reference.shape != logits.shape:
        raise ValueError(f"reference shape {tuple(reference.shape)} != logits shape {tuple(logits.shape)}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or None, got {top_p}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ref_V = _upcast(reference.detach()) / temperature
    keep_V = torch.ones_like(ref_V, dtype=torch.bool)
    if top_k is not None and top_k < ref_V.shape[-1]:
        kth_1 = ref_V.topk(top_k, dim=-1).values[..., -1:]
        keep_V = ref_V >= kth_1
    if top_p is not None and top_p < 1.0:
        probs_V = torch.softmax(ref_V.masked_fill(~keep_V, -math.inf), dim=-1)
        sorted_V, order_V = probs_V.sort(dim=-1, descending=True)
        mass_before_V = sorted_V.cumsum(dim=-1) - sorted_V
        in_nucleus_V = torch.zeros_like(keep_V).scatter(-1, order_V, mass_before_V < top_p)
        keep_V = keep_V & in_nucleus_V
    masked_value = max(MASKED_LOGIT, torch.finfo(logits.dtype).min)
    return logits.masked_fill(~keep_V, masked_value)


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """``per_token_divergence`` with both distributions renormalised over the teacher's top-k.

    The k vocabulary entries with the largest teacher logits are gathered from both roles and
    the divergence is taken over those k logits only (docs/algorithm.md, Divergences, "top-k
    variant"). [..., V] -> [...].
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    if not 1 <= k <= student_logits.shape[-1]:
        raise ValueError(f"k must lie in [1, V={student_logits.shape[-1]}], got {k}")
    teacher_logits = teacher_logits.detach()
    top_K = teacher_logits.topk(k, dim=-1).indices
    return per_token_divergence(
        student_logits.gather(-1, top_K), teacher_logits.gather(-1, top_K), kind, beta, temperature, clip
    )


def sampled_token_loss(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy-gradient form on the sampled tokens (docs/algorithm.md, Divergences, "sampled-token variant").

    a_n = log p_T(y_n) - log p_S(y_n), detached and optionally clamped to [-clamp, clamp]
    (rLLM uses 5); the loss is the masked sum of -a_n log p_S(y_n). Minimising it raises
    log p_S where the teacher likes the token more than the student (a_n > 0): its gradient is
    the single-sample estimate of the reverse-KL gradient; its value is not a divergence.
    Padded positions contribute nothing and get zero gradient, even if their log-probs are -inf.

    Returns ``(loss_sum, per_token_BT)`` like every loss here: the differentiable masked sum (the
    trainer divides by the step's completion-token count) and, detached, the single-sample
    estimate of KL(p_S || p_T) at each token, log p_S(y_n) - log p_T(y_n) = -a_n unclamped (0
    where masked): the disagreement this loss reduces.
    """
    if student_logprobs_BT.shape != teacher_logprobs_BT.shape or student_logprobs_BT.shape != mask_BT.shape:
        raise ValueError(
            f"shapes differ: student {tuple(student_logprobs_BT.shape)}, teacher "
            f"{tuple(teacher_logprobs_BT.shape)}, mask {tuple(mask_BT.shape)}"
        )
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be > 0 or None, got {clamp}")
    mask_BT = mask_BT.bool()
    student_BT = _upcast(student_logprobs_BT)
    gap_BT = torch.where(mask_BT, _upcast(teacher_logprobs_BT.detach()) - student_BT.detach(), 0.0)
    advantage_BT = gap_BT if clamp is None else gap_BT.clamp(-clamp, clamp)
    per_token_loss_BT = torch.where(mask_BT, -advantage_BT * student_BT, 0.0)
    return per_token_loss_BT.sum(), -gap_BT


@dataclass(frozen=True)
class DivergenceSpec:
    """What the OPSD loss computes at each completion position. Built once from the training
    config (`from_config`) and passed to `divergence`, by the trainer and by every diagnostic, so
    that a diagnostic shows exactly the divergence that was trained."""

    kind: str = "forward_kl"
    """'forward_kl' KL(P||Q), 'reverse_kl' KL(Q||P), 'jsd', 'topk' (forward KL renormalised over
    the teacher's top-k), 'sampled_token' (policy-gradient form) or 'hint_contrast'."""
    beta: float = 0.5
    """JSD mixing weight (kind='jsd' only)."""
    temperature: float = 1.0
    """Temperature dividing every role's logits."""
    clip: float | None = None
    """Pointwise clipping tau of each vocabulary entry's contribution (None: off)."""
    topk: int = 20
    """Support size for kind='topk'."""
    truncate: tuple | None = None
    """(top_k, top_p) of the student's sampling support to restrict every role to, or None (full)."""
    truncate_temperature: float | None = None
    """Temperature of the nucleus of ``truncate`` (the sampling temperature; None: ``temperature``)."""
    clamp: float | None = None
    """Advantage clamp of kind='sampled_token'."""
    alpha: float = 1.0
    """Contrast strength of kind='hint_contrast'."""
    contrast_clip: float | None = None
    """Clip L of kind='hint_contrast''s teacher log-ratio log c - log w to [-L, L] (None: unbounded)."""
    chunk_size: int = 128
    """Sequence positions per chunk (bounds the logits held at once)."""

    @classmethod
    def from_config(cls, cfg) -> "DivergenceSpec":
        """The spec of a `TrainConfig` (its OPSD loss settings)."""
        truncate = (cfg.top_k or None, cfg.top_p if cfg.top_p < 1 else None)
        return cls(kind=cfg.divergence, beta=cfg.jsd_beta, temperature=cfg.effective_loss_temperature,
                   clip=cfg.clip_tau, topk=cfg.distill_topk,
                   truncate=truncate if cfg.loss_support == "truncated" else None,
                   truncate_temperature=cfg.temperature, clamp=cfg.sampled_token_clamp, alpha=cfg.contrast_alpha,
                   contrast_clip=cfg.contrast_clip, chunk_size=cfg.loss_chunk_size)

    @property
    def needs_wrong_teacher(self) -> bool:
        """kind='hint_contrast' also needs the teacher with a wrong (shuffled) hint."""
        return self.kind == HINT_CONTRAST


def divergence(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    head: torch.nn.Module,
    mask_BT: torch.Tensor,
    spec: DivergenceSpec,
    *,
    targets_BT: torch.Tensor | None = None,
    wrong_teacher_hidden_BTH: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The OPSD loss of a micro-batch under ``spec``, from final hidden states and the output layer.

    Returns ``(loss_sum, per_token_BT)``: the differentiable masked sum over completion tokens
    (divide by the optimizer step's completion-token count) and the detached per-token values
    (0 where masked). ``targets_BT`` (the sampled completion ids) is needed by
    kind='sampled_token', ``wrong_teacher_hidden_BTH`` by kind='hint_contrast'.
    """
    if spec.kind == "sampled_token":
        if targets_BT is None:
            raise ValueError("kind='sampled_token' needs targets_BT, the sampled completion ids")
        student_BT = chunked_token_logprobs(student_hidden_BTH, head, targets_BT, temperature=spec.temperature,
                                            chunk_size=spec.chunk_size)
        with torch.no_grad():
            teacher_BT = chunked_token_logprobs(teacher_hidden_BTH.detach(), head, targets_BT,
                                                temperature=spec.temperature, chunk_size=spec.chunk_size)
        return sampled_token_loss(student_BT, teacher_BT, mask_BT, clamp=spec.clamp)
    return chunked_divergence(student_hidden_BTH, teacher_hidden_BTH, head, mask_BT, spec,
                              wrong_teacher_hidden_BTH=wrong_teacher_hidden_BTH)


def chunked_divergence(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    head: torch.nn.Module,
    mask_BT: torch.Tensor,
    spec: DivergenceSpec | None = None,
    *,
    wrong_teacher_hidden_BTH: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked sum of per-token divergences computed from hidden states, chunk by chunk along T.

    Equals ``per_token_divergence(head(student_hidden), head(teacher_hidden), ...)`` under
    ``spec`` (default: `DivergenceSpec()`, forward KL at temperature 1) summed over positions
    where ``mask_BT`` is true, without ever holding a [B, T, V] logits tensor: each chunk of
    ``spec.chunk_size`` positions (head -> logits -> divergence -> masked sum) runs under
    non-reentrant activation checkpointing, so only hidden states are kept and logits are
    recomputed in backward. ``head`` is the output layer (``model.get_output_embeddings()``); the
    teacher's logits are computed under no_grad and its hidden states are detached.

    Support: the full vocabulary by default; ``spec.kind = "topk"`` is forward KL renormalised
    over the teacher's top ``spec.topk`` (``topk_divergence``); ``spec.truncate = (top_k, top_p)``
    restricts every role to the student's sampling support (``truncate_logits`` with the student
    as reference), the nucleus taken at ``spec.truncate_temperature`` (None: ``spec.temperature``).

    ``spec.kind = "hint_contrast"``: ``hint_contrast_divergence`` with ``teacher_hidden_BTH`` as
    the correct-hint teacher c and ``wrong_teacher_hidden_BTH`` (required then, and only then) as
    the wrong-hint teacher w, contrast strength ``spec.alpha``, log-ratio clip ``spec.contrast_clip``;
    both teachers are detached, a truncated support applies to all three roles.
    ``spec.kind = "sampled_token"`` needs the sampled tokens and goes through `divergence`.

    Returns ``(loss_sum, per_token_BT)``: loss_sum is a differentiable scalar (float32, float64
    for float64 inputs) to be divided by the optimizer step's completion-token count;
    per_token_BT holds the detached divergences, 0 where the mask is false.
    """
    spec = spec or DivergenceSpec()
    contrast = spec.needs_wrong_teacher
    kind = "forward_kl" if spec.kind == "topk" else spec.kind
    top_k_support = spec.topk if spec.kind == "topk" else None
    beta, temperature, clip, truncate, alpha = spec.beta, spec.temperature, spec.clip, spec.truncate, spec.alpha
    chunk_size = spec.chunk_size
    if spec.kind == "sampled_token":
        raise ValueError("kind='sampled_token' needs the sampled tokens: use losses.divergence with targets_BT")
    if contrast:
        _check_temperature_and_clip(temperature, clip)
        if wrong_teacher_hidden_BTH is None:
            raise ValueError("kind='hint_contrast' needs wrong_teacher_hidden_BTH (the wrong-hint teacher)")
    else:
        _check_divergence_args(kind, beta, temperature, clip)
        if wrong_teacher_hidden_BTH is not None:
            raise ValueError(f"wrong_teacher_hidden_BTH is used by kind='hint_contrast' only, not {spec.kind!r}")
    for name, other_BTH in (("teacher", teacher_hidden_BTH), ("wrong teacher", wrong_teacher_hidden_BTH)):
        if other_BTH is not None and student_hidden_BTH.shape != other_BTH.shape:
            raise ValueError(
                f"student and {name} hidden states differ in shape: {tuple(student_hidden_BTH.shape)} "
                f"vs {tuple(other_BTH.shape)}"
            )
    if mask_BT.shape != student_hidden_BTH.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask_BT.shape)} != [B, T] {tuple(student_hidden_BTH.shape[:2])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if top_k_support is not None and truncate is not None:
        raise ValueError("choose one support: kind='topk' or truncate, not both")
    support_t = temperature if spec.truncate_temperature is None else spec.truncate_temperature

    def chunk_loss(student_BCH, teacher_BCH, wrong_BCH, mask_BC):
        student_BCV = head(student_BCH)
        with torch.no_grad():
            teachers_BCV = [head(h_BCH) for h_BCH in (teacher_BCH, wrong_BCH) if h_BCH is not None]
        if truncate is not None:
            reference_BCV = student_BCV.detach()
            student_BCV, *teachers_BCV = (truncate_logits(x_BCV, *truncate, reference=reference_BCV,
                                                          temperature=support_t)
                                          for x_BCV in (student_BCV, *teachers_BCV))
        if contrast:
            div_BC = hint_contrast_divergence(student_BCV, *teachers_BCV, alpha, temperature, clip,
                                              log_ratio_clip=spec.contrast_clip)
        elif top_k_support is not None:
            div_BC = topk_divergence(student_BCV, *teachers_BCV, top_k_support, kind, beta, temperature, clip)
        else:
            div_BC = per_token_divergence(student_BCV, *teachers_BCV, kind, beta, temperature, clip)
        div_BC = torch.where(mask_BC, div_BC, 0.0)
        return div_BC.sum(), div_BC.detach()

    teacher_hidden_BTH = teacher_hidden_BTH.detach()
    if wrong_teacher_hidden_BTH is not None:
        wrong_teacher_hidden_BTH = wrong_teacher_hidden_BTH.detach()
    mask_BT = mask_BT.bool()
    if (torch.is_grad_enabled() and student_hidden_BTH.requires_grad
            and not any(p.requires_grad for p in head.parameters())):
        # Frozen head (LoRA): the gradient w.r.t. the hidden states is all backward needs, so it
        # is computed chunk by chunk right here and kept ([B, T, H]); backward only scales it.
        # Same values as the checkpointed path below, without recomputing both roles' logits.
        return _GradInForward.apply(student_hidden_BTH, teacher_hidden_BTH, wrong_teacher_hidden_BTH, mask_BT,
                                    chunk_loss, chunk_size)
    loss_sum = student_hidden_BTH.new_zeros((), dtype=torch.promote_types(student_hidden_BTH.dtype, torch.float32))
    per_token_chunks = []
    for start in range(0, student_hidden_BTH.shape[1], chunk_size):
        span = slice(start, start + chunk_size)
        chunk_sum, chunk_BC = checkpoint(
            chunk_loss, student_hidden_BTH[:, span], teacher_hidden_BTH[:, span],
            _columns(wrong_teacher_hidden_BTH, span), mask_BT[:, span], use_reentrant=False,
        )
        loss_sum = loss_sum + chunk_sum
        per_token_chunks.append(chunk_BC)
    return loss_sum, torch.cat(per_token_chunks, dim=1)


def _columns(x_BTH: torch.Tensor | None, span: slice) -> torch.Tensor | None:
    """``x_BTH[:, span]``, or None for an absent (optional) role."""
    return None if x_BTH is None else x_BTH[:, span]


class _GradInForward(torch.autograd.Function):
    """``chunked_divergence`` for a frozen output layer: each chunk's loss and its gradient
    w.r.t. the student's hidden states are computed in forward (the chunk's logits are freed
    before the next chunk), so backward is one multiply and no logits are ever recomputed."""

    @staticmethod
    def forward(ctx, student_BTH, teacher_BTH, wrong_BTH, mask_BT, chunk_loss, chunk_size):
        grad_BTH = torch.zeros_like(student_BTH)
        loss_sum = student_BTH.new_zeros((), dtype=torch.promote_types(student_BTH.dtype, torch.float32))
        per_token_chunks = []
        for start in range(0, student_BTH.shape[1], chunk_size):
            span = slice(start, start + chunk_size)
            with torch.enable_grad():
                student_BCH = student_BTH[:, span].detach().requires_grad_()
                chunk_sum, chunk_BC = chunk_loss(student_BCH, teacher_BTH[:, span], _columns(wrong_BTH, span),
                                                 mask_BT[:, span])
                (grad_BTH[:, span],) = torch.autograd.grad(chunk_sum, student_BCH)
            loss_sum = loss_sum + chunk_sum.detach()
            per_token_chunks.append(chunk_BC)
        ctx.save_for_backward(grad_BTH)
        per_token_BT = torch.cat(per_token_chunks, dim=1)
        ctx.mark_non_differentiable(per_token_BT)
        return loss_sum, per_token_BT

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        (grad_BTH,) = ctx.saved_tensors
        return grad_BTH * grad_loss.to(grad_BTH.dtype), None, None, None, None, None


def chunked_token_logprobs(
    hidden_BTH: torch.Tensor,
    head: torch.nn.Module,
    targets_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[target] at every position: [B, T].

    Float32 (float64 for float64 inputs). Chunked along T under activation checkpointing like
    ``chunked_divergence``, so no [B, T, V] tensor is held; gradients flow to ``hidden_BTH`` and the head's parameters.
    Every target must be a valid vocabulary index (put any id at padded positions and mask
    the result). Used by GRPO, SFT and the sampled-token mode.
    """
    if targets_BT.shape != hidden_BTH.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets_BT.shape)} != [B, T] {tuple(hidden_BTH.shape[:2])}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    def chunk_logprobs(hidden_BCH, targets_BC):
        logits_BCV = _upcast(head(hidden_BCH)) / temperature
        return logits_BCV.gather(-1, targets_BC.unsqueeze(-1)).squeeze(-1) - logits_BCV.logsumexp(dim=-1)

    pieces_BC = [
        checkpoint(chunk_logprobs, hidden_BTH[:, s:s + chunk_size], targets_BT[:, s:s + chunk_size],
                   use_reentrant=False)
        for s in range(0, hidden_BTH.shape[1], chunk_size)
    ]
    return torch.cat(pieces_BC, dim=1)
