"""The comparison study: evaluate the base model and chosen checkpoints of each run on one
held-out set under one `EvalConfig`, then compare them the way a paper should.

- `study_points`: which (method, step) pairs carry the study (each run's final adapter, and
  optionally evenly spaced earlier checkpoints), with the generated tokens, training tokens
  and wall time the run had spent at that step;
- `evaluate_points`: one held-out evaluation per point (in ``workers`` processes, each loading
  the model once; the base is the policy with its adapter switched off), saved and reused when
  the same adapter was already evaluated under the same protocol;
- `summarize`: accuracy with its 95% interval per point and grading mode; every pair of final
  points (and each method against the base) as a paired difference with a bootstrap interval
  and a paired test's p (`stats.paired_test`: exact McNemar for k = 1, sign flips for k > 1);
  the tokens-to-equal-accuracy ratio read off the accuracy-vs-tokens curves
  (`tokens_to_equal_accuracy`), with a bootstrap interval over problems.

All runs must share the model and LoRA settings (one model load serves every evaluation).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

MODES = ("strict", "lenient")


@dataclass(frozen=True)
class Point:
    """One evaluated model: ``method`` at ``step``. The base (method 'base', step 0) is the model
    every run started from: the adapter switched off (``adapter=None``), or the runs' common
    ``init_adapter``."""

    method: str
    step: int
    adapter: str | None
    run_dir: str | None = None
    generated_tokens: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0

    @property
    def tag(self) -> str:
        return "base" if self.method == "base" else f"{self.method}-step{self.step}"


def study_points(runs: dict, per_method: dict | None = None) -> list[Point]:
    """The base and, per run, its final adapter plus earlier checkpoints evenly spaced in the
    rollout tokens it generated (in steps for a run that generates none, as SFT).

    ``runs`` maps a method name to its run folder; ``per_method`` maps a method to how many
    points it gets (default 1: the final adapter only). With n points and a final position X
    (tokens, or steps), the i-th earlier point is the checkpoint whose position is nearest
    i * X / n (the earlier one on a tie); points that fall on the same checkpoint are evaluated
    once. Tokens, not steps, because the curves are read against tokens: a GRPO run whose
    rollouts shorten as it learns generates most of its tokens in its first steps.
    """
    from opsd_kit.run.metrics import read_metrics
    from opsd_kit.run.rundir import RunDir

    if not runs:
        raise ValueError("study_points needs at least one run")
    points = [common_start(runs)]
    for method, run_dir in runs.items():
        available = RunDir(run_dir).adapters()
        if not available:
            raise ValueError(f"run {method!r} in {run_dir} has no checkpoint or final adapter")
        want = (per_method or {}).get(method, 1)
        if want < 1:
            raise ValueError(f"per_method[{method!r}] must be >= 1, got {want}")
        metrics = read_metrics(RunDir(run_dir).metrics_file).set_index("step")
        tokens = [float(metrics.loc[step, "tokens/generated_total"]) for step, _ in available]
        position = tokens if tokens[-1] > 0 else [float(step) for step, _ in available]
        picked = {len(available) - 1}  # the final adapter always
        for i in range(1, want):
            target = i * position[-1] / want
            picked.add(min(range(len(position)), key=lambda j: (abs(position[j] - target), j)))
        for index in sorted(picked):
            step, adapter = available[index]
            at = metrics.loc[step]
            points.append(Point(method, step, str(adapter), str(run_dir), int(at["tokens/generated_total"]),
                                int(at["tokens/train_total"]), float(at["time/elapsed"])))
    return points


def common_start(runs: dict) -> Point:
    """The base point of runs that share a start: the base model (adapter off) when no run has an
    ``init_adapter``, else that adapter (the same for every run, or ValueError: curves from
    different starts do not compare)."""
    from opsd_kit.run.lineage import resolve_init_adapter

    starts = {}
    for method, run_dir in runs.items():
        values = _run_config(run_dir)
        starts[method] = resolve_init_adapter(load_run_config(values)) if values.get("init_adapter") else None
    adapters = {None if s is None else s.adapter_dir for s in starts.values()}
    if len(adapters) > 1:
        listed = ", ".join(f"{m}: {'the base model' if s is None else s.adapter_dir}" for m, s in starts.items())
        raise ValueError(f"the runs start from different models ({listed}); a study compares runs from one start: "
                         "give every run the same init_adapter")
    start = next(iter(starts.values()))
    if start is None:
        return Point("base", 0, None)
    return Point("base", 0, str(start.adapter_dir), None if start.run_dir is None else str(start.run_dir))


def evaluate_points(points: list[Point], problems, eval_config, *, model_run, out_dir, workers: int = 1,
                    progress: bool = False) -> dict:
    """Evaluate every point on ``problems``; returns ``{tag: EvalResult}``.

    ``model_run`` is a run folder whose config names the model and LoRA settings every point
    shares, or that `TrainConfig` itself (e.g. a profile's, to evaluate the base model before
    any run has written its folder). Results are saved under ``out_dir/<tag>`` with a key of
    the protocol, the problems and the adapter's weights: a point whose key matches is loaded,
    not evaluated again.
    ``workers`` > 1 spreads the points over that many processes (one model each, one thread
    each); grading runs in each worker's main thread.
    """
    from opsd_kit.evaluation.evaluate import EvalResult

    configs = {p.method: _run_config(p.run_dir) for p in points if p.adapter and p.run_dir}
    keys = {m: _model_key(c) for m, c in configs.items()}
    keys["model_run"] = _model_key(_run_config(model_run))
    if len(set(keys.values())) != 1:
        raise ValueError(f"runs differ in model or LoRA settings, cannot share one model: {keys}")
    check_start_leakage({p.run_dir for p in points if p.run_dir and p.method != "base"}, problems)
    out_dir = Path(out_dir)
    problem_dicts = [p.to_dict() for p in problems]
    todo = []
    for point in points:
        key = _evaluation_key(point, eval_config, problem_dicts)
        if _saved_key(out_dir / point.tag) != key:
            todo.append((point.tag, point.adapter, key))
    _in_workers(_evaluate_share, todo, workers, _run_config(model_run), problem_dicts, eval_config.to_dict(),
                str(out_dir), progress)
    return {point.tag: EvalResult.load(out_dir / point.tag) for point in points}


def check_start_leakage(run_dirs, problems) -> None:
    """Raise ValueError when a held-out problem (by id or normalised question) is among the
    training problems of a run that one of ``run_dirs`` started from (``init_adapter``, followed
    back; `run.lineage.lineage_leakage`). A run's own training problems are the split's business
    (notebook 00's leakage check). An earlier run that recorded no training problems is warned
    about: its overlap is unknown."""
    import warnings

    from opsd_kit.run.lineage import lineage_leakage

    for run_dir in sorted(map(str, run_dirs)):
        if not _run_config(run_dir).get("init_adapter"):
            continue
        for row in lineage_leakage(run_dir, problems)[1:]:
            if not row["recorded"]:
                warnings.warn(f"{run_dir} started from {row['run_dir'] or 'a bare adapter'}, which recorded no "
                              "training problems: whether they overlap the held-out set is unknown", RuntimeWarning,
                              stacklevel=2)
            elif row["shared_ids"] or row["shared_questions"]:
                raise ValueError(f"{run_dir} started from {row['run_dir']}, which trained on held-out problems (ids "
                                 f"{row['shared_ids'][:5]}, questions of {row['shared_questions'][:5]}); hold out "
                                 "problems disjoint from every run in the chain")


def _in_workers(work, jobs: list, workers: int, *args) -> list:
    """``work(share, *args)`` over ``workers`` shares of ``jobs``: in this process for one share,
    else in spawned processes (one model and one torch thread each; grading, which needs a main
    thread, runs in each one's). ``work`` returns one result per job of its share; the results
    come back in the order of ``jobs``."""
    shares = [jobs[i::workers] for i in range(min(max(1, workers), len(jobs)))]
    if len(shares) <= 1:
        return list(work(jobs, *args)) if jobs else []
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
        outputs = [f.result() for f in [pool.submit(work, share, *args) for share in shares]]
    results = [None] * len(jobs)
    for i, output in enumerate(outputs):
        results[i::len(shares)] = output
    return results


def _evaluate_share(jobs: list, model_run: dict, problem_dicts: list, eval_values: dict, out_dir: str,
                    progress: bool) -> list:
    """Worker: load the model once, evaluate each ``(tag, adapter, key)`` and save it."""
    from contextlib import nullcontext

    from opsd_kit.config import EvalConfig
    from opsd_kit.data.problems import Problem
    from opsd_kit.evaluation.evaluate import evaluate_model

    eval_config = EvalConfig.from_dict(eval_values)
    problems = [Problem(**d) for d in problem_dicts]
    policy, builder = load_run_policy(model_run, student_thinking=eval_config.student_thinking,
                                      prompt=eval_prompt(eval_config))
    for tag, adapter, key in jobs:
        if adapter is not None:
            policy.load_adapter(adapter)
        with policy.model.disable_adapter() if adapter is None else nullcontext():
            result = evaluate_model(policy.model, policy.tokenizer, problems, builder=builder,
                                    settings=eval_config.settings(), mode=eval_config.mode, seed=eval_config.seed,
                                    progress=progress, engine=eval_config.engine)
        folder = result.save(Path(out_dir) / tag)
        (folder / "key.json").write_text(json.dumps(key, indent=2))
    return [None] * len(jobs)


def summarize(points: list[Point], results: dict, eval_config) -> dict:
    """Intervals, paired comparisons and the token ratio of a study (see the module doc).

    Returns ``{"points": DataFrame, "comparisons": DataFrame, "tokens_to_equal_accuracy":
    {mode: dict}}``. Point rows hold ``n_eval``, ``k``, per mode ``<mode>/avg@k``,
    ``<mode>/ci_low``, ``<mode>/ci_high``, and the run's tokens and seconds. Comparison rows
    (``a`` vs ``b``; every method's final point against the base and against each other)
    hold per mode ``diff``, ``ci_low``, ``ci_high``, ``p`` and ``test`` (`stats.paired_test`: exact
    McNemar for k = 1, the sign-flip permutation test of the per-problem avg@k differences for
    k > 1), ``a_better`` and ``b_better`` (problems where one is above the other).
    """
    import pandas as pd

    from opsd_kit.evaluation.stats import accuracy_interval, bootstrap_indices, paired_difference, paired_test

    base = results["base"]
    ids = list(base.table["id"])
    for tag, result in results.items():
        if list(result.table["id"]) != ids:
            raise ValueError(f"evaluation {tag!r} was run on other problems than the base; cannot pair them")
    k, conf = eval_config.k, eval_config.confidence
    indices = bootstrap_indices(len(ids), eval_config.n_bootstrap, eval_config.seed)
    per_problem = {tag: {m: r.table[f"avg_{m}"].to_numpy(float) for m in MODES} for tag, r in results.items()}

    rows = []
    for p in points:
        s = results[p.tag].summary
        row = {"method": p.method, "step": p.step, "tag": p.tag, "n_eval": len(ids), "k": k}
        for m in MODES:
            low, high = accuracy_interval(per_problem[p.tag][m], k, confidence=conf, indices=indices)
            row.update({f"{m}/avg@k": s[f"eval/{m}/avg@k"], f"{m}/ci_low": low, f"{m}/ci_high": high,
                        f"{m}/pass@k": s[f"eval/{m}/pass@k"]})
        row.update({"boxed_rate": s["eval/boxed_rate"], "mean_response_tokens": s["eval/mean_response_tokens"],
                    "truncation_rate": s["eval/truncation_rate"], "generated_tokens": p.generated_tokens,
                    "train_tokens": p.train_tokens, "train_seconds": p.train_seconds})
        rows.append(row)
    table = pd.DataFrame(rows)

    finals = [p for p in points if p.method != "base"]
    finals = [p for p in finals if p.step == max(q.step for q in finals if q.method == p.method)]
    pairs = [(p, points[0]) for p in finals] + [(a, b) for i, a in enumerate(finals) for b in finals[i + 1:]]
    comparisons = []
    for a, b in pairs:
        row = {"a": a.method, "a_step": a.step, "b": b.method, "b_step": b.step, "n_eval": len(ids)}
        for m in MODES:
            diff = paired_difference(per_problem[a.tag][m], per_problem[b.tag][m], indices, conf)
            test = paired_test(per_problem[a.tag][m], per_problem[b.tag][m], k, seed=eval_config.seed)
            row.update({f"{m}/{key}": value for key, value in diff.items()})
            row.update({f"{m}/{key}": value for key, value in test.items()})
        comparisons.append(row)
    ratios = {m: tokens_to_equal_accuracy(table, per_problem, indices, mode=m, confidence=conf) for m in MODES}
    return {"points": table, "comparisons": pd.DataFrame(comparisons), "tokens_to_equal_accuracy": ratios}


TARGET_FRACTION = 0.5
"""`tokens_to_equal_accuracy`'s target: the base accuracy plus this fraction of the smaller of the
two methods' best gains over the base."""


def tokens_to_equal_accuracy(points, per_problem: dict | None = None, indices=None, *, mode: str = "lenient",
                             a: str = "opsd", b: str = "grpo", confidence: float = 0.95,
                             target_fraction: float = TARGET_FRACTION) -> dict:
    """How many times more rollout tokens ``b`` needed than ``a`` to reach the same held-out
    accuracy, read off both methods' curves.

    Definition (per grading ``mode``):

    1. Each method's curve is its accuracy against the rollout tokens it had generated at each
       evaluated checkpoint (step > 0), in token order, starting from the base model at 0 tokens
       (every method starts there), joined by straight lines.
    2. Each method's gain is its best accuracy on the curve minus the base's; the target is
       ``base + target_fraction * min(gain_a, gain_b)``: an accuracy both curves reach.
    3. ``tokens_<m>``: where method m's curve first reaches the target, linearly interpolated
       between the two checkpoints around the crossing (``t0 + (target - acc0) / (acc1 - acc0)
       * (t1 - t0)``).
    4. ``ratio = tokens_b / tokens_a``: > 1 means ``a`` needed fewer tokens.

    Undefined (``ratio`` None, and a ``reason`` that the outputs print) when a method has no
    evaluated checkpoint, when either method never rose above the base (no common improvement:
    then there is no accuracy both reached by training), or when ``a`` reached the target with 0
    tokens. When exactly one method rose above the base, the target is the base plus
    ``target_fraction`` of that method's gain, and the other method's last evaluated tokens
    bound the ratio: ``bound`` is ``{"side": ">", "value": last_b / tokens_a}`` when only ``a``
    reached it (``b`` would need more than all it generated), ``{"side": "<", "value": tokens_b /
    last_a}`` when only ``b`` did; the ``reason`` states it. A bound is a statement about the
    budgets that ran, not an estimate: it gets no interval.

    With ``per_problem`` (``{tag: {mode: per-problem accuracies}}``) and bootstrap ``indices``
    ([resamples, problems], `stats.bootstrap_indices`), every point's accuracy (the base's
    included) is recomputed on each resample of the problems and the whole definition is applied
    again: ``ci_low``/``ci_high`` are the percentile interval of the ratio over the
    resamples where it is defined, ``defined_fraction`` says how many those were.
    """
    import numpy as np

    from opsd_kit.evaluation.stats import percentile_interval

    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    column = f"{mode}/avg@k"
    out = _ratio(points, points[column].to_numpy(float), mode=mode, a=a, b=b, fraction=target_fraction)
    out["target_fraction"] = target_fraction
    if per_problem is None or indices is None or out["ratio"] is None:  # no interval for an undefined ratio
        return out
    accuracy = np.stack([per_problem[t][mode][indices].mean(axis=1) for t in points["tag"]])  # [points, boots]
    ratios = np.array([_ratio(points, accuracy[:, i], mode=mode, a=a, b=b, fraction=target_fraction)["ratio"]
                       for i in range(accuracy.shape[1])], dtype=float)  # None -> nan
    out["ci_low"], out["ci_high"] = percentile_interval(ratios, confidence)
    out["defined_fraction"] = float(np.mean(~np.isnan(ratios)))
    return out


def first_crossing(tokens, accuracy, target: float) -> float | None:
    """The tokens at which the piecewise-linear curve through ``(tokens[i], accuracy[i])`` (in
    token order) first reaches ``target``; None if it never does."""
    if accuracy[0] >= target:
        return float(tokens[0])
    for t0, t1, a0, a1 in zip(tokens, tokens[1:], accuracy, accuracy[1:]):
        if a1 >= target:  # a0 < target here, so a1 > a0
            return float(t0 + (target - a0) / (a1 - a0) * (t1 - t0))
    return None


def _ratio(points, accuracy, *, mode: str, a: str, b: str, fraction: float) -> dict:
    """`tokens_to_equal_accuracy` for one vector of point accuracies (row order of ``points``)."""
    import numpy as np

    method, step = points["method"].to_numpy(), points["step"].to_numpy()
    tokens = points["generated_tokens"].to_numpy(float)
    base = float(accuracy[step == 0][0])
    out = {"mode": mode, "base_accuracy": base, "target_accuracy": None, f"tokens_{a}": None, f"tokens_{b}": None,
           "ratio": None, "reason": ""}
    trained = {m: (method == m) & (step > 0) for m in (a, b)}
    missing = [m for m in (a, b) if not trained[m].any()]
    if missing:
        out["reason"] = f"no evaluated checkpoint of {missing} (never trained)"
        return out
    curves = {}
    for m in (a, b):
        order = np.argsort(tokens[trained[m]], kind="stable")
        curves[m] = (np.concatenate([[0.0], tokens[trained[m]][order]]),
                     np.concatenate([[base], accuracy[trained[m]][order]]))
    best = {m: float(curves[m][1].max()) for m in (a, b)}
    out.update({f"best_{m}": best[m] for m in (a, b)})
    gain = min(best.values()) - base
    out["target_accuracy"] = min(base + fraction * gain, *best.values())  # never above a best by rounding
    if not gain > 0:
        out["reason"] = (f"no common improvement over the base model ({base:.3f}): best {a} {best[a]:.3f}, "
                         f"best {b} {best[b]:.3f}")
        if max(best.values()) > base:  # one method improved: the other's budget bounds the ratio
            up = a if best[a] > base else b
            down = b if up == a else a
            target = min(base + fraction * (best[up] - base), best[up])
            reached, budget = first_crossing(*curves[up], target), float(curves[down][0][-1])
            if reached > 0 and budget > 0:
                value = budget / reached if up == a else reached / budget
                side = ">" if up == a else "<"
                out.update(target_accuracy=target, **{f"tokens_{up}": reached},
                           bound={"side": side, "value": value})
                out["reason"] += (f"; {down} never reached {up}'s target {target:.3f} ({up} at {reached:,.0f} "
                                  f"tokens) within its {budget:,.0f}: ratio {side} {value:.2g}")
        return out
    for m in (a, b):
        out[f"tokens_{m}"] = first_crossing(*curves[m], out["target_accuracy"])
    if not out[f"tokens_{a}"] > 0:
        out["reason"] = f"{a} reached the target with no generated tokens"
        return out
    out["ratio"] = out[f"tokens_{b}"] / out[f"tokens_{a}"]
    return out


def _run_config(run) -> dict:
    """A run's config values: a run folder's ``config.json``, or a `TrainConfig` (or its dict)."""
    from opsd_kit.run.rundir import RunDir

    if isinstance(run, dict):
        return run
    if hasattr(run, "to_dict"):
        return json.loads(json.dumps(run.to_dict()))  # as config.json holds it (tuples become lists)
    return RunDir(run).saved_config()


def held_out(eval_profile: str, eval_file: str = "", overrides: dict | None = None):
    """``(eval_config, problems)``: the named evaluation protocol with ``overrides``, and its
    held-out problems: ``eval_file`` (all of it, e.g. notebook 00's split) or else the
    protocol's own ``data`` at its ``size``, drawn with its ``seed``."""
    from opsd_kit.config import load_eval_profile
    from opsd_kit.data.sources import load_source

    eval_config = load_eval_profile(eval_profile, **(overrides or {}))
    problems, _ = load_source(eval_file or eval_config.data, size=None if eval_file else eval_config.size,
                              seed=eval_config.seed)
    return eval_config, problems


def load_run_config(run_dir):
    """The `TrainConfig` a run folder was trained with (its ``config.json``, validated), or the
    `TrainConfig` given."""
    from opsd_kit.config import TrainConfig

    return TrainConfig.from_saved(_run_config(run_dir))


def answer_token_divergence(points: list[Point], results: dict, problems, *, run, n_samples: int = 16,
                            workers: int = 1):
    """Per evaluated model (the base and each method's final checkpoint): how much of the
    trained divergence, frozen privileged teacher vs that model, falls on the tokens that spell
    the final answer of its own held-out rollouts, and how much on the rest.

    The divergence is ``run``'s (`losses.DivergenceSpec.from_config`; a 'hint_contrast' run is
    shown as forward KL); the first ``n_samples`` first-sample rollouts of each evaluation are
    used (none, and an empty table, for 0); ``workers`` processes share the models. One row per
    model: ``method``, ``step``, ``rollouts``, ``answer_share`` (mean over rollouts of the share of
    the rollout's divergence on its answer tokens), ``answer_mean`` and ``other_mean`` (mean
    per-token divergence on answer tokens and on the rest), ``total``.
    """
    import pandas as pd

    if n_samples == 0:
        return pd.DataFrame(columns=["method", "step", "rollouts", "answer_share", "answer_mean", "other_mean",
                                     "total", "kind"])
    last = {p.method: max(q.step for q in points if q.method == p.method) for p in points}
    finals = [p for p in points if p.method == "base" or p.step == last[p.method]]
    jobs = []
    for point in finals:
        samples = results[point.tag].samples
        first = samples[samples["sample"] == 0].head(n_samples)
        jobs.append((point.method, point.step, point.adapter, [str(i) for i in first["problem_id"]],
                     [list(map(int, ids)) for ids in first["completion_ids"]], list(first["response"])))
    return pd.DataFrame(_in_workers(_answer_split_share, jobs, workers, str(run), [p.to_dict() for p in problems]))


def _answer_split_share(jobs: list, run: str, problem_dicts: list) -> list[dict]:
    """Worker of `answer_token_divergence`: one row per ``(method, step, adapter, ids, completions,
    responses)``."""
    import dataclasses

    from opsd_kit.data.problems import Problem
    from opsd_kit.evaluation.diagnostics import divergence_by_answer_tokens
    from opsd_kit.losses import DivergenceSpec

    spec = DivergenceSpec.from_config(load_run_config(run))
    if spec.needs_wrong_teacher:
        spec = dataclasses.replace(spec, kind="forward_kl")
    by_id = {str(d["id"]): Problem(**d) for d in problem_dicts}
    policy, builder = load_run_policy(run)  # a fresh adapter (LoRA B = 0) is the base model exactly
    rows = []
    for n, (method, step, adapter, ids, completions, responses) in enumerate(jobs):
        if adapter is None and n:
            raise ValueError("the base model must come first in a share: its adapter is the fresh one")
        if adapter is not None:
            policy.load_adapter(adapter)
        table = divergence_by_answer_tokens(policy, builder, [by_id[i] for i in ids], completions, responses,
                                            spec=spec)
        rows.append({"method": method, "step": step, "rollouts": len(table),
                     "answer_share": float(table["answer_share"].mean()),
                     "answer_mean": float(table["answer_mean"].mean()), "other_mean": float(table["other_mean"].mean()),
                     "total": float(table["total"].mean()), "kind": spec.kind})
    return rows


def _model_key(cfg: dict) -> tuple:
    """A run's `config.model_fields`: equal keys share one loaded model."""
    from opsd_kit.config import model_fields

    return tuple(tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in model_fields())


def _evaluation_key(point: Point, eval_config, problem_dicts: list) -> dict:
    """What an evaluation depends on: the protocol, the problems, and the adapter's weights."""
    digest = hashlib.sha256(json.dumps(problem_dicts, sort_keys=True).encode()).hexdigest()
    weights = None
    if point.adapter is not None:
        weights = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(point.adapter).glob("*.safetensors"))))
        weights = weights.hexdigest()
    key = {"eval_config": eval_config.to_dict(), "problems_sha256": digest, "adapter_sha256": weights}
    return json.loads(json.dumps(key))  # as saved in key.json (tuples become lists), so that equal keys compare equal


