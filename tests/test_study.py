"""The study's arithmetic on hand-made evaluations: intervals, paired comparisons, the token ratio."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from opsd_kit.config import EvalConfig, load_eval_profile
from opsd_kit.evaluation.evaluate import EvalResult
from opsd_kit.evaluation.stats import mcnemar_exact, wilson_interval
from opsd_kit.evaluation.study import Point, first_crossing, summarize, to_record, tokens_to_equal_accuracy


def fake_result(strict: list[int], lenient: list[int] | None = None) -> EvalResult:
    """An EvalResult of k = 1 with the given per-problem verdicts (ids p0, p1, ...)."""
    lenient = strict if lenient is None else lenient
    ids = [f"p{i}" for i in range(len(strict))]
    table = pd.DataFrame({"id": ids, "avg_strict": np.array(strict, float), "avg_lenient": np.array(lenient, float)})
    samples = pd.DataFrame({"problem_id": ids, "sample": 0, "correct_strict": [bool(x) for x in strict],
                            "correct_lenient": [bool(x) for x in lenient]})
    summary = {f"eval/{m}/avg@k": float(np.mean(v)) for m, v in (("strict", strict), ("lenient", lenient))}
    summary.update({f"eval/{m}/pass@k": summary[f"eval/{m}/avg@k"] for m in ("strict", "lenient")})
    summary.update({"eval/boxed_rate": 1.0, "eval/mean_response_tokens": 10.0, "eval/truncation_rate": 0.0})
    return EvalResult(summary=summary, table=table, samples=samples)


def test_summarize_reports_intervals_and_paired_comparisons():
    n = 40
    base = [1] * 4 + [0] * 36
    opsd = [1] * 4 + [1] * 12 + [0] * 24  # right on 12 more problems, wrong on none the base got
    grpo = [0] * 4 + [1] * 2 + [0] * 34
    points = [Point("base", 0, None), Point("opsd", 24, "a", "r", 15000, 1, 60.0),
              Point("grpo", 12, "b", "r", 16000, 1, 70.0)]
    results = {"base": fake_result(base), "opsd-step24": fake_result(opsd), "grpo-step12": fake_result(grpo)}
    config = EvalConfig(n_bootstrap=2000)
    out = summarize(points, results, config)
    table = out["points"].set_index("tag")
    assert table.loc["opsd-step24", "strict/avg@k"] == 16 / n
    assert (table.loc["opsd-step24", "strict/ci_low"], table.loc["opsd-step24", "strict/ci_high"]) == \
        wilson_interval(16, n)
    comparisons = out["comparisons"].set_index(["a", "b"])
    vs_base = comparisons.loc[("opsd", "base")]
    assert vs_base["strict/diff"] == pytest.approx(12 / n)
    assert vs_base["strict/p"] == mcnemar_exact(opsd, base)["p"] == pytest.approx(2 / 2 ** 12)
    assert vs_base["strict/test"] == "mcnemar_exact"  # k = 1
    assert 0 < vs_base["strict/ci_low"] < 12 / n < vs_base["strict/ci_high"]
    pair = comparisons.loc[("opsd", "grpo")]
    assert pair["strict/diff"] == pytest.approx((16 - 2) / n)
    assert (pair["strict/a_better"], pair["strict/b_better"]) == (14, 0)
    record = json.loads(json.dumps(to_record(out, config)))  # plain JSON
    assert record["vs_base"]["opsd"]["strict"]["diff"] == pytest.approx(12 / n)
    assert set(record["vs_base"]["opsd"]["strict"]) == {"diff", "ci_low", "ci_high", "p", "test"}
    first = record["points"][1]
    assert {"n_eval", "k", "generated_tokens", "train_seconds"} <= set(first)
    assert set(first["lenient"]) == {"accuracy", "ci_low", "ci_high"}


@pytest.mark.parametrize("n", [20, 144, 500])  # sizes whose Wilson ends miss 0 and 1 by an ulp
def test_token_efficiency_plots_points_at_0_and_100_percent(n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from opsd_kit.evaluation.plots import token_efficiency

    points = [Point("base", 0, None), Point("opsd", 4, "a", "r", 1500, 1, 6.0),
              Point("grpo", 4, "b", "r", 1600, 1, 7.0)]
    results = {"base": fake_result([0] * n), "opsd-step4": fake_result([1] * n), "grpo-step4": fake_result([0] * n)}
    out = summarize(points, results, EvalConfig(n_bootstrap=20))
    table = out["points"].set_index("tag")
    assert table.loc["grpo-step4", "strict/ci_low"] == 0.0 and table.loc["opsd-step4", "strict/ci_high"] == 1.0
    for mode in ("strict", "lenient"):
        plt.close(token_efficiency(out["points"], mode=mode, ratio=out["tokens_to_equal_accuracy"][mode]))
    # an interval a step off its estimate (another summation order) draws a zero-length bar
    shifted = out["points"].copy()
    shifted["strict/ci_low"] += 1e-16
    plt.close(token_efficiency(shifted, mode="strict"))


def test_with_k_samples_the_printed_p_tests_the_avg_at_k_difference():
    """k = 4: per-problem accuracies in quarters. The first samples alone agree (McNemar: p = 1),
    the avg@k difference does not; the p printed beside it is the sign-flip test of the
    per-problem differences (d = +0.75 on 3 problems, +0.25 on 2: 2 of 2^5 patterns reach
    |sum| = 2.75, p = 1/16)."""
    n = 8
    base = [0.0] * n
    better = [0.75, 0.75, 0.75, 0.25, 0.25, 0.0, 0.0, 0.0]

    def result(avg):
        ids = [f"p{i}" for i in range(n)]
        table = pd.DataFrame({"id": ids, "avg_strict": avg, "avg_lenient": avg})
        samples = pd.DataFrame({"problem_id": ids, "sample": 0, "correct_strict": False, "correct_lenient": False})
        summary = {f"eval/{m}/{s}": float(np.mean(avg)) for m in ("strict", "lenient") for s in ("avg@k", "pass@k")}
        summary.update({"eval/boxed_rate": 1.0, "eval/mean_response_tokens": 10.0, "eval/truncation_rate": 0.0})
        return EvalResult(summary=summary, table=table, samples=samples)

    points = [Point("base", 0, None), Point("opsd", 24, "a", "r", 15000, 1, 60.0)]
    out = summarize(points, {"base": result(base), "opsd-step24": result(better)},
                    EvalConfig(k=4, temperature=1.0, n_bootstrap=200))
    row = out["comparisons"].iloc[0]
    assert row["strict/test"] == "sign_flip_exact" and row["strict/p"] == pytest.approx(2 / 2 ** 5)
    assert (row["strict/a_better"], row["strict/b_better"]) == (5, 0)


def test_summarize_refuses_unpaired_evaluations():
    points = [Point("base", 0, None), Point("opsd", 1, "a", "r")]
    other = fake_result([1, 0])
    other.table["id"] = ["q0", "q1"]
    with pytest.raises(ValueError, match="other problems"):
        summarize(points, {"base": fake_result([1, 0]), "opsd-step1": other}, EvalConfig())


def _points(rows):
    frame = pd.DataFrame(rows, columns=["method", "step", "generated_tokens", "lenient/avg@k"])
    frame["tag"] = [f"{m}-{s}" for m, s in zip(frame["method"], frame["step"])]
    return frame


def test_tokens_to_equal_accuracy_on_curves_by_hand():
    """Base 0.20; OPSD (1000, 0.30), (2000, 0.50); GRPO (4000, 0.25), (8000, 0.40). Gains 0.30 and
    0.20: the target at half the smaller gain is 0.30, which OPSD reaches at its first checkpoint
    (1000) and GRPO between its two: 4000 + (0.30 - 0.25) / (0.40 - 0.25) * 4000 = 5333.3."""
    points = _points([
        ("opsd", 0, 0, 0.20), ("opsd", 4, 1000, 0.30), ("opsd", 8, 2000, 0.50),
        ("grpo", 4, 4000, 0.25), ("grpo", 8, 8000, 0.40),
    ])
    out = tokens_to_equal_accuracy(points, mode="lenient")
    assert out["target_accuracy"] == pytest.approx(0.30) and out["target_fraction"] == 0.5
    assert out["tokens_opsd"] == pytest.approx(1000) and out["tokens_grpo"] == pytest.approx(4000 + 4000 / 3)
    assert out["ratio"] == pytest.approx((4000 + 4000 / 3) / 1000)
    # the whole gain: target 0.40; OPSD crosses at 1000 + (0.40 - 0.30) / 0.20 * 1000 = 1500, GRPO at 8000
    full = tokens_to_equal_accuracy(points, mode="lenient", target_fraction=1.0)
    assert (full["tokens_opsd"], full["tokens_grpo"]) == (pytest.approx(1500), pytest.approx(8000))
    # the first crossing counts, also from the base at 0 tokens: 0 + 0.05 / 0.25 * 100 = 20
    assert first_crossing([0, 100, 200, 300], [0.1, 0.35, 0.05, 0.5], 0.15) == pytest.approx(20)
    assert first_crossing([0, 100], [0.1, 0.2], 0.3) is None


def test_tokens_to_equal_accuracy_without_improvement_says_why():
    points = _points([("opsd", 0, 0, 0.2), ("opsd", 4, 100, 0.1), ("grpo", 0, 0, 0.2), ("grpo", 4, 800, 0.3)])
    out = tokens_to_equal_accuracy(points, mode="lenient")
    assert out["ratio"] is None and "no common improvement" in out["reason"]
    # with resamples where it would be defined, an undefined point ratio still gets no interval
    per_problem = {"opsd-0": {"lenient": np.array([0.2, 0.2])}, "opsd-4": {"lenient": np.array([0.0, 0.2])},
                   "grpo-0": {"lenient": np.array([0.2, 0.2])}, "grpo-4": {"lenient": np.array([0.6, 0.0])}}
    resampled = tokens_to_equal_accuracy(points, per_problem, np.array([[1, 1], [0, 1]]), mode="lenient")
    assert resampled["ratio"] is None and "ci_low" not in resampled
    missing = tokens_to_equal_accuracy(_points([("opsd", 0, 0, 0.2), ("opsd", 4, 100, 0.3)]), mode="lenient")
    assert missing["ratio"] is None and "never trained" in missing["reason"]


def test_tokens_to_equal_accuracy_bounds_the_ratio_when_one_method_improves_by_hand():
    """Base 0.20; OPSD (1000, 0.30), (2000, 0.50); GRPO (4000, 0.15), (16000, 0.20) never rises.
    Target 0.20 + 0.5 * 0.30 = 0.35, which OPSD reaches at 1000 + 0.05 / 0.20 * 1000 = 1250 tokens:
    GRPO would need more than its 16000, so the ratio is > 16000 / 1250 = 12.8. With the roles
    swapped, the ratio is < 1250 / 16000."""
    rows = [("opsd", 0, 0, 0.20), ("opsd", 4, 1000, 0.30), ("opsd", 8, 2000, 0.50),
            ("grpo", 4, 4000, 0.15), ("grpo", 16, 16000, 0.20)]
    out = tokens_to_equal_accuracy(_points(rows), mode="lenient")
    assert out["ratio"] is None and out["reason"].startswith("no common improvement")
    assert out["bound"] == {"side": ">", "value": pytest.approx(12.8)}
    assert out["target_accuracy"] == pytest.approx(0.35) and out["tokens_opsd"] == pytest.approx(1250)
    assert "grpo never reached opsd's target 0.350" in out["reason"] and "ratio > 13" in out["reason"]
    swapped = tokens_to_equal_accuracy(_points(rows), mode="lenient", a="grpo", b="opsd")
    assert swapped["bound"] == {"side": "<", "value": pytest.approx(1250 / 16000)}
    neither = tokens_to_equal_accuracy(_points([("opsd", 0, 0, 0.2), ("opsd", 4, 100, 0.1),
                                                ("grpo", 4, 800, 0.2)]), mode="lenient")
    assert "bound" not in neither and neither["ratio"] is None


def test_tokens_ratio_interval_recomputes_both_curves_on_each_problem_resample():
    """Two problems; the base gets neither, OPSD (100 tokens) the first, GRPO (300) both.
    Resample (p0, p0): gains 1 and 1, target 0.5: 50 vs 150 tokens, ratio 3. (p1, p1): OPSD gains
    nothing: undefined. (p0, p1): target 0.25, 50 vs 75: ratio 1.5 (the point estimate too)."""
    points = _points([("opsd", 0, 0, 0.0), ("opsd", 4, 100, 0.5), ("grpo", 8, 300, 1.0)])
    per_problem = {"opsd-0": {"lenient": np.array([0.0, 0.0])}, "opsd-4": {"lenient": np.array([1.0, 0.0])},
                   "grpo-8": {"lenient": np.array([1.0, 1.0])}}
    indices = np.array([[0, 0], [1, 1], [0, 1]])
    out = tokens_to_equal_accuracy(points, per_problem, indices, mode="lenient", confidence=0.5)
    assert out["ratio"] == pytest.approx(1.5)
    assert out["defined_fraction"] == pytest.approx(2 / 3)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(1.875), pytest.approx(2.625))  # 25th, 75th of {1.5, 3}


def test_eval_profiles_validate():
    demo = load_eval_profile("cpu-demo")
    assert demo.greedy and demo.k == 1 and demo.max_new_tokens >= 128 and demo.mode == "strict"
    assert demo.settings().temperature == 0 and demo.settings().n == 1
    from opsd_kit.config import ConfigError

    with pytest.raises(ConfigError, match="greedy"):
        load_eval_profile("cpu-demo", k=4)
    with pytest.raises(ConfigError, match="did you mean 'max_new_tokens'"):
        load_eval_profile("cpu-demo", max_new_token=4)
    with pytest.raises(ConfigError, match="mode"):
        load_eval_profile("cpu-demo", mode="loose")


def test_study_points_never_repeat_a_checkpoint(tmp_path):
    """More points asked than checkpoints exist: each checkpoint once, the final one included."""
    from opsd_kit.evaluation.study import study_points

    run = tmp_path / "grpo"
    (run / "adapter").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algorithm": "grpo"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens/generated_total": 10, "tokens/train_total": 10,
                                                   "time/elapsed": 1.0}) + "\n")
    points = study_points({"grpo": str(run)}, {"grpo": 3})
    assert [(p.method, p.step) for p in points] == [("base", 0), ("grpo", 1)]


def test_report_renders_what_the_summary_says(tmp_path):
    """docs/results.md's tables come from summary.json as it is: numbers, intervals and p-values."""
    from opsd_kit.evaluation.report import render

    base, opsd = [1] * 4 + [0] * 36, [1] * 16 + [0] * 24
    points = [Point("base", 0, None), Point("opsd", 24, "a", "r", 15000, 1, 60.0)]
    config = EvalConfig(n_bootstrap=500)
    out = summarize(points, {"base": fake_result(base), "opsd-step24": fake_result(opsd)}, config)
    summary = dict(to_record(out, config), profile="cpu-demo", plan="demo", total_seconds=600.0,
                   notebook_seconds={"opsd": 500.0}, date="2026-11-29")
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = render(tmp_path)
    assert "| opsd | 24 | 40.0 [" in text and "| base | 0 | 10.0 [" in text
    assert "| opsd | base | +30.0 [" in text and f"| {mcnemar_exact(opsd, base)['p']:.1e} |" in text
    assert "p: exact McNemar, two-sided, paired on each problem's verdict." in text
    assert "10.0 min in all" in text


