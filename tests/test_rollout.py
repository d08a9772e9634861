"""Rollouts: stop tokens, trimming, which distribution is sampled, and the merged-LoRA engine."""
import pytest
import torch

from opsd_kit.rollout import FastEngine, GenerationSettings, _eos_ids, _trim, generate


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


@pytest.fixture()
def lora_policy(tiny_model, tiny_tokenizer):
    """A tiny LoRA policy whose adapter is not a no-op (peft initialises lora_B to zero)."""
    from opsd_kit.policy import LoraSettings, Policy

    policy = Policy(tiny_model, tiny_tokenizer, lora=LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return policy


def _weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def test_fast_greedy_equals_generate(lora_policy, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, n=1)
    hf = generate(lora_policy.model, tiny_tokenizer, PROMPTS, settings)
    with lora_policy.model.disable_adapter():  # the adapter changes the greedy tokens, so merging matters
        base = generate(lora_policy.model, tiny_tokenizer, PROMPTS, settings)
    fast = FastEngine(lora_policy.model, tiny_tokenizer).generate(PROMPTS, settings)
    assert fast.completion_ids == hf.completion_ids != base.completion_ids
    assert fast.finished == hf.finished


def test_fast_restores_weights_bit_for_bit(lora_policy, tiny_tokenizer, monkeypatch):
    import opsd_kit.rollout as rollout

    engine = FastEngine(lora_policy.model, tiny_tokenizer)
    before = _weights(lora_policy.model)
    engine.generate(PROMPTS, GenerationSettings(max_new_tokens=5, temperature=1.0), seed=0)
    after = _weights(lora_policy.model)
    assert all(torch.equal(before[n], after[n]) for n in before)

    def fail(model, *args, **kwargs):
        merged = _weights(model)
        assert any(not torch.equal(before[n], merged[n]) for n in before)  # it did sample merged
        raise RuntimeError("boom")

    monkeypatch.setattr(rollout, "generate", fail)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(PROMPTS, GenerationSettings(max_new_tokens=5))
    after = _weights(lora_policy.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(getattr(m, "merged", False) for m in lora_policy.model.modules())


def test_fast_sampled_logprobs_match_the_unmerged_student(lora_policy, tiny_tokenizer):
    temperature = 0.7
    settings = GenerationSettings(max_new_tokens=10, temperature=temperature, n=2)
    out = FastEngine(lora_policy.model, tiny_tokenizer).generate(PROMPTS, settings, seed=1, logprobs=True)
    model = lora_policy.model.eval()
    worst = 0.0
    for pi, completion, sampled in zip(out.prompt_index, out.completion_ids, out.logprobs):
        prompt = PROMPTS[pi]
        with torch.no_grad():
            logits_TV = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
        scores_CV = logits_TV[len(prompt) - 1:-1] / temperature
        student_C = torch.log_softmax(scores_CV, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert len(sampled) == len(completion)
        worst = max(worst, float((student_C - torch.tensor(sampled)).abs().max()))
    assert worst < 1e-3


def test_fast_with_4bit_is_refused():
    from opsd_kit.config import ConfigError, load_profile

    with pytest.raises(ConfigError, match="rollout_backend='fast'.*quantization='4bit'"):
        load_profile("tiny", rollout_backend="fast", quantization="4bit")


def test_trainer_uses_the_fast_engine(tmp_path):
    from opsd_kit.config import load_profile
    from opsd_kit.rollout import FastEngine
    from opsd_kit.trainer import Trainer

    trainer = Trainer(load_profile("tiny", run_dir=str(tmp_path), progress=False, max_steps=2, rollout_backend="fast"))
    base = {n: p.detach().clone() for n, p in trainer.policy.causal_lm.named_parameters() if "lora_" not in n}
    trainer.train()
    assert isinstance(trainer.algorithm.sampler._engine, FastEngine)
    after = dict(trainer.policy.causal_lm.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)
