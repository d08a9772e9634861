"""The "fast" rollout engine's fused decoder: the student's tokens and log-probabilities, for every
supported architecture, sampling as transformers samples, and a model it never writes to."""
from __future__ import annotations

import pytest
import torch
from _numerics import assert_same_greedy, tolerance

from opsd_kit.rollout.fast import FastEngine
from opsd_kit.rollout.fused_decoder import FusedDecoder, draw, process_scores
from opsd_kit.rollout.hf import GenerationSettings, generate

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]  # different lengths: left padding in every batch
GREEDY = GenerationSettings(max_new_tokens=10, temperature=0.0, n=1, batch_size=2)


def _model(kind: str, tokenizer):
    """A random tiny model of each supported layout: Qwen2 (q/k/v biases), Llama with tied
    embeddings (SmolLM2's layout), Qwen3 (q/k norms, a head_dim that is not hidden / heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from opsd_kit.models import build_tiny_model

    if kind == "qwen2":
        return build_tiny_model(tokenizer)
    common = dict(vocab_size=len(tokenizer) + 13, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=24, tie_word_embeddings=False))


def _lora_policy(model, tokenizer, std: float = 0.3):
    from opsd_kit.policy import LoraSettings, Policy

    policy = Policy(model, tokenizer, lora=LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return policy


def _weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_greedy_tokens_equal_generate_for_every_supported_layout(kind, tiny_tokenizer):
    policy = _lora_policy(_model(kind, tiny_tokenizer), tiny_tokenizer)
    engine = FastEngine(policy.model, tiny_tokenizer)
    assert engine.fallback is None
    fast = engine.generate(PROMPTS, GREEDY)
    hf = generate(policy.model, tiny_tokenizer, PROMPTS, GREEDY)
    with policy.model.disable_adapter():  # the adapter changes the greedy tokens, so merging it matters
        base = generate(policy.model, tiny_tokenizer, PROMPTS, GREEDY)
    assert_same_greedy(policy.model, PROMPTS, fast, hf)
    assert hf.completion_ids != base.completion_ids


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_sampled_logprobs_are_the_students(kind, tiny_tokenizer):
    """The on-policy assumption: the log-probability the engine reports for each sampled token is
    the one the student's own forward (unmerged LoRA, full sequence) assigns it, within 1e-3."""
    policy = _lora_policy(_model(kind, tiny_tokenizer), tiny_tokenizer)
    settings = GenerationSettings(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, n=2, batch_size=4)
    out = FastEngine(policy.model, tiny_tokenizer).generate(PROMPTS, settings, seed=3, logprobs=True)
    model = policy.model.eval()
    worst = 0.0
    for pi, completion, sampled in zip(out.prompt_index, out.completion_ids, out.logprobs):
        prompt = PROMPTS[pi]
        with torch.no_grad():
            logits_TV = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
        scores_CV = process_scores(logits_TV[len(prompt) - 1:-1], settings.temperature, settings.top_k, settings.top_p)
        student_C = torch.log_softmax(scores_CV, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert len(sampled) == len(completion) and torch.isfinite(student_C).all()
        worst = max(worst, float((student_C - torch.tensor(sampled)).abs().max()))
    assert worst < 1e-3


def test_seeded_sampling_repeats(tiny_tokenizer):
    policy = _lora_policy(_model("qwen2", tiny_tokenizer), tiny_tokenizer)
    engine = FastEngine(policy.model, tiny_tokenizer)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, n=3, batch_size=4)
    a, b = (engine.generate(PROMPTS, settings, seed=7).completion_ids for _ in range(2))
    assert a == b != engine.generate(PROMPTS, settings, seed=8).completion_ids


def test_the_merged_copy_is_released_between_rollouts(tiny_tokenizer):
    """The copy exists only while sampling, so the loss's activations do not sit on top of it."""
    policy = _lora_policy(_model("qwen2", tiny_tokenizer), tiny_tokenizer)
    engine = FastEngine(policy.model, tiny_tokenizer)
    first = engine.generate(PROMPTS, GREEDY).completion_ids
    projections = engine._decoder._projections()
    assert all(p.weight is None and p.packed is None and p.bias is None for p in projections)
    with pytest.raises(RuntimeError, match="after release"):
        engine._decoder.decode(torch.tensor([PROMPTS[0]]), torch.ones(1, len(PROMPTS[0])), max_new_tokens=2,
                               eos_ids=[0], pad_id=0)
    assert engine.generate(PROMPTS, GREEDY).completion_ids == first  # the next call merges it again