def test_report_names_the_test_of_a_summary_written_before_tests_were_named():
    from opsd_kit.evaluation.report import comparisons_table

    old = {"diff": 0.1, "ci_low": 0.0, "ci_high": 0.2, "mcnemar_p": 0.004}
    summary = {"points": [{"k": 1, "n_eval": 10}], "vs_base": {"opsd": {"strict": old, "lenient": old}},
               "comparisons": []}
    text = comparisons_table(summary)
    assert "| 0.004 |" in text and "p: exact McNemar on each problem's first sample only" in text


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_work_split_over_workers_comes_back_in_job_order(workers):
    """`_in_workers` deals jobs round-robin to processes; the results must line up with the jobs."""
    from opsd_kit.evaluation.study import _in_workers

    jobs = [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]
    assert _in_workers(list, jobs, workers) == jobs
    assert _in_workers(list, [], workers) == []


def test_evaluation_key_equals_itself_after_a_round_trip_through_key_json(tmp_path):
    """A saved evaluation is reused only when its key.json equals the key computed now: every
    field must survive JSON (a tuple field read back as a list once made every key differ)."""
    from opsd_kit.data.problems import Problem
    from opsd_kit.evaluation.study import _evaluation_key, _saved_key

    problems = [Problem(id="p1", question="1+1?", answer="2", solution="\\boxed{2}", source="t").to_dict()]
    for profile in ("tiny", "cpu-demo", "paper"):
        key = _evaluation_key(Point("base", 0, None), load_eval_profile(profile), problems)
        (tmp_path / "summary.json").write_text("{}")
        (tmp_path / "key.json").write_text(json.dumps(key))
        assert _saved_key(tmp_path) == key, profile


