"""The main job: notebooks 00 to 04 under papermill, into one run folder.

``python -m opsd_kit.demo --profile cpu-demo --run-dir runs/demo`` (what ``make demo`` runs):
notebook 00 writes the leakage-checked splits; the training notebooks (OPSD, GRPO, SFT)
run next, ``--jobs`` of them at a time (each in its own kernel, one torch thread), and the base
model's evaluation joins that queue last, so it runs on the first free core; notebook 04
evaluates the trained checkpoints and compares them. ``--plan study`` (``make study``) adds the
shuffled-hint control, second seeds and the further variants in the same run folder: a
training job whose folder already holds a finished run of the same configuration is
reused, not run again, and so are evaluations already made under the same protocol.
The run folder gets the executed notebooks, each run, the study and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

NOTEBOOKS = ("00_data_prep", "01_opsd_training", "02_grpo_baseline", "03_sft_baseline",
             "04_evaluation_and_token_efficiency")
TRAINING_NOTEBOOK = {"opsd": "01_opsd_training", "grpo": "02_grpo_baseline", "sft": "03_sft_baseline",
                     "rlsd": "02_grpo_baseline"}


@dataclass(frozen=True)
class TrainingJob:
    """One training run of the study: a method name, its algorithm and config overrides."""

    method: str
    algorithm: str
    overrides: dict = field(default_factory=dict)
    points: int = 1
    """How many of its checkpoints the study evaluates (the final one, and evenly spaced
    earlier ones)."""


#: Per profile: data sizes, the evaluation protocol, and the training runs of each plan.
#: cpu-demo: OPSD trains 24 steps; GRPO gets a rollout-token budget above OPSD's total
#: (token-matched, GRPO favoured); SFT trains on the same problems. The study adds the
#: shuffled-hint OPSD control, a second seed of OPSD and GRPO, the hint-contrast loss, RLSD
#: (with GRPO's budget) and OPSD's mid-run checkpoint (``study_points``), which do not fit the
#: demo's 40 minutes on a 2-core CPU. The tiny profile keeps the control in its demo, so that
#: every notebook path runs in CI.
DEMO_PLANS = {
    "tiny": dict(
        train_size=16, eval_size=6, eval_profile="tiny", gap_problems=2,
        demo=[TrainingJob("opsd", "opsd", points=2), TrainingJob("opsd-shuffled", "opsd", {"teacher_hint": "shuffled"}),
              TrainingJob("grpo", "grpo", points=2), TrainingJob("sft", "sft")],
        study=[TrainingJob("opsd-seed1", "opsd", {"seed": 1}), TrainingJob("rlsd", "rlsd")],
        study_points={"opsd-seed1": 2},
    ),
    "cpu-demo": dict(
        train_size=256, eval_size=144, eval_profile="cpu-demo", gap_problems=8,
        demo=[TrainingJob("opsd", "opsd"), TrainingJob("grpo", "grpo"), TrainingJob("sft", "sft")],
        study=[TrainingJob("opsd-shuffled", "opsd", {"teacher_hint": "shuffled"}),
               TrainingJob("opsd-seed1", "opsd", {"seed": 1}),
               TrainingJob("grpo-seed1", "grpo", {"seed": 1}),
               TrainingJob("opsd-contrast", "opsd", {"divergence": "hint_contrast"}),
               TrainingJob("rlsd", "rlsd")],
        study_points={"opsd": 2},
    ),
}
PLANS = ("demo", "study")
BASE_EVALUATION = "base-evaluation"


def notebook_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "notebooks"


def plan_jobs(profile: str, plan: str = "demo") -> list[TrainingJob]:
    """The training runs of ``plan`` ('demo', or 'study' = demo plus its extra runs)."""
    if profile not in DEMO_PLANS:
        raise ValueError(f"the demo supports PROFILE in {sorted(DEMO_PLANS)}, got {profile!r}")
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    spec = DEMO_PLANS[profile]
    return list(spec["demo"]) + (list(spec["study"]) if plan == "study" else [])


def demo_parameters(profile: str, run_dir: Path, plan: str = "demo", workers: int = 1) -> dict[str, dict]:
    """Papermill parameters per job name: '00_data_prep', one per training run, '04_...'."""
    from .config import load_profile

    spec, jobs = DEMO_PLANS.get(profile), plan_jobs(profile, plan)
    cfg = load_profile(profile)
    data = run_dir / "data"
    files = dict(train_file=str(data / "train.jsonl"), eval_file=str(data / "eval.jsonl"))
    params = {"00_data_prep": dict(train_source=cfg.train_data, train_size=spec["train_size"], eval_source="",
                                   eval_size=spec["eval_size"], seed=cfg.seed, model=cfg.model, out_dir=str(data))}
    for job in jobs:
        params[job.method] = dict(files, profile=profile, run_dir=str(run_dir / job.method),
                                  overrides=dict(job.overrides))
        if job.algorithm == "opsd":
            params[job.method]["gap_problems"] = spec["gap_problems"]
        if job.algorithm == "rlsd":
            params[job.method]["algorithm"] = "rlsd"
    params["04_evaluation_and_token_efficiency"] = dict(
        files, profile=profile, eval_profile=spec["eval_profile"], out_dir=str(run_dir / "study"),
        runs={j.method: str(run_dir / j.method) for j in jobs},
        points={j.method: j.points for j in jobs} | (spec.get("study_points", {}) if plan == "study" else {}),
        workers=workers)
    return params


def finished_run(run_dir: Path, profile: str, job: TrainingJob) -> bool:
    """True when ``run_dir`` holds a final adapter trained with exactly this job's config."""
    from .config import load_profile

    saved = run_dir / "config.json"
    if not (saved.is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()):
        return False
    want = load_profile(profile, job.algorithm, run_dir=str(run_dir), **job.overrides).to_dict()
    return json.loads(saved.read_text()) == json.loads(json.dumps(want))


