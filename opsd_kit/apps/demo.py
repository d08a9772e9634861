"""The main job: notebooks 00 to 04 under papermill, into one run folder.

``python -m opsd_kit.apps.demo --profile cpu-demo --run-dir runs/demo`` (what ``make demo`` runs):
notebook 00 writes the leakage-checked splits; the common start (a short SFT format warm-up on
problems of its own) trains next; the training notebooks (OPSD, GRPO, SFT), each continuing from
it, run then, ``--jobs`` of them at a time (each in its own kernel, one torch thread); the start's
evaluation (the study's base) joins that queue after them and each run's evaluation when its training
ends; notebook 04 then tabulates, compares and draws. ``--plan study`` (``make study``) adds the
shuffled-hint control, second OPSD and GRPO seeds and OPSD + SFT, ``--plan full`` the hint-contrast
loss and RLSD, in the same run folder; ``--plan raw`` runs the demo's methods from the base model
itself (``make study`` runs it in a folder of its own). A training job whose
folder already holds a finished run of the same configuration is reused, not run again, and so
are evaluations already made under the same protocol.
The run folder gets the executed notebooks, each run, the study and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
    gap_problems: int = 0
    """OPSD: held-out problems of notebook 01's teacher-student gap, measured before training
    (0: not measured in this run)."""
    train_split: str = "train"
    """The split of notebook 00 it trains on: 'train', or 'warmup' (the common start's problems,
    disjoint from training and evaluation)."""


#: Per profile: data sizes, the evaluation protocol, the common start and the training runs of
#: each plan. ``start``: a short SFT format warm-up on ``warmup_size`` problems disjoint from
#: training and evaluation, which every run of the demo, study and full plans continues from
#: (``init_adapter``) and which their study's 'base' point is. ``val_size``: problems for choosing
#: settings (`opsd_kit.apps.sweep`, ``make sweep``), disjoint from the rest.
#: cpu-demo: OPSD trains 24 steps; GRPO gets a rollout-token budget above OPSD's total
#: (token-matched, GRPO favoured); SFT trains on the same problems; OPSD and GRPO are evaluated at
#: two points each (``points``), three in the study (``study_points``). The study adds the
#: shuffled-hint OPSD control, a second OPSD seed (whose notebook also measures the
#: teacher-student gap, kept off the demo's critical path), a second GRPO seed, OPSD + SFT
#: (``sft_weight`` 1) and the answer-token divergence split (``answer_split_samples`` rollouts per
#: model, 0 when a plan has none). The full study adds the hint-contrast loss, RLSD (with GRPO's
#: budget and reward) and GRPO rewarded for a leniently read correct answer plus a parsable box.
#: ``raw``: the demo's runs from the base model itself (the other start, in its own run folder),
#: three points per curve for cpu-demo (where its token ratio is defined).
#: The tiny profile's plans have the same shape; tests/test_demo.py runs its study and raw plans,
#: so every notebook path runs in CI.
RAW_GRPO = {"rewards": ["correct_lenient", "format"], "learning_rate": 5e-4}
"""GRPO from the raw model, which never boxes an answer: the strict reward earns nothing there, a
leniently read answer and a parsable box do; the learning rate is the best of the sweep from the
raw model on the validation problems (`make sweep`, docs/results.md)."""
DEMO_PLANS = {
    "tiny": dict(
        train_size=16, eval_size=6, eval_profile="tiny", warmup_size=8, val_size=4,
        start=TrainingJob("start", "sft", {"max_steps": 2}, train_split="warmup"),
        answer_split_samples={"study": 4, "full": 4},
        demo=[TrainingJob("opsd", "opsd", points=2, gap_problems=2), TrainingJob("grpo", "grpo", points=2),
              TrainingJob("sft", "sft")],
        study=[TrainingJob("opsd-shuffled", "opsd", {"teacher_hint": "shuffled"}),
               TrainingJob("opsd-seed1", "opsd", {"seed": 1})],
        full=[TrainingJob("rlsd", "rlsd"), TrainingJob("opsd-sft", "opsd", {"sft_weight": 1.0}),
              TrainingJob("grpo-lenient", "grpo", {"rewards": ["correct_lenient", "format"]})],
        raw=[TrainingJob("opsd", "opsd", points=2), TrainingJob("grpo", "grpo", RAW_GRPO, points=2),
             TrainingJob("sft", "sft")],
        study_points={"opsd-seed1": 2},
    ),
    "cpu-demo": dict(
        train_size=256, eval_size=128, eval_profile="cpu-demo", warmup_size=96, val_size=128,
        start=TrainingJob("start", "sft", {"max_steps": 12}, train_split="warmup"),
        answer_split_samples={"study": 16, "full": 16},
        demo=[TrainingJob("opsd", "opsd", points=2), TrainingJob("grpo", "grpo", points=2), TrainingJob("sft", "sft")],
        study=[TrainingJob("opsd-shuffled", "opsd", {"teacher_hint": "shuffled"}),
               TrainingJob("opsd-seed1", "opsd", {"seed": 1}, gap_problems=8),
               TrainingJob("grpo-seed1", "grpo", {"seed": 1}), TrainingJob("opsd-sft", "opsd", {"sft_weight": 1.0})],
        full=[TrainingJob("opsd-contrast", "opsd", {"divergence": "hint_contrast"}), TrainingJob("rlsd", "rlsd"),
              TrainingJob("grpo-lenient", "grpo", {"rewards": ["correct_lenient", "format"]})],
        raw=[TrainingJob("opsd", "opsd", points=3), TrainingJob("grpo", "grpo", RAW_GRPO, points=3),
             TrainingJob("sft", "sft")],
        study_points={"opsd": 3, "grpo": 3},
    ),
}
PLANS = ("demo", "study", "full", "raw")
"""'demo' < 'study' < 'full' from the common start; 'raw': the runs of ``raw`` from the base model."""


def evaluation_task(method: str) -> str:
    """The name of the pool task that evaluates ``method``'s checkpoints ('base' for the base)."""
    return f"{method}-evaluation"