def test_base_model_evaluates_from_a_profile_config_as_from_a_run_folder(tmp_path):
    """The demo evaluates the base model from the profile's `TrainConfig` (no run folder needed
    yet); notebook 04 from a run folder: the same model, the same rollouts, the same key."""
    from opsd_kit.config import load_profile
    from opsd_kit.data.problems import Problem
    from opsd_kit.evaluation.study import _saved_key, evaluate_points, held_out

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(Problem(id=f"p{i}", question=f"{i} + 1?", answer=str(i + 1),
                                                    solution=f"\\boxed{{{i + 1}}}", source="t").to_dict()) + "\n"
                                 for i in range(3)))
    eval_config, problems = held_out("tiny", str(eval_file), {"max_new_tokens": 4})
    assert [p.id for p in problems] == ["p0", "p1", "p2"] and eval_config.max_new_tokens == 4  # all of the file
    config = load_profile("tiny", run_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    config.save(tmp_path / "run" / "config.json")
    base = [Point("base", 0, None)]
    from_config = evaluate_points(base, problems, eval_config, model_run=config, out_dir=tmp_path / "a")
    from_folder = evaluate_points(base, problems, eval_config, model_run=tmp_path / "run", out_dir=tmp_path / "b")
    pd.testing.assert_frame_equal(from_config["base"].samples, from_folder["base"].samples)
    assert _saved_key(tmp_path / "a" / "base") == _saved_key(tmp_path / "b" / "base")


def test_study_points_are_spaced_by_rollout_tokens(tmp_path):
    """A GRPO run whose rollouts shortened: checkpoints at steps 6, 12 and 18 (7,200, 9,200 and
    10,400 tokens) and the final adapter at step 41 (16,100). Two points: the checkpoint nearest
    8,050 tokens (step 6), not the one nearest step 20.5 (18); three: nearest 5,367 (6) and
    10,733 (18). A run that generates nothing (SFT) is spaced by steps."""
    from opsd_kit.evaluation.study import study_points

    def run_with(name, tokens_at):
        run = tmp_path / name
        (run / "adapter").mkdir(parents=True)
        for step in (6, 12, 18):
            (run / "checkpoints" / f"step-{step:06d}" / "adapter").mkdir(parents=True)
            (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").write_text("")
        (run / "config.json").write_text(json.dumps({"algorithm": name}))
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "tokens/generated_total": tokens_at(s), "tokens/train_total": 10,
                        "time/elapsed": 1.0}) + "\n" for s in range(1, 42)))
        return str(run)

    known = {6: 7200, 12: 9200, 18: 10400, 41: 16100}
    grpo = run_with("grpo", lambda s: known.get(s, 7200 + 300 * s))
    assert [p.step for p in study_points({"grpo": grpo}, {"grpo": 2})] == [0, 6, 41]
    assert [p.step for p in study_points({"grpo": grpo}, {"grpo": 3})] == [0, 6, 18, 41]
    sft = run_with("sft", lambda s: 0)
    assert [p.step for p in study_points({"sft": sft}, {"sft": 2})] == [0, 18, 41]  # nearest step 20.5