def _saved_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "key.json").read_text()) if (folder / "summary.json").is_file() else None
    except (OSError, ValueError):
        return None


def eval_prompt(eval_config) -> dict:
    """The student-prompt settings an evaluation protocol sets over the run's own
    (`EvalConfig.student_prompt_format`, `EvalConfig.student_template`; None keeps the run's)."""
    values = {"student_prompt_format": eval_config.student_prompt_format,
              "student_template": eval_config.student_template}
    return {k: v for k, v in values.items() if v is not None}


def eval_prompt_check(run_dir, *, student_thinking="from run", prompt: dict | None = None):
    """The function that refuses a held-out problem whose student prompt cannot fit the run's
    ``max_prompt_tokens`` (`opsd_kit.prompts.PromptBuilder.length_error`), as `load_run_policy`'s
    builder renders it (the same ``student_thinking`` and ``prompt``), on the run's tokenizer
    alone: pass it as ``check`` to
    `opsd_kit.data.sources.load_source` so an over-long problem fails before any model loads."""
    from dataclasses import replace
    from functools import partial

    from opsd_kit.models import load_tokenizer
    from opsd_kit.prompts import build_prompts

    cfg = load_run_config(run_dir)
    if student_thinking != "from run":
        cfg = replace(cfg, student_thinking=student_thinking)
    cfg = replace(cfg, **(prompt or {}))
    return partial(build_prompts(cfg, load_tokenizer(cfg.model)).length_error, teacher=False)


