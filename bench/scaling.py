"""OPSD step throughput: two processes (``accelerate launch``, one thread each) vs one, same global batch.

Both train the cpu-demo profile (SmolLM2-135M, ``rollout_backend="fast"``) for ``--steps`` optimizer
steps from the same seed, at each global batch of ``--problems-per-step`` (the profile's 8 first):
one process takes all the step's problems, two take half each (`Trainer.step_problems`) and sum
their LoRA gradients with one ``accelerator.reduce`` (`trainer.sum_over_processes`). The rollouts
are greedy here (the sampler's temperature set to 0; the loss keeps the profile's temperature),
so that both runs train on the same completions and their final adapters can be compared: sampled
rollouts draw from a per-process random stream, which differs between one and two processes.

Each run is a fresh set of processes; runs alternate (one, two, then two, one). Throughput: steps
after the first (its time includes building the engine and oneDNN's start) per second, from each
step's own wall time; ``speedup`` = one process's median step time / two processes' (the median
over repeats); ``speedup`` is the profile's batch, ``speedup_by_problems_per_step`` every batch,
``speedup_per_repeat`` each pair's own ratio (their spread is the run-to-run noise).
Per process and step the worker also records its phases (generate, student, teacher, backward,
optimizer) and the seconds spent inside ``accelerator.reduce``: a process waits there for the
slower one (rollout imbalance: rows finish at different lengths) and then all-reduces the LoRA
gradients. ``ceiling`` is what the phases allow: the one-process step over generation as two
processes measured it plus every other phase of one process halved (no reduce, no imbalance).

Agreement: the greedy completions of both runs (per step and prompt; where they part, the logit
gap at the first step they part against a rounding tolerance: `rollout_agreement`), and the final
adapters: the relative difference ``||A_two - A_one|| / ||A_one - A_start||`` against a rounding bound for a
weight's gradient (float32; the longest reduction n: hidden, MLP, vocabulary width or the step's
loss tokens; through the forward's and the backward's layers; once per step), probabilistic
(sqrt(n) eps a reduction; the worst case, n eps, is recorded too). The two ranks' adapters must
be identical (they apply the same all-reduced update). The adapter bound holds only where the
runs trained on the same completions.

The parts (`parts_worker`, two processes, ``--parts-repeats`` times): decode time at all the
first batch's rows and at half of them, alone and beside the other process; the gradient
all-reduce tensor by tensor and in one buffer.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py --steps 3 --repeats 3 --problems-per-step 8 64 --json bench/results/scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (the order alternates)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the cpu-demo profile's")
    p.add_argument("--problems-per-step", type=int, nargs="+", default=[8],
                   help="global batches to measure (even: two processes take half each); the first is reported as `speedup`")
    p.add_argument("--json")
    p.add_argument("--note", default=None, help="the conditions of the run, stored in the JSON (e.g. what else ran)")
    p.add_argument("--parts-repeats", type=int, default=3,
                   help="repeats of each measurement of the parts (0: skip them)")
    p.add_argument("--worker-dir", help="(internal) train in this folder")
    p.add_argument("--parts", action="store_true", help="(internal) with --worker-dir: measure the parts")
    return p.parse_args(argv)


def worker(args) -> None:
    """Train (one process of a run); each rank writes its timings, rollouts and adapter."""
    import torch

    from opsd_kit.config import load_profile
    from opsd_kit.rollout.sampler import RolloutSampler
    from opsd_kit.trainer import Trainer

    torch.set_num_threads(1)
    folder = Path(args.worker_dir)
    overrides = dict(run_dir=str(folder / "run"), progress=False, max_steps=args.steps, save_every=10_000,
                     problems_per_step=args.problems_per_step[0])
    if args.max_new_tokens:
        overrides["max_new_tokens"] = args.max_new_tokens
    config = load_profile("cpu-demo", **overrides)
    rollouts, before_step = [], []  # [step, prompt ids, completion ids]; the adapter before each step
    sample = RolloutSampler.sample

    def greedy(self, prompt_ids, settings, step, prefill=None):
        import dataclasses

        out = sample(self, prompt_ids, dataclasses.replace(settings, temperature=0.0), step, prefill=prefill)
        rollouts.extend([len(before_step) - 1, prompt_ids[i], c] for i, c in zip(out.prompt_index, out.completion_ids))
        return out

    RolloutSampler.sample = greedy
    trainer = Trainer(config)
    rank = trainer.accelerator.process_index
    start = {k: v.clone() for k, v in trainer.policy.lora_state_dict().items()}
    reduce, in_reduce = trainer.accelerator.reduce, [0.0]

    def timed_reduce(*a, **k):
        t0 = time.perf_counter()
        try:
            return reduce(*a, **k)
        finally:
            in_reduce[0] += time.perf_counter() - t0

    trainer.accelerator.reduce = timed_reduce
    steps, optimizer_step = [], trainer._optimizer_step

    def timed_step():
        before_step.append(trainer.policy.lora_state_dict())
        in_reduce[0] = 0.0
        t0 = time.perf_counter()
        metrics = optimizer_step()
        steps.append({"seconds": time.perf_counter() - t0, "reduce_s": in_reduce[0],
                      "loss_tokens": metrics["tokens/loss_tokens"],
                      **{k: v for k, v in metrics.items() if k.startswith("time/")}})
        return metrics

    trainer._optimizer_step = timed_step
    trainer.train()
    torch.save({"start": start, "final": trainer.policy.lora_state_dict(), "before_step": before_step},
               folder / f"adapter{rank}.pt")
    cfg = trainer.policy.causal_lm.config
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers")}
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": trainer.accelerator.num_processes,
                                                         "steps": steps, "rollouts": rollouts, "shape": shape}))


def parts_worker(args) -> None:
    """What bounds the second process, measured in two processes (rank 0 writes ``parts.json``):

    * decode: greedy rollouts of the fast engine (as in training: the adapter merged each call) for
      the global batch's first ``2M`` prompts on rank 0 alone, then its first ``M`` alone, then each
      rank its ``M`` at once (``M`` = half the first ``--problems-per-step``): what halving the rows
      buys, and what a second process decoding beside it costs;
    * gradient all-reduce: the adapter's gradients summed tensor by tensor (one collective each)
      and in one flat buffer (`trainer.sum_over_processes`, what the trainer does).
    Each after a barrier, ``--parts-repeats`` times after one untimed round; medians."""
    import dataclasses
    from functools import partial

    import torch

    from opsd_kit.config import load_profile
    from opsd_kit.trainer import Trainer, sum_over_processes

    torch.set_num_threads(1)
    rows = args.problems_per_step[0]
    trainer = Trainer(load_profile("cpu-demo", run_dir=str(Path(args.worker_dir) / "run"), progress=False,
                                   problems_per_step=rows))
    acc, algorithm = trainer.accelerator, trainer.algorithm
    rank, half = acc.process_index, rows // 2
    prompts = [algorithm.prompts.student[p.id] for p in trainer.problems[:rows]]
    settings = dataclasses.replace(trainer.config.rollout_settings(), temperature=0.0)

    def decode(ids) -> float:
        t0 = time.perf_counter()
        algorithm.sampler.sample(ids, settings, step=0)
        return time.perf_counter() - t0

    reduce = partial(acc.reduce, reduction="sum")
    grads = [torch.randn_like(p) for p in trainer.policy.model.parameters() if p.requires_grad]

    def per_tensor() -> float:
        t0 = time.perf_counter()
        for g in grads:
            g.copy_(reduce(g))
        return time.perf_counter() - t0

    def flat() -> float:
        t0 = time.perf_counter()
        sum_over_processes(grads, 0.0, reduce)
        return time.perf_counter() - t0

    times = {k: [] for k in ("decode_all_rows_alone_s", "decode_half_rows_alone_s", "decode_half_rows_both_s",
                             "allreduce_per_tensor_s", "allreduce_one_buffer_s")}
    for r in range(args.parts_repeats + 1):  # the first round (engine built, oneDNN warmed up) untimed
        keep = r > 0
        acc.wait_for_everyone()
        if rank == 0:
            alone = decode(prompts), decode(prompts[:half])
        acc.wait_for_everyone()
        both = decode(prompts[rank * half:(rank + 1) * half])
        acc.wait_for_everyone()
        tensor_s = per_tensor()
        acc.wait_for_everyone()
        flat_s = flat()
        if keep and rank == 0:
            for key, value in zip(times, (*alone, both, tensor_s, flat_s)):
                times[key].append(value)
    if rank == 0:
        (Path(args.worker_dir) / "parts.json").write_text(json.dumps(dict(
            rows_all=rows, rows_half=half, tensors=len(grads), values=sum(g.numel() for g in grads),
            times=times, median={k: _common.median(v) for k, v in times.items()})))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, problems: int, args, folder: Path, *extra: str) -> float:
    """This script as a worker in ``folder`` in fresh processes; returns the wall seconds."""
    me = [str(Path(__file__).resolve()), "--steps", str(args.steps), "--worker-dir", str(folder),
          "--problems-per-step", str(problems), "--parts-repeats", str(args.parts_repeats), *extra]
    if args.max_new_tokens:
        me += ["--max-new-tokens", str(args.max_new_tokens)]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:  # as tests/test_trainer.py launches two CPU processes (torchrun; --cpu would need mpirun)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
               "--main_process_port", str(free_port()), *me]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=_common.ROOT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run with {processes} process(es) failed (rc={proc.returncode}): {' '.join(cmd)}")
    return wall


def run(processes: int, problems: int, args, folder: Path) -> dict:
    """One training run in fresh processes; returns each rank's record."""
    wall = launch(processes, problems, args, folder)
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(processes)]
    return {"processes": processes, "problems_per_step": problems, "wall_s": wall, "ranks": ranks}


