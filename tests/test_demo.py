"""The main job on the tiny profile: notebooks 00-04 under papermill, end to end (CI)."""
import json

import pandas as pd
import pytest

from opsd_kit.demo import BASE_EVALUATION, NOTEBOOKS, plan_jobs, run_demo


@pytest.mark.slow
def test_demo_runs_every_notebook_on_the_tiny_profile(tmp_path):
    summary = run_demo("tiny", tmp_path, jobs=2)
    jobs = plan_jobs("tiny")
    assert set(summary["notebook_seconds"]) == {"00_data_prep", *(j.method for j in jobs), BASE_EVALUATION,
                                                NOTEBOOKS[-1]}
    # the base model was evaluated in the training queue (by the time 04 ran, nothing was left to do for it)
    assert (tmp_path / "study" / "evaluations" / "base" / "key.json").stat().st_mtime < \
        (tmp_path / "study" / "points.csv").stat().st_mtime
    assert (tmp_path / "01_opsd_training-opsd-shuffled.ipynb").is_file()
    for job in jobs:
        assert (tmp_path / job.method / "adapter" / "adapter_config.json").is_file()
    shuffled = json.loads((tmp_path / "opsd-shuffled" / "config.json").read_text())
    assert shuffled["teacher_hint"] == "shuffled" and shuffled["algorithm"] == "opsd"
    diag = json.loads((tmp_path / "opsd" / "diagnostics.json").read_text())
    assert 0 <= diag["gap"]["gap/teacher_accuracy"] <= 1 and diag["gap"]["gap/divergence_mean"] >= 0
    points = pd.read_csv(tmp_path / "study" / "points.csv")
    assert set(points["method"]) == {"base", *(j.method for j in jobs)}
    assert len(points[points["method"] == "opsd"]) == 2  # the plan asks for two OPSD checkpoints
    assert (points["n_eval"] == 6).all() and (points["strict/ci_low"] <= points["strict/avg@k"]).all()
    assert (points.loc[points["method"] == "sft", "generated_tokens"] == 0).all()
    # the summary holds, per point, both modes with intervals, and per method its paired difference vs base
    first = summary["points"][1]
    assert {"n_eval", "k", "generated_tokens", "train_seconds"} <= set(first)
    assert set(first["strict"]) == set(first["lenient"]) == {"accuracy", "ci_low", "ci_high"}
    assert set(summary["vs_base"]) == {j.method for j in jobs}
    assert set(summary["vs_base"]["opsd"]["strict"]) == {"diff", "ci_low", "ci_high", "mcnemar_p"}
    assert "ratio" in summary["tokens_to_equal_accuracy"]["strict"]
    assert len(summary["answer_token_divergence"]) == 1 + len(jobs)
    for mode in ("strict", "lenient"):
        assert (tmp_path / "study" / f"token_efficiency_{mode}.png").is_file()
    # a second run reuses every finished run and evaluation: only 00 and 04 run again
    again = run_demo("tiny", tmp_path, jobs=2)
    assert set(again["notebook_seconds"]) == {"00_data_prep", BASE_EVALUATION, NOTEBOOKS[-1]}
    assert again["vs_base"] == summary["vs_base"]


def test_demo_plans_are_valid_configs(tmp_path):
    """Every job of every plan builds a valid config, and the study extends the demo."""
    from opsd_kit.config import load_profile
    from opsd_kit.demo import DEMO_PLANS

    for profile in DEMO_PLANS:
        demo, study = plan_jobs(profile, "demo"), plan_jobs(profile, "study")
        assert study[: len(demo)] == demo and len(study) > len(demo)
        assert set(DEMO_PLANS[profile].get("study_points", {})) <= {j.method for j in study}
        for job in study:
            load_profile(profile, job.algorithm, run_dir=str(tmp_path / job.method), **job.overrides)


@pytest.mark.slow
def test_notebook_01_runs_alone_with_only_the_profile_set(tmp_path):
    """`papermill notebooks/01_opsd_training.ipynb out.ipynb -p profile tiny`, from any folder."""
    import papermill

    from opsd_kit.demo import notebook_dir

    papermill.execute_notebook(str(notebook_dir() / "01_opsd_training.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"profile": "tiny"}, cwd=str(tmp_path), progress_bar=False)
    diag = json.loads((tmp_path / "runs" / "opsd" / "diagnostics.json").read_text())
    assert set(diag["before_after"]) == {"mode", "student_before", "student_after", "teacher"}


@pytest.mark.slow
@pytest.mark.parametrize("notebook, run", [("02_grpo_baseline", "grpo"), ("03_sft_baseline", "sft")])
def test_baseline_notebook_runs_alone_with_only_the_profile_set(tmp_path, notebook, run):
    """`papermill notebooks/02_grpo_baseline.ipynb out.ipynb -p profile tiny` (and 03), from any folder."""
    import papermill

    from opsd_kit.demo import notebook_dir

    papermill.execute_notebook(str(notebook_dir() / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"profile": "tiny"}, cwd=str(tmp_path), progress_bar=False)
    assert (tmp_path / "runs" / run / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "runs" / run / "training_curves.png").is_file()