def load_run_policy(run_dir, adapter=None, *, student_thinking="from run", prompt: dict | None = None):
    """The policy and prompt builder a run (a folder, or a `TrainConfig`) trained with, its
    adapter loaded when given.

    ``student_thinking`` overrides the run's student thinking switch (an evaluation protocol
    may differ from training: the paper trains with thinking off and evaluates with it on);
    ``prompt`` (`eval_prompt`) the student prompt's format and template (the paper's
    protocol evaluates chat-templated whatever prompt the run trained on).
    """
    from dataclasses import replace

    from opsd_kit.policy import build_policy
    from opsd_kit.prompts import build_prompts

    cfg = load_run_config(run_dir)
    if not cfg.use_lora:
        raise ValueError("the study compares LoRA adapters; a run with use_lora=False has none")
    # Evaluation only: no EMA copy, no activation recomputation, the transformers backend.
    policy = build_policy(replace(cfg, teacher="frozen", gradient_checkpointing=False, backend="hf"))
    if student_thinking != "from run":
        cfg = replace(cfg, student_thinking=student_thinking)
    cfg = replace(cfg, **(prompt or {}))
    builder = build_prompts(cfg, policy.tokenizer)
    if adapter is not None:
        policy.load_adapter(adapter)
    return policy, builder


