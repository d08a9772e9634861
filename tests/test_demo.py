"""The main job on the tiny profile: notebooks 00-04 under papermill, end to end (CI)."""
import json

import pandas as pd
import pytest

from opsd_kit.demo import NOTEBOOKS, run_demo


@pytest.mark.slow
def test_demo_runs_every_notebook_on_the_tiny_profile(tmp_path):
    summary = run_demo("tiny", tmp_path)
    assert list(summary["notebook_seconds"]) == list(NOTEBOOKS)
    for name in NOTEBOOKS:
        assert (tmp_path / f"{name}.ipynb").is_file()
    for method in ("opsd", "grpo", "sft"):
        assert (tmp_path / method / "adapter" / "adapter_config.json").is_file()
    diag = json.loads((tmp_path / "opsd" / "diagnostics.json").read_text())
    assert 0 <= diag["gap"]["gap/teacher_accuracy"] <= 1 and diag["gap"]["gap/divergence_mean"] >= 0
    points = pd.read_csv(tmp_path / "study" / "points.csv")
    assert set(points["method"]) == {"opsd", "grpo", "sft"}
    assert (points.loc[points["method"] == "sft", "generated_tokens"] == 0).all()
    assert points.loc[points["method"] == "grpo", "generated_tokens"].max() > \
        points.loc[points["method"] == "opsd", "generated_tokens"].max()  # G rollouts per problem vs 1
    assert summary["mode"] == "lenient" and "tokens_to_equal_accuracy" in summary
    assert (tmp_path / "study" / "token_efficiency.png").is_file()


@pytest.mark.slow
def test_notebook_01_runs_alone_with_only_the_profile_set(tmp_path):
    """`papermill notebooks/01_opsd_training.ipynb out.ipynb -p profile tiny`, from any folder."""
    import papermill

    from opsd_kit.demo import notebook_dir

    papermill.execute_notebook(str(notebook_dir() / "01_opsd_training.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"profile": "tiny"}, cwd=str(tmp_path), progress_bar=False)
    diag = json.loads((tmp_path / "runs" / "opsd" / "diagnostics.json").read_text())
    assert set(diag["before_after"]) == {"mode", "student_before", "student_after", "teacher"}
