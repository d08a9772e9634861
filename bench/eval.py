"""Evaluation problems/s: the fast engine (``EvalConfig.engine="fast"``) vs HF ``generate`` (``"hf"``).

The cpu-demo evaluation protocol (`load_eval_profile("cpu-demo")`: greedy, 128 new tokens, strict
headline, both grading modes), each engine at its own batch size (``--batch-size-fast``, default
128, the protocol's; ``--batch-size-hf``, default 48: the fastest for ``generate`` in the sweep
below) on ``--problems`` problems of the cpu-demo task
(`_common.bench_problems`, seed 1: not the first problems the training benchmarks use), for two
models: the base SmolLM2 (a plain transformers model, no adapter) and the same model with a LoRA
adapter (``--adapter`` a trained one, else r = 16, alpha = 32 as the cpu-demo profile with
``lora_B`` set to seeded random values of std ``--lora-b-std``: a random nonzero adapter, so
merging it really changes the weights). Every measurement is one fresh worker process (one torch
thread) that loads the model and times `opsd_kit.evaluation.evaluate.sample_responses` (for
"fast" the engine's construction and the adapter merge included), then grades both modes.
The order alternates from model to model and from repeat to repeat (base: fast, hf; adapter:
hf, fast; the next repeat the other way round). Per pair the ratio hf seconds / fast seconds (problems/s of fast over hf), in the
worker's CPU seconds (`time.process_time`; one thread: the seconds it ran, not those it waited
on a machine shared with other jobs) and by the wall clock; ``speedup`` is the median over models
and repeats of the CPU-second ratios on CPU (``speedup_cpu_seconds``), of the wall-clock ones on a
GPU (``speedup_wall_clock``; both are always reported).

Agreement, from the same runs: the greedy match rate (rows token for token equal), and where rows
part, the logit gap between the two tokens chosen under the model's own forward pass (HF's
modules, adapter unmerged), against a tolerance derived from float32 and the reductions (as
tests/_numerics.py: ``2 * layers * max(hidden, intermediate) * eps * max|logit|``); the strict and
lenient accuracies of both engines.

Batch sizes, found in the open: ``--sweep 32 48 64 128`` first times each engine once per batch
size on the base model (fresh workers, CPU seconds), stored as ``batch_size_sweep``. The fast
engine drops stopped rows from its batch, so a larger batch keeps its matmuls full for longer;
``generate`` decodes every row until the batch's longest completion ends, so a larger batch
wastes more.

Bounds, per engine at its batch size (`executed_work`): the floating-point work its batches need
(the left-padded prompt width through the body and the head once, then every row's positions
until its own completion ends through the body and the head, attention over the cache) over the machine's
sustained one-thread float32 matmul rate (a ``--gemm-size`` square matmul) gives the compute
bound; the decoder's weight bytes per decode step (each batch until its longest completion ends)
over the memory bandwidth the weight bound; the fraction of the bound reached is the larger bound
over the median CPU seconds (on a GPU, wall seconds). ``--profile`` also runs ``torch.profiler`` over one batch of the fast engine and writes its
op table next to the JSON (``eval_profile.txt``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval.py --sweep 32 48 64 128 --json bench/results/eval.json --profile
    OMP_NUM_THREADS=1 .venv/bin/python bench/eval.py --problems 48 --repeats 1   # a quick run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

ENGINES = ("fast", "hf")
MODELS = ("base", "adapter")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--adapter", default=None, help="a trained adapter folder (default: a random nonzero LoRA)")
    p.add_argument("--problems", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-size-fast", type=int, default=128, help="rows per call of the fast engine")
    p.add_argument("--batch-size-hf", type=int, default=48, help="rows per call of generate")
    p.add_argument("--sweep", type=int, nargs="*", default=[],
                   help="batch sizes to time once per engine on the base model before the pairs")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-b-std", type=float, default=0.01, help="std of the random lora_B weights")
    p.add_argument("--repeats", type=int, default=2, help="pairs per model (the order alternates)")
    p.add_argument("--gemm-size", type=int, default=1536)
    p.add_argument("--profile", action="store_true", help="torch.profiler over one batch of the fast engine")
    p.add_argument("--json")
    p.add_argument("--note", default=None, help="the conditions of the run, stored in the JSON (e.g. what else ran)")
    # worker mode (internal)
    p.add_argument("--worker-out")
    p.add_argument("--worker", choices=["eval", "gaps", "profile"])
    p.add_argument("--engine", choices=ENGINES)
    p.add_argument("--batch-size", type=int, help="worker: rows per call (default: the protocol's)")
    p.add_argument("--which", choices=MODELS)
    p.add_argument("--parts", default=None, help="gaps worker: a JSON file of [row, prefix ids, a, b]")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.worker is None:
        p.error("--batch-size is a worker's flag: set --batch-size-fast and --batch-size-hf")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def load(args, which: str):
    """(model, tokenizer, problems, settings, builder): the base model, or it with the adapter."""
    import torch

    from opsd_kit.config import load_eval_profile
    from opsd_kit.models import load_causal_lm, load_tokenizer
    from opsd_kit.prompts import PromptBuilder

    path = _common.materialise_model(args.model, args.dtype)
    tok = load_tokenizer(path)
    if which == "base":
        model = load_causal_lm(path, dtype=args.dtype).to(args.device)
    else:
        from opsd_kit.policy import LoraSettings, Policy

        policy = Policy.from_pretrained(path, dtype=args.dtype, lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
                                        adapter=args.adapter, device=args.device)
        model = policy.model
        if args.adapter is None:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * args.lora_b_std)
    model.eval()
    rows = {"batch_size": args.batch_size} if args.batch_size else {}  # none given: the protocol's
    protocol = load_eval_profile("cpu-demo", max_new_tokens=args.new_tokens, **rows)
    problems = _common.bench_problems(args.problems, seed=1)
    return model, tok, problems, protocol, PromptBuilder(tok)


def worker_eval(args) -> dict:
    import torch

    from opsd_kit.evaluation.evaluate import grade_responses, sample_responses, tabulate

    torch.set_num_threads(1)
    model, tok, problems, protocol, builder = load(args, args.which)
    _common.touch_parameters(model)
    t0, c0 = time.perf_counter(), time.process_time()
    rollouts = sample_responses(model, tok, problems, settings=protocol.settings(), builder=builder,
                                seed=protocol.seed, progress=False, engine=args.engine)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    verdicts = grade_responses(rollouts.texts, [problems[i].answer for i in rollouts.prompt_index])
    result = tabulate(problems, rollouts, verdicts, mode=protocol.mode)
    prompts = [builder.student_ids(p) for p in problems]
    return {"engine": args.engine, "which": args.which, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "problems": len(problems), "problems_per_s": len(problems) / seconds,
            "problems_per_cpu_s": len(problems) / cpu_seconds, "generated_tokens": rollouts.num_generated_tokens,
            "completion_ids": rollouts.completion_ids, "prompt_lengths": [len(p) for p in prompts],
            "accuracy": {m: result.summary[f"eval/{m}/avg@k"] for m in ("strict", "lenient")},
            "work": executed_work(model, prompts, rollouts.completion_ids, protocol.batch_size)}


def executed_work(model, prompts, completions, batch_size: int) -> dict:
    """Floating-point operations and weight reads of the work decoding ``completions`` needs:
    per batch, every row runs the left-padded prompt width, then one position per decode step
    until its own completion ends (a decoder that keeps stopped rows in the batch does more:
    this is the bound of the work, not of one engine's way of doing it). ``decode_steps``: the
    decode calls, each batch until its longest completion ends."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = causal_lm.config
    embed = causal_lm.get_input_embeddings().weight
    body = sum(p.numel() for n, p in causal_lm.get_decoder().named_parameters()
               if p is not embed and "lora_" not in n and p.dim() == 2)
    head = causal_lm.get_output_embeddings().weight.numel()
    heads_dim = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    flops = 0.0
    steps = 0
    for s in range(0, len(prompts), batch_size):
        rows = len(prompts[s:s + batch_size])
        width = max(len(p) for p in prompts[s:s + batch_size])
        # prompt: the body at every position, attention over the causal prefix, the head once
        flops += rows * (2 * body * width + 4 * cfg.num_hidden_layers * heads_dim * width * (width + 1) / 2 + 2 * head)
        # decode steps of each row until its own end (the first token comes from the prompt pass)
        for completion in completions[s:s + batch_size]:
            for t in range(1, len(completion)):
                flops += 2 * body + 2 * head + 4 * cfg.num_hidden_layers * heads_dim * (width + t)
        steps += max(len(c) for c in completions[s:s + batch_size])
    weight_bytes = (body + head) * embed.element_size()
    return {"flops": flops, "decode_steps": steps, "weight_bytes_per_step": weight_bytes,
            "params_body": body, "params_head": head}


def worker_gaps(args) -> dict:
    """The model's own logit gap (token b minus token a) at each point where two rows part."""
    import torch

    torch.set_num_threads(1)
    model, tok, problems, protocol, builder = load(args, args.which)
    parts = json.loads(Path(args.parts).read_text())
    return {"gaps": [{"row": row, **_common.logit_gap(model, ids, a, b)} for row, ids, a, b in parts]}


def worker_profile(args) -> dict:
    """torch.profiler over one batch of the fast engine (construction excluded)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from opsd_kit.rollout.fast import FastEngine

    torch.set_num_threads(1)
    model, tok, problems, protocol, builder = load(args, args.which)
    prompts = [builder.student_ids(p) for p in problems[:protocol.batch_size]]
    settings = protocol.settings()
    engine = FastEngine(model, tok)
    engine.generate(prompts[:1], settings)  # build the decoder and warm oneDNN up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        out = engine.generate(prompts, settings)
        seconds = time.perf_counter() - t0
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    work = executed_work(model, prompts, out.completion_ids, protocol.batch_size)
    return {"seconds": seconds, "rows": len(prompts), "table": table,
            "self_share": {e.key: e.self_cpu_time_total / total for e in top[:12]}, "work": work}


def gemm_rate(n: int, device, dtype, repeats: int = 5) -> dict:
    """Sustained matmul rate (FLOP/s) of an n x n x n product in ``dtype``: on CPU one thread, in
    CPU seconds (as the engines are timed: a shared machine's waits left out); on a GPU, wall time."""
    import torch

    clock = time.process_time if device.type == "cpu" else time.perf_counter
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return {"flop_per_s": 2 * n ** 3 / _common.median(times), "n": n, "times": times}


def run(args, argv, **extra) -> dict:
    """One worker process; ``extra`` becomes its flags (an eval worker's ``batch_size`` is its
    engine's unless given)."""
    if "engine" in extra and "batch_size" not in extra:
        extra["batch_size"] = getattr(args, f"batch_size_{extra['engine']}")
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--problems", str(args.problems), "--new-tokens", str(args.new_tokens),
             "--lora-r", str(args.lora_r), "--lora-b-std", str(args.lora_b_std)]
    if args.adapter:
        flags += ["--adapter", args.adapter]
    for key, value in extra.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return _common.run_worker(Path(__file__), flags, env_extra={"OMP_NUM_THREADS": "1"})


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = {"eval": worker_eval, "gaps": worker_gaps, "profile": worker_profile}[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rollout import memory_bandwidth

    torch.set_num_threads(1)
    machine = _common.machine()
    print("settings:", json.dumps(vars(args)))
    print("machine:", json.dumps(machine))
    sweep = {e: {} for e in ENGINES}
    for size in args.sweep:
        for engine in ENGINES:
            got = run(args, argv, worker="eval", engine=engine, which="base", batch_size=size)
            sweep[engine][size] = {"cpu_seconds": got["cpu_seconds"], "seconds": got["seconds"],
                                   "accuracy": got["accuracy"]}
            print(f"  sweep base {engine:4s} batch {size:4d} {got['seconds']:7.1f} s ({got['cpu_seconds']:7.1f} CPU s)",
                  flush=True)
    runs = {m: {e: [] for e in ENGINES} for m in MODELS}
    pair_ratios = {m: [] for m in MODELS}
    pair_cpu_ratios = {m: [] for m in MODELS}
    for r in range(args.repeats):
        for i, which in enumerate(MODELS):
            order = ENGINES if (r + i) % 2 == 0 else ENGINES[::-1]
            got = {}
            for engine in order:
                got[engine] = run(args, argv, worker="eval", engine=engine, which=which)
                runs[which][engine].append(got[engine])
                print(f"  repeat {r} {which:7s} {engine:4s} {got[engine]['seconds']:7.1f} s "
                      f"({got[engine]['cpu_seconds']:7.1f} CPU s) "
                      f"{got[engine]['problems_per_s']:.3f} problems/s  accuracy {got[engine]['accuracy']}",
                      flush=True)
            pair_ratios[which].append(got["hf"]["seconds"] / got["fast"]["seconds"])
            pair_cpu_ratios[which].append(got["hf"]["cpu_seconds"] / got["fast"]["cpu_seconds"])

    # agreement: the first repeat's rows (greedy: every repeat decodes the same tokens)
    agreement = {}
    for which in MODELS:
        fast, hf = runs[which]["fast"][0], runs[which]["hf"][0]
        a_rows, b_rows = fast["completion_ids"], hf["completion_ids"]
        same = [a == b for a, b in zip(a_rows, b_rows)]
        repeat_equal = all(x["completion_ids"] == runs[which][e][0]["completion_ids"]
                           for e in ENGINES for x in runs[which][e])
        parts = []
        problems = None
        for row, (a, b) in enumerate(zip(a_rows, b_rows)):
            k = _common.first_difference(a, b)
            if k is not None:
                if problems is None:
                    from opsd_kit.models import load_tokenizer
                    from opsd_kit.prompts import PromptBuilder

                    builder = PromptBuilder(load_tokenizer(args.model))
                    problems = _common.bench_problems(args.problems, seed=1)
                parts.append([row, builder.student_ids(problems[row]) + b[:k], a[k], b[k]])
        gaps = []
        if parts:
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(parts, f)
            gaps = run(args, argv, worker="gaps", which=which, parts=f.name)["gaps"]
            Path(f.name).unlink()
        agreement[which] = {
            "greedy_match_rate": sum(same) / len(same), "rows": len(same), "rows_parted": len(same) - sum(same),
            "repeats_decode_the_same_tokens": repeat_equal, "gaps_where_rows_part": gaps,
            "all_gaps_within_tolerance": all(abs(g["gap"]) <= g["tolerance"] for g in gaps),
            "accuracy": {e: runs[which][e][0]["accuracy"] for e in ENGINES},
            "same_accuracies": runs[which]["fast"][0]["accuracy"] == runs[which]["hf"][0]["accuracy"]}
        print(f"{which}: greedy match {sum(same)}/{len(same)}; where rows part, gap / tolerance: "
              f"{[(round(g['gap'], 6), round(g['tolerance'], 6)) for g in gaps]}; accuracies "
              f"{agreement[which]['accuracy']}", flush=True)

    gemm = gemm_rate(args.gemm_size, torch.device(args.device), getattr(torch, args.dtype))
    bandwidth = memory_bandwidth(torch.device(args.device))
    bounds = {}
    timed = "cpu_seconds" if args.device == "cpu" else "seconds"  # a GPU's time is wall time
    for which in MODELS:
        bounds[which] = {}
        for engine in ENGINES:  # each engine's batches: the work its batch size implies
            work = runs[which][engine][0]["work"]
            compute_s = work["flops"] / gemm["flop_per_s"]
            weights_s = work["decode_steps"] * work["weight_bytes_per_step"] / bandwidth["bytes_per_s"]
            bound_s = max(compute_s, weights_s)
            bounds[which][engine] = {
                "batch_size": getattr(args, f"batch_size_{engine}"), "flops": work["flops"],
                "decode_steps": work["decode_steps"], "compute_bound_s": compute_s,
                "weight_bandwidth_bound_s": weights_s,
                "binding": "compute" if compute_s >= weights_s else "weight bandwidth",
                "fraction_of_bound": bound_s / _common.median([x[timed] for x in runs[which][engine]])}
            print(f"{which} {engine}: {work['flops'] / 1e12:.2f} TFLOP executed in {work['decode_steps']} decode "
                  f"steps; compute bound {compute_s:.1f} s at {gemm['flop_per_s'] / 1e9:.1f} GFLOP/s, "
                  f"weight-bandwidth bound {weights_s:.1f} s at {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s; "
                  f"fraction of the bound reached {bounds[which][engine]['fraction_of_bound']:.2f}")
    profile = None
    if args.profile:
        profile = run(args, argv, worker="profile", which="adapter", batch_size=args.batch_size_fast)
        if args.json:
            Path(args.json).with_name("eval_profile.txt").write_text(
                f"bench/eval.py --profile: the fast engine, one batch of {profile['rows']} rows, adapter model, "
                f"{profile['seconds']:.1f} s, {profile['work']['flops'] / 1e12:.3f} TFLOP executed\n\n"
                + profile["table"])
        print(profile["table"])
        profile.pop("table")

    all_ratios = [x for m in MODELS for x in pair_ratios[m]]
    cpu_ratios = [x for m in MODELS for x in pair_cpu_ratios[m]]
    speedup_wall = _common.median(all_ratios)
    speedup_cpu = _common.median(cpu_ratios)
    speedup = speedup_cpu if args.device == "cpu" else speedup_wall  # what the machine's load leaves out
    match = {m: agreement[m]["greedy_match_rate"] for m in MODELS}
    greedy_match_rate = sum(agreement[m]["rows"] - agreement[m]["rows_parted"] for m in MODELS) / \
        sum(agreement[m]["rows"] for m in MODELS)
    print(f"speedup (hf s / fast s, median of pairs {[round(x, 2) for x in all_ratios]}): {speedup_wall:.2f}x; "
          f"in CPU seconds (pairs {[round(x, 2) for x in cpu_ratios]}): {speedup_cpu:.2f}x; "
          f"greedy match rate {greedy_match_rate:.3f} {match}")
    if args.json:
        for which in MODELS:
            for engine in ENGINES:
                for x in runs[which][engine]:
                    x.pop("completion_ids"), x.pop("prompt_lengths")
        _common.write_results(args.json, "bench/eval.py", argv, machine, args, speedup=speedup,
                              greedy_match_rate=greedy_match_rate, speedup_wall_clock=speedup_wall,
                              speedup_wall_clock_per_pair=pair_ratios, speedup_cpu_seconds=speedup_cpu,
                              speedup_cpu_seconds_per_pair=pair_cpu_ratios,
                              agreement=agreement, bounds=bounds, batch_size_sweep=sweep, gemm=gemm, bandwidth=bandwidth,
                              profile=profile, runs=runs,
                              note=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
