"""Configs validate before any model loads, naming the key and the allowed values."""
import dataclasses

import pytest

from opsd_kit.config import (
    ALGORITHMS,
    ConfigError,
    TrainConfig,
    applies_to,
    eval_protocol_for,
    load_eval_profile,
    load_profile,
    model_fields,
    profile_names,
    resumable_fields,
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


def test_every_field_says_where_it_applies_whether_it_may_change_on_resume_and_whether_it_is_the_model():
    for f in dataclasses.fields(TrainConfig):
        assert set(f.metadata) == {"applies", "resumable", "model"}, f.name
        assert f.metadata["applies"] and set(f.metadata["applies"]) <= set(ALGORITHMS), f.name
    assert set(model_fields()) == {"model", "dtype", "quantization", "use_lora", "lora_r", "lora_alpha",
                                   "lora_target_modules"}
    # what changes the trained weights or the sampled rollouts may not change on resume
    assert not set(resumable_fields()) & {"algorithm", "seed", "learning_rate", "problems_per_step", "divergence",
                                          "temperature", "train_data", *model_fields()}
    assert "num_generations" in resumable_fields("opsd") and "num_generations" not in resumable_fields("grpo")


# A value other than the default for every field that does not apply to every algorithm.
SPECIFIC = {
    "max_generated_tokens": 100, "rollout_backend": "fast", "teacher_thinking": True,
    "teacher_template": "{question} {solution}", "teacher_hint": "shuffled", "max_new_tokens": 12,
    "max_target_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "generation_batch_size": 4,
    "divergence": "jsd", "jsd_beta": 0.3, "clip_tau": 0.05, "contrast_alpha": 2.0, "loss_temperature": 1.0,
    "loss_support": "truncated", "distill_topk": 5, "sampled_token_clamp": 3.0, "teacher": "live", "ema_decay": 0.9,
    "num_generations": 3, "num_iterations": 1, "ratio_clip_eps": 0.1, "scale_rewards": False, "kl_coef": 0.1,
    "grading_mode": "lenient", "loss_normalisation": "sequence", "rlsd_lambda": 0.3, "rlsd_eps": 0.1,
    "rlsd_decay_steps": 10, "rlsd_teacher": "frozen", "contrast_clip": 2.0, "sft_weight": 0.5,
    "rewards": ("correct", "format"), "reward_weights": (2.0,),
}


def test_the_specific_values_cover_every_algorithm_specific_field():
    specific = {f.name for f in dataclasses.fields(TrainConfig) if set(applies_to(f.name)) != set(ALGORITHMS)}
    assert set(SPECIFIC) == specific


@pytest.mark.parametrize("key, algorithm", [(k, a) for k in SPECIFIC for a in ALGORITHMS if a not in applies_to(k)])
def test_a_field_set_for_an_algorithm_it_does_not_apply_to_is_refused(key, algorithm):
    with pytest.raises(ConfigError) as info:
        load_profile("tiny", algorithm, **{key: SPECIFIC[key]})
    message = str(info.value)
    assert message.startswith(f"{key}={SPECIFIC[key]!r} applies to algorithm ") and "\n" not in message
    assert f"not algorithm={algorithm!r}" in message
    assert all(repr(a) in message for a in applies_to(key))


@pytest.mark.parametrize("key", list(SPECIFIC))
def test_a_field_set_for_an_algorithm_it_applies_to_is_kept(key):
    for algorithm in applies_to(key):
        companion = {"sft_weight": 0.5} if (key, algorithm) == ("max_target_tokens", "opsd") else {}
        assert getattr(load_profile("tiny", algorithm, **{key: SPECIFIC[key]}, **companion), key) == SPECIFIC[key]


def test_opsd_caps_its_sft_targets_only_with_sft_on():
    with pytest.raises(ConfigError, match="max_target_tokens=64 caps the SFT targets of OPSD [+] SFT"):
        load_profile("tiny", max_target_tokens=64)
    cfg = load_profile("tiny", sft_weight=0.5, max_target_tokens=64)
    with pytest.raises(ConfigError, match="max_target_tokens=64 = "):  # the SFT term's sequences fit too
        cfg.check_context(cfg.max_prompt_tokens + 63)
    cfg.check_context(cfg.max_prompt_tokens + max(64, cfg.max_new_tokens))


@pytest.mark.parametrize("name", profile_names())
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_profile_sets_a_field_only_for_the_algorithms_it_applies_to(name, algorithm):
    cfg = load_profile(name, algorithm)
    for f in dataclasses.fields(TrainConfig):
        if algorithm not in applies_to(f.name):
            assert getattr(cfg, f.name) == f.default, f.name


def test_a_profile_value_reaches_the_algorithms_its_field_applies_to():
    assert load_profile("paper").clip_tau == 0.05 and load_profile("paper", "grpo").clip_tau is None
    assert load_profile("cpu-demo", "grpo").temperature == load_profile("cpu-demo").temperature == 0.6
    assert load_profile("cpu-demo", "sft").temperature == TrainConfig().temperature  # SFT samples nothing


def test_profiles_include_the_paper_in_bf16_and_in_4bit():
    assert {"tiny", "cpu-demo", "paper", "paper-qlora"} <= set(profile_names())


@pytest.mark.parametrize("name", profile_names())
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_profiles_validate(name, algorithm):
    cfg = load_profile(name, algorithm)
    assert (cfg.algorithm, cfg.profile) == (algorithm, name)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # a saved config.json rebuilds the same config


def test_paper_profile_is_the_published_run_in_bf16_with_every_checkpoint_kept():
    cfg, qlora = load_profile("paper"), load_profile("paper-qlora")
    assert cfg.dtype == "bfloat16" and cfg.quantization is None  # paper-qlora is the 4-bit variant, and only that
    differing = {k for k, v in cfg.to_dict().items() if qlora.to_dict()[k] != v}
    assert differing == {"profile", "run_dir", "quantization"} and qlora.quantization == "4bit"
    assert cfg.use_lora and cfg.teacher == "frozen"  # the teacher is the initial model: the adapter off
    assert cfg.effective_loss_temperature == cfg.temperature  # both roles' logits at the rollout temperature
    # the best of the checkpoints every save_every steps can be chosen: none is deleted
    assert cfg.max_steps % cfg.save_every == 0 and cfg.keep_checkpoints >= cfg.max_steps // cfg.save_every
    cfg.check_context(40_960)  # Qwen3-1.7B's context holds the longest prompt and completion


def test_paper_grpo_follows_the_official_grpo_script():
    cfg = load_profile("paper", "grpo")
    assert (cfg.learning_rate, cfg.problems_per_step, cfg.num_generations, cfg.num_iterations) == (2e-5, 4, 8, 1)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.kl_coef) == (1.2, 1.0, 0, 0.0)
    assert (cfg.loss_normalisation, cfg.scale_rewards, cfg.max_new_tokens) == ("sequence", True, 16_000)
    assert cfg.max_steps == 2 * 29_400 // 4  # 2 epochs of 4 problems a step
    assert (cfg.grading_mode, cfg.student_prompt_format) == ("first_box_exact", "plain")
    assert cfg.student_template == "Problem: {question}\n {instruction}"