def to_record(summary: dict, eval_config) -> dict:
    """The study as plain JSON: per (method, step) ``n_eval``, ``k``, both modes' accuracy with
    ``ci_low``/``ci_high``, generated tokens and training seconds; per method its paired
    difference against the base (``diff``, ``ci_low``, ``ci_high``, ``p`` and which ``test``); every
    other comparison; the tokens-to-equal-accuracy ratios; the protocol."""
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        return value.item() if hasattr(value, "item") else value

    def by_mode(row: dict, fields: dict) -> dict:
        return {m: {out: clean(row[f"{m}/{name}"]) for out, name in fields.items()} for m in MODES}

    accuracy = {"accuracy": "avg@k", "ci_low": "ci_low", "ci_high": "ci_high"}
    difference = {"diff": "diff", "ci_low": "ci_low", "ci_high": "ci_high", "p": "p", "test": "test"}
    points = [dict({key: clean(row[key]) for key in ("method", "step", "n_eval", "k", "generated_tokens",
                                                      "train_tokens", "train_seconds", "boxed_rate",
                                                      "mean_response_tokens", "truncation_rate")},
                   **by_mode(row, accuracy)) for row in summary["points"].to_dict("records")]
    comparisons = [dict({key: clean(row[key]) for key in ("a", "a_step", "b", "b_step", "n_eval")},
                        **by_mode(row, difference)) for row in summary["comparisons"].to_dict("records")]
    vs_base = {c["a"]: {k: v for k, v in c.items() if k not in ("a", "b", "b_step")}
               for c in comparisons if c["b"] == "base"}
    ratios = {m: {k: clean(v) for k, v in r.items()} for m, r in summary["tokens_to_equal_accuracy"].items()}
    return {"eval_config": eval_config.to_dict(), "points": points, "vs_base": vs_base,
            "comparisons": [c for c in comparisons if c["b"] != "base"], "tokens_to_equal_accuracy": ratios}