def notebook_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "notebooks"


def plan_start(profile: str, plan: str = "demo") -> TrainingJob | None:
    """The run every compared run of ``plan`` starts from (None: the base model)."""
    return None if plan == "raw" else DEMO_PLANS[profile].get("start")


def job_overrides(profile: str, job: TrainingJob, run_dir: Path, plan: str = "demo") -> dict:
    """``job``'s config overrides, with ``init_adapter`` naming the plan's start in ``run_dir``."""
    start = plan_start(profile, plan)
    if start is None or job == start:
        return dict(job.overrides)
    return {**job.overrides, "init_adapter": str(run_dir / start.method)}


def plan_jobs(profile: str, plan: str = "demo") -> list[TrainingJob]:
    """The training runs of ``plan``: 'demo'; 'study' = demo plus its extra runs; 'full' = study
    plus the runs that take longest."""
    if profile not in DEMO_PLANS:
        raise ValueError(f"the demo supports PROFILE in {sorted(DEMO_PLANS)}, got {profile!r}")
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    spec = DEMO_PLANS[profile]
    if plan == "raw":
        return list(spec["raw"])
    return [*spec["demo"], *(spec["study"] if plan != "demo" else []), *(spec["full"] if plan == "full" else [])]


def demo_parameters(profile: str, run_dir: Path, plan: str = "demo", workers: int = 1) -> dict[str, dict]:
    """Papermill parameters per job name: '00_data_prep', one per training run, '04_...'."""
    from opsd_kit.config import load_profile

    spec, jobs, start = DEMO_PLANS.get(profile), plan_jobs(profile, plan), plan_start(profile, plan)
    cfg = load_profile(profile)
    data = run_dir / "data"
    files = dict(train_file=str(data / "train.jsonl"), eval_file=str(data / "eval.jsonl"))
    params = {"00_data_prep": dict(train_source=cfg.train_data, train_size=spec["train_size"], eval_source="",
                                   eval_size=spec["eval_size"], warmup_size=spec.get("warmup_size", 0),
                                   val_size=spec.get("val_size", 0), seed=cfg.seed, model=cfg.model,
                                   out_dir=str(data))}
    for job in [start, *jobs] if start else jobs:
        params[job.method] = dict(files, train_file=str(data / f"{job.train_split}.jsonl"), profile=profile,
                                  run_dir=str(run_dir / job.method),
                                  overrides=job_overrides(profile, job, run_dir, plan))
        if job.algorithm == "opsd":
            params[job.method]["gap_problems"] = job.gap_problems
        if job.algorithm == "rlsd":
            params[job.method]["algorithm"] = "rlsd"
    params["04_evaluation_and_token_efficiency"] = dict(
        files, profile=profile, eval_profile=spec["eval_profile"], eval_overrides={}, out_dir=str(run_dir / "study"),
        runs={j.method: str(run_dir / j.method) for j in jobs}, points=plan_points(profile, plan), workers=workers,
        answer_split_samples=spec.get("answer_split_samples", {}).get(plan, 0))
    return params