def summarise(record: dict) -> dict:
    """Step times after the first: a step ends when its slowest process does (they meet in the
    all-reduce), so the step time is the per-step maximum over ranks."""
    per_step = [max(r["steps"][i]["seconds"] for r in record["ranks"]) for i in range(len(record["ranks"][0]["steps"]))]
    timed = per_step[1:] or per_step
    phases = {}
    for r in record["ranks"]:
        for key in ("reduce_s", "time/generate", "time/student", "time/teacher", "time/backward", "time/optimizer"):
            phases.setdefault(key, []).append([s.get(key, 0.0) for s in r["steps"][1:] or r["steps"]])
    return {"step_s": per_step, "median_step_s": _common.median(timed),
            "phases_per_rank": {k: [sum(v) / len(v) for v in vs] for k, vs in phases.items()}}


def parted_rollouts(rollouts: dict) -> tuple[dict, bool, int]:
    """The greedy completions of one process (``rollouts[1]``) and two (``rollouts[2]``), each a list
    of [step, prompt ids, completion ids], compared per step and prompt: ({step: [(prompt, one's
    completion, two's completion)] where they differ}, whether both runs decoded the same prompts
    at every step, the completions compared)."""
    by = {p: {} for p in (1, 2)}
    for p, rows in rollouts.items():
        for step, prompt, completion in rows:
            by[p].setdefault((step, json.dumps(prompt)), []).append(completion)
    parted = {}
    for key in sorted(by[1]):
        for a, b in zip(sorted(by[1][key]), sorted(by[2].get(key, []))):
            if a != b:
                parted.setdefault(key[0], []).append((json.loads(key[1]), a, b))
    same_prompts = {k: len(v) for k, v in by[1].items()} == {k: len(v) for k, v in by[2].items()}
    return parted, same_prompts, sum(len(v) for v in by[1].values())


