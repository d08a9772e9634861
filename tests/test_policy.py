"""Policy: LoRA wiring, the three teachers, hidden states without logits, adapter I/O, 4-bit."""
from __future__ import annotations

import peft
import pytest
import torch
from _numerics import tolerance

from opsd_kit.models import load_causal_lm
from opsd_kit.policy import LoraSettings, Policy

SMALL = LoraSettings(r=4, alpha=8)


def _batch(tokenizer, texts=("hello there", "hi")):
    """Left-padded batch with position ids that start at 0 on each row's first real token."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    position_ids = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return enc.input_ids, enc.attention_mask, position_ids


def _logits(model, batch):
    ids, mask, pos = batch
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _sgd_step(policy, batch, lr=1.0):
    """One optimizer step on a made-up loss, so the adapter moves away from its zero init."""
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=lr)
    _logits(policy.model, batch).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def _assert_same_tensors(a: dict, b: dict):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# construction
def test_lora_on_exactly_the_target_modules(tiny_model, tiny_tokenizer):
    policy = Policy(tiny_model, tiny_tokenizer)
    assert isinstance(policy.model, peft.PeftModel)
    targets = set(LoraSettings().target_modules)
    wrapped = {n for n, m in policy.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    linears = {n for n, m in policy.causal_lm.named_modules()
               if n.split(".")[-1] in targets and not n.endswith("base_layer")}
    assert len(wrapped) == 2 * 7  # 2 layers x 7 projections
    assert {n.removeprefix("base_model.model.") for n in wrapped} == linears
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    assert set(map(id, policy.trainable_parameters())) == {
        id(p) for n, p in policy.model.named_parameters() if n in trainable}
    assert not policy.head.weight.requires_grad
    assert policy.model.training
    assert policy.config.model_type == "qwen2"


def test_adapter_init_is_seeded_and_leaves_global_rng_alone(tiny_tokenizer):
    state = torch.get_rng_state()
    a = Policy(load_causal_lm("tiny"), tiny_tokenizer, lora=SMALL, seed=1).lora_state_dict()
    b = Policy(load_causal_lm("tiny"), tiny_tokenizer, lora=SMALL, seed=1).lora_state_dict()
    c = Policy(load_causal_lm("tiny"), tiny_tokenizer, lora=SMALL, seed=2).lora_state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    _assert_same_tensors(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_frozen_teacher_without_lora_is_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="teacher='frozen' needs a LoRA adapter"):
        Policy(tiny_model, tiny_tokenizer, lora=None)
    with pytest.raises(ValueError, match="teacher='frozen' needs a LoRA adapter"):
        Policy.from_pretrained("tiny", lora=None)
    with pytest.raises(ValueError, match="quantization='4bit' needs a LoRA adapter"):
        Policy.from_pretrained("tiny", lora=None, teacher="live", quantization="4bit")


@pytest.mark.parametrize("policy_kwargs, config_overrides", [
    ({}, {"use_lora": False}),
    ({"teacher": "live", "quantization": "4bit"}, {"use_lora": False, "teacher": "live", "quantization": "4bit"}),
])
def test_the_policy_refuses_in_the_words_of_the_config(policy_kwargs, config_overrides):
    """One statement of each rule: `Policy` says what `TrainConfig.validate` says before any model loads."""
    from opsd_kit.config import ConfigError, load_profile

    with pytest.raises(ConfigError) as config_error:
        load_profile("tiny", **config_overrides)
    with pytest.raises(ValueError) as policy_error:
        Policy.from_pretrained("tiny", lora=None, **policy_kwargs)
    assert str(policy_error.value) == str(config_error.value)


def test_full_fine_tuning_builds_for_an_algorithm_without_a_teacher():
    """GRPO and SFT run no teacher: a run that trains all weights gets the live one, not the frozen
    default, which needs an adapter to switch off."""
    from opsd_kit.config import load_profile
    from opsd_kit.policy import build_policy

    for algorithm in ("grpo", "sft"):
        policy = build_policy(load_profile("tiny", algorithm, use_lora=False), device="cpu")
        assert policy.lora is None and policy.teacher_mode == "live"
    assert build_policy(load_profile("tiny", "grpo"), device="cpu").teacher_mode == "frozen"


@pytest.mark.parametrize("kwargs, name", [
    ({"teacher": "base"}, "teacher"),
    ({"backend": "vllm"}, "backend"),
    ({"quantization": "8bit"}, "quantization"),
    ({"dtype": "fp32"}, "dtype"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"ema_decay": 0.0}, "ema_decay"),
])
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        Policy.from_pretrained("tiny", **kwargs)


def test_unsloth_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='unsloth' needs a CUDA GPU"):
        Policy.from_pretrained("tiny", backend="unsloth", device="cpu")


# ---------------------------------------------------------------------------------------------
# hidden states without logits
def test_backbone_hidden_through_head_equals_logits_with_left_padding(tiny_model, tiny_tokenizer):
    policy = Policy(tiny_model, tiny_tokenizer, lora=SMALL)
    batch = _batch(tiny_tokenizer)
    _sgd_step(policy, batch)
    ids, mask, pos = batch
    assert (mask[1] == 0).any(), "the second row should be left-padded"
    hidden = policy.backbone_hidden(ids, mask, pos)
    assert hidden.shape == (*ids.shape, policy.config.hidden_size)
    assert hidden.requires_grad
    torch.testing.assert_close(policy.head(hidden), _logits(policy.model, batch))
    # the padded row equals the same row computed alone
    n = int(mask[1].sum())
    alone = policy.backbone_hidden(ids[1:, -n:], mask[1:, -n:], pos[1:, -n:])
    # float32; a padded batch and a single row run different kernel blockings: bound by the longest
    # dot product (the MLP's inner size) through every layer
    cfg = policy.config
    tol = tolerance(torch.float32, cfg.intermediate_size, scale=float(alone.abs().max()), depth=cfg.num_hidden_layers)
    torch.testing.assert_close(hidden[1:, -n:], alone, **tol)
    with policy.teacher():
        torch.testing.assert_close(policy.head(policy.backbone_hidden(ids, mask, pos)),
                                   _logits(policy.model, batch))


def test_backbone_hidden_never_calls_the_head(tiny_model, tiny_tokenizer):
    policy = Policy(tiny_model, tiny_tokenizer, lora=SMALL)
    calls = []
    handle = policy.head.register_forward_hook(lambda *_: calls.append(1))
    policy.backbone_hidden(*_batch(tiny_tokenizer))
    handle.remove()
    assert calls == []


def test_llama_with_tied_embeddings(tiny_tokenizer):
    """SmolLM2 is a Llama with tied input/output embeddings: same guarantees as Qwen2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tiny_tokenizer) + 5, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, pad_token_id=tiny_tokenizer.pad_token_id)
        return LlamaForCausalLM(config)

    batch = _batch(tiny_tokenizer)
    base = _logits(build(), batch)
    policy = Policy(build(), tiny_tokenizer, lora=SMALL)
    _sgd_step(policy, batch)
    student = _logits(policy.model, batch)
    assert not torch.allclose(student, base, atol=1e-3)
    torch.testing.assert_close(policy.head(policy.backbone_hidden(*batch)), student)
    with policy.teacher():
        torch.testing.assert_close(policy.head(policy.backbone_hidden(*batch)), base)