def plan_points(profile: str, plan: str = "demo") -> dict[str, int]:
    """How many checkpoints notebook 04 evaluates per training run of ``plan``."""
    study_points = DEMO_PLANS[profile].get("study_points", {}) if plan in ("study", "full") else {}
    return {j.method: study_points.get(j.method, j.points) for j in plan_jobs(profile, plan)}


def finished_run(run_dir: Path, profile: str, job: TrainingJob, plan: str = "demo") -> bool:
    """True when ``run_dir`` holds a run that training this job's config would not continue:
    finished, of the same config up to the keys a resumed run may change (`run.rundir.RunDir.finished`)."""
    from opsd_kit.config import load_profile
    from opsd_kit.run.rundir import RunDir

    return RunDir(run_dir).finished(load_profile(profile, job.algorithm, run_dir=str(run_dir),
                                                 **job_overrides(profile, job, run_dir.parent, plan)))


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
    start_job = plan_start(profile, plan)
    every = [start_job, *training] if start_job else training
    todo = [j for j in every if not finished_run(run_dir / j.method, profile, j, plan)]
    for job in every:
        if job not in todo:
            print(f"[demo] {job.method}: a finished run of the same config is in {run_dir / job.method}; reused",
                  flush=True)
    print(f"[demo] {expected_line(profile, plan, todo, jobs, run_dir)}", flush=True)
    timings["00_data_prep"] = _execute("00_data_prep", "00_data_prep", params, run_dir, kernel)
    if start_job in todo:  # the common start, before every run that continues from it
        todo.remove(start_job)
        timings[start_job.method] = _execute(TRAINING_NOTEBOOK[start_job.algorithm], start_job.method, params,
                                             run_dir, kernel)
    start_dir = None if start_job is None else run_dir / start_job.method
    # The pool's queue, in order: the training runs, the base model's evaluation, the evaluation of
    # each reused run; each run's evaluation joins the queue when its training ends. Notebook 04 then
    # finds every evaluation saved under its key and only tabulates, compares and draws.
    evaluate = params[NOTEBOOKS[-1]]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn"))
    with workers, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        running = {pool.submit(_execute, TRAINING_NOTEBOOK[j.algorithm], j.method, params, run_dir, kernel): j
                   for j in todo}
        for method in ["base", *(j.method for j in training if j not in todo)]:
            running[pool.submit(_evaluate, workers, evaluate, method, start_dir)] = evaluation_task(method)
        while running:
            done, _ = wait(running, timeout=progress_every, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                name = task.method if isinstance(task, TrainingJob) else task
                timings[name] = future.result()  # raises the first failure
                if isinstance(task, TrainingJob):
                    running[pool.submit(_evaluate, workers, evaluate, task.method, start_dir)] = \
                        evaluation_task(task.method)
            for task in running.values():
                training_job = isinstance(task, TrainingJob)
                line = progress_line(run_dir / task.method, profile, task, plan) if training_job else None
                if line:
                    print(f"[demo] {task.method}: {line}", flush=True)
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


#: Where the expected total printed before a run comes from: demo_times.json (package data) holds,
#: per profile, what each part took on the reference machine (two jobs at a time, one torch thread
#: each, a fresh run folder) and what `calibrate` measured there (None: not recorded). Per training
#: run its notebook; ``point``: one checkpoint's evaluation (for tiny, the mean over the study's
#: evaluations, the first of each worker paying its imports); ``split``: one model's answer-token
#: split (16 rollouts, as many at once as jobs); ``04``: the rest of notebook 04. The cpu-demo times
#: come from the `make demo` and `make study` runs of docs/results.md; its full plan has none.
_REFERENCE = json.loads((Path(__file__).with_name("demo_times.json")).read_text())
REFERENCE_MACHINE: str = _REFERENCE["machine"]
REFERENCE_SECONDS: dict[str, dict[str, float]] = _REFERENCE["seconds"]
REFERENCE_CALIBRATION: dict[str, dict | None] = _REFERENCE["calibration"]


def calibrate(profile: str, repeats: int = 3) -> dict:
    """What dominates the demo's time, measured on the profile's model with one torch thread (as
    each demo job runs): ``train_step``, the seconds of one LoRA forward and backward pass over
    2 x 64 tokens, and ``decode_step``, the seconds per token of greedy decoding 16 tokens after
    a 32-token prompt (the KV cache on); best of ``repeats``. ``spread``: the largest ratio of
    the slowest to the fastest repeat of either (how steady the machine was meanwhile)."""
    import torch

    from opsd_kit.config import load_profile
    from opsd_kit.policy import Policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = Policy.from_pretrained(load_profile(profile).model, device="cpu").model
        generator = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        train_ids = torch.randint(vocab, (2, 64), generator=generator)
        prompt = torch.randint(vocab, (1, 32), generator=generator)
        train, decode = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=train_ids, labels=train_ids).loss.backward()
            train.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=0)
            decode.append((time.perf_counter() - start) / 16)
    finally:
        torch.set_num_threads(threads)
    return {"train_step": min(train), "decode_step": min(decode),
            "spread": max(max(train) / min(train), max(decode) / min(decode))}


