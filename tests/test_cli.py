"""The `opsd-kit` command: train, eval, compare and profiles on the tiny model; config and data
errors print one line and exit 2."""
import json

import pytest

from opsd_kit.apps.cli import main

EVAL = ["--eval-profile", "tiny", "--data", "reasoning_gym:chain_sum", "--set", "size=6"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two finished tiny runs, opsd and sft, trained through the command line."""
    root = tmp_path_factory.mktemp("cli")
    runs = {}
    for algorithm in ("opsd", "sft"):
        runs[algorithm] = root / algorithm
        assert main(["train", "--profile", "tiny", "--algorithm", algorithm, "--set", f"run_dir={runs[algorithm]}",
                     "progress=false", "max_steps=2"]) == 0
    return runs


def test_train_prints_the_result(tiny_runs, capsys):
    assert main(["train", "--algorithm", "sft", "--set", f"run_dir={tiny_runs['sft']}", "progress=false",
                 "max_steps=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "nothing to do" in lines[0] and json.loads(lines[1])["steps"] == 2


def test_profiles_show_prints_every_value_with_its_docstring(capsys):
    assert main(["profiles"]) == 0
    assert capsys.readouterr().out.split() == ["cpu-demo", "paper", "paper-qlora", "tiny"]
    assert main(["profiles", "--show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "max_steps = 3\n    Optimizer steps (`paper`: 200 for OPSD; the official scripts' epochs" in out
    assert "resume = None\n    None = resume when run_dir holds checkpoints of the same config" in out
    assert "lora_r = 4\n" in out and "model = 'tiny'\n" in out
    assert "experimental" in out.split("\nbackend = 'hf'\n")[1].split("\nrollout_backend")[0]  # unsloth
    assert main(["profiles", "--show", "paper", "--algorithm", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "clip_tau = None  (not used by algorithm='grpo')\n" in out  # the profile's 0.05 is OPSD's
    assert "temperature = 1.2\n" in out and "kl_coef = 0.0\n" in out


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--set", "lerning_rate=0.1"], "unknown config key 'lerning_rate'; did you mean 'learning_rate'?"),
    (["train", "--set", "max_steps"], "--set expects key=value, got 'max_steps'"),
    (["train", "--set", "trackers=[\"mlflow\"]"], "trackers contains 'mlflow'"),
    (["eval", "nowhere", "--data", "x.jsonl"], "nowhere is not a run folder"),
])
def test_config_errors_print_one_line_and_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_data_errors_print_one_line_and_exit_2(tiny_runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?"}\n{"question": \n')
    assert main(["eval", str(tiny_runs["opsd"]), "--eval-profile", "tiny", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err


def test_help_lists_choices_and_keys(capsys):
    for command, parts in [("train", ["{opsd,grpo,sft,rlsd}", "learning_rate", "resume", "tiny"]),
                           ("eval", ["n_bootstrap", "{cpu-demo,paper,paper-qlora,tiny}"]),
                           ("compare", ["--out", "--data", "confidence"]), ("profiles", ["--show"])]:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        for part in parts:
            assert part in out, (command, part)


def test_eval_prints_both_modes_with_intervals(tiny_runs, capsys):
    assert main(["eval", str(tiny_runs["opsd"]), *EVAL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("on reasoning_gym:chain_sum: 6 problems, k = 1")
    for mode, line in zip(("strict", "lenient"), lines[1:]):
        assert line.split()[:2] == [mode, "avg@1"] and "95% interval [" in line
    adapter = tiny_runs["opsd"] / "checkpoints" / "step-000002" / "adapter"  # an adapter folder in a run
    assert main(["eval", str(adapter), *EVAL]) == 0
    assert str(adapter) in capsys.readouterr().out


def test_eval_samples_with_the_engine_of_the_protocol(tiny_runs, monkeypatch, capsys):
    """`--set engine=hf` picks generate (the reference); the protocol's default is the fast engine;
    an unknown engine is a one-line config error."""
    from opsd_kit.evaluation import evaluate

    engines = []
    real = evaluate.evaluate_model

    def spy(*args, **kwargs):
        engines.append(kwargs["engine"])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    assert main(["eval", str(tiny_runs["opsd"]), *EVAL]) == 0
    assert main(["eval", str(tiny_runs["opsd"]), *EVAL, "engine=hf"]) == 0
    assert engines == ["fast", "hf"]
    capsys.readouterr()
    assert main(["eval", str(tiny_runs["opsd"]), *EVAL, "engine=vllm"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "engine='vllm' is not allowed" in err


def test_compare_writes_one_table_and_figures(tiny_runs, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", str(tiny_runs["opsd"]), f"baseline={tiny_runs['sft']}", "--out", str(out),
                 *EVAL]) == 0
    printed = capsys.readouterr().out
    assert "opsd" in printed and "baseline" in printed and "strict/ci_low" in printed
    assert "paired test of each (k = 1: exact McNemar)" in printed and "mcnemar_exact" in printed
    assert "tokens to equal accuracy (strict): undefined" in printed  # no grpo run to compare with
    for name in ("points.csv", "comparisons.csv", "token_efficiency_strict.png", "token_efficiency_lenient.png"):
        assert (out / name).is_file(), name


def test_export_is_a_verb_for_a_run_folder(tiny_runs, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(tiny_runs["sft"]), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert main(["export", str(tiny_runs["sft"]), str(out)]) == 2  # not empty: one line, exit 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err and "Traceback" not in err