def rollout_agreement(rollouts: dict, before_step: list, args) -> dict:
    """`parted_rollouts`, and at the first step where completions part, each parting measured
    against rounding.

    The runs decode the same prompts from the same weights in different batches (one process all
    the step's rows, two half each), so a completion can part where two tokens are tied to
    rounding: the logit gap between the two runs' tokens at the first differing position, under
    the one-process run's adapter before that step (HF modules, adapter unmerged;
    `_common.logit_gap`). From there on the runs train on different completions, so later partings
    follow from the first and are only counted."""
    import torch

    parted, same_prompts, compared = parted_rollouts(rollouts)
    gaps, first = [], min(parted, default=None)
    if first is not None:
        from opsd_kit.config import load_profile
        from opsd_kit.policy import build_policy

        overrides = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
        policy = build_policy(load_profile("cpu-demo", **overrides), "cpu")
        params = dict(policy.model.named_parameters())
        with torch.no_grad():
            for name, value in before_step[first].items():
                params[name].copy_(value)
        policy.model.eval()
        for prompt, a, b in parted[first]:
            k = _common.first_difference(a, b)
            if k is not None:  # else one completion is a prefix of the other: no token pair
                gaps.append({"step": first, "position": k, **_common.logit_gap(policy.model, prompt + a[:k], a[k], b[k])})
    return dict(greedy_rollouts_equal=same_prompts and not parted, same_prompts=same_prompts,
                rollouts_compared=compared,
                rollouts_parted_per_step={str(k): len(v) for k, v in sorted(parted.items())},
                first_parted_step=first, gaps_where_rollouts_first_part=gaps,
                all_gaps_within_tolerance=all(abs(g["gap"]) <= g["tolerance"] for g in gaps))