def expected_line(profile: str, plan: str, todo: list[TrainingJob], jobs: int, run_dir: Path) -> str:
    """What the demo prints before it starts: the expected total with the range its calibration
    allows, or why there is none.

    Every reference time is scaled by this machine's speed relative to the reference machine,
    measured by `calibrate` as two ratios (training step, decode step): the estimate uses their
    geometric mean, the range each ratio alone, widened by the spread of the repeats."""
    reference = REFERENCE_SECONDS.get(profile, {})
    parts = ["00_data_prep", *(reference_key(plan, j) for j in todo), "point", "split", "04"]
    missing = [p for p in parts if p not in reference]
    if missing:
        return f"no expected total: no reference time for {missing} of profile {profile!r}"
    there = REFERENCE_CALIBRATION.get(profile)
    if there is None:
        return (f"no expected total: the reference machine's calibration for profile {profile!r} is not recorded "
                f"(python -m opsd_kit.apps.demo --calibrate --profile {profile} prints it)")
    here = calibrate(profile)
    ratios = {part: here[part] / there[part] for part in ("train_step", "decode_step")}
    scale = math.sqrt(ratios["train_step"] * ratios["decode_step"])
    low, high = min(ratios.values()) / here["spread"], max(ratios.values()) * here["spread"]
    total, unscaled = expected_seconds(profile, plan, todo, jobs, run_dir, scale), expected_seconds(
        profile, plan, todo, jobs, run_dir)
    return (f"expected total about {_duration(total)} (between {_duration(low * unscaled)} and "
            f"{_duration(high * unscaled)}: this machine ran a training step {1 / ratios['train_step']:.2f}x "
            f"and a decode step {1 / ratios['decode_step']:.2f}x as fast as {there['machine']}, where each part "
            f"was measured)")


