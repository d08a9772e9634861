"""Rollout tokens/s: opsd_kit's "fast" engine (``opsd_kit.rollout.fused_decoder``) vs plain ``model.generate``.

Both sample from the same PEFT policy (SmolLM2 with a LoRA adapter whose ``lora_B`` is set to
seeded random values of std ``--lora-b-std``, so the adapter is not the zero update peft
initialises and merging it really changes the weights), on the same chat-templated cpu-demo
prompts, with the same settings and a fixed completion length (``min_new_tokens =
max_new_tokens``, stop tokens banned until then), so both produce ``prompts x new_tokens`` tokens
per call. The baseline is one plain ``model.generate`` call on the left-padded batch with the
adapter unmerged (what TRL's trainers and ``rollout_backend="hf"`` do); "fast" is
``FastEngine.generate`` as the trainer calls it (``rollout_backend="fast"``: the adapter merged
into a new copy of the fused, prepacked projections, then the fused decoder; the merge is part of
every call's time). Calls alternate fast/plain; medians of ``--repeats`` after ``--warmup``. The
engine's start (construction and a first 1-token call: one more merge, oneDNN's start-up) is
timed on its own and charged to a ``--run-steps``-call run: ``speedup`` = plain time of that many
calls / (setup + fast time of that many calls); ``speedup_per_call`` leaves the setup out.

Also measured in the same run: the greedy match rate of ``FastEngine.generate`` vs
``opsd_kit.rollout.hf.generate`` (``rollout_backend="hf"``) on the same prompts (and, where rows
part, the unmerged model's logit gap between the two tokens chosen), the largest difference
between the log-probabilities "fast" reports for its sampled tokens and those the unmerged
student assigns to them (one forward pass per row), the machine's memory bandwidth (a large
``torch`` copy) and the fraction of the weight-bandwidth bound reached (weight bytes read per
decode step / measured seconds per decode step, over that bandwidth; the per-step time is the
call time over ``--new-tokens``, so it includes the prefill and sampling).

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollout.py --json bench/results/rollout.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-b-std", type=float, default=0.01, help="std of the random lora_B weights")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--run-steps", type=int, default=24, help="rollout calls of a run the setup is charged to")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def memory_bandwidth(device, gib: float = 1.0, repeats: int = 5) -> dict:
    """Bytes moved per second by ``dst.copy_(src)`` of a ``gib``-GiB float32 tensor (read + write)."""
    import torch

    n = int(gib * 2**30) // 4
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"bytes_per_s": 2 * n * 4 / _common.median(times), "times": times, "gib": gib}


def weight_bytes_per_decode_step(policy) -> int:
    """Bytes of weights one decode step reads: every decoder weight (adapter included) and the
    output head; the input embedding only gives one row per token."""
    decoder = policy.causal_lm.get_decoder()
    embed = policy.causal_lm.get_input_embeddings().weight
    own = sum(p.numel() * p.element_size() for p in decoder.parameters() if p is not embed)
    head = policy.head.weight
    return own + head.numel() * head.element_size()


def main(argv=None):
    import torch

    from opsd_kit.policy import LoraSettings, Policy
    from opsd_kit.prompts import PromptBuilder
    from opsd_kit.rollout.fast import FastEngine
    from opsd_kit.rollout.hf import GenerationSettings, _eos_ids, generate, left_pad

    args = parse_args(argv)
    machine = _common.machine()
    print("settings:", json.dumps(vars(args)))
    print("machine:", json.dumps(machine))
    device = torch.device(args.device)
    path = _common.materialise_model(args.model, args.dtype)
    policy = Policy.from_pretrained(path, dtype=args.dtype, lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
                                    device=args.device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * args.lora_b_std)
    tok, model = policy.tokenizer, policy.model
    prompts = [PromptBuilder(tok).student_ids(p) for p in _common.bench_problems(args.prompts)]
    t0 = time.perf_counter()
    engine = FastEngine(model, tok)
    engine.generate(prompts[:1], GenerationSettings(max_new_tokens=1, batch_size=len(prompts)))
    setup_s = time.perf_counter() - t0  # construction and a first 1-token call
    if engine.fallback:
        raise SystemExit(f"the fused decoder does not run this model: {engine.fallback}")
    eos = _eos_ids(model, tok)

    def settings(temperature, min_new_tokens=0):
        return GenerationSettings(max_new_tokens=args.new_tokens, temperature=temperature, batch_size=len(prompts),
                                  min_new_tokens=min_new_tokens)

    # greedy: "fast" vs "hf", the engines as the trainer calls them
    greedy_fast = engine.generate(prompts, settings(0.0)).completion_ids
    greedy_hf = generate(model, tok, prompts, settings(0.0)).completion_ids
    rows_equal = sum(a == b for a, b in zip(greedy_fast, greedy_hf))
    prefix = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(greedy_fast, greedy_hf)]
    tie_gaps = []  # where rows part: the unmerged model's logit gap between the two tokens chosen
    model.eval()
    with torch.no_grad():
        for pi, (a, b, k) in enumerate(zip(greedy_fast, greedy_hf, prefix)):
            if k < min(len(a), len(b)):
                logits_V = model(input_ids=torch.tensor([prompts[pi] + b[:k]], device=device)).logits[0, -1].float()
                tie_gaps.append(float(logits_V[b[k]] - logits_V[a[k]]))
    print(f"greedy: {rows_equal}/{len(prompts)} rows identical; identical prefix lengths {prefix}; "
          f"unmerged logit gap (hf's token - fast's token) where rows part: {[f'{g:.1e}' for g in tie_gaps]}",
          flush=True)

    # sampled: the unmerged student's log-probs of the engine's tokens vs the engine's own
    out = engine.generate(prompts, settings(args.temperature), seed=1, logprobs=True)
    logprob_diffs = []
    with torch.no_grad():
        for pi, completion, sampled in zip(out.prompt_index, out.completion_ids, out.logprobs):
            ids_T = torch.tensor([prompts[pi] + completion], device=device)
            logits_CV = model(input_ids=ids_T).logits[0, len(prompts[pi]) - 1:-1].float() / args.temperature
            student_C = torch.log_softmax(logits_CV, -1).gather(-1, ids_T[0, len(prompts[pi]):, None]).squeeze(-1)
            logprob_diffs.append(float((student_C.cpu() - torch.tensor(sampled)).abs().max()))
    model.train()
    print(f"max |log p_unmerged - log p_fast| per row: {[f'{d:.1e}' for d in logprob_diffs]}", flush=True)

    # speed: the same fixed-length rollout, plain generate (LoRA unmerged) and FastEngine.generate (fast)
    def plain():
        ids, mask = left_pad(prompts, tok.pad_token_id)
        torch.manual_seed(0)
        model.eval()
        with torch.no_grad():
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=args.temperature, top_p=1.0, top_k=None, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, suppress_tokens=[tok.pad_token_id],
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)[:, ids.shape[1]:]
        model.train()
        return new.numel()

    def fast():
        out = engine.generate(prompts, settings(args.temperature, args.new_tokens), seed=0)
        return out.num_generated_tokens

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, tokens = {"fast": [], "plain": []}, {}
    for i in range(args.warmup + args.repeats):
        for name, fn in (("fast", fast), ("plain", plain)):
            sync()
            t0 = time.perf_counter()
            tokens[name] = fn()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                print(f"  {name} {times[name][-1]:.2f} s", flush=True)
    bandwidth = memory_bandwidth(device)
    weight_bytes = weight_bytes_per_decode_step(policy)
    res = {}
    for name, ts in times.items():
        t = _common.median(ts)
        step_s = t / args.new_tokens
        res[name] = {"median_s": t, "tokens": tokens[name], "tok_per_s": tokens[name] / t, "times": ts,
                     "s_per_decode_step": step_s,
                     "fraction_of_bandwidth_bound": weight_bytes / step_s / bandwidth["bytes_per_s"]}
        print(f"{name:5s}: {tokens[name]} tokens, median {t:.2f} s ({', '.join(f'{x:.2f}' for x in ts)}), "
              f"{tokens[name] / t:.1f} tok/s, {1e3 * step_s:.1f} ms/step, "
              f"{100 * res[name]['fraction_of_bandwidth_bound']:.0f}% of the weight-bandwidth bound")
    speedup_per_call = res["fast"]["tok_per_s"] / res["plain"]["tok_per_s"]
    n = args.run_steps
    speedup = n * res["plain"]["median_s"] / (setup_s + n * res["fast"]["median_s"])
    per_call_ratio = [p / f for f, p in zip(times["fast"], times["plain"])]
    bound_s = weight_bytes / bandwidth["bytes_per_s"]
    print(f"bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s; weights per decode step {weight_bytes / 1e6:.0f} MB "
          f"-> bound {1e3 * bound_s:.1f} ms/step; fast's one-time setup {setup_s:.2f} s; speedup fast/plain over a "
          f"{n}-call run, setup included: {speedup:.2f}x; per call {speedup_per_call:.2f}x "
          f"(per adjacent pair: {', '.join(f'{r:.2f}' for r in per_call_ratio)})")
    if args.json:
        _common.write_results(
            args.json, "bench/rollout.py", argv, machine, args, speedup=speedup, speedup_per_call=speedup_per_call,
            setup_s=setup_s, speedup_per_pair=per_call_ratio,
            greedy_match_rate=rows_equal / len(prompts), greedy_identical_prefix=prefix,
            greedy_logit_gap_where_rows_part=tie_gaps, max_logprob_diff=max(logprob_diffs),
            logprob_diff_per_row=logprob_diffs, bandwidth=bandwidth, weight_bytes_per_decode_step=weight_bytes,
            bound_s_per_decode_step=bound_s, **res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