def measure(problems: int, args, tmp: Path) -> dict:
    """Alternating runs of one and two processes at one global batch, and their agreement."""
    import torch

    records = {1: [], 2: []}
    adapters = {}
    for r in range(args.repeats):
        for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
            folder = tmp / f"b{problems}-r{r}-p{processes}"
            folder.mkdir()
            record = run(processes, problems, args, folder)
            record["summary"] = summarise(record)
            records[processes].append(record)
            print(f"{problems} problems a step, repeat {r}: {processes} process(es): step seconds "
                  f"{[round(x, 1) for x in record['summary']['step_s']]}; per rank, mean seconds a step: "
                  f"{ {k: [round(x, 2) for x in v] for k, v in record['summary']['phases_per_rank'].items()} }",
                  flush=True)
            if r == 0:
                adapters[processes] = [torch.load(folder / f"adapter{k}.pt") for k in range(processes)]
    one, two = adapters[1][0], adapters[2]
    ranks_equal = all(torch.equal(two[0]["final"][k], two[1]["final"][k]) for k in two[0]["final"])
    diff = sum(float((two[0]["final"][k] - one["final"][k]).double().norm() ** 2) for k in one["final"]) ** 0.5
    update = sum(float((one["final"][k] - one["start"][k]).double().norm() ** 2) for k in one["final"]) ** 0.5
    max_abs = max(float((two[0]["final"][k] - one["final"][k]).abs().max()) for k in one["final"])
    agreement = rollout_agreement({p: [x for rk in records[p][0]["ranks"] for x in rk["rollouts"]] for p in (1, 2)},
                                  one["before_step"], args)
    for p in (1, 2):
        for rec in records[p]:
            for rk in rec["ranks"]:
                rk.pop("rollouts")
    tokens = max(s["loss_tokens"] for s in records[1][0]["ranks"][0]["steps"])
    shape = records[1][0]["ranks"][0]["shape"]
    reduction = max(shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], tokens)
    # The two runs differ in summation order and batch shapes only (each rank pads its own rows).
    # Per step, two computations, each through the forward's and the backward's layers: the worst
    # case (tests/_numerics.tolerance: reduction * eps a reduction) exceeds the whole update at this
    # width, so the check uses the probabilistic bound, sqrt(reduction) * eps a reduction (Higham &
    # Mary 2019, SIAM J. Sci. Comput. 41(5)).
    chained = args.steps * 2 * (2 * shape["num_hidden_layers"]) * torch.finfo(torch.float32).eps
    tolerance, worst_case = chained * reduction ** 0.5, chained * reduction
    rel = diff / update
    one_s = _common.median([x["summary"]["median_step_s"] for x in records[1]])
    two_s = _common.median([x["summary"]["median_step_s"] for x in records[2]])

    def phase(p, key):  # median over repeats of the mean over ranks
        return _common.median([sum(v) / len(v) for v in (x["summary"]["phases_per_rank"][key] for x in records[p])])

    rest_one = sum(phase(1, k) for k in ("time/student", "time/teacher", "time/backward", "time/optimizer"))
    ceiling = (phase(1, "time/generate") + rest_one) / (phase(2, "time/generate") + rest_one / 2)
    # each repeat's pair (run one after the other): its spread is the run-to-run noise of the ratio
    per_repeat = [a["summary"]["median_step_s"] / b["summary"]["median_step_s"] for a, b in zip(records[1], records[2])]
    result = dict(speedup=one_s / two_s, speedup_per_repeat=per_repeat, ceiling=ceiling,
                  median_step_s={"one": one_s, "two": two_s},
                  generate_s={"one": phase(1, "time/generate"), "two": phase(2, "time/generate")},
                  reduce_s_two=phase(2, "reduce_s"), **agreement,
                  ranks_identical=ranks_equal, adapter_relative_difference=rel, adapter_tolerance=tolerance,
                  adapter_tolerance_worst_case=worst_case,
                  adapter_within_tolerance=rel <= tolerance, adapter_max_abs_difference=max_abs)
    print(f"{problems} problems a step: median step one process {one_s:.1f} s, two {two_s:.1f} s: speedup "
          f"{one_s / two_s:.2f}x (per repeat {[round(x, 2) for x in per_repeat]}; ceiling from the phases "
          f"{ceiling:.2f}x); greedy rollouts equal: {result['greedy_rollouts_equal']}", flush=True)
    if result["first_parted_step"] is not None:
        print(f"  rollouts parted per step (of {result['rollouts_compared']} in all): "
              f"{result['rollouts_parted_per_step']}; at step {result['first_parted_step']}, gap / tolerance: "
              f"{[(round(g['gap'], 5), round(g['tolerance'], 5)) for g in result['gaps_where_rollouts_first_part']]}",
              flush=True)
    print(f"  ranks' adapters identical: {ranks_equal}; adapter difference two vs one: {rel:.2e} of the update "
          f"(tolerance {tolerance:.1e}), max |diff| {max_abs:.1e}"
          + ("" if result["greedy_rollouts_equal"] else " (the runs trained on different completions: not a "
             "rounding comparison)"), flush=True)
    return {**result, "runs": records}