def reference_key(plan: str, job: TrainingJob) -> str:
    """The name of ``job``'s training time in `REFERENCE_SECONDS`: its method, prefixed 'raw/' in
    the raw plan (the same methods from another start take other times)."""
    return f"raw/{job.method}" if plan == "raw" else job.method


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 180 else f"{seconds / 60:.0f} min"


def expected_seconds(profile: str, plan: str, todo: list[TrainingJob], jobs: int, run_dir: Path,
                     scale: float = 1.0) -> float:
    """The expected total: `REFERENCE_SECONDS` times ``scale`` (this machine's time over the
    reference machine's for the same work, from `calibrate`), with the pool's queue played out on ``jobs`` slots as
    `run_demo` fills it (training runs, the base evaluation unless saved, reused runs' new points;
    each run's evaluation queued when its training ends), after notebook 00 and the common start
    (if it is in ``todo``), then notebook 04."""
    reference = REFERENCE_SECONDS[profile]
    wanted = plan_points(profile, plan)
    start = plan_start(profile, plan)
    before = reference[start.method] if start in todo else 0.0
    todo = [j for j in todo if j != start]
    base_saved = (run_dir / "study" / "evaluations" / "base" / "key.json").is_file()
    queue = [(0.0, reference[reference_key(plan, j)], j) for j in todo]
    queue += [(0.0, reference["point"] * (not base_saved), None)]
    # a reused run's demo points are saved: only the points the plan adds are new
    queue += [(0.0, reference["point"] * (wanted[j.method] - j.points), None)
              for j in plan_jobs(profile, plan) if j not in todo]
    slots = [0.0] * max(1, jobs)
    while queue:
        submitted, seconds, job = queue.pop(0)
        slot = slots.index(min(slots))
        slots[slot] = max(slots[slot], submitted) + seconds
        if job is not None:
            queue.append((slots[slot], reference["point"] * wanted[job.method], None))
            queue.sort(key=lambda task: task[0])  # first submitted, first served
    split_samples = DEMO_PLANS[profile].get("answer_split_samples", {}).get(plan, 0)
    split = math.ceil((1 + len(wanted)) / max(1, jobs)) * reference["split"] if split_samples else 0.0
    return scale * (reference["00_data_prep"] + before + max(slots) + reference["04"] + split)


def progress_line(run_dir: Path, profile: str, job: TrainingJob, plan: str = "demo") -> str | None:
    """'step k/N, s per step, about M min left' from a running job's metrics.jsonl (None before
    its first step). With a rollout-token budget, the larger of the step and token fractions counts."""
    from opsd_kit.config import load_profile

    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    if not lines:
        return None
    last = json.loads(lines[-1])
    overrides = job_overrides(profile, job, run_dir.parent, plan)
    cfg = load_profile(profile, job.algorithm, run_dir=str(run_dir), **overrides)
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


def _evaluate(workers, params: dict, method: str, start: Path | None) -> float:
    """Evaluate ``method``'s checkpoints (or, for 'base', the common start: the run folder
    ``start`` or the base model) under notebook 04's protocol, on its problems and with its choice
    of points, in one of the ``workers`` processes (they outlive a task, so torch and transformers
    are imported once per process; grading needs their main thread); 04 finds the results saved
    under the same keys and reuses them."""
    begin = time.perf_counter()
    print(f"[demo] {evaluation_task(method)} started", flush=True)
    workers.submit(_evaluate_in_process, params, method, None if start is None else str(start)).result()
    seconds = round(time.perf_counter() - begin, 1)
    print(f"[demo] {evaluation_task(method)} done in {seconds} s", flush=True)
    return seconds