def test_the_model_is_never_written_and_each_call_samples_the_current_weights(tiny_tokenizer):
    policy = _lora_policy(_model("llama", tiny_tokenizer), tiny_tokenizer)
    model = policy.model
    engine = FastEngine(model, tiny_tokenizer)

    def both():
        fast, hf = engine.generate(PROMPTS, GREEDY), generate(model, tiny_tokenizer, PROMPTS, GREEDY)
        assert_same_greedy(model, PROMPTS, fast, hf)
        return hf.completion_ids

    before = _weights(model)
    first = both()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():  # an optimizer step on the adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)
    second = both()
    assert second != first
    with model.disable_adapter():  # the base model, e.g. the frozen teacher's own rollouts
        assert both() != second
    # the (tied) head and embedding changed in place, e.g. a loaded state dict
    with torch.no_grad():
        model.get_base_model().get_output_embeddings().weight.mul_(3)
    assert both() != second


def test_rows_that_stop_early_are_cut_and_padded_as_generate_does(tiny_tokenizer):
    policy = _lora_policy(_model("qwen2", tiny_tokenizer), tiny_tokenizer)
    engine = FastEngine(policy.model, tiny_tokenizer)
    first = engine.generate(PROMPTS[:1], GREEDY).completion_ids[0][0]
    policy.model.generation_config.eos_token_id = first  # row 0 stops at once, the others later or never
    settings = GenerationSettings(max_new_tokens=10, temperature=0.0, batch_size=3)
    fast, hf = engine.generate(PROMPTS, settings), generate(policy.model, tiny_tokenizer, PROMPTS, settings)
    assert_same_greedy(policy.model, PROMPTS, fast, hf)
    assert fast.completion_ids[0] == [first] and fast.finished == hf.finished
    assert any(len(c) > 1 for c in fast.completion_ids)


def test_a_bfloat16_base_with_float32_adapters_samples_and_stays_untouched(tiny_tokenizer):
    """peft keeps the adapter in float32 over a bfloat16 base; the merge then adds the delta in
    the adapter's dtype, cast to bfloat16, as peft's merge does."""
    from opsd_kit.policy import LoraSettings, Policy

    policy = Policy(_model("qwen2", tiny_tokenizer).to(torch.bfloat16), tiny_tokenizer, lora=LoraSettings(r=4, alpha=8))
    assert {p.dtype for n, p in policy.model.named_parameters() if "lora_" in n} == {torch.float32}
    before = _weights(policy.model)
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, n=2, batch_size=6)
    out = FastEngine(policy.model, tiny_tokenizer).generate(PROMPTS, settings, seed=0, logprobs=True)
    assert len(out) == 6 and all(torch.isfinite(torch.tensor(lp)).all() for lp in out.logprobs)
    assert all(torch.equal(before[n], p) for n, p in policy.model.named_parameters())


def test_a_merged_adapter_is_refused_rather_than_applied_twice(tiny_tokenizer):
    policy = _lora_policy(_model("qwen2", tiny_tokenizer), tiny_tokenizer)
    engine = FastEngine(policy.model, tiny_tokenizer)
    engine.generate(PROMPTS, GREEDY)
    policy.model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapter"):
        engine.generate(PROMPTS, GREEDY)
    policy.model.unmerge_adapter()


def test_min_new_tokens_bans_the_stop_tokens_until_then_on_both_backends(tiny_tokenizer):
    policy = _lora_policy(_model("qwen2", tiny_tokenizer), tiny_tokenizer)
    engine = FastEngine(policy.model, tiny_tokenizer)
    first = engine.generate(PROMPTS[:1], GREEDY).completion_ids[0][0]
    policy.model.generation_config.eos_token_id = first  # the first greedy token now stops the row
    for sample in (engine.generate, lambda *a: generate(policy.model, tiny_tokenizer, *a)):
        assert sample(PROMPTS[:1], GREEDY).completion_ids == [[first]]
        banned = sample(PROMPTS[:1], GenerationSettings(max_new_tokens=10, temperature=0.0, min_new_tokens=3))
        assert first not in banned.completion_ids[0][:3] and len(banned.completion_ids[0]) >= 4


def test_unsupported_models_say_why(tiny_model, tiny_tokenizer):
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from opsd_kit.models import build_tiny_model

    dora = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in FusedDecoder.unsupported(dora)
    ia3 = get_peft_model(build_tiny_model(tiny_tokenizer), IA3Config(target_modules=["k_proj", "down_proj"],
                                                                      feedforward_modules=["down_proj"]))
    assert "not a plain LoRA" in FusedDecoder.unsupported(ia3)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert "model_type 'gpt2'" in FusedDecoder.unsupported(gpt2)
    with pytest.raises(ValueError, match="FusedDecoder: .*gpt2"):
        FusedDecoder(gpt2)