def test_paper_rlsd_follows_the_official_rlsd_script():
    cfg = load_profile("paper", "rlsd")
    assert (cfg.learning_rate, cfg.max_grad_norm, cfg.problems_per_step, cfg.num_generations) == (5e-6, 0.1, 4, 8)
    assert (cfg.num_iterations, cfg.temperature, cfg.top_p, cfg.top_k) == (2, 1.1, 0.95, 20)
    assert (cfg.max_new_tokens, cfg.max_prompt_tokens, cfg.max_steps) == (1024, 4096, 2 * 29_400 // 4)
    assert (cfg.rlsd_lambda, cfg.rlsd_eps, cfg.rlsd_decay_steps, cfg.rlsd_teacher) == (0.5, 0.2, 50, "live")
    assert (cfg.teacher_weights, cfg.loss_normalisation, cfg.kl_coef) == ("live", "sequence", 0.0)
    assert (cfg.grading_mode, cfg.student_prompt_format) == ("first_box_after_think", "chat")
    assert (cfg.student_thinking, cfg.teacher_thinking) == (None, None)  # not passed: Qwen3's default, on


def test_paper_sft_follows_the_official_sft_script():
    cfg = load_profile("paper", "sft")
    assert (cfg.learning_rate, cfg.lr_schedule, cfg.problems_per_step) == (2e-5, "linear", 64)
    assert cfg.max_steps == 4 * -(-29_400 // 64)  # 4 epochs
    assert (cfg.max_target_tokens, cfg.max_new_tokens) == (16_000, 1024)
    assert (cfg.student_prompt_format, cfg.student_template) == ("plain", "Problem: {question}\nSolution:")
    assert load_profile("paper").max_target_tokens is None  # no meaning outside SFT
    cfg.check_context(40_960)  # Qwen3-1.7B
    with pytest.raises(ConfigError, match="max_target_tokens=16000"):
        cfg.check_context(16_000)


def _paper_dicts():
    """The ``dict(...)`` calls of config.py that define `paper` values: the profile and each
    algorithm's `paper` overrides, as (label, ast.Call)."""
    import ast
    import inspect

    import opsd_kit.config as config_module

    source = inspect.getsource(config_module)
    found = []
    for node in ast.parse(source).body:
        target = node.targets[0].id if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) else \
            node.target.id if isinstance(node, ast.AnnAssign) else None
        if target not in ("_PROFILES", "_ALGORITHM_OVERRIDES"):
            continue
        outer = node.value
        inner = [outer] if target == "_PROFILES" else [v for v in outer.values if isinstance(v, ast.Dict)]
        for d in inner:
            for key, value in zip(d.keys, d.values):
                if isinstance(key, ast.Constant) and key.value == "paper" and isinstance(value, ast.Call):
                    found.append((f"{target}: {ast.get_source_segment(source, d)[:30]!r}", value))
    return source.splitlines(), found


#: What a `paper` value's comment names: the paper ("v3"), an official script or module (".sh", ".py"),
#: TRL's default the official scripts inherit, the official README, or the kit's own choice.
PAPER_SOURCE_TAGS = ("v3", ".sh", ".py", "TRL", "official", "kit")


def test_every_paper_value_names_its_source():
    """Each keyword of a `paper` dict has a comment on its line or just above it (its source:
    the paper's section or the official file and line, or why the kit differs)."""
    lines, dicts = _paper_dicts()
    assert len(dicts) == 4  # the profile, and the GRPO, RLSD and SFT overrides (OPSD has none)
    for label, call in dicts:
        for kw in call.keywords:
            comment = lines[kw.value.lineno - 1].partition("#")[2]
            above = kw.value.lineno - 2
            while lines[above].strip().startswith("#"):  # and the comment block just above
                comment, above = lines[above] + comment, above - 1
            assert any(tag in comment for tag in PAPER_SOURCE_TAGS), f"{label}: {kw.arg} names no source: {comment!r}"


def test_rlsd_teacher_is_live_by_default_and_frozen_on_request():
    assert load_profile("tiny", "rlsd").teacher_weights == "live"
    assert load_profile("tiny", "rlsd", rlsd_teacher="frozen").teacher_weights == "frozen"
    assert load_profile("tiny", "opsd").teacher_weights == "frozen"
    with pytest.raises(ConfigError, match="teacher='ema' applies to algorithm 'opsd', not algorithm='rlsd'"):
        load_profile("tiny", "rlsd", teacher="ema")  # OPSD's knob: refused, not ignored


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
    assert protocol.benchmarks == ("HuggingFaceH4/aime_2024", "yentinglin/aime_2025", "MathArena/hmmt_feb_2025")
    assert (protocol.student_prompt_format, protocol.student_template) == ("chat", "{question}\n\n{instruction}")


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
    ({"rlsd_lambda": 0.3}, "rlsd_lambda"),  # an RLSD knob with OPSD
    ({"loss_support": "truncated", "divergence": "topk"}, "loss_support"),
    ({"max_target_tokens": 0}, "max_target_tokens"),
    ({"rlsd_lambda": 1.5}, "rlsd_lambda"),
    ({"rlsd_eps": 1.0}, "rlsd_eps"),
    ({"rlsd_decay_steps": 1.5}, "rlsd_decay_steps"),
    ({"rlsd_teacher": "ema"}, "rlsd_teacher"),
    ({"loss_normalisation": "batch"}, "loss_normalisation"),
    ({"student_prompt_format": "raw"}, "student_prompt_format"),
    ({"grading_mode": "first_box"}, "grading_mode"),
    ({"profile": "paper-8bit"}, "profile"),
    ({"contrast_clip": 0.0}, "contrast_clip"),
    ({"sft_weight": -1.0}, "sft_weight"),
    ({"rewards": ["nope"]}, "rewards"),
    ({"reward_weights": [float("nan")]}, "reward_weights"),
    ({"init_adapter": "runs/warmup", "use_lora": False, "teacher": "live"}, "init_adapter"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_profile("tiny", **overrides)


def test_new_fields_come_from_the_command_line_and_are_off_by_default():
    from opsd_kit.apps.cli import parse_overrides

    default = load_profile("cpu-demo", "grpo")
    assert (default.rewards, default.reward_weights, default.init_adapter, default.sft_weight) == (
        ("correct",), (), None, 0.0)
    config = load_profile("tiny", "grpo", **parse_overrides(
        ["init_adapter=runs/warmup", 'rewards=["correct_lenient", "format"]', "reward_weights=[1, 0.2]"]))
    assert (config.init_adapter, config.rewards, config.reward_weights) == (
        "runs/warmup", ("correct_lenient", "format"), (1, 0.2))


@pytest.mark.parametrize("algorithm", ["grpo", "rlsd"])
def test_group_algorithms_need_a_group(algorithm):
    with pytest.raises(ConfigError, match=f"num_generations must be >= 2 for {algorithm}"):
        load_profile("tiny", algorithm, num_generations=1)


def test_rlsd_frozen_teacher_needs_the_adapter():
    with pytest.raises(ConfigError, match=r"rlsd_teacher='frozen' needs a LoRA adapter \(use_lora=True\)"):
        load_profile("tiny", "rlsd", use_lora=False, rlsd_teacher="frozen")
    assert load_profile("tiny", "rlsd", use_lora=False).teacher_weights == "live"


def test_grpo_kl_penalty_needs_the_adapter():
    with pytest.raises(ConfigError, match="kl_coef=0.1 needs use_lora=True"):
        load_profile("tiny", "grpo", use_lora=False, kl_coef=0.1)
    assert load_profile("tiny", "grpo", use_lora=False).kl_coef == 0.0  # full fine-tuning without the penalty


def test_live_teacher_without_lora_is_an_explicit_choice():
    """Without LoRA the default frozen teacher is refused, naming the way out; the live teacher,
    chosen explicitly, validates."""
    assert load_profile("tiny").teacher == "frozen"
    with pytest.raises(ConfigError, match="choose teacher='live' explicitly"):
        load_profile("tiny", use_lora=False)
    load_profile("tiny", use_lora=False, teacher="live").validate()


def test_batch_must_divide_over_processes():
    cfg = load_profile("tiny", problems_per_step=3)
    assert cfg.check_world(1) == 3
    with pytest.raises(ConfigError, match="problems_per_step=3"):
        cfg.check_world(2)
