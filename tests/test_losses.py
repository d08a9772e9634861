"""opsd_kit.losses against float64 references written here with plain loops.

See docs/algorithm.md, Divergences and Pitfalls."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from _numerics import tolerance

from opsd_kit.losses import (
    DivergenceSpec,
    chunked_divergence,
    chunked_token_logprobs,
    hint_contrast_divergence,
    per_token_divergence,
    sampled_token_loss,
    topk_divergence,
    truncate_logits,
)

KINDS = ["forward_kl", "reverse_kl", "jsd"]


# ----------------------------------------------------------------------------- reference
def _softmax(row, temperature):
    top = max(row) / temperature
    exps = [math.exp(x / temperature - top) if x != -math.inf else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _xlog_ratio(a, b):
    """a * log(a / b) with 0 log 0 = 0."""
    return 0.0 if a == 0.0 else a * math.log(a / b)


def ref_row(student, teacher, kind, beta=0.5, temperature=1.0, clip=None):
    """One position's divergence from lists of logits, P = teacher, Q = student."""
    p, q = _softmax(teacher, temperature), _softmax(student, temperature)
    total = 0.0
    for pv, qv in zip(p, q):
        if kind == "forward_kl":
            term = _xlog_ratio(pv, qv)
        elif kind == "reverse_kl":
            term = _xlog_ratio(qv, pv)
        else:
            mv = beta * pv + (1 - beta) * qv
            term = beta * _xlog_ratio(pv, mv) + (1 - beta) * _xlog_ratio(qv, mv)
        total += term if clip is None else min(term, clip)
    return total


def ref(student_NV, teacher_NV, **kw):
    """``ref_row`` over every leading index of [..., V] tensors, as float64 [...]."""
    s_rows = student_NV.detach().double().reshape(-1, student_NV.shape[-1]).tolist()
    t_rows = teacher_NV.detach().double().reshape(-1, teacher_NV.shape[-1]).tolist()
    values = [ref_row(s, t, **kw) for s, t in zip(s_rows, t_rows)]
    return torch.tensor(values, dtype=torch.float64).reshape(student_NV.shape[:-1])


def logits_pair(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64),
            scale * torch.randn(*shape, generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------- per_token_divergence
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_matches_reference(kind, temperature, clip):
    s, t = logits_pair(2, 3, 7)
    got = per_token_divergence(s, t, kind, beta=0.3, temperature=temperature, clip=clip)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref(s, t, kind=kind, beta=0.3, temperature=temperature, clip=clip))


def test_forward_and_reverse_kl_swap_roles():
    s, t = logits_pair(4, 9)
    torch.testing.assert_close(per_token_divergence(s, t, "forward_kl"), per_token_divergence(t, s, "reverse_kl"))


def test_low_precision_input_is_upcast():
    s, t = logits_pair(3, 11)
    got = per_token_divergence(s.bfloat16(), t.bfloat16(), "forward_kl")
    assert got.dtype == torch.float32
    # float32 arithmetic over V = 11 entries (log-softmax, then the sum), terms of the logits' size
    tol = tolerance(torch.float32, reduction=2 * s.shape[-1], scale=float(s.abs().max()))
    torch.testing.assert_close(got.double(), ref(s.bfloat16(), t.bfloat16(), kind="forward_kl"), **tol)