def test_an_unsupported_model_falls_back_to_generate_with_the_adapter_merged(tiny_tokenizer, monkeypatch):
    """The fallback samples the merged model and restores the base weights bit for bit, also
    when sampling raises (``unmerge_adapter`` alone would leave rounding errors in the teacher)."""
    import opsd_kit.rollout.hf as rollout

    policy = _lora_policy(_model("qwen2", tiny_tokenizer), tiny_tokenizer)
    monkeypatch.setattr(FusedDecoder, "unsupported", staticmethod(lambda model: "a reason the test gives"))
    with pytest.warns(UserWarning, match="a reason the test gives"):
        engine = FastEngine(policy.model, tiny_tokenizer)
    before = _weights(policy.model)
    fast = engine.generate(PROMPTS, GREEDY)
    assert fast.completion_ids == generate(policy.model, tiny_tokenizer, PROMPTS, GREEDY).completion_ids
    assert all(torch.equal(before[n], p) for n, p in policy.model.named_parameters())

    def fail(model, *args, **kwargs):
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it did sample merged
        raise RuntimeError("boom")

    monkeypatch.setattr(rollout, "generate", fail)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(PROMPTS, GREEDY)
    assert all(torch.equal(before[n], p) for n, p in policy.model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in policy.model.modules())


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (0.6, 0, 0.9), (1.3, 7, 0.8)])
def test_process_scores_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits_BV = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits_BV[0, :6] = 1.5  # ties at the cut
    ref = TemperatureLogitsWarper(temperature)(None, logits_BV.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(process_scores(logits_BV, temperature, top_k, top_p), ref)


def test_draw_inverts_the_cumulative_distribution(monkeypatch):
    cases = {(0.1, 0.0, 0.6, 0.3): [(0.0, 0), (0.0999, 0), (0.1001, 2), (0.6999, 2), (0.7001, 3), (0.99999, 3)],
             (0.0, 0.5, 0.0, 0.5): [(0.0, 1), (0.5, 3), (0.99999, 3)]}  # u on a step of the cdf: the next token
    for row, draws in cases.items():
        for u, token in draws:
            monkeypatch.setattr(torch, "rand", lambda *shape, u=u, **kw: torch.full(shape, u, dtype=kw.get("dtype")))
            assert int(draw(torch.tensor([row]))) == token  # a zero-probability token is never drawn
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    monkeypatch.undo()
    # and the frequencies: every token within 5 binomial standard deviations of its probability
    torch.manual_seed(0)
    n = 20_000
    counts = torch.bincount(draw(probs.expand(n, 4)), minlength=4).double()
    sd = (n * probs[0] * (1 - probs[0])).sqrt()
    assert counts[1] == 0 and ((counts - n * probs[0]).abs() <= 5 * sd).all()


STAGGERED = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24], [25, 26]]


