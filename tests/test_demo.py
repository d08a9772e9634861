"""The main job on the tiny profile: notebooks 00-04 under papermill, end to end (CI)."""
import json

import pandas as pd
import pytest

from opsd_kit.apps.demo import NOTEBOOKS, evaluation_task, plan_jobs, run_demo


@pytest.mark.slow
def test_the_study_runs_every_notebook_on_the_tiny_profile(tmp_path, capfd):
    """The tiny study (the demo's OPSD, GRPO and SFT, plus the shuffled-hint control and a
    second OPSD seed), so every notebook path runs."""
    summary = run_demo("tiny", tmp_path, jobs=2, plan="study")
    out, err = capfd.readouterr()
    assert "[demo] expected total about" in out  # the tiny profile has reference times and a calibration
    assert "without encryption" not in err  # the kernels talk over local sockets, not TCP
    assert "gemm_4bit_forward" not in out + err  # bitsandbytes' 4-bit kernel notice: no 4-bit here
    jobs = plan_jobs("tiny", "study")
    methods = [j.method for j in jobs]
    evaluations = {evaluation_task(m) for m in ["base", *methods]}
    assert set(summary["notebook_seconds"]) == {"00_data_prep", "start", *methods, *evaluations, NOTEBOOKS[-1]}
    # every point was evaluated in the pool's queue: notebook 04 found them all saved
    keys = list((tmp_path / "study" / "evaluations").glob("*/key.json"))
    assert len(keys) == 1 + 2 + 2 + 1 + 1 + 2  # start, opsd x 2, grpo x 2, sft, opsd-shuffled, opsd-seed1 x 2
    # the common start: an SFT warm-up on its own problems, disjoint from training and evaluation,
    # which every compared run continues from and which is the study's 'base' point
    from opsd_kit.data.sources import load_source

    data = {name: load_source(str(tmp_path / "data" / f"{name}.jsonl"))[0]
            for name in ("train", "eval", "warmup", "val")}
    assert {name: len(p) for name, p in data.items()} == {"train": 16, "eval": 6, "warmup": 8, "val": 4}
    ids = [p.id for part in data.values() for p in part]
    assert len(ids) == len(set(ids))
    start = json.loads((tmp_path / "start" / "config.json").read_text())
    assert start["algorithm"] == "sft" and start["max_steps"] == 2 and start["init_adapter"] is None
    assert {json.loads((tmp_path / j.method / "config.json").read_text())["init_adapter"] for j in jobs} == {
        str(tmp_path / "start")}
    assert json.loads((tmp_path / "study" / "evaluations" / "base" / "key.json").read_text())["adapter_sha256"]
    assert summary["start"] == str(tmp_path / "start")
    from opsd_kit.evaluation.report import render

    assert "'base' is the runs' common start, `start` (init_adapter)." in render(tmp_path)
    from datetime import datetime

    notebook04 = json.loads((tmp_path / "04_evaluation_and_token_efficiency.ipynb").read_text())
    started = datetime.fromisoformat(notebook04["metadata"]["papermill"]["start_time"]).timestamp()
    assert max(k.stat().st_mtime for k in keys) < started
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
    assert set(summary["vs_base"]["opsd"]["strict"]) == {"diff", "ci_low", "ci_high", "p", "test"}
    assert "ratio" in summary["tokens_to_equal_accuracy"]["strict"]
    assert len(summary["answer_token_divergence"]) == 1 + len(jobs)
    for mode in ("strict", "lenient"):
        assert (tmp_path / "study" / f"token_efficiency_{mode}.png").is_file()
    # the per-token view: four rollouts (before and after training, correct and shuffled hint)
    tokens = pd.read_csv(tmp_path / "study" / "token_divergence.csv")
    assert tokens["view"].nunique() == 4 and (tmp_path / "study" / "token_divergence.png").is_file()
    # a second run reuses every finished run and evaluation: only 00 and 04 run again
    again = run_demo("tiny", tmp_path, jobs=2, plan="study")
    assert set(again["notebook_seconds"]) == {"00_data_prep", *evaluations, NOTEBOOKS[-1]}
    assert "[demo] start: a finished run of the same config" in capfd.readouterr().out
    assert again["vs_base"] == summary["vs_base"]


