"""One full OPSD optimizer step, opsd_kit vs TRL's SDFTTrainer, on the same model and batch.

A step = rollouts (one per problem) + teacher forward + student forward + divergence + backward
+ optimizer, for ``--problems`` problems in micro-batches of ``--micro-batch``.

TRL side: ``trl.experimental.sdft.SDFTTrainer`` configured as OPSD: ``teacher_model_kind='base'``
(frozen base teacher = the adapter switched off), ``distillation_mode='full_logits'``,
``distillation_alpha=0`` (forward KL(p_T || p_S)), ``distillation_is_clip=None``, LoRA through
``peft_config``, ``num_generations=1``, ``per_device_train_batch_size=micro``,
``gradient_accumulation_steps=problems/micro`` (one generation of all the step's problems per
optimizer step, split into micro-batches), ``gradient_checkpointing=False`` and ``bf16=False``
(TRL defaults both to True; opsd_kit's cpu-demo uses neither), constant lr, same AdamW lr and
grad clipping. It is driven the way its tests drive it, ``trainer.train()`` with ``max_steps``;
a callback timestamps every ``on_step_end``, so one step's time covers its data loading,
generation, both forwards, backward, clipping, optimizer and logging.

opsd_kit side: ``opsd_kit.trainer.Trainer`` on the cpu-demo profile (overrides printed), with
``--rollout-backend`` (default "fast", opsd_kit's fused decoder, or "hf" with a 4-bit model;
"hf" samples with the same ``generate`` as TRL); each step is ``Trainer._optimizer_step()``, the body of
``Trainer.train()``'s loop (no checkpoint writing). With "fast" the student's forward over the prompts
runs once, before sampling, and serves the rollout and the loss (``opsd.py``); the loss check below
runs the student the same way.

Same work: both sides get the same problems every step, the same chat-templated student prompt
ids and the same teacher prompt ids (opsd_kit's ``teacher_template`` is set to TRL's
``"{prompt}\\n\\n{privileged_context}"`` layout for the benchmark; the ids are compared), the
same sampling settings, and a fixed completion length: ``min_new_tokens = max_new_tokens`` (TRL
also suppresses the pad token), so every row has exactly ``--new-tokens`` completion tokens on both
sides (TRL's per-sequence-mean normalisation then equals opsd_kit's per-token mean).

Loss check: on one fixed batch of rollouts (sampled once, fed to both), both losses are printed
(and the LoRA gradients compared when both adapters start from the same seeded init); if they
disagree beyond tolerance the comparison is VOID and the script says so and exits non-zero.

Timing: each side runs in a fresh subprocess; ``--warmup`` steps, then ``--repeats`` timed
steps; the median is reported. Memory, over all steps of a worker (warm-up included), from a
baseline taken after setup with every weight page resident: CPU: resident high-water mark (VmHWM,
reset through ``/proc/self/clear_refs``), reported as growth over the baseline (the steps' own
working memory, allocator retention included) and as the absolute peak (weights, libraries and
runtime included); CUDA: ``torch.cuda.max_memory_allocated`` (growth over the allocated memory
after setup, and absolute). With ``--rounds N`` each side's worker runs N times, alternating
ours/TRL, and the step times of all rounds are pooled (background load drifts; alternation
spreads it over both sides); memory is the median over rounds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/step.py                  # bundled SmolLM2, CPU, ~10 min
    python bench/step.py --model qwen3-1.7b-random --device cuda --dtype bfloat16 --new-tokens 256
    python bench/step.py --model qwen3-1.7b-random --device cuda --quantization 4bit --impl ours
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

#: The privileged block appended to the student message for the teacher (both sides).
PRIVILEGED = ("Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n{solution}\n"
              "=== Reference Solution End ===\n\nAfter understanding the reference solution, do not copy it: "
              "solve the problem again in your own words.")
TRL_TEMPLATE = "{prompt}\n\n{privileged_context}"
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5  # float32; loosened x50 for bf16 / 4-bit (see check_loss)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="opsd_kit model name, hub id, local folder, or " + ", ".join(_common.RANDOM_MODELS))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantization", default=None, choices=[None, "4bit"], type=lambda s: None if s in ("", "none") else s)
    p.add_argument("--impl", default="both", choices=["both", "ours", "trl"])
    p.add_argument("--problems", type=int, default=8, help="problems (= rollouts) per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64, help="fixed completion length")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--chunk-size", type=int, default=64, help="opsd_kit loss_chunk_size")
    p.add_argument("--rollout-backend", default=None, choices=["hf", "fast"],
                   help="opsd_kit's rollout engine (default: fast; hf with --quantization 4bit)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="fresh workers per side, alternating ours/TRL")
    p.add_argument("--skip-loss-check", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=["ours", "trl", "loss"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.rollout_backend = args.rollout_backend or ("hf" if args.quantization else "fast")
    if args.problems % args.micro_batch:
        p.error("--problems must be a multiple of --micro-batch")
    return args


# ----------------------------------------------------------------------------------- ours
def build_ours(args, model_path, run_dir):
    from opsd_kit.config import load_profile
    from opsd_kit.prompts import STUDENT_TEMPLATE
    from opsd_kit.trainer import Trainer

    cfg = load_profile(
        "cpu-demo", model=model_path, dtype=args.dtype, quantization=args.quantization, run_dir=run_dir,
        progress=False, problems_per_step=args.problems, micro_batch_size=args.micro_batch,
        max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, learning_rate=args.lr, max_grad_norm=1.0,
        loss_chunk_size=args.chunk_size, generation_batch_size=max(32, args.problems),
        rollout_backend=args.rollout_backend,
        gradient_checkpointing=args.gradient_checkpointing, divergence="forward_kl", clip_tau=None,
        teacher="frozen", lr_schedule="constant", warmup_steps=0, weight_decay=0.0,
        teacher_template=STUDENT_TEMPLATE + "\n\n" + PRIVILEGED)  # TRL's layout
    problems = _common.bench_problems(args.problems)
    trainer = Trainer(cfg, problems=problems)
    # fixed completion length: the stop tokens banned until the cap, with either backend
    sampler, sample = trainer.algorithm.sampler, trainer.algorithm.sampler.sample
    sampler.sample = lambda prompts, settings, step, **kw: sample(
        prompts, dataclasses.replace(settings, min_new_tokens=args.new_tokens), step, **kw)
    return trainer, cfg, problems


def worker_ours(args, model_path):
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg, _ = build_ours(args, model_path, tmp)
        device = trainer.accelerator.device
        times, tokens, losses, phases = [], [], [], []
        _common.touch_parameters(trainer.policy.model)
        mem = _common.PeakMemory(device)
        mem.__enter__()  # peak over all steps (warm-up included) above the resident size after setup
        for i in range(args.warmup + args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = trainer._optimizer_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            trainer.step += 1
            if i >= args.warmup:
                times.append(dt)
                tokens.append(m["tokens/generated"])
                losses.append(m["loss/total"])
                phases.append({k[5:]: m[k] for k in m if k.startswith("time/") and k != "time/step"})
        mem.__exit__(None, None, None)
    return {"impl": "ours", "times": times, "tokens": tokens, "losses": losses, "phases": phases,
            "mem_peak": mem.peak, "mem_growth": mem.growth, "config": cfg.to_dict()}


# ----------------------------------------------------------------------------------- TRL
def trl_dataset(problems, builder):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": builder.student_message(p)}],
                               "privileged_context": PRIVILEGED.format(solution=p.solution)} for p in problems])


def build_trl(args, model_path, out_dir, max_steps, callbacks=()):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opsd_kit import models
    from opsd_kit.policy import LoraSettings
    from opsd_kit.prompts import PromptBuilder

    tokenizer = models.load_tokenizer(model_path)
    device = args.device
    if args.quantization == "4bit":
        model = models.load_causal_lm(model_path, dtype=args.dtype, quantization="4bit", device_map={"": device})
    else:
        model = models.load_causal_lm(model_path, dtype=args.dtype).to(device)
    problems = _common.bench_problems(args.problems)
    builder = PromptBuilder(tokenizer, max_prompt_tokens=512)
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha)
    config = SDFTConfig(
        output_dir=out_dir, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.problems // args.micro_batch, max_steps=max_steps,
        learning_rate=args.lr, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", num_generations=1, max_completion_length=args.new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, max_prompt_length=512,
        generation_kwargs={"min_new_tokens": args.new_tokens, "suppress_tokens": [tokenizer.pad_token_id]},
        distillation_mode="full_logits", distillation_alpha=0.0, distillation_is_clip=None,
        teacher_model_kind="base", teacher_prompt_template=TRL_TEMPLATE, shuffle_dataset=False,
        gradient_checkpointing=args.gradient_checkpointing, bf16=False, fp16=False,
        use_cpu=device == "cpu", logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    trainer = SDFTTrainer(model=model, args=config, train_dataset=trl_dataset(problems, builder),
                          processing_class=tokenizer, peft_config=lora.to_peft(), callbacks=list(callbacks))
    return trainer, problems, builder


def worker_trl(args, model_path):
    import torch
    from transformers import TrainerCallback

    device = torch.device(args.device)
    marks, mem = [], _common.PeakMemory(device)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, model=None, **k):
            _common.touch_parameters(model)
            mem.__enter__()  # as for opsd_kit: peak over all steps above the resident size after setup
            marks.append(self._now())

        def on_step_end(self, *a, **k):
            marks.append(self._now())

        @staticmethod
        def _now():
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = build_trl(args, model_path, tmp, args.warmup + args.repeats, [Clock()])
        trainer.train()
        mem.__exit__(None, None, None)
        history = trainer.state.log_history
    steps = [b - a for a, b in itertools.pairwise(marks)]
    logs = [h for h in history if "loss" in h]
    tokens = [h.get("completions/mean_length", float("nan")) * args.problems for h in logs]
    losses = [h.get("self_distillation/distillation_loss", h.get("loss")) for h in logs]
    return {"impl": "trl", "times": steps[args.warmup:], "tokens": tokens[args.warmup:],
            "losses": losses[args.warmup:], "mem_peak": mem.peak, "mem_growth": mem.growth,
            "all_step_times": steps}


# ----------------------------------------------------------------------------------- loss check
def worker_loss(args, model_path):
    """Both losses (and LoRA gradients) on one fixed batch of rollouts."""
    import torch

    from opsd_kit.algorithms.opsd import OPSDBatch
    from opsd_kit.prompts import build_batch
    from opsd_kit.rollout.hf import GenerationSettings, generate

    with tempfile.TemporaryDirectory() as tmp:
        ours, _cfg, problems = build_ours(args, model_path, tmp + "/ours")
        trl, _, builder = build_trl(args, model_path, tmp + "/trl", 1)
    alg = ours.algorithm
    tok = ours.policy.tokenizer
    student_ids = [alg.prompts.student[p.id] for p in problems]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, temperature=args.temperature, batch_size=64,
                                  min_new_tokens=args.new_tokens)
    rollouts = generate(ours.policy.model, tok, student_ids, settings, seed=1234)
    completions = rollouts.completion_ids
    lengths = sorted({len(c) for c in completions})

    # TRL's own batch construction from the same prompts and completions.
    prompts = [[{"role": "user", "content": builder.student_message(p)}] for p in problems]
    privileged = [PRIVILEGED.format(solution=p.solution) for p in problems]
    trl_student = trl._tokenize_prompts(prompts)
    ids_equal = {"student": trl_student == student_ids,
                 "teacher": trl._tokenize_prompts(trl.teacher_context_builder.select_generation_prompts(
                     prompts, privileged)) == [alg.prompts.teacher[p.id] for p in problems]}

    # opsd_kit: the trainer's per-step normalisation, sum over micro-batches / token count.
    total = sum(len(c) for c in completions)
    ours_sum = 0.0
    for s in range(0, len(problems), args.micro_batch):
        rows = range(s, min(len(problems), s + args.micro_batch))
        student = build_batch([student_ids[r] for r in rows], [completions[r] for r in rows], tok.pad_token_id)
        teacher = build_batch([alg.prompts.teacher[problems[r].id] for r in rows], [completions[r] for r in rows],
                              tok.pad_token_id)
        prompt_pass = (alg.prompt_pass.run([student_ids[r] for r in rows])[0] if alg.prompt_pass.enabled
                       else None)  # as the timed step runs the student: from its pass over the prompts
        loss_sum, _ = alg.loss(OPSDBatch(student=student, teacher=teacher, wrong_teacher=None, num_loss_tokens=0,
                                         student_prompt=prompt_pass))
        (loss_sum / total).backward()
        ours_sum += float(loss_sum.detach())
    ours_loss = ours_sum / total

    # TRL: compute_loss on TRL-built micro-batches (mean over micro-batches of its per-sequence means).
    from trl.trainer.utils import pad

    device = torch.device(args.device)
    model = trl.model
    model.train()
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    trl_losses, trl_losses_fp32 = [], []
    n_micro = len(problems) // args.micro_batch
    for s in range(0, len(problems), args.micro_batch):
        rows = list(range(s, s + args.micro_batch))
        p_ids = pad([torch.tensor(trl_student[r]) for r in rows], padding_value=tok.pad_token_id,
                    padding_side="left").to(device)
        p_mask = pad([torch.ones(len(trl_student[r]), dtype=torch.long) for r in rows], padding_value=0,
                     padding_side="left").to(device)
        c_ids = pad([torch.tensor(completions[r]) for r in rows], padding_value=tok.pad_token_id,
                    padding_side="right").to(device)
        c_mask = pad([torch.ones(len(completions[r]), dtype=torch.long) for r in rows], padding_value=0,
                     padding_side="right").to(device)
        inputs = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask}
        inputs.update(trl.teacher_context_builder.build([prompts[r] for r in rows], [privileged[r] for r in rows],
                                                        c_ids, c_mask))
        logits = trl._compute_teacher_student_logits(model, trl.teacher_model, inputs)
        loss = trl._compute_self_distillation_loss(model, inputs, logits)
        (loss / n_micro).backward()
        trl_losses.append(float(loss.detach()))
        with torch.no_grad():  # TRL's own formula on float32-upcast logits (isolates its low-precision arithmetic)
            per_token = compute_full_logit_self_distillation_loss(
                logits.student_logits.float(), logits.teacher_logits.float(), distillation_alpha=0.0)
            mask = logits.loss_mask.float()
            trl_losses_fp32.append(float(((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()))
    trl_loss = sum(trl_losses) / len(trl_losses)
    trl_loss_fp32 = sum(trl_losses_fp32) / len(trl_losses_fp32)

    ours_grads = {n: p.grad for n, p in ours.policy.model.named_parameters() if p.requires_grad}
    trl_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ours_init = {n: p.detach() for n, p in ours.policy.model.named_parameters() if p.requires_grad}
    trl_init = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    same_init = set(ours_init) == set(trl_init) and all(torch.equal(ours_init[n].cpu(), trl_init[n].cpu())
                                                        for n in ours_init)
    grad_diff = grad_scale = None
    if same_init:
        grad_diff = max(float((ours_grads[n].float() - trl_grads[n].float()).abs().max()) for n in ours_grads
                        if ours_grads[n] is not None)
        grad_scale = max(float(ours_grads[n].float().abs().max()) for n in ours_grads if ours_grads[n] is not None)
    return {"ours_loss": ours_loss, "trl_loss": trl_loss, "trl_loss_fp32_logits": trl_loss_fp32, "lengths": lengths, "ids_equal": ids_equal,
            "same_lora_init": same_init, "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale,
            "tokens": total}


def check_loss(args, r) -> bool:
    """Equal loss (and gradients when the adapters start equal). In bf16 TRL takes log_softmax
    and the KL of bf16 logits, opsd_kit upcasts to float32 first; there the comparison is made
    against TRL's own formula on float32-upcast logits, and the gap to TRL's bf16 value is printed."""
    loose = 50.0 if (args.dtype != "float32" or args.quantization) else 1.0
    ref = r["trl_loss"] if args.dtype == "float32" else r["trl_loss_fp32_logits"]
    ok = math.isclose(r["ours_loss"], ref, rel_tol=LOSS_RTOL * loose, abs_tol=LOSS_ATOL * loose)
    ok = ok and all(r["ids_equal"].values()) and len(r["lengths"]) == 1
    if r["grad_max_abs_diff"] is not None:
        ok = ok and r["grad_max_abs_diff"] <= 1e-3 * loose * max(r["grad_max_abs"], 1e-12) + 1e-7 * loose
    return ok


# ----------------------------------------------------------------------------------- driver
def summarise(r, args):
    t = _common.median(r["times"])
    toks = args.problems * args.new_tokens
    return {"median_step_s": t, "tokens_per_step": toks, "tok_per_s": toks / t, "times": r["times"],
            "mem_growth_MiB": r["mem_growth"] / 2**20, "mem_peak_MiB": r["mem_peak"] / 2**20,
            "measured_tokens": r["tokens"], "losses": r["losses"], "phases": r.get("phases")}


def main(argv=None):
    args = parse_args(argv)
    model_path = _common.materialise_model(args.model, args.dtype)
    if args.worker:
        fn = {"ours": worker_ours, "trl": worker_trl, "loss": worker_loss}[args.worker]
        result = fn(args, model_path)
        Path(args.worker_out).write_text(json.dumps(result, default=str))
        return 0
    have_trl = _have_trl()
    impl = args.impl
    if impl in ("both", "trl") and not have_trl:
        print("NOTE: trl (with trl.experimental.sdft) is not importable: running opsd_kit only.")
        impl = "ours"
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")}
    print("settings:", json.dumps(settings))
    print("machine:", json.dumps(_common.machine()))
    results = {"settings": settings, "machine": _common.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    script = Path(__file__).resolve()
    status = 0
    if impl == "both" and not args.skip_loss_check:
        r = _common.run_worker(script, passthrough + ["--worker", "loss"])
        ok = check_loss(args, r)
        results["loss_check"] = dict(r, ok=ok)
        print(f"loss check on a fixed batch of rollouts ({r['tokens']} completion tokens, lengths {r['lengths']}): "
              f"opsd_kit {r['ours_loss']:.8f}  TRL {r['trl_loss']:.8f}  |diff| {abs(r['ours_loss'] - r['trl_loss']):.2e}; "
              f"TRL formula on float32-upcast logits {r['trl_loss_fp32_logits']:.8f} "
              f"|diff| {abs(r['ours_loss'] - r['trl_loss_fp32_logits']):.2e}; "
              f"prompt ids equal {r['ids_equal']}; same LoRA init {r['same_lora_init']}; "
              f"max|grad diff| {r['grad_max_abs_diff']} (max|grad| {r['grad_max_abs']})")
        if not ok:
            print("!" * 80 + "\nLOSS CHECK FAILED: the two sides do not compute the same loss; the speed and "
                  "memory comparison below is VOID.\n" + "!" * 80)
            status = 1
    sides = ["ours", "trl"] if impl == "both" else [impl]
    raw = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            raw[side].append(_common.run_worker(script, passthrough + ["--worker", side]))
    for side in sides:
        runs = raw[side]
        r = {"times": [t for x in runs for t in x["times"]], "tokens": [t for x in runs for t in x["tokens"]],
             "losses": [t for x in runs for t in x["losses"]], "phases": [t for x in runs for t in x.get("phases") or []],
             "mem_growth": _common.median([x["mem_growth"] for x in runs]),
             "mem_peak": _common.median([x["mem_peak"] for x in runs])}
        results[side] = summarise(r, args)
        results[side]["mem_growth_MiB_rounds"] = [x["mem_growth"] / 2**20 for x in runs]
        s = results[side]
        print(f"{side:5s}: median step {s['median_step_s']:.2f} s over {len(s['times'])} "
              f"({', '.join(f'{x:.2f}' for x in s['times'])}); {s['tok_per_s']:.1f} completion tok/s; "
              f"peak memory growth {s['mem_growth_MiB']:.0f} MiB (absolute peak {s['mem_peak_MiB']:.0f} MiB); "
              f"measured tokens/step {s['measured_tokens']}")
        if s.get("phases"):
            ph = {k: round(_common.median([p[k] for p in s["phases"]]), 3) for k in s["phases"][0]}
            print(f"       opsd_kit phases (median s): {ph}")
    if "ours" in results and "trl" in results:
        o, t = results["ours"], results["trl"]
        ratios = {"tok_per_s_ours_over_trl": o["tok_per_s"] / t["tok_per_s"],
                  "mem_growth_ours_over_trl": o["mem_growth_MiB"] / t["mem_growth_MiB"],
                  "mem_peak_ours_over_trl": o["mem_peak_MiB"] / t["mem_peak_MiB"]}
        results["ratios"] = ratios
        void = " (VOID: loss check failed)" if status else ""
        print(f"ratios ours/TRL{void}: throughput {ratios['tok_per_s_ours_over_trl']:.2f}x (target >= 1.3), "
              f"peak memory growth {ratios['mem_growth_ours_over_trl']:.2f}x (target <= 0.5), "
              f"absolute peak {ratios['mem_peak_ours_over_trl']:.2f}x")
    if args.json:
        check = results.get("loss_check")
        figures = {"tokens_per_s_ratio": results.get("ratios", {}).get("tok_per_s_ours_over_trl"),
                   "loss_abs_diff": abs(check["ours_loss"] - check["trl_loss"]) if check else None,
                   "loss_check_ok": check["ok"] if check else None, "peak_memory_ratio":
                   results.get("ratios", {}).get("mem_growth_ours_over_trl")}
        _common.write_results(args.json, "bench/step.py", argv, results["machine"], args,
                              **json.loads(json.dumps(dict(figures, **{k: v for k, v in results.items()
                                                                         if k not in ("settings", "machine", "date")}),
                                                      default=str)))
    return status


def _have_trl() -> bool:
    try:
        import trl.experimental.sdft  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
