"""Bad configuration: every invalid setting fails before any model loads (the `no_model_loads`
fixture fails the test if weights load), with a ConfigError naming the key and what is allowed."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from _faults import tiny_config

from opsd_kit.config import ALGORITHMS, ConfigError, TrainConfig, load_profile
from opsd_kit.data.problems import Problem
from opsd_kit.trainer import Trainer

# (overrides, fragments the message must contain: the key and the allowed values)
BAD = [
    ({"lerning_rate": 1e-3}, ["'lerning_rate'", "did you mean 'learning_rate'"]),
    ({"jsd_bta": 0.5}, ["'jsd_bta'", "did you mean 'jsd_beta'"]),
    ({"jsd_beta": 1.5}, ["jsd_beta=1.5", "in [0, 1]"]),
    ({"jsd_beta": -0.1}, ["jsd_beta=-0.1", "in [0, 1]"]),
    ({"clip_tau": 0.0}, ["clip_tau=0.0", "None or > 0"]),
    ({"clip_tau": -0.05}, ["clip_tau=-0.05", "None or > 0"]),
    ({"teacher": "frozen", "use_lora": False}, ["teacher='frozen'", "use_lora=True", "teacher='live'"]),
    ({"rollout_backend": "vllm", "quantization": "4bit"}, ["rollout_backend='vllm'", "quantization", "'hf'"]),
    ({"divergence": "kl"}, ["divergence='kl'", "forward_kl", "reverse_kl", "jsd"]),
    ({"teacher": "ema2"}, ["teacher='ema2'", "frozen", "live", "ema"]),
    ({"micro_batch_size": 0}, ["micro_batch_size", ">= 1"]),
    ({"problems_per_step": -4}, ["problems_per_step", ">= 1"]),
    ({"max_new_tokens": 0}, ["max_new_tokens", ">= 1"]),
    ({"jsd_beta": "0.5"}, ["jsd_beta='0.5'", "float"]),  # a string from a config file or --set
    ({"max_steps": 2.5}, ["max_steps=2.5", "int"]),
    ({"use_lora": "yes"}, ["use_lora='yes'", "bool"]),
    ({"learning_rate": 0.0}, ["learning_rate=0.0", "> 0"]),
    ({"temperature": 0}, ["temperature=0", "> 0"]),
    ({"trackers": ["mlflow"]}, ["trackers", "'mlflow'", "tensorboard", "wandb"]),
    ({"max_nonfinite_steps": 0}, ["max_nonfinite_steps", ">= 1"]),
    ({"teacher_template": "{question}\n{instruction}"}, ["teacher_template", "{solution}"]),
    ({"student_template": "{instruction}"}, ["student_template", "{question}"]),
    ({"teacher_template": "{question} {solution} \\boxed{}"}, ["teacher_template", "'{{'"]),
    ({"teacher_hint": "wrong"}, ["teacher_hint='wrong'", "reference", "shuffled"]),
    ({"divergence": "hint_contrast", "teacher_hint": "shuffled"}, ["hint_contrast", "teacher_hint='reference'"]),
    ({"contrast_alpha": 0.0}, ["contrast_alpha=0.0", "> 0"]),
    ({"rlsd_lambda": 0.3}, ["rlsd_lambda=0.3", "'rlsd'", "algorithm='opsd'", "default 0.5"]),  # an RLSD knob
    ({"kl_coef": 0.1}, ["kl_coef=0.1", "'grpo' or 'rlsd'", "algorithm='opsd'"]),
]


def _ids(case):
    return "-".join(f"{k}={v}" for k, v in case[0].items())


@pytest.mark.parametrize("overrides, fragments", BAD, ids=[_ids(c) for c in BAD])
def test_invalid_config_fails_naming_key_and_allowed_values(overrides, fragments, no_model_loads):
    with pytest.raises(ConfigError) as info:
        load_profile("tiny", **overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


KNOWN_KEYS = [c for c in BAD if "lerning_rate" not in c[0] and "jsd_bta" not in c[0]]


@pytest.mark.parametrize("overrides, fragments", KNOWN_KEYS, ids=[_ids(c) for c in KNOWN_KEYS])
def test_trainer_revalidates_a_config_changed_after_loading(tmp_path, overrides, fragments, no_model_loads):
    cfg = tiny_config(tmp_path)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError) as info:
        Trainer(cfg)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_key_from_the_command_line_and_from_a_file(no_model_loads, capsys):
    from opsd_kit.apps.cli import main

    assert main(["train", "--profile", "tiny", "--set", "max_step=3"]) == 2  # one line on stderr, no traceback
    assert "unknown config key 'max_step'; did you mean 'max_steps'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown config key 'betaa'"):
        TrainConfig.from_dict(json.loads('{"algorithm": "opsd", "betaa": 0.5}'))


def test_lengths_over_the_models_context_fail_before_the_weights_load(tmp_path, no_model_loads):
    # The tiny model's max_position_embeddings is 2048; read from its config file, not its weights.
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config(tmp_path, max_prompt_tokens=2040, max_new_tokens=16))
    message = str(info.value)
    for fragment in ("max_prompt_tokens=2040", "max_new_tokens=16", "2056", "2048", "max_position_embeddings"):
        assert fragment in message, message
    for algorithm in ("grpo", "rlsd", "sft"):  # SFT generates nothing: its targets are capped by max_target_tokens
        cap = "max_target_tokens" if algorithm == "sft" else "max_new_tokens"
        with pytest.raises(ConfigError, match=f"{cap}=1025 = 2049 exceeds the model's context of 2048"):
            Trainer(tiny_config(tmp_path, algorithm, max_prompt_tokens=1024, **{cap: 1025}))


@pytest.mark.parametrize("algorithm, overrides", [("sft", {}), ("opsd", {"sft_weight": 0.5})])
def test_solutions_beyond_the_context_fail_before_the_weights_load(tmp_path, no_model_loads, algorithm, overrides):
    long = Problem(id="long", question="1 + 1?", solution="two " * 2100 + "\\boxed{2}", answer="2", source="test")
    with pytest.raises(ConfigError, match="max_target_tokens=None: 1 reference solutions .*'long'"):
        Trainer(tiny_config(tmp_path, algorithm, max_target_tokens=None, **overrides), problems=[long])


def test_lengths_that_fit_exactly_are_accepted():
    cfg = load_profile("tiny", max_prompt_tokens=2036, max_new_tokens=12)
    cfg.check_context(2048)
    with pytest.raises(ConfigError):
        cfg.check_context(2047)
    cfg.check_context(None)  # unknown context: no check


def test_context_is_read_from_a_given_policy(tmp_path):
    from opsd_kit.trainer import _context_length

    trainer = Trainer(tiny_config(tmp_path, max_steps=1))
    assert _context_length(trainer.config, trainer.policy)[0] == 2048
    with pytest.raises(ConfigError, match="2048"):
        Trainer(tiny_config(tmp_path, max_prompt_tokens=2048), policy=trainer.policy)


def test_empty_dataset_fails_before_the_model_loads(tmp_path, no_model_loads):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"train_data='.*empty.jsonl' gave no problems: the dataset is empty"):
        Trainer(tiny_config(tmp_path, train_data=str(empty)))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n   \n")
    with pytest.raises(ConfigError, match="the dataset is empty"):
        Trainer(tiny_config(tmp_path, train_data=str(blank)))
    with pytest.raises(ConfigError, match=r"problems=\[\] gave no problems"):
        Trainer(tiny_config(tmp_path), problems=[])


def test_batch_that_does_not_divide_over_processes_fails_before_the_model_loads(tmp_path, no_model_loads):
    two_processes = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True,
                                    device=SimpleNamespace(type="cpu"), distributed_type="MULTI_CPU",
                                    mixed_precision="no")
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config(tmp_path, problems_per_step=3), accelerator=two_processes)
    assert "problems_per_step=3" in str(info.value) and "multiple of 2" in str(info.value)


def test_every_profile_passes_the_context_check():
    """The shipped profiles fit their models (checked against the known context lengths)."""
    contexts = {"tiny": 2048, "smollm2-135m-instruct": 8192, "Qwen/Qwen3-1.7B": 40960}
    from opsd_kit.config import profile_names

    for name in profile_names():
        for algorithm in ALGORITHMS:
            cfg = load_profile(name, algorithm)
            cfg.check_context(contexts[cfg.model])


def test_duplicate_problem_ids_passed_directly_are_refused(tmp_path, no_model_loads):
    twice = [Problem(id="same", question="1+1?", solution="2", answer="2", source="x")] * 2
    with pytest.raises(ConfigError, match="'same' appears 2 times"):
        Trainer(load_profile("tiny", run_dir=str(tmp_path)), problems=twice)


@pytest.mark.parametrize("overrides, key", [({"teacher_hint": "shuffled"}, "teacher_hint='shuffled'"),
                                            ({"divergence": "hint_contrast"}, "divergence='hint_contrast'")])
def test_a_wrong_hint_needs_two_different_answers_before_the_model_loads(tmp_path, overrides, key, no_model_loads):
    same = [Problem(id=f"p{i}", question=f"{i} + 0?", solution="\\boxed{4}", answer="4", source="x")
            for i in range(3)]
    with pytest.raises(ConfigError, match="problem 'p0'") as info:
        Trainer(tiny_config(tmp_path, **overrides), problems=same)
    assert key in str(info.value) and "different answers" in str(info.value)
    with pytest.raises(ConfigError, match=r"only 1 problem \('p0'\)"):
        Trainer(tiny_config(tmp_path, **overrides), problems=same[:1])


def test_a_shuffled_hint_is_for_opsd_only(no_model_loads):
    with pytest.raises(ConfigError, match="teacher_hint='shuffled'.*algorithm='sft'"):
        load_profile("tiny", "sft", teacher_hint="shuffled")


@pytest.mark.parametrize("model, fragment", [
    ("/nonexistent", "model '/nonexistent': no such folder"),
    ("./models/mine", "model './models/mine': no such folder"),
    ("org/name/extra", "no such folder"),
    ("org/two words", "neither a folder nor a hub id"),
])
def test_a_model_that_names_nothing_is_one_line_before_any_data_or_model_loads(tmp_path, model, fragment,
                                                                               no_model_loads, capsys):
    from opsd_kit.apps.cli import main

    assert main(["train", "--profile", "tiny", "--set", f"model={model}", f"run_dir={tmp_path / 'run'}",
                 "train_data=/no/such/data.jsonl"]) == 2  # the model is named before the data is read
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err and "a local folder holding config.json" in err and "'org/name'" in err
    assert "huggingface-cli" not in err


def test_a_folder_without_a_model_is_named(tmp_path, no_model_loads):
    from opsd_kit.models import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match=r"holds no config.json, so no model"):
        Trainer(tiny_config(tmp_path / "run", model=str(tmp_path)))