@pytest.mark.slow
def test_the_raw_plan_runs_the_demos_methods_from_the_base_model(tmp_path):
    summary = run_demo("tiny", tmp_path, jobs=2, plan="raw")
    methods = [j.method for j in plan_jobs("tiny", "raw")]
    assert set(summary["notebook_seconds"]) == {"00_data_prep", *methods, NOTEBOOKS[-1],
                                                *(evaluation_task(m) for m in ["base", *methods])}
    assert not (tmp_path / "start").exists() and summary["start"] is None
    for method in methods:
        assert json.loads((tmp_path / method / "config.json").read_text())["init_adapter"] is None
    assert json.loads((tmp_path / "study" / "evaluations" / "base" / "key.json").read_text())["adapter_sha256"] is None
    grpo = json.loads((tmp_path / "grpo" / "config.json").read_text())
    assert grpo["rewards"] == ["correct_lenient", "format"]


def test_a_finished_run_is_reused_under_the_changes_a_resume_allows(tmp_path):
    """The demo reuses a finished run whose config differs from the job's only in keys a resumed run
    may change (the folder it was trained in, micro_batch_size), and trains where a run of the job's
    config would start over, continue or be refused (`run.rundir.RunDir.finished`)."""
    from opsd_kit.apps.demo import TrainingJob, finished_run
    from opsd_kit.config import load_profile

    run_dir = tmp_path / "sft"
    saved = load_profile("tiny", "sft", run_dir=str(tmp_path / "elsewhere"), micro_batch_size=1)
    checkpoint = run_dir / "checkpoints" / f"step-{saved.max_steps:06d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text(str(saved.max_steps))
    saved.save(run_dir / "config.json")
    (run_dir / "adapter").mkdir()
    # (the raw plan: no common start, so the job's config is the profile's with its overrides)
    assert finished_run(run_dir, "tiny", TrainingJob("sft", "sft"), "raw")
    assert not finished_run(run_dir, "tiny", TrainingJob("sft", "sft", {"seed": 1}), "raw")
    assert not finished_run(run_dir, "tiny", TrainingJob("sft", "sft", {"max_steps": saved.max_steps + 1}), "raw")


def test_demo_plans_are_valid_configs(tmp_path):
    """Every job of every plan builds a valid config, and the study extends the demo."""
    from opsd_kit.apps.demo import DEMO_PLANS, job_overrides, plan_start
    from opsd_kit.config import load_profile

    for profile in DEMO_PLANS:
        demo, study, full = plan_jobs(profile, "demo"), plan_jobs(profile, "study"), plan_jobs(profile, "full")
        assert study[: len(demo)] == demo and len(study) > len(demo)
        assert full[: len(study)] == study and len(full) > len(study)
        assert len({j.method for j in full}) == len(full)
        assert set(DEMO_PLANS[profile].get("study_points", {})) <= {j.method for j in study}
        start = plan_start(profile)
        assert start is not None and start.method not in {j.method for j in full}
        assert job_overrides(profile, start, tmp_path) == start.overrides
        for job in [start, *full]:
            overrides = job_overrides(profile, job, tmp_path)
            assert overrides.get("init_adapter") == (None if job == start else str(tmp_path / start.method))
            load_profile(profile, job.algorithm, run_dir=str(tmp_path / job.method), **overrides)
        # the other start: the demo's methods from the base model itself
        raw = plan_jobs(profile, "raw")
        assert plan_start(profile, "raw") is None and [j.algorithm for j in raw] == [j.algorithm for j in demo]
        for job in raw:
            overrides = job_overrides(profile, job, tmp_path, "raw")
            assert "init_adapter" not in overrides
            load_profile(profile, job.algorithm, run_dir=str(tmp_path / job.method), **overrides)