def test_jsd_continuous_at_both_ends():
    s, t = logits_pair(5, 8)
    at_0 = per_token_divergence(s, t, "jsd", beta=0.0)
    at_1 = per_token_divergence(s, t, "jsd", beta=1.0)
    assert torch.equal(at_0, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(at_1, torch.zeros(5, dtype=torch.float64))
    for eps in (1e-3, 1e-6):
        near_0 = per_token_divergence(s, t, "jsd", beta=eps)
        near_1 = per_token_divergence(s, t, "jsd", beta=1 - eps)
        assert near_0.abs().max() < 10 * eps and near_1.abs().max() < 10 * eps
        torch.testing.assert_close(near_0, ref(s, t, kind="jsd", beta=eps))
        torch.testing.assert_close(near_1, ref(s, t, kind="jsd", beta=1 - eps))
    # no KL hiding at the ends: forward KL is far from 0 on the same inputs
    assert per_token_divergence(s, t, "forward_kl").min() > 0.1


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_jsd_role_symmetry(beta):
    s, t = logits_pair(6, 10)
    torch.testing.assert_close(
        per_token_divergence(s, t, "jsd", beta=beta), per_token_divergence(t, s, "jsd", beta=1 - beta)
    )


def test_clip_by_hand():
    """P = [.7, .2, .1], Q = [.1, .2, .7]: forward-KL entries .7 ln 7, 0, .1 ln(1/7)."""
    teacher = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).log()
    student = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64).log().requires_grad_()
    loss = per_token_divergence(student, teacher, "forward_kl", clip=0.05)
    expected = 0.05 + 0.0 + 0.1 * math.log(0.1 / 0.7)
    assert expected < 0
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    # the clipped entry v=0 carries no gradient; v=1, 2 (-P_v log Q_v + const) give
    # (P_1 + P_2) Q - P_1 onehot_1 - P_2 onehot_2 = .3 [.1, .2, .7] - [0, .2, .1]
    torch.testing.assert_close(student.grad, torch.tensor([0.03, -0.14, 0.11], dtype=torch.float64))
    unclipped = per_token_divergence(student, teacher, "forward_kl")
    assert unclipped.item() == pytest.approx(0.7 * math.log(7) + 0.1 * math.log(1 / 7), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_student_only(kind):
    s, t = logits_pair(3, 6)
    s.requires_grad_()
    t.requires_grad_()
    per_token_divergence(s, t, kind, temperature=1.3).sum().backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    student = logits_pair(2, 5)[0].requires_grad_()
    teacher = logits_pair(2, 5, seed=1)[1]
    assert torch.autograd.gradcheck(
        lambda x: per_token_divergence(x, teacher, kind, beta=0.3, temperature=0.8, clip=0.2), (student,)
    )


def test_forward_kl_gradient_is_q_minus_p_over_temperature():
    s, t = logits_pair(4, 7)
    s.requires_grad_()
    per_token_divergence(s, t, "forward_kl", temperature=2.0).sum().backward()
    expected = (torch.softmax(s.detach() / 2.0, -1) - torch.softmax(t / 2.0, -1)) / 2.0
    torch.testing.assert_close(s.grad, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [-math.inf, -1e9])
def test_masked_vocabulary_entries_give_no_nan(kind, masked):
    s, t = logits_pair(3, 8)
    keep = torch.tensor([True, True, False, True, False, True, True, False])
    s_masked = s.masked_fill(~keep, masked).requires_grad_()
    t_masked = t.masked_fill(~keep, masked)
    got = per_token_divergence(s_masked, t_masked, kind, beta=0.4, clip=0.3)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(s_masked.grad).all()
    assert torch.equal(s_masked.grad[:, ~keep], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(got, ref(s[:, keep], t[:, keep], kind=kind, beta=0.4, clip=0.3))


def test_one_sided_minus_inf_with_zero_weight_is_finite():
    s, t = logits_pair(2, 5)
    t_inf = t.clone()
    t_inf[:, 1] = -math.inf
    s_inf = s.clone()
    s_inf[:, 1] = -math.inf
    forward = per_token_divergence(s.requires_grad_(), t_inf, "forward_kl")  # P(v) = 0 there
    reverse = per_token_divergence(s_inf.requires_grad_(), t, "reverse_kl")  # Q(v) = 0 there
    (forward.sum() + reverse.sum()).backward()
    assert torch.isfinite(forward).all() and torch.isfinite(reverse).all()
    assert torch.isfinite(s.grad).all() and torch.isfinite(s_inf.grad).all()
    torch.testing.assert_close(forward, ref(s, t_inf, kind="forward_kl"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "kl"}, "unknown divergence kind"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments(kwargs, message):
    s, t = logits_pair(2, 4)
    with pytest.raises(ValueError, match=message):
        per_token_divergence(s, t, **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        per_token_divergence(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="differ in shape"):
        topk_divergence(torch.zeros(2, 5), torch.zeros(3, 5), k=2)
    with pytest.raises(ValueError, match="k must"):
        topk_divergence(torch.zeros(2, 5), torch.zeros(2, 5), k=6)


# ----------------------------------------------------------------------------- top-k support
@pytest.mark.parametrize("kind", KINDS)
def test_topk_renormalises_over_teacher_top_k(kind):
    s, t = logits_pair(3, 10)
    got = topk_divergence(s, t, k=4, kind=kind, temperature=0.9)
    expected = []
    for s_row, t_row in zip(s.tolist(), t.tolist()):
        top = sorted(range(10), key=lambda v: -t_row[v])[:4]
        expected.append(ref_row([s_row[v] for v in top], [t_row[v] for v in top], kind, temperature=0.9))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


# ----------------------------------------------------------------------------- truncation
PROBS = [0.05, 0.5, 0.15, 0.3]  # ranks: v1 > v3 > v2 > v0


def _kept(logits):
    return (logits > -1e8).tolist()


def test_truncate_top_k_keeps_exactly_top_k():
    s, _ = logits_pair(4, 12)
    out = truncate_logits(s, top_k=5)
    for row, out_row in zip(s.tolist(), out.tolist()):
        top = set(sorted(range(12), key=lambda v: -row[v])[:5])
        assert {v for v in range(12) if out_row[v] > -1e8} == top
        assert all(out_row[v] == row[v] for v in top)
        assert all(out_row[v] == -1e9 for v in range(12) if v not in top)


@pytest.mark.parametrize(
    "top_k, top_p, temperature, kept",
    [
        (None, 0.75, 1.0, [False, True, False, True]),  # mass before v2 is .8
        (None, 0.83, 1.0, [False, True, True, True]),
        (3, 0.83, 1.0, [False, True, False, True]),  # renormalised over top 3: mass before v2 is .842
        (None, 0.75, 2.0, [False, True, True, True]),  # temperature flattens the nucleus
        (None, 1.0, 1.0, [True, True, True, True]),
        (2, None, 1.0, [False, True, False, True]),
    ],
)
def test_truncate_nucleus(top_k, top_p, temperature, kept):
    logits = torch.tensor([PROBS], dtype=torch.float64).log() + 1.7
    assert _kept(truncate_logits(logits, top_k, top_p, temperature=temperature)) == [kept]


def test_truncate_uses_reference_support_and_keeps_values_and_grads():
    reference = torch.tensor([PROBS]).log()
    logits = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    out = truncate_logits(logits, top_p=0.75, reference=reference)
    assert _kept(out) == [[False, True, False, True]]
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])
    out.sum().backward()
    assert logits.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    assert truncate_logits(torch.zeros(1, 3, dtype=torch.float16), top_k=1).isfinite().all()


def test_truncate_bad_arguments():
    x = torch.zeros(2, 5)
    for kwargs in ({"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.2}, {"temperature": 0.0}, {"reference": torch.zeros(5)}):
        with pytest.raises(ValueError):
            truncate_logits(x, **kwargs)


# ----------------------------------------------------------------------------- sampled token
def test_sampled_token_loss_by_hand():
    student = torch.tensor([[-1.0, -2.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0, -math.inf]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    # a = t - s = [0.5, -1.0]; -a * s = [0.5, -2.0]; the sum is returned, never a mean
    loss_sum, per_token = sampled_token_loss(student, teacher, mask)
    assert loss_sum.item() == pytest.approx(-1.5)
    assert per_token.tolist() == [[-0.5, 1.0, 0.0]]  # log p_S - log p_T on real tokens, 0 on padding
    loss_sum.backward()
    assert student.grad.tolist() == [[-0.5, 1.0, 0.0]]  # d/ds of -a s with a detached: -a
    clamped, per_token_clamped = sampled_token_loss(student, teacher, mask, clamp=0.6)
    assert clamped.item() == pytest.approx(0.5 - 1.2)  # a = [0.5, -0.6]
    assert torch.equal(per_token_clamped, per_token)  # the reported disagreement is never clamped
    assert sampled_token_loss(student, teacher, torch.zeros_like(mask))[0].item() == 0.0


def test_sampled_token_loss_detaches_teacher_and_checks_arguments():
    student = torch.tensor([-1.0, -2.0], requires_grad=True)
    teacher = torch.tensor([-0.5, -1.0], requires_grad=True)
    sampled_token_loss(student, teacher, torch.ones(2))[0].backward()
    assert teacher.grad is None
    with pytest.raises(ValueError, match="shapes differ"):
        sampled_token_loss(student, teacher, torch.ones(3))
    with pytest.raises(ValueError, match="clamp"):
        sampled_token_loss(student, teacher, torch.ones(2), clamp=0)


# ----------------------------------------------------------------------------- chunked
B, T, H, V = 2, 11, 6, 13


def chunk_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    student = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = (student.detach() + 0.7 * torch.randn(B, T, H, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, :2] = False
    return head, student, teacher, mask


SETTINGS = [
    {"kind": "forward_kl"},
    {"kind": "reverse_kl", "temperature": 1.1},
    {"kind": "jsd", "beta": 0.3, "clip": 0.1},
    {"kind": "forward_kl", "clip": 0.05, "temperature": 0.8},
    {"kind": "forward_kl", "top_k_support": 4},
    {"kind": "reverse_kl", "truncate": (6, 0.9), "temperature": 1.1},
]


def unchunked(student, teacher, head, mask, top_k_support=None, truncate=None, **kw):
    s_BTV, t_BTV = head(student), head(teacher).detach()
    if truncate is not None:
        ref_BTV = s_BTV.detach()
        t_kw = kw.get("temperature", 1.0)
        s_BTV = truncate_logits(s_BTV, *truncate, reference=ref_BTV, temperature=t_kw)
        t_BTV = truncate_logits(t_BTV, *truncate, reference=ref_BTV, temperature=t_kw)
    if top_k_support is not None:
        div_BT = topk_divergence(s_BTV, t_BTV, top_k_support, **kw)
    else:
        div_BT = per_token_divergence(s_BTV, t_BTV, **kw)
    return (div_BT * mask).sum(), div_BT * mask


def spec_of(setting: dict, **more) -> DivergenceSpec:
    """The `DivergenceSpec` of a setting written in the reference's terms (``top_k_support=k`` is
    the spec's kind='topk', forward KL over the teacher's top k)."""
    setting = dict(setting)
    k = setting.pop("top_k_support", None)
    if k is not None:
        assert setting.pop("kind") == "forward_kl"
        setting.update(kind="topk", topk=k)
    return DivergenceSpec(**setting, **more)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64])
def test_chunked_equals_unchunked(setting, chunk_size):
    head, student, teacher, mask = chunk_inputs()
    want_sum, want_BT = unchunked(student, teacher, head, mask, **setting)
    want_grads = torch.autograd.grad(want_sum, [student, head.weight])
    got_sum, got_BT = chunked_divergence(student, teacher, head, mask, spec_of(setting, chunk_size=chunk_size))
    assert not got_BT.requires_grad and got_BT.shape == (B, T)
    torch.testing.assert_close(got_sum, want_sum)
    torch.testing.assert_close(got_BT, want_BT.detach())
    got_sum.backward()
    torch.testing.assert_close(student.grad, want_grads[0])
    torch.testing.assert_close(head.weight.grad, want_grads[1])
    assert teacher.grad is None
    assert torch.equal(student.grad[~mask], torch.zeros(int((~mask).sum()), H, dtype=torch.float64))
    assert torch.equal(got_BT[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_with_a_frozen_head_equals_unchunked(setting, chunk_size):
    """The LoRA case: the head is frozen, so each chunk's gradient is taken in the forward pass."""
    head, student, teacher, mask = chunk_inputs()
    head.weight.requires_grad_(False)
    want_sum, _ = unchunked(student, teacher, head, mask, **setting)
    (want_grad,) = torch.autograd.grad(want_sum, [student])
    got_sum, _ = chunked_divergence(student, teacher, head, mask, spec_of(setting, chunk_size=chunk_size))
    torch.testing.assert_close(got_sum, want_sum)
    got_sum.backward()
    torch.testing.assert_close(student.grad, want_grad)
    assert head.weight.grad is None and teacher.grad is None


def saving_shapes(saved_shapes: list):
    """A context in which autograd records the shape of every tensor it saves for backward."""
    def pack(x):
        saved_shapes.append(tuple(x.shape))
        return x

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)


def test_chunked_saves_no_vocabulary_sized_tensor():
    """Only hidden-sized tensors are kept for backward: nothing with a V-sized last dim."""
    head, student, teacher, mask = chunk_inputs()
    saved_shapes = []
    with saving_shapes(saved_shapes):
        loss_sum, _ = chunked_divergence(student, teacher, head, mask, DivergenceSpec(chunk_size=4))
        logprobs_BT = chunked_token_logprobs(student, head, torch.zeros(B, T, dtype=torch.long), chunk_size=4)
    assert not [s for s in saved_shapes if s and s[-1] == V]
    (loss_sum + logprobs_BT.sum()).backward()
    assert torch.isfinite(student.grad).all()


def test_chunked_padding_does_not_matter():
    head, student, teacher, mask = chunk_inputs()
    loss_a, per_token_a = chunked_divergence(student, teacher, head, mask, DivergenceSpec(chunk_size=4))
    garbage = student.detach().clone()
    garbage[~mask] = 1e3
    loss_b, per_token_b = chunked_divergence(garbage, teacher, head, mask, DivergenceSpec(chunk_size=4))
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(per_token_a, per_token_b)


def test_chunked_bad_arguments():
    head, student, teacher, mask = chunk_inputs()
    with pytest.raises(ValueError, match="hidden states differ"):
        chunked_divergence(student, teacher[:, :5], head, mask)
    with pytest.raises(ValueError, match="mask shape"):
        chunked_divergence(student, teacher, head, mask[:, :5])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(student, teacher, head, mask, DivergenceSpec(chunk_size=0))
    with pytest.raises(ValueError, match="one support"):
        chunked_divergence(student, teacher, head, mask,
                           DivergenceSpec(kind="topk", topk=3, truncate=(3, None)))
    with pytest.raises(ValueError, match="beta"):
        chunked_divergence(student, teacher, head, mask, DivergenceSpec(kind="jsd", beta=2.0))
    with pytest.raises(ValueError, match="kind"):
        chunked_divergence(student, teacher, head, mask, DivergenceSpec(kind="forward"))
    with pytest.raises(ValueError, match="sampled_token"):
        chunked_divergence(student, teacher, head, mask, DivergenceSpec(kind="sampled_token"))
    with pytest.raises(ValueError, match="targets shape"):
        chunked_token_logprobs(student, head, torch.zeros(B, T + 1, dtype=torch.long))


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_token_logprobs_equals_log_softmax_gather(chunk_size):
    head, student, _, _ = chunk_inputs()
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    want = torch.log_softmax(head(student) / 0.7, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    want_grads = torch.autograd.grad(want.sum(), [student, head.weight])
    got = chunked_token_logprobs(student, head, targets, temperature=0.7, chunk_size=chunk_size)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    torch.testing.assert_close(student.grad, want_grads[0])
    torch.testing.assert_close(head.weight.grad, want_grads[1])


def test_chunked_low_precision_head_computes_in_float32():
    head, student, teacher, mask = chunk_inputs()
    want_sum, _ = chunked_divergence(student, teacher, head, mask, DivergenceSpec(chunk_size=4))
    head_bf16 = copy.deepcopy(head).to(torch.bfloat16)
    got_sum, got_BT = chunked_divergence(
        student.detach().bfloat16().requires_grad_(), teacher.bfloat16(), head_bf16, mask,
        DivergenceSpec(chunk_size=4),
    )
    assert got_sum.dtype == got_BT.dtype == torch.float32
    # bf16 inputs: each hidden state and weight is rounded once (eps_bf16 / 2 relative), which moves each
    # logit by up to H * eps_bf16 * |h||w|; the float32 arithmetic after that is negligible.
    head_scale = float(student.detach().abs().max() * head.weight.detach().abs().max())
    tol = tolerance(torch.bfloat16, reduction=H, scale=head_scale * int(mask.sum()))
    torch.testing.assert_close(got_sum.double(), want_sum.detach(), **tol)


# ----------------------------------------------------------------------------- hint contrast
def ref_contrast_row(student, correct, wrong, alpha=1.0, temperature=1.0, clip=None):
    """One position's KL(r || q), r_v = q_v (c_v / w_v)^alpha / Z, from lists of logits."""
    q, c, w = (_softmax(x, temperature) for x in (student, correct, wrong))
    tilted = [qv * (cv / wv) ** alpha for qv, cv, wv in zip(q, c, w)]
    z = sum(tilted)
    total = 0.0
    for rv, qv in zip((t / z for t in tilted), q):
        term = _xlog_ratio(rv, qv)
        total += term if clip is None else min(term, clip)
    return total


def logits_triple(*shape, seed=0):
    s, c = logits_pair(*shape, seed=seed)
    return s, c, logits_pair(*shape, seed=seed + 1)[1]


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_hint_contrast_matches_reference(alpha, temperature, clip):
    s, c, w = logits_triple(2, 3, 7)
    got = hint_contrast_divergence(s, c, w, alpha, temperature, clip)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    rows = zip(s.reshape(-1, 7).tolist(), c.reshape(-1, 7).tolist(), w.reshape(-1, 7).tolist())
    want = torch.tensor([ref_contrast_row(*row, alpha, temperature, clip) for row in rows], dtype=torch.float64)
    torch.testing.assert_close(got, want.reshape(2, 3))
    if clip is None:
        assert (got > 0).all()


def test_hint_contrast_is_zero_with_zero_gradient_when_the_teachers_agree():
    s, c, _ = logits_triple(4, 9)
    s.requires_grad_()
    got = hint_contrast_divergence(s, c, c.clone(), alpha=1.5, temperature=0.8)
    assert torch.equal(got, torch.zeros(4, dtype=torch.float64))  # exactly: the target is the student
    got.sum().backward()
    # (q - r) / T with r = q: zero up to the rounding of sum_v q_v = 1 over V = 9 entries
    torch.testing.assert_close(s.grad, torch.zeros_like(s), **tolerance(torch.float64, reduction=9))


def test_hint_contrast_gradient_is_q_minus_r_and_reaches_the_student_only():
    s, c, w = logits_triple(3, 6)
    s.requires_grad_()
    c.requires_grad_()
    w.requires_grad_()
    hint_contrast_divergence(s, c, w, alpha=0.7, temperature=1.3).sum().backward()
    assert c.grad is None and w.grad is None
    q = torch.softmax(s.detach() / 1.3, -1)
    tilted = q * (torch.softmax(c.detach() / 1.3, -1) / torch.softmax(w.detach() / 1.3, -1)) ** 0.7
    r = tilted / tilted.sum(-1, keepdim=True)
    torch.testing.assert_close(s.grad, (q - r) / 1.3)


def test_hint_contrast_log_ratio_clip_bounds_the_tilt():
    """A token the student finds unlikely (q = 1e-3) and the wrong-hint teacher all but rules out
    (w = 1e-12): unclipped, its log-ratio (about 21) hands it almost all of the target's mass; with
    the log-ratio clipped to [-L, L] every tilt lies in [e^-aL, e^aL], so r_v <= q_v e^{2 a L}."""
    V = 5
    q = torch.tensor([1e-3, (1 - 1e-3) / 4, (1 - 1e-3) / 4, (1 - 1e-3) / 4, (1 - 1e-3) / 4], dtype=torch.float64)
    c = torch.full((V,), 0.2, dtype=torch.float64)
    w = torch.tensor([1e-12, *[(1 - 1e-12) / 4] * 4], dtype=torch.float64)
    s, cl, wl = q.log(), c.log(), w.log()

    def target(clip, alpha):  # r from the loss's own gradient: d loss / d logits = q - r at T = 1
        logits = s.clone().requires_grad_()
        hint_contrast_divergence(logits, cl, wl, alpha=alpha, log_ratio_clip=clip).backward()
        return q - logits.grad

    assert target(None, 1.0)[0] > 0.99  # unbounded: the ruled-out token takes the mass
    for clip, alpha in [(1.0, 1.0), (2.0, 0.5), (0.5, 3.0)]:
        r = target(clip, alpha)
        bound = float(q[0]) * math.exp(2 * alpha * clip)
        assert float(r[0]) <= bound * (1 + 1e-12) and float(r[0]) < 0.5
        # by hand: d = clip(log c - log w) = (L, d1 x 4), r = q e^{a d} / sum
        d = torch.clamp(cl - wl, -clip, clip)
        want = q * torch.exp(alpha * d)
        torch.testing.assert_close(r, want / want.sum(), **tolerance(torch.float64, reduction=V))


def test_hint_contrast_bad_arguments():
    s, c, w = logits_triple(2, 4)
    with pytest.raises(ValueError, match="alpha"):
        hint_contrast_divergence(s, c, w, alpha=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        hint_contrast_divergence(s, c, w[:, :3])
    with pytest.raises(ValueError, match="clip"):
        hint_contrast_divergence(s, c, w, clip=0.0)
    with pytest.raises(ValueError, match="log_ratio_clip"):
        hint_contrast_divergence(s, c, w, log_ratio_clip=0.0)


def unchunked_contrast(student, correct, wrong, head, mask, truncate=None, **kw):
    s_BTV, c_BTV, w_BTV = head(student), head(correct).detach(), head(wrong).detach()
    if truncate is not None:
        ref_BTV = s_BTV.detach()
        s_BTV, c_BTV, w_BTV = (truncate_logits(x, *truncate, reference=ref_BTV, temperature=kw["temperature"])
                               for x in (s_BTV, c_BTV, w_BTV))
    kw["log_ratio_clip"] = kw.pop("contrast_clip", None)
    div_BT = hint_contrast_divergence(s_BTV, c_BTV, w_BTV, **kw) * mask
    return div_BT.sum(), div_BT


CONTRAST_SETTINGS = [
    {"alpha": 1.0, "temperature": 1.0},
    {"alpha": 0.5, "temperature": 1.1, "clip": 0.1},
    {"alpha": 2.0, "temperature": 0.9, "truncate": (6, 0.9)},
    {"alpha": 1.5, "temperature": 1.0, "contrast_clip": 0.3},
]


@pytest.mark.parametrize("setting", CONTRAST_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_hint_contrast_equals_unchunked(setting, frozen_head, chunk_size):
    head, student, teacher, mask = chunk_inputs()
    wrong = (teacher.detach() + 0.5 * torch.randn(B, T, H, generator=torch.Generator().manual_seed(3),
                                                  dtype=torch.float64)).requires_grad_()
    head.weight.requires_grad_(not frozen_head)
    params = [student] if frozen_head else [student, head.weight]
    want_sum, want_BT = unchunked_contrast(student, teacher, wrong, head, mask, **setting)
    want_grads = torch.autograd.grad(want_sum, params)
    got_sum, got_BT = chunked_divergence(student, teacher, head, mask,
                                         DivergenceSpec(kind="hint_contrast", chunk_size=chunk_size, **setting),
                                         wrong_teacher_hidden_BTH=wrong)
    torch.testing.assert_close(got_sum, want_sum)
    torch.testing.assert_close(got_BT, want_BT.detach())
    got_sum.backward()
    for param, want in zip(params, want_grads):
        torch.testing.assert_close(param.grad, want)
    assert teacher.grad is None and wrong.grad is None


def test_chunked_hint_contrast_saves_no_vocabulary_sized_tensor_and_vanishes_for_equal_teachers():
    head, student, teacher, mask = chunk_inputs()
    saved_shapes = []
    with saving_shapes(saved_shapes):
        loss_sum, per_token_BT = chunked_divergence(student, teacher, head, mask,
                                                    DivergenceSpec(kind="hint_contrast", chunk_size=4),
                                                    wrong_teacher_hidden_BTH=teacher.detach().clone())
    assert not [s for s in saved_shapes if s and s[-1] == V]
    assert loss_sum.item() == 0.0 and torch.equal(per_token_BT, torch.zeros(B, T, dtype=torch.float64))


def test_chunked_hint_contrast_bad_arguments():
    head, student, teacher, mask = chunk_inputs()
    contrast = DivergenceSpec(kind="hint_contrast")
    with pytest.raises(ValueError, match="needs wrong_teacher_hidden_BTH"):
        chunked_divergence(student, teacher, head, mask, contrast)
    with pytest.raises(ValueError, match="hint_contrast' only"):
        chunked_divergence(student, teacher, head, mask, DivergenceSpec(), wrong_teacher_hidden_BTH=teacher)
    with pytest.raises(ValueError, match="hint_contrast' only"):  # a top-k support has no contrast form
        chunked_divergence(student, teacher, head, mask, DivergenceSpec(kind="topk", topk=3),
                           wrong_teacher_hidden_BTH=teacher)
    with pytest.raises(ValueError, match="wrong teacher hidden states differ"):
        chunked_divergence(student, teacher, head, mask, contrast, wrong_teacher_hidden_BTH=teacher[:, :5])