def run_demo(profile: str, run_dir, *, plan: str = "demo", jobs: int = 2, kernel: str | None = None,
             progress_every: float = 60.0) -> dict:
    """Execute the plan; stop at the first failure (papermill keeps the failed notebook, with
    its error, in the run folder). Every ``progress_every`` seconds one line per running training
    job says its step, the time per step and the time left. Returns and writes ``summary.json``."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    params = demo_parameters(profile, run_dir, plan, workers=jobs)
    training = plan_jobs(profile, plan)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    print(f"[demo] {profile} / {plan}: 00, then {len(training)} training runs ({jobs} at a time), then 04",
          flush=True)
    timings["00_data_prep"] = _execute("00_data_prep", "00_data_prep", params, run_dir, kernel)
    todo = [j for j in training if not finished_run(run_dir / j.method, profile, j)]
    for job in training:
        if job not in todo:
            print(f"[demo] {job.method}: a finished run of the same config is in {run_dir / job.method}; reused",
                  flush=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        running = {pool.submit(_execute, TRAINING_NOTEBOOK[j.algorithm], j.method, params, run_dir, kernel): j
                   for j in todo}
        # queued last, so it starts when a training job has finished (and a run folder names the model)
        running[pool.submit(_evaluate_base, params[NOTEBOOKS[-1]])] = BASE_EVALUATION
        while running:
            done, _ = wait(running, timeout=progress_every, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                timings[getattr(job, "method", job)] = future.result()  # raises the first failure
            for job in running.values():
                line = progress_line(run_dir / job.method, profile, job) if job != BASE_EVALUATION else None
                if line:
                    print(f"[demo] {job.method}: {line}", flush=True)
    name = "04_evaluation_and_token_efficiency"
    timings[name] = _execute(name, name, params, run_dir, kernel)
    total = round(time.perf_counter() - start, 1)
    summary = {"profile": profile, "plan": plan, "run_dir": str(run_dir), "jobs": jobs,
               "notebook_seconds": timings, "total_seconds": total}
    study = run_dir / "study" / "study.json"
    if study.is_file():
        summary.update(json.loads(study.read_text()))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] total {total / 60:.1f} min ({total} s); summary in {run_dir / 'summary.json'}", flush=True)
    return summary


def progress_line(run_dir: Path, profile: str, job: TrainingJob) -> str | None:
    """'step k/N, s per step, about M min left' from a running job's metrics.jsonl (None before
    its first step). With a rollout-token budget, the larger of the step and token fractions counts."""
    from .config import load_profile

    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    if not lines:
        return None
    last = json.loads(lines[-1])
    cfg = load_profile(profile, job.algorithm, run_dir=str(run_dir), **job.overrides)
    done = last["step"] / cfg.max_steps
    if cfg.max_generated_tokens:
        done = max(done, last["tokens/generated_total"] / cfg.max_generated_tokens)
    per_step = last["time/elapsed"] / last["step"]
    left = last["time/elapsed"] * (1 - done) / max(done, 1e-9)
    return (f"step {last['step']}/{cfg.max_steps} ({100 * done:.0f}%), {per_step:.0f} s per step, "
            f"about {left / 60:.0f} min left")


def _papermill():
    """papermill, which runs the notebooks; it is in the `notebooks` extra, not a core dependency."""
    try:
        import papermill
    except ImportError as err:
        raise ImportError("the demo runs the notebooks with papermill, which is not installed: "
                          "pip install 'opsd_kit[notebooks]' (or `make install`)") from err
    return papermill


def _evaluate_base(params: dict) -> float:
    """The base model's evaluation under notebook 04's protocol and problems, in its own process
    (grading needs a main thread); 04 then finds it saved under the same key and reuses it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    print(f"[demo] {BASE_EVALUATION} started", flush=True)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_evaluate_base_in_process, params).result()
    seconds = round(time.perf_counter() - start, 1)
    print(f"[demo] {BASE_EVALUATION} done in {seconds} s", flush=True)
    return seconds