@pytest.mark.slow
def test_notebook_01_runs_alone_with_only_the_profile_set(tmp_path):
    """`papermill notebooks/01_opsd_training.ipynb out.ipynb -p profile tiny`, from any folder."""
    import papermill

    from opsd_kit.apps.demo import notebook_dir

    papermill.execute_notebook(str(notebook_dir() / "01_opsd_training.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"profile": "tiny"}, cwd=str(tmp_path), progress_bar=False)
    diag = json.loads((tmp_path / "runs" / "opsd" / "diagnostics.json").read_text())
    assert set(diag["before_after"]) == {"mode", "student_before", "student_after", "teacher"}


@pytest.mark.slow
@pytest.mark.parametrize("notebook, run", [("02_grpo_baseline", "grpo"), ("03_sft_baseline", "sft")])
def test_baseline_notebook_runs_alone_with_only_the_profile_set(tmp_path, notebook, run):
    """`papermill notebooks/02_grpo_baseline.ipynb out.ipynb -p profile tiny` (and 03), from any folder."""
    import papermill

    from opsd_kit.apps.demo import notebook_dir

    papermill.execute_notebook(str(notebook_dir() / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"profile": "tiny"}, cwd=str(tmp_path), progress_bar=False)
    assert (tmp_path / "runs" / run / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "runs" / run / "training_curves.png").is_file()


def test_expected_total_plays_the_queue_out_and_scales_by_machine_speed(monkeypatch, tmp_path):
    import opsd_kit.apps.demo as demo

    reference = {"00_data_prep": 10, "start": 7, "opsd": 100, "grpo": 30, "sft": 20, "opsd-shuffled": 60,
                 "opsd-seed1": 50, "point": 5, "split": 2, "04": 3}
    monkeypatch.setitem(demo.REFERENCE_SECONDS, "tiny", reference)
    jobs = plan_jobs("tiny")  # opsd (2 points), grpo (2 points), sft
    # two slots: opsd 0-100 | grpo 0-30, sft 30-50, base 50-55, grpo's evaluation 55-65, sft's
    # 65-70, opsd's 100-110. Then 04: 3 (the demo has no answer-token split).
    assert demo.expected_seconds("tiny", "demo", jobs, 2, tmp_path, scale=2.0) == 2.0 * (10 + 110 + 3)
    # the common start, still to train, runs before the pool starts
    start = demo.plan_start("tiny")
    assert demo.expected_seconds("tiny", "demo", [start, *jobs], 2, tmp_path) == 10 + 7 + 110 + 3
    # the study adds opsd-shuffled and opsd-seed1 (2 points): opsd 0-100, seed1 100-150 | grpo 0-30,
    # sft 30-50, shuffled 50-110, base 110-115, then the evaluations of grpo, sft, opsd and
    # shuffled 115-145, seed1's 150-160; then 04 and the split of 6 models over 2 workers: 3 x 2
    study = plan_jobs("tiny", "study")
    assert demo.expected_seconds("tiny", "study", study, 2, tmp_path) == 10 + 160 + 3 + 6
    # everything trained and evaluated: 00 and 04 remain
    (tmp_path / "study" / "evaluations" / "base").mkdir(parents=True)
    (tmp_path / "study" / "evaluations" / "base" / "key.json").write_text("{}")
    assert demo.expected_seconds("tiny", "demo", [], 2, tmp_path) == 10 + 3
    there = {"machine": "the reference", "train_step": 1.0, "decode_step": 4.0}
    monkeypatch.setitem(demo.REFERENCE_CALIBRATION, "tiny", there)
    # here: training steps twice as slow, decode steps 8x as slow (scale 4), each repeat within 10%
    monkeypatch.setattr(demo, "calibrate", lambda profile: {"train_step": 2.0, "decode_step": 32.0, "spread": 1.1})
    line = demo.expected_line("tiny", "demo", jobs, 2, tmp_path)  # 123 s unscaled
    # 4 x 123 s; 2 / 1.1 x 123 s (224 s) and 8 x 1.1 x 123 s (1082 s)
    assert line.startswith("expected total about 8 min (between 4 min and 18 min: this machine ran a training "
                           "step 0.50x and a decode step 0.12x as fast as the reference")
    assert demo._duration(45.2) == "45 s" and demo._duration(179) == "179 s" and demo._duration(180) == "3 min"
    monkeypatch.setitem(demo.REFERENCE_CALIBRATION, "tiny", None)
    assert "calibration for profile 'tiny' is not recorded" in demo.expected_line("tiny", "demo", jobs, 2, tmp_path)
    del reference["sft"]
    assert "no reference time for ['sft']" in demo.expected_line("tiny", "demo", jobs, 2, tmp_path)


def test_calibration_measures_a_training_and_a_decode_step_of_the_profiles_model():
    from opsd_kit.apps.demo import REFERENCE_CALIBRATION, calibrate

    measured = calibrate("tiny", repeats=2)
    assert measured["train_step"] > 0 and measured["decode_step"] > 0 and measured["spread"] >= 1
    assert set(REFERENCE_CALIBRATION["tiny"]) == {"machine", "train_step", "decode_step"}


def test_the_demo_ends_with_the_results_table_and_the_files(tmp_path):
    """The demo's last lines: the report's tables (not raw summary.json) and the paths of the files."""
    from opsd_kit.apps.demo import results

    point = {"method": "base", "step": 0, "k": 1, "n_eval": 6, "boxed_rate": 0.5, "mean_response_tokens": 9.0,
             "truncation_rate": 0.0, "generated_tokens": 0, "train_seconds": 0.0,
             **{m: {"accuracy": 0.5, "ci_low": 0.2, "ci_high": 0.8} for m in ("strict", "lenient")}}
    summary = {"profile": "tiny", "plan": "demo", "total_seconds": 60, "notebook_seconds": {"04": 60},
               "points": [point], "vs_base": {}, "comparisons": [],
               "tokens_to_equal_accuracy": {"strict": {"ratio": None, "reason": "one method"}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "points.csv").write_text("method\n")
    text = results(tmp_path)
    assert "| base | 0 | 50.0 [20.0, 80.0] |" in text and '"points"' not in text
    assert "  summary.json\n" in text and "  study/points.csv\n" in text


def test_a_finished_notebooks_kernel_is_shut_down_without_a_sigint(monkeypatch):
    """jupyter_client interrupts every kernel before shutting it down, and a kernel that gets
    the SIGINT mid-message logs 'KeyboardInterrupt caught in kernel' into the demo's output:
    the demo's kernels skip that interrupt, and only that one."""
    import asyncio
    import os

    from jupyter_client import KernelManager

    from opsd_kit.apps.demo import _local_kernels

    if os.name != "posix":
        pytest.skip("the demo's own kernel manager is POSIX-only")
    interrupted = []

    async def interrupt(self):
        interrupted.append(self.shutting_down)

    monkeypatch.setattr(KernelManager, "_async_interrupt_kernel", interrupt)
    km = _local_kernels()["kernel_manager_class"]()
    km.shutting_down = True
    asyncio.run(km._async_interrupt_kernel())
    assert interrupted == []
    km.shutting_down = False  # e.g. a cell timeout: interrupted as jupyter_client does
    asyncio.run(km._async_interrupt_kernel())
    assert interrupted == [False]


def test_reference_times_ship_with_the_package_and_a_missing_one_is_named(tmp_path):
    """demo_times.json has a time for every part of the tiny demo and study plans (tests/test_demo.py's study
    prints its expected total) and of cpu-demo's demo, study and raw plans; where a part has none
    (cpu-demo's full plan, never run on the reference machine), the demo names it instead of
    guessing; pyproject ships the file in the wheel."""
    from pathlib import Path

    import tomllib

    import opsd_kit.apps.demo as demo

    for profile, plans in (("tiny", ("demo", "study")), ("cpu-demo", ("demo", "study", "raw"))):
        for plan in plans:
            start = demo.plan_start(profile, plan)
            parts = ["00_data_prep", *([start.method] if start else []),
                     *(demo.reference_key(plan, j) for j in plan_jobs(profile, plan)), "point", "split", "04"]
            assert [p for p in parts if p not in demo.REFERENCE_SECONDS[profile]] == [], (profile, plan)
    todo = [demo.plan_start("cpu-demo", "full"), *plan_jobs("cpu-demo", "full")]
    missing = [demo.reference_key("full", j) for j in plan_jobs("cpu-demo", "full")
               if demo.reference_key("full", j) not in demo.REFERENCE_SECONDS["cpu-demo"]]
    line = demo.expected_line("cpu-demo", "full", todo, 2, tmp_path)  # named before anything is measured
    assert missing and line == f"no expected total: no reference time for {missing} of profile 'cpu-demo'"
    assert all(demo.REFERENCE_CALIBRATION.values())  # every profile's calibration is recorded
    assert demo.REFERENCE_MACHINE and set(demo.REFERENCE_CALIBRATION) == set(demo.REFERENCE_SECONDS)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "demo_times.json" in pyproject["tool"]["setuptools"]["package-data"]["opsd_kit.apps"]
