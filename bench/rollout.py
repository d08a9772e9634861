"""Generated tokens per second: opsd_kit's rollout engine vs plain ``model.generate``.

Both sample from the same policy (the model with its LoRA adapter, as during training), on the
same chat-templated prompts (the cpu-demo task), with the same settings (temperature, top-p,
top-k, batch) and a fixed completion length (``min_new_tokens = max_new_tokens``, pad token
suppressed), so both produce exactly ``prompts x new_tokens`` tokens per call. The baseline is
one plain ``model.generate`` call on the left-padded batch, the way TRL's SDFT/GRPO trainers
call it; opsd_kit's engine is ``opsd_kit.rollout.generate`` (left padding, seeding, trimming
after EOS, decoding the texts). Calls alternate between the two; median of ``--repeats`` after
``--warmup``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollout.py
    python bench/rollout.py --model qwen3-1.7b-random --device cuda --dtype bfloat16 --prompts 32 --new-tokens 256
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
    p.add_argument("--quantization", default=None, type=lambda s: None if s in ("", "none") else s)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None):
    import torch

    from opsd_kit.policy import LoraSettings, Policy
    from opsd_kit.prompts import PromptBuilder
    from opsd_kit.rollout import GenerationSettings, _eos_ids, generate, left_pad

    args = parse_args(argv)
    print("settings:", json.dumps(vars(args)))
    print("machine:", json.dumps(_common.machine()))
    path = _common.materialise_model(args.model, args.dtype)
    policy = Policy.from_pretrained(path, dtype=args.dtype, quantization=args.quantization,
                                    lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r), device=args.device)
    tok, model = policy.tokenizer, policy.model
    builder = PromptBuilder(tok)
    prompts = [builder.student_ids(p) for p in _common.bench_problems(args.prompts)]
    fixed = {"min_new_tokens": args.new_tokens, "suppress_tokens": [tok.pad_token_id]}
    settings = GenerationSettings(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, batch_size=max(1, args.prompts))
    eos = _eos_ids(model, tok)
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours():
        gen = policy.causal_lm.generation_config
        saved = (gen.min_new_tokens, gen.suppress_tokens)
        gen.min_new_tokens, gen.suppress_tokens = fixed["min_new_tokens"], fixed["suppress_tokens"]
        try:
            out = generate(model, tok, prompts, settings, seed=0)
        finally:
            gen.min_new_tokens, gen.suppress_tokens = saved
        return out.num_generated_tokens

    def plain():
        ids, mask = left_pad(prompts, tok.pad_token_id)
        torch.manual_seed(0)
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None,
                                 max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                 **fixed)
        model.train()
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    times = {"ours": [], "plain": []}
    tokens = {}
    for i in range(args.warmup + args.repeats):
        for name, fn in (("ours", ours), ("plain", plain)):
            sync()
            t0 = time.perf_counter()
            tokens[name] = fn()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    res = {}
    for name, ts in times.items():
        t = _common.median(ts)
        res[name] = {"median_s": t, "tokens": tokens[name], "tok_per_s": tokens[name] / t, "times": ts}
        print(f"{name:5s}: {tokens[name]} tokens, median {t:.2f} s ({', '.join(f'{x:.2f}' for x in ts)}), "
              f"{tokens[name] / t:.1f} tok/s")
    ratio = res["ours"]["tok_per_s"] / res["plain"]["tok_per_s"]
    print(f"ratio opsd_kit/plain generate: {ratio:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "machine": _common.machine(),
                                               "date": time.strftime("%Y-%m-%d %H:%M:%S"), **res,
                                               "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
