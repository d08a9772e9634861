"""Configs validate before any model loads, naming the key and the allowed values."""
import dataclasses

import pytest

from opsd_kit.config import (
    ALGORITHMS,
    ConfigError,
    TrainConfig,
    eval_protocol_for,
    load_eval_profile,
    load_profile,
    profile_names,
)


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import opsd_kit.config as module

    tree = ast.parse(inspect.getsource(module.TrainConfig))
    body = tree.body[0].body
    documented = {body[i].target.id for i in range(len(body) - 1)
                  if isinstance(body[i], ast.AnnAssign) and isinstance(body[i + 1], ast.Expr)}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= documented


def test_profiles_include_the_paper_in_bf16_and_in_4bit():
    assert {"tiny", "cpu-demo", "paper", "paper-qlora"} <= set(profile_names())


@pytest.mark.parametrize("name", profile_names())
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_profiles_validate(name, algorithm):
    cfg = load_profile(name, algorithm)
    assert (cfg.algorithm, cfg.profile) == (algorithm, name)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # a saved config.json rebuilds the same config


def test_paper_profile_matches_the_published_setting():
    cfg = load_profile("paper")
    assert (cfg.model, cfg.dtype, cfg.quantization) == ("Qwen/Qwen3-1.7B", "bfloat16", None)  # bf16, not quantised
    assert (cfg.lora_r, cfg.lora_alpha, cfg.use_lora, cfg.teacher) == (64, 128, True, "frozen")
    assert set(cfg.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}
    assert (cfg.train_data, cfg.problems_per_step, cfg.max_steps) == ("siyanzhao/Openthoughts_math_30k_opsd", 32, 100)
    assert (cfg.save_every, cfg.keep_checkpoints) == (25, 4)  # the best of every 25-step checkpoint can be chosen
    assert (cfg.learning_rate, cfg.max_grad_norm) == (2e-4, 1.0)  # scripts/run_opsd_1b.sh; TRL's default norm
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens) == (1.1, 0.95, 20, 1024)
    assert (cfg.divergence, cfg.clip_tau) == ("forward_kl", 0.05)
    assert (cfg.student_thinking, cfg.teacher_thinking) == (False, True)
    assert cfg.effective_loss_temperature == 1.1


@pytest.mark.parametrize("algorithm", ["grpo", "rlsd"])
def test_paper_grpo_and_rlsd_follow_the_official_grpo_script(algorithm):
    cfg = load_profile("paper", algorithm)
    assert (cfg.num_generations, cfg.temperature, cfg.kl_coef, cfg.num_iterations) == (8, 1.2, 0.0, 2)
    assert (cfg.scale_rewards, cfg.grading_mode, cfg.max_steps, cfg.keep_checkpoints) == (True, "strict", 500, 20)
    assert cfg.learning_rate == 1e-6  # TRL GRPOConfig's default (to be checked against scripts/run_grpo.sh)
    if algorithm == "rlsd":
        assert (cfg.rlsd_lambda, cfg.rlsd_eps, cfg.rlsd_decay_steps) == (0.5, 0.2, 50)


def test_paper_sft_targets_are_capped_at_the_official_sft_length_not_the_rollout_cap():
    cfg = load_profile("paper", "sft")
    assert (cfg.max_target_tokens, cfg.max_new_tokens) == (16_384, 1024)
    assert load_profile("paper").max_target_tokens is None  # no meaning outside SFT
    cfg.check_context(40_960)  # Qwen3-1.7B
    with pytest.raises(ConfigError, match="max_target_tokens=16384"):
        cfg.check_context(16_384)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_paper_qlora_is_the_paper_in_4bit(algorithm):
    paper, qlora = load_profile("paper", algorithm), load_profile("paper-qlora", algorithm)
    assert (paper.quantization, qlora.quantization) == (None, "4bit")
    differ = {"quantization", "run_dir", "profile"}
    assert {k: v for k, v in paper.to_dict().items() if k not in differ} == \
        {k: v for k, v in qlora.to_dict().items() if k not in differ}


@pytest.mark.parametrize("name", ["paper", "paper-qlora"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_paper_run_is_evaluated_with_the_papers_protocol(name, algorithm):
    protocol = eval_protocol_for(load_profile(name, algorithm))
    assert protocol == load_eval_profile(name) == load_eval_profile("paper")
    assert (protocol.student_thinking, protocol.temperature, protocol.top_p, protocol.k) == (True, 1.0, 0.95, 12)
    assert (protocol.max_new_tokens, protocol.mode) == (38_912, "strict")
    assert protocol.benchmarks == ("HuggingFaceH4/aime_2024", "math-ai/aime25", "MathArena/hmmt_feb_2025")


def test_each_profile_has_its_evaluation_protocol():
    for name in profile_names():
        assert eval_protocol_for(load_profile(name)) == load_eval_profile(name)
    assert eval_protocol_for(load_profile("cpu-demo")).student_thinking is None  # the demo is not the paper
    with pytest.raises(ConfigError, match="profile=None"):
        eval_protocol_for(TrainConfig())
    with pytest.raises(ConfigError, match="unknown evaluation profile 'paper-8bit'"):
        load_eval_profile("paper-8bit")


def test_the_cpu_demo_rolls_out_and_evaluates_with_the_fast_engine():
    assert load_profile("cpu-demo").rollout_backend == "fast"
    assert load_profile("cpu-demo", rollout_backend="hf").rollout_backend == "hf"  # the reference, one setting away
    assert load_eval_profile("cpu-demo").engine == "fast" and load_eval_profile("cpu-demo", engine="hf").engine == "hf"
    with pytest.raises(ConfigError, match="engine='vllm' is not allowed"):
        load_eval_profile("cpu-demo", engine="vllm")


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
    ({"max_target_tokens": 0}, "max_target_tokens"),
    ({"rlsd_lambda": 1.5}, "rlsd_lambda"),
    ({"rlsd_eps": 1.0}, "rlsd_eps"),
    ({"rlsd_decay_steps": 0}, "rlsd_decay_steps"),
    ({"profile": "paper-8bit"}, "profile"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_profile("tiny", **overrides)


@pytest.mark.parametrize("algorithm", ["grpo", "rlsd"])
def test_group_algorithms_need_a_group(algorithm):
    with pytest.raises(ConfigError, match=f"num_generations must be >= 2 for {algorithm}"):
        load_profile("tiny", algorithm, num_generations=1)


def test_rlsd_frozen_teacher_needs_the_adapter():
    with pytest.raises(ConfigError, match="use_lora=True"):
        load_profile("tiny", "rlsd", use_lora=False)


def test_live_teacher_without_lora_is_an_explicit_choice():
    cfg = load_profile("tiny", use_lora=False, teacher="live")
    assert cfg.teacher == "live"


def test_batch_must_divide_over_processes():
    cfg = load_profile("tiny", problems_per_step=3)
    assert cfg.check_world(1) == 3
    with pytest.raises(ConfigError, match="problems_per_step=3"):
        cfg.check_world(2)
