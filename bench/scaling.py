"""OPSD step throughput: two processes (``accelerate launch``, one thread each) vs one, same global batch.

Both train the cpu-demo profile (SmolLM2-135M, 8 problems a step, ``rollout_backend="fast"``) for
``--steps`` optimizer steps from the same seed: one process takes the 8 problems, two take 4 each
(`Trainer.step_problems`) and sum their LoRA gradients with ``accelerator.reduce``. The rollouts
are greedy here (the sampler's temperature set to 0; the loss keeps the profile's temperature),
so that both runs train on the same completions and their final adapters can be compared: sampled
rollouts draw from a per-process random stream, which differs between one and two processes.

Each run is a fresh set of processes; runs alternate (one, two, then two, one). Throughput: steps
after the first (its time includes building the engine and oneDNN's start) per second, from each
step's own wall time; ``speedup`` = one process's median step time / two processes' (the median
over repeats). Per process and step the worker also records its phases (generate, student,
teacher, backward, optimizer) and the seconds spent inside ``accelerator.reduce``: a process
waits there for the slower one (rollout imbalance: rows finish at different lengths) and then
all-reduces the LoRA gradients.

Agreement: the greedy completions of both runs (per prompt), and the final adapters: the
relative difference ``||A_two - A_one|| / ||A_one - A_start||`` against the worst-case bound
tests/_numerics.py derives for a weight's gradient (float32; the longest reduction: hidden,
MLP, vocabulary width or the step's loss tokens; through the forward's and the backward's
layers), once per step. The two ranks' adapters must be identical (they apply the same
all-reduced update).

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py --json bench/results/scaling.json
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
    p.add_argument("--json")
    p.add_argument("--note", default=None, help="the conditions of the run, stored in the JSON (e.g. what else ran)")
    p.add_argument("--worker-dir", help="(internal) train in this folder")
    return p.parse_args(argv)


def worker(args) -> None:
    """Train (one process of a run); each rank writes its timings, rollouts and adapter."""
    import torch

    from opsd_kit.config import load_profile
    from opsd_kit.rollout.sampler import RolloutSampler
    from opsd_kit.trainer import Trainer

    torch.set_num_threads(1)
    folder = Path(args.worker_dir)
    overrides = dict(run_dir=str(folder / "run"), progress=False, max_steps=args.steps, save_every=10_000)
    if args.max_new_tokens:
        overrides["max_new_tokens"] = args.max_new_tokens
    config = load_profile("cpu-demo", **overrides)
    rollouts = []
    sample = RolloutSampler.sample

    def greedy(self, prompt_ids, settings, step, prefill=None):
        import dataclasses

        out = sample(self, prompt_ids, dataclasses.replace(settings, temperature=0.0), step, prefill=prefill)
        rollouts.extend([prompt_ids[i], c] for i, c in zip(out.prompt_index, out.completion_ids))
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
        in_reduce[0] = 0.0
        t0 = time.perf_counter()
        metrics = optimizer_step()
        steps.append({"seconds": time.perf_counter() - t0, "reduce_s": in_reduce[0],
                      "loss_tokens": metrics["tokens/loss_tokens"],
                      **{k: v for k, v in metrics.items() if k.startswith("time/")}})
        return metrics

    trainer._optimizer_step = timed_step
    trainer.train()
    torch.save({"start": start, "final": trainer.policy.lora_state_dict()}, folder / f"adapter{rank}.pt")
    cfg = trainer.policy.causal_lm.config
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers")}
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": trainer.accelerator.num_processes,
                                                         "steps": steps, "rollouts": rollouts, "shape": shape}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, args, folder: Path) -> dict:
    """One training run in fresh processes; returns each rank's record."""
    me = [str(Path(__file__).resolve()), "--steps", str(args.steps), "--worker-dir", str(folder)]
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
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(processes)]
    return {"processes": processes, "wall_s": wall, "ranks": ranks}


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


def main(argv=None):
    args = parse_args(argv)
    if args.worker_dir:
        worker(args)
        return 0
    import torch

    machine = _common.machine()
    print("settings:", json.dumps(vars(args)))
    print("machine:", json.dumps(machine))
    records = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for r in range(args.repeats):
            for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
                folder = Path(tmp) / f"r{r}-p{processes}"
                folder.mkdir()
                record = run(processes, args, folder)
                record["summary"] = summarise(record)
                records[processes].append(record)
                print(f"repeat {r}: {processes} process(es): step seconds {[round(x, 1) for x in record['summary']['step_s']]}; "
                      f"per rank, mean seconds a step: "
                      f"{ {k: [round(x, 2) for x in v] for k, v in record['summary']['phases_per_rank'].items()} }",
                      flush=True)
                if r == 0:
                    adapters[processes] = [torch.load(folder / f"adapter{k}.pt") for k in range(processes)]
        one, two = adapters[1][0], adapters[2]
        ranks_equal = all(torch.equal(two[0]["final"][k], two[1]["final"][k]) for k in two[0]["final"])
        diff = sum(float((two[0]["final"][k] - one["final"][k]).double().norm() ** 2) for k in one["final"]) ** 0.5
        update = sum(float((one["final"][k] - one["start"][k]).double().norm() ** 2) for k in one["final"]) ** 0.5
        max_abs = max(float((two[0]["final"][k] - one["final"][k]).abs().max()) for k in one["final"])
    rollouts = {p: sorted(map(json.dumps, [x for rk in records[p][0]["ranks"] for x in rk["rollouts"]])) for p in (1, 2)}
    tokens = max(s["loss_tokens"] for s in records[1][0]["ranks"][0]["steps"])
    shape = records[1][0]["ranks"][0]["shape"]
    reduction = max(shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], tokens)
    # tests/_numerics.tolerance for a weight's gradient (depth: the forward's and the backward's
    # layers), once per step: a worst case, far above what rounding does in practice
    tolerance = args.steps * 2 * (2 * shape["num_hidden_layers"]) * reduction * torch.finfo(torch.float32).eps
    rel = diff / update
    one_s = _common.median([x["summary"]["median_step_s"] for x in records[1]])
    two_s = _common.median([x["summary"]["median_step_s"] for x in records[2]])
    speedup = one_s / two_s
    print(f"median step: one process {one_s:.1f} s, two {two_s:.1f} s: speedup {speedup:.2f}x; greedy rollouts "
          f"equal: {rollouts[1] == rollouts[2]}; ranks' adapters identical: {ranks_equal}; adapter difference "
          f"two vs one: {rel:.2e} of the update (tolerance {tolerance:.1e}), max |diff| {max_abs:.1e}")
    if args.json:
        for p in (1, 2):
            for rec in records[p]:
                for rk in rec["ranks"]:
                    rk.pop("rollouts")
        _common.write_results(args.json, "bench/scaling.py", argv, machine, args, speedup=speedup,
                              median_step_s={"one": one_s, "two": two_s}, greedy_rollouts_equal=rollouts[1] == rollouts[2],
                              ranks_identical=ranks_equal, adapter_relative_difference=rel,
                              adapter_tolerance=tolerance, adapter_within_tolerance=rel <= tolerance,
                              adapter_max_abs_difference=max_abs, runs=records,
                              note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
