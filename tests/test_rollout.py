"""Rollouts: stop tokens, trimming, which distribution is sampled, and the merged-LoRA engine."""
import pytest
import torch

from opsd_kit.rollout.hf import GenerationSettings, _eos_ids, _trim, generate


class _Tok:
    def __init__(self, eos, pad):
        self.eos_token_id, self.pad_token_id = eos, pad


class _Model:
    def __init__(self, eos):
        self.generation_config = type("G", (), {"eos_token_id": eos})()


def test_pad_equal_to_an_eos_still_stops_rows():
    """Qwen3-Base: pad = <|endoftext|> is also a generation EOS; it must still end a row."""
    eos = _eos_ids(_Model([151645, 151643]), _Tok(151643, 151643))
    assert eos == [151643, 151645]
    assert _trim([1, 2, 151643, 151643, 151643], eos) == ([1, 2, 151643], True)
    assert _trim([1, 2, 3], eos) == ([1, 2, 3], False)  # never stopped: nothing removed


def test_model_generation_config_extras_do_not_change_rollouts(tiny_model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, n=2)
    prompts = [[5, 6, 7, 8], [9, 10]]
    plain = generate(tiny_model, tiny_tokenizer, prompts, settings, seed=3).completion_ids
    tiny_model.generation_config.repetition_penalty = 1.3
    tiny_model.generation_config.no_repeat_ngram_size = 2
    assert generate(tiny_model, tiny_tokenizer, prompts, settings, seed=3).completion_ids == plain


def test_rollouts_are_seeded_and_books_tokens(tiny_model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, n=3, batch_size=4)
    a = generate(tiny_model, tiny_tokenizer, [[5, 6], [7, 8, 9]], settings, seed=1)
    b = generate(tiny_model, tiny_tokenizer, [[5, 6], [7, 8, 9]], settings, seed=1)
    assert a.completion_ids == b.completion_ids and a.prompt_index == [0, 0, 0, 1, 1, 1]
    assert a.num_generated_tokens == sum(len(c) for c in a.completion_ids) <= 6 * 6
    tiny_model.train()
    generate(tiny_model, tiny_tokenizer, [[5]], settings, seed=0)
    assert tiny_model.training


def test_models_that_post_process_logits_are_refused(tiny_tokenizer):
    import pytest

    from opsd_kit.models import load_causal_lm
    from opsd_kit.policy import Policy

    model = load_causal_lm("tiny")
    model.config.final_logit_softcapping = 30.0
    modules = [name for name, _ in model.named_modules()]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        Policy(model, tiny_tokenizer, gradient_checkpointing=True)
    # refused before the model was touched: no LoRA layers injected, nothing frozen, no checkpointing
    assert [name for name, _ in model.named_modules()] == modules
    assert [name for name, p in model.named_parameters() if p.requires_grad] == trainable
    assert not model.is_gradient_checkpointing


# The "fast" engine's tokens, log-probabilities and weights: tests/test_fused_decoder.py.


def test_fast_with_4bit_is_refused():
    from opsd_kit.config import ConfigError, load_profile

    with pytest.raises(ConfigError, match="rollout_backend='fast'.*quantization='4bit'"):
        load_profile("tiny", rollout_backend="fast", quantization="4bit")


def test_the_engines_refuse_in_the_words_of_the_config(tiny_model, tiny_tokenizer, monkeypatch):
    """One statement of each backend rule: an engine built anyway says what `validate` says before
    any model loads. (The fast engine also samples a model without an adapter, for evaluation;
    training with it needs one, a rule of the config alone.)"""
    from opsd_kit.config import ConfigError, load_profile
    from opsd_kit.rollout.fast import FastEngine
    from opsd_kit.rollout.vllm_engine import VLLMEngine

    monkeypatch.setattr(tiny_model, "is_loaded_in_4bit", True, raising=False)  # what bitsandbytes sets
    cases = [({"rollout_backend": "fast", "quantization": "4bit"}, lambda: FastEngine(tiny_model, tiny_tokenizer)),
             ({"rollout_backend": "vllm", "quantization": "4bit"}, lambda: VLLMEngine("tiny", quantization="4bit"))]
    for overrides, build in cases:
        with pytest.raises(ConfigError) as config_error:
            load_profile("tiny", **overrides)
        with pytest.raises(ValueError) as engine_error:
            build()
        assert str(engine_error.value) == str(config_error.value)


def test_trainer_uses_the_fast_engine(tmp_path):
    from opsd_kit.config import load_profile
    from opsd_kit.rollout.fast import FastEngine
    from opsd_kit.trainer import Trainer

    trainer = Trainer(load_profile("tiny", run_dir=str(tmp_path), progress=False, max_steps=2, rollout_backend="fast"))
    base = {n: p.detach().clone() for n, p in trainer.policy.causal_lm.named_parameters() if "lora_" not in n}
    trainer.train()
    assert isinstance(trainer.algorithm.sampler._engine, FastEngine)
    assert trainer.algorithm.sampler._engine.fallback is None  # the fused decoder sampled
    after = dict(trainer.policy.causal_lm.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)