def test_full_fine_tuning_without_lora(tiny_model, tiny_tokenizer):
    policy = Policy(tiny_model, tiny_tokenizer, lora=None, teacher="live")
    assert not isinstance(policy.model, peft.PeftModel)
    assert len(policy.trainable_parameters()) == len(list(tiny_model.parameters()))
    batch = _batch(tiny_tokenizer)
    torch.testing.assert_close(policy.head(policy.backbone_hidden(*batch)), _logits(policy.model, batch))
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        policy.save_adapter("unused")


# ---------------------------------------------------------------------------------------------
# teachers
def test_frozen_teacher_is_the_base_model(tiny_model, tiny_tokenizer):
    policy = Policy(tiny_model, tiny_tokenizer, lora=SMALL)
    batch = _batch(tiny_tokenizer)
    _sgd_step(policy, batch)
    base = _logits(load_causal_lm("tiny"), batch)
    student = _logits(policy.model, batch)
    assert not torch.allclose(student, base, atol=1e-3)
    with policy.teacher():
        teacher = _logits(policy.model, batch)
        teacher_hidden = policy.backbone_hidden(*batch)
        assert not policy.model.training
    torch.testing.assert_close(teacher, base, rtol=0, atol=0)
    torch.testing.assert_close(policy.head(teacher_hidden), base)
    assert not teacher.requires_grad and not teacher_hidden.requires_grad
    # everything is back: adapter on, train mode, gradients
    after = _logits(policy.model, batch)
    torch.testing.assert_close(after, student, rtol=0, atol=0)
    assert after.requires_grad and policy.model.training


def test_teacher_context_restores_on_exception(tiny_model, tiny_tokenizer):
    policy = Policy(tiny_model, tiny_tokenizer, lora=SMALL)
    batch = _batch(tiny_tokenizer)
    _sgd_step(policy, batch)
    student = _logits(policy.model, batch)
    with pytest.raises(KeyError), policy.teacher():
        raise KeyError("boom")
    torch.testing.assert_close(_logits(policy.model, batch), student, rtol=0, atol=0)
    assert torch.is_grad_enabled() and policy.model.training


def test_live_teacher_is_the_student_without_grad(tiny_model, tiny_tokenizer):
    policy = Policy(tiny_model, tiny_tokenizer, lora=SMALL, teacher="live")
    batch = _batch(tiny_tokenizer)
    _sgd_step(policy, batch)
    student = _logits(policy.model, batch)
    with policy.teacher():
        teacher = _logits(policy.model, batch)
    assert not teacher.requires_grad
    torch.testing.assert_close(teacher, student.detach(), rtol=0, atol=0)