def measure_parts(args, tmp: Path) -> dict:
    """`parts_worker` in two fresh processes, with the ratios it is for."""
    folder = tmp / "parts"
    folder.mkdir()
    launch(2, args.problems_per_step[0], args, folder, "--parts")
    parts = json.loads((folder / "parts.json").read_text())
    m = parts["median"]
    parts["ratios"] = {
        "decode_half_rows_over_all_rows_alone": m["decode_half_rows_alone_s"] / m["decode_all_rows_alone_s"],
        "decode_half_rows_both_over_alone": m["decode_half_rows_both_s"] / m["decode_half_rows_alone_s"],
        "allreduce_per_tensor_over_one_buffer": m["allreduce_per_tensor_s"] / m["allreduce_one_buffer_s"]}
    print(f"parts ({parts['rows_all']} rows, {parts['tensors']} gradient tensors): decode seconds "
          f"{m['decode_all_rows_alone_s']:.2f} all rows alone, {m['decode_half_rows_alone_s']:.2f} half alone, "
          f"{m['decode_half_rows_both_s']:.2f} half with the other process decoding; all-reduce "
          f"{m['allreduce_per_tensor_s']:.3f} s tensor by tensor, {m['allreduce_one_buffer_s']:.3f} s one buffer",
          flush=True)
    return parts


def main(argv=None):
    args = parse_args(argv)
    if args.worker_dir:
        (parts_worker if args.parts else worker)(args)
        return 0
    if any(n < 2 or n % 2 for n in args.problems_per_step):
        raise SystemExit(f"--problems-per-step: each must be even and >= 2 (two processes take half each), "
                         f"got {args.problems_per_step}")
    machine = _common.machine()
    print("settings:", json.dumps(vars(args)))
    print("machine:", json.dumps(machine))
    with tempfile.TemporaryDirectory() as tmp:
        by_batch = {n: measure(n, args, Path(tmp)) for n in args.problems_per_step}
        parts = measure_parts(args, Path(tmp)) if args.parts_repeats else None
    first = by_batch[args.problems_per_step[0]]
    if args.json:
        _common.write_results(args.json, "bench/scaling.py", argv, machine, args, speedup=first["speedup"],
                              speedup_by_problems_per_step={n: r["speedup"] for n, r in by_batch.items()},
                              ceiling_by_problems_per_step={n: r["ceiling"] for n, r in by_batch.items()},
                              by_problems_per_step=by_batch, parts=parts, note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