def _evaluate_base_in_process(params: dict) -> None:
    from . import study
    from .config import load_eval_profile
    from .data import load_source

    eval_config = load_eval_profile(params["eval_profile"])
    problems, _ = load_source(params["eval_file"], size=None, seed=eval_config.seed)
    model_run = next(d for d in params["runs"].values() if (Path(d) / "config.json").is_file())
    study.evaluate_points([study.Point("base", 0, None)], problems, eval_config, model_run=model_run,
                          out_dir=Path(params["out_dir"]) / "evaluations")


def _execute(notebook: str, job: str, params: dict, run_dir: Path, kernel: str | None) -> float:
    papermill = _papermill()
    start = time.perf_counter()
    print(f"[demo] {job} ({notebook}) started", flush=True)
    out = run_dir / (f"{notebook}.ipynb" if job == notebook else f"{notebook}-{job}.ipynb")
    papermill.execute_notebook(str(notebook_dir() / f"{notebook}.ipynb"), str(out), parameters=params[job],
                               kernel_name=kernel, cwd=str(run_dir), progress_bar=False)
    seconds = round(time.perf_counter() - start, 1)
    print(f"[demo] {job} done in {seconds} s", flush=True)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-demo", choices=sorted(DEMO_PLANS))
    parser.add_argument("--plan", default="demo", choices=PLANS)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--jobs", type=int, default=2, help="training notebooks (and evaluation workers) at once")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebooks' own)")
    args = parser.parse_args(argv)
    summary = run_demo(args.profile, args.run_dir or f"runs/demo-{args.profile}", plan=args.plan, jobs=args.jobs,
                       kernel=args.kernel)
    print(json.dumps({k: summary.get(k) for k in ("notebook_seconds", "total_seconds", "vs_base")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