def test_ema_teacher(tiny_model, tiny_tokenizer):
    decay = 0.75
    policy = Policy(tiny_model, tiny_tokenizer, lora=SMALL, teacher="ema", ema_decay=decay)
    batch = _batch(tiny_tokenizer)
    start = policy.lora_state_dict()
    _sgd_step(policy, batch)
    policy.update_ema()
    current = policy.lora_state_dict()
    expected = {k: decay * start[k] + (1 - decay) * current[k] for k in start}
    assert any(not torch.equal(start[k], current[k]) for k in start)
    ema = policy.extra_state()["ema"]
    torch.testing.assert_close(ema, expected)
    student = _logits(policy.model, batch)
    with policy.teacher():
        inside = policy.lora_state_dict()
        teacher = _logits(policy.model, batch)
    torch.testing.assert_close(inside, expected)
    assert not torch.allclose(teacher, student)
    _assert_same_tensors(policy.lora_state_dict(), current)
    # the EMA survives a checkpoint round trip
    other = Policy(load_causal_lm("tiny"), tiny_tokenizer, lora=SMALL, teacher="ema", ema_decay=decay)
    other.load_extra_state(policy.extra_state())
    _assert_same_tensors(other.extra_state()["ema"], ema)


def test_update_ema_needs_the_ema_teacher(tiny_model, tiny_tokenizer):
    with pytest.raises(RuntimeError, match="teacher='ema'"):
        Policy(tiny_model, tiny_tokenizer, lora=SMALL).update_ema()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    grads = []
    for checkpointing in (False, True):
        policy = Policy(load_causal_lm("tiny"), tiny_tokenizer, lora=SMALL,
                        gradient_checkpointing=checkpointing)
        assert policy.causal_lm.is_gradient_checkpointing == checkpointing
        _sgd_step(policy, batch)  # make lora_B nonzero so lora_A gets gradients too
        policy.head(policy.backbone_hidden(*batch)).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# adapter I/O
def test_adapter_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    policy = Policy(tiny_model, tiny_tokenizer, lora=SMALL)
    batch = _batch(tiny_tokenizer)
    _sgd_step(policy, batch)
    policy.model.eval()
    student = _logits(policy.model, batch)
    policy.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()

    fresh = Policy(load_causal_lm("tiny"), tiny_tokenizer, lora=SMALL, seed=5)
    fresh.load_adapter(tmp_path)
    _assert_same_tensors(fresh.lora_state_dict(), policy.lora_state_dict())
    torch.testing.assert_close(_logits(fresh.model, batch), student, rtol=0, atol=0)

    resumed = Policy.from_pretrained("tiny", adapter=tmp_path, device="cpu")
    assert resumed.lora == LoraSettings.from_peft(policy.model.peft_config["default"])
    assert len(resumed.trainable_parameters()) == len(policy.trainable_parameters())
    torch.testing.assert_close(_logits(resumed.model, batch), student, rtol=0, atol=0)

    plain = peft.PeftModel.from_pretrained(load_causal_lm("tiny"), str(tmp_path))
    torch.testing.assert_close(_logits(plain, batch), student, rtol=0, atol=0)

    other = Policy(load_causal_lm("tiny"), tiny_tokenizer, lora=LoraSettings(r=8, alpha=8))
    with pytest.raises(ValueError, match="settings"):
        other.load_adapter(tmp_path)


# ---------------------------------------------------------------------------------------------
# 4-bit (bitsandbytes NF4 runs on CPU)
def test_4bit_lora_trains_and_frozen_teacher_is_the_4bit_base(tiny_tokenizer):
    import bitsandbytes as bnb

    policy = Policy.from_pretrained("tiny", quantization="4bit", lora=SMALL, device="cpu")
    assert policy.quantized
    q_proj = policy.causal_lm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    batch = _batch(tiny_tokenizer)
    # A teacher pass first (eval mode, no grad): on AVX512-BF16 CPUs bitsandbytes would repack
    # the weights for inference here and break every later training step.
    with policy.teacher():
        teacher = _logits(policy.model, batch)
    _sgd_step(policy, batch, lr=10.0)
    policy.head(policy.backbone_hidden(*batch)).logsumexp(-1).mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)

    base = load_causal_lm("tiny", quantization="4bit")
    base.train()  # eval + no grad would take bitsandbytes' repacked CPU kernel (other numerics)
    with torch.no_grad():
        base_logits = _logits(base, batch)
    with policy.teacher():
        teacher_after = _logits(policy.model, batch)
    torch.testing.assert_close(teacher, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(teacher_after, base_logits, rtol=0, atol=0)
    assert not torch.allclose(_logits(policy.model, batch), base_logits, atol=1e-3)