def _evaluate_in_process(params: dict, method: str, start: str | None) -> None:
    """Notebook 04's evaluation of ``method``'s points (for 'base' the common start: the final
    adapter of the run folder ``start``, or the profile's base model), saved where 04 finds them."""
    from transformers.utils import logging as hf_logging

    from opsd_kit.config import load_profile
    from opsd_kit.evaluation import study

    hf_logging.disable_progress_bar()  # the demo's terminal shows one line per task, not a weight-loading bar
    eval_config, problems = study.held_out(params["eval_profile"], params["eval_file"], params["eval_overrides"])
    if method == "base" and start is not None:  # the point `study.common_start` names for runs from it
        model_run, points = start, [study.Point("base", 0, str(Path(start) / "adapter"), start)]
    elif method == "base":  # the profile names the model and prompts every run shares
        model_run, points = load_profile(params["profile"]), [study.Point("base", 0, None)]
    else:
        model_run = params["runs"][method]
        points = [p for p in study.study_points({method: model_run}, params["points"]) if p.adapter]
    study.evaluate_points(points, problems, eval_config, model_run=model_run,
                          out_dir=Path(params["out_dir"]) / "evaluations")


def _local_kernels() -> dict:
    """On POSIX, papermill's kernels talk over local IPC sockets, each under its own name, instead
    of TCP ports: nothing listens on the network, and ipykernel has no reason to print its
    'running over TCP without encryption' warning into the demo's output; and a finished
    notebook's kernel is shut down without the SIGINT jupyter_client sends first."""
    if os.name != "posix":
        return {}
    import tempfile
    import uuid

    from jupyter_client import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(tempfile.gettempdir(), f"opsd-kit-kernel-{uuid.uuid4().hex[:12]}")

        async def _async_interrupt_kernel(self):
            # jupyter_client sends SIGINT before every shutdown; a notebook that has finished has
            # nothing to interrupt, and the signal only makes the kernel log "KeyboardInterrupt
            # caught in kernel" into the demo's output. (A cell timeout still interrupts.)
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return {"kernel_manager_class": IPCKernelManager}


def _execute(notebook: str, job: str, params: dict, run_dir: Path, kernel: str | None) -> float:
    papermill = _papermill()
    start = time.perf_counter()
    print(f"[demo] {job} ({notebook}) started", flush=True)
    out = run_dir / (f"{notebook}.ipynb" if job == notebook else f"{notebook}-{job}.ipynb")
    papermill.execute_notebook(str(notebook_dir() / f"{notebook}.ipynb"), str(out), parameters=params[job],
                               kernel_name=kernel, cwd=str(run_dir), progress_bar=False, **_local_kernels())
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
    parser.add_argument("--calibrate", action="store_true",
                        help="only print `calibrate`'s measurement for --profile (to record with reference times)")
    args = parser.parse_args(argv)
    if args.calibrate:
        print(json.dumps(calibrate(args.profile)))
        return 0
    summary = run_demo(args.profile, args.run_dir or f"runs/demo-{args.profile}", plan=args.plan, jobs=args.jobs,
                       kernel=args.kernel)
    print(results(Path(summary["run_dir"])), end="")
    return 0


def results(run_dir: Path) -> str:
    """What the demo prints at the end: the tables of `opsd_kit.evaluation.report` and where the
    files are."""
    from opsd_kit.evaluation.report import render

    study = run_dir / "study"
    files = [run_dir / "summary.json", *sorted(study.glob("*.csv")), *sorted(study.glob("*.png"))]
    return (f"\n{render(run_dir)}\nFiles in {run_dir}: the executed notebooks, one folder per run, and\n"
            + "".join(f"  {f.relative_to(run_dir)}\n" for f in files))


if __name__ == "__main__":
    sys.exit(main())
