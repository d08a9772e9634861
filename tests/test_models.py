"""Model resolution: tiny built in code, the bundled SmolLM2 offline, clear errors otherwise."""
import os
import subprocess
import sys

import pytest
import torch

from opsd_kit import models


def test_tiny_is_small_and_has_more_logits_than_tokens(tiny_tokenizer, tiny_model):
    n_params = sum(p.numel() for p in tiny_model.parameters())
    assert 50_000 < n_params < 1_000_000
    assert tiny_model.config.vocab_size > len(tiny_tokenizer)  # like Qwen (docs/algorithm.md, Pitfalls, 4)
    assert tiny_tokenizer.pad_token == "<|endoftext|>" != tiny_tokenizer.eos_token
    text = "héllo ∑ 42"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text  # byte level: lossless


def test_two_processes_building_the_cache_at_once_leave_one_good_folder(tmp_path):
    code = "from opsd_kit.models import resolve_model_path; print(resolve_model_path('tiny'))"
    env = dict(os.environ, OPSD_KIT_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["tiny-qwen2-v1"]  # no temporaries left
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(outs[0])


def test_missing_hub_model_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailableError, match="huggingface-cli download"):
        models.load_tokenizer("nobody-here/not-a-model-xyz")


def test_bad_names_and_settings():
    with pytest.raises(ValueError, match="non-empty"):
        models.resolve_model_path("")
    with pytest.raises(ValueError, match="quantization"):
        models.load_causal_lm("tiny", quantization="8bit")
    with pytest.raises(ValueError, match="dtype"):
        models.load_causal_lm("tiny", dtype="float8")


@pytest.mark.slow
def test_bundled_smollm2_answers_a_gsm8k_question_offline():
    from opsd_kit.data.sources import load_builtin
    from opsd_kit.prompts import PromptBuilder
    from opsd_kit.rollout.hf import GenerationSettings, generate

    tokenizer = models.load_tokenizer(models.BUNDLED)
    model = models.load_causal_lm(models.BUNDLED)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    problem = load_builtin("gsm8k", "test", limit=1, seed=0)[0][0]
    prompt = PromptBuilder(tokenizer).student_ids(problem)
    assert tokenizer.decode(prompt).startswith("<|im_start|>system")  # SmolLM2's chat template
    out = generate(model, tokenizer, [prompt], GenerationSettings(max_new_tokens=48, temperature=0.0))
    answer = out.texts[0]
    assert len(answer.split()) >= 5 and "<|im_" not in answer  # a real, decoded answer
    again = generate(model, tokenizer, [prompt], GenerationSettings(max_new_tokens=48, temperature=0.0))
    assert again.completion_ids == out.completion_ids  # greedy is deterministic
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits
    assert torch.isfinite(logits).all()
