"""Configs validate before any model loads, naming the key and the allowed values."""
import dataclasses

import pytest

from opsd_kit.config import ConfigError, TrainConfig, load_profile, profile_names


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import opsd_kit.config as module

    tree = ast.parse(inspect.getsource(module.TrainConfig))
    body = tree.body[0].body
    documented = {body[i].target.id for i in range(len(body) - 1)
                  if isinstance(body[i], ast.AnnAssign) and isinstance(body[i + 1], ast.Expr)}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= documented


@pytest.mark.parametrize("name", profile_names())
@pytest.mark.parametrize("algorithm", ["opsd", "grpo", "sft"])
def test_profiles_validate(name, algorithm):
    cfg = load_profile(name, algorithm)
    assert cfg.algorithm == algorithm


def test_paper_profile_matches_the_papers_v3_settings():
    cfg = load_profile("paper")
    assert (cfg.model, cfg.quantization, cfg.lora_r, cfg.lora_alpha) == ("Qwen/Qwen3-1.7B", "4bit", 64, 128)
    assert (cfg.learning_rate, cfg.max_grad_norm, cfg.problems_per_step, cfg.max_steps) == (5e-6, 0.1, 32, 100)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens) == (1.1, 0.95, 20, 1024)
    assert (cfg.divergence, cfg.teacher, cfg.clip_tau) == ("forward_kl", "frozen", 0.05)
    assert (cfg.student_thinking, cfg.teacher_thinking) == (False, True)
    assert cfg.effective_loss_temperature == 1.1
    grpo = load_profile("paper", "grpo")
    assert (grpo.num_generations, grpo.temperature, grpo.kl_coef, grpo.num_iterations) == (8, 1.2, 0.0, 2)


@pytest.mark.parametrize("overrides, key", [
    ({"lerning_rate": 1.0}, "learning_rate"),  # unknown key, with a suggestion
    ({"jsd_beta": 1.5}, "jsd_beta"),
    ({"clip_tau": 0.0}, "clip_tau"),
    ({"divergence": "kl"}, "divergence"),
    ({"teacher": "frozen", "use_lora": False}, "use_lora"),
    ({"rollout_backend": "vllm", "quantization": "4bit"}, "vllm"),
    ({"quantization": "8bit"}, "quantization"),
    ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"top_p": 0.0}, "top_p"),
    ({"trackers": ["mlflow"]}, "trackers"),
    ({"kl_coef": 0.1}, "kl_coef"),
    ({"loss_support": "truncated", "divergence": "topk"}, "loss_support"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_profile("tiny", **overrides)


def test_live_teacher_without_lora_is_an_explicit_choice():
    cfg = load_profile("tiny", use_lora=False, teacher="live")
    assert cfg.teacher == "live"


def test_batch_must_divide_over_processes():
    cfg = load_profile("tiny", problems_per_step=3)
    assert cfg.check_world(1) == 3
    with pytest.raises(ConfigError, match="problems_per_step=3"):
        cfg.check_world(2)