def _decode(decoder, tokenizer, monkeypatch, compact_at: float, eos_ids: list[int], seed: int = 0, **knobs):
    """`FusedDecoder.decode` of `STAGGERED` with `COMPACT_AT` set: the completions (cut after the
    first stop token; the rest of each row must be padding), their log-probabilities, and the
    number of rows each decode step ran."""
    import opsd_kit.rollout.fused_decoder as fused
    from opsd_kit.rollout.hf import left_pad

    rows_per_step = []
    forward = FusedDecoder._forward

    def counting(self, ids_BQ, *args):
        rows_per_step.append(ids_BQ.shape[0])
        return forward(self, ids_BQ, *args)

    monkeypatch.setattr(fused, "COMPACT_AT", compact_at)
    monkeypatch.setattr(FusedDecoder, "_forward", counting)
    ids_BL, mask_BL = left_pad(STAGGERED, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    ids_BN, logprobs_BN = decoder.decode(ids_BL, mask_BL, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id,
                                         logprobs=True, **knobs)
    monkeypatch.undo()
    completions, logprobs = [], []
    for row, lp in zip(ids_BN.tolist(), logprobs_BN.tolist()):
        n = next((j + 1 for j, x in enumerate(row) if x in eos_ids), len(row))
        assert all(x == tokenizer.pad_token_id for x in row[n:]) and not any(lp[n:])
        completions.append(row[:n])
        logprobs.append(lp[:n])
    return completions, logprobs, rows_per_step[1:]  # [0]: the prompt's pass


@pytest.mark.parametrize("temperature, min_new_tokens", [(0.0, 0), (0.8, 0), (0.8, 2)])
def test_rows_that_stopped_leave_the_batch_and_change_no_token(temperature, min_new_tokens, tiny_tokenizer,
                                                                 monkeypatch):
    """Compacting the batch as rows stop (at every stop, and at the default `COMPACT_AT`) gives
    every row the tokens and log-probabilities of decoding all rows to the end, a seeded sample
    included: each step draws one uniform per row of the whole batch. Rows may part only at a
    tie the smaller matmul batch may break either way (greedy: two logits within float32
    rounding; sampled: the step's uniform within rounding of a boundary of the cumulative
    distribution); log-probabilities agree within that rounding."""
    policy = _lora_policy(_model("qwen2", tiny_tokenizer), tiny_tokenizer)
    model = policy.model.eval()
    decoder = FusedDecoder(model)
    knobs = dict(max_new_tokens=16, temperature=temperature, min_new_tokens=min_new_tokens)
    free, _, _ = _decode(decoder, tiny_tokenizer, monkeypatch, 2.0, eos_ids=[], **knobs)
    # stop tokens that end row r by step 2 r + 1 (earlier where one of them comes first), the last row maybe never
    eos_ids = sorted({row[2 * r + 1] for r, row in enumerate(free[:-1])})
    ref, ref_lp, ref_rows = _decode(decoder, tiny_tokenizer, monkeypatch, 2.0, eos_ids, **knobs)
    assert set(ref_rows) == {len(STAGGERED)}  # above 1: every row runs every step
    assert len({len(c) for c in ref}) >= 4  # the rows stop at different steps
    cfg = model.get_base_model().config
    for compact_at in (0.0, 0.25):
        out, out_lp, out_rows = _decode(decoder, tiny_tokenizer, monkeypatch, compact_at, eos_ids, **knobs)
        assert out_rows == sorted(out_rows, reverse=True) and out_rows[-1] < len(STAGGERED)  # the work shrinks
        for r, (prompt, a, b) in enumerate(zip(STAGGERED, out, ref)):
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
            agree = min(len(a), len(b)) if k is None else k
            with torch.no_grad():
                logits_TV = model(input_ids=torch.tensor([prompt + b[:agree]])).logits[0].float()
            tol = tolerance(torch.float32, reduction=max(cfg.hidden_size, cfg.intermediate_size),
                            scale=float(logits_TV.abs().max()), depth=cfg.num_hidden_layers)["atol"]
            scale = 1.0 / temperature if temperature > 0 else 1.0
            # a log-softmax moves by at most twice the largest move of its scores
            torch.testing.assert_close(torch.tensor(out_lp[r][:agree]),
                                       torch.tensor(ref_lp[r][:agree]), rtol=0, atol=2 * tol * scale)
            if k is None:
                assert a == b
                continue
            scores_V = logits_TV[-1]
            if k < min_new_tokens:
                scores_V[eos_ids] = float("-inf")
            if temperature == 0:
                assert abs(float(scores_V[a[k]] - scores_V[b[k]])) <= tol, (r, k, a[k], b[k])
            else:  # the same uniform fell on either side of the boundary between the two tokens
                torch.manual_seed(0)
                u = [torch.rand(len(STAGGERED), 1, dtype=torch.float64) for _ in range(k + 1)][k][r]
                cdf_V = torch.softmax(scores_V / temperature, -1).double().cumsum(-1)
                assert abs(float(cdf_V[min(a[k], b[k])] - u * cdf_V[-1])) <= 2 * tol * scale, (r, k, a[k], b[k])


def test_greedy_breaks_a_tie_at_the_first_maximal_index_as_argmax(tiny_tokenizer, monkeypatch):
    """Greedy decoding takes the first of equal maximal logits (``torch.argmax``'s rule, which
    ``generate`` uses), at every step and with -inf entries around."""
    from opsd_kit.rollout.hf import left_pad

    decoder = FusedDecoder(_model("llama", tiny_tokenizer))
    V = decoder.embed.weight.shape[0]
    ties = [(5, 9), (40, 7), (3, 4)]  # per row: the tied maximal indices, not in order

    def tied(self, ids_BQ, *args):
        logits_BV = torch.zeros(ids_BQ.shape[0], V)
        logits_BV[:, :2] = float("-inf")
        for row, (a, b) in enumerate(ties[:ids_BQ.shape[0]]):
            logits_BV[row, [a, b]] = 1.0
        return logits_BV

    monkeypatch.setattr(FusedDecoder, "_forward", tied)
    ids_BL, mask_BL = left_pad([[11, 12], [13], [14, 15, 16]], tiny_tokenizer.pad_token_id)
    ids_BN, _ = decoder.decode(ids_BL, mask_BL, max_new_tokens=3, eos_ids=[tiny_tokenizer.eos_token_id],
                               pad_id=tiny_tokenizer.pad_token_id, temperature=0.0)
    assert ids_BN.tolist() == [[min(t)] * 3 for t in ties]
    logits_BV = tied(None, ids_BL)
    assert ids_BN[:, 0].tolist() == logits_BV.argmax(-1).tolist()
