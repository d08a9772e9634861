"""Peak memory of one OPSD optimizer step: opsd_kit's chunked divergence vs TRL's full-logit loss.

Model: a random-weight Qwen3-shaped causal LM built from a config (vocabulary 151936, the
Qwen3 size; ``--layers`` layers of hidden size ``--hidden``), random token ids (no tokenizer),
LoRA r=16 on the attention and MLP projections, gradient checkpointing on both sides, float32.
Batch: ``--batch`` rows of a ``--prompt``-token student prompt, a teacher prompt ``--privileged``
tokens longer, and the same ``--completion`` completion tokens. One optimizer step (AdamW on
the LoRA weights) per side, each side in a fresh process:

- opsd_kit: student and teacher (adapter off, no grad) final hidden states from
  ``Policy.backbone_hidden``, ``opsd_kit.losses.chunked_divergence`` (forward KL, chunk
  ``--chunk``), divided by the completion-token count, backward, step.
- TRL: ``SDFTTrainer``'s computation with ``distillation_mode="full_logits"``,
  ``distillation_alpha=0`` (forward KL): both roles' logits over the completion
  (``logits_to_keep = completion + 1``, as ``SDFTTrainer._forward_logits``), TRL's
  ``compute_full_logit_self_distillation_loss`` on the full [B, T, V] logits, per-sequence
  mean then batch mean (= the per-token mean here: all rows have the same length), backward, step.

Memory: growth of the resident high-water mark (VmHWM, reset after setup with every weight page
resident) over the step; on CUDA ``max_memory_allocated`` growth. Both losses are printed and
compared (same seeded weights, LoRA init and ids on both sides).

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py --json bench/results/memory.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

LOSS_TOL = 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--privileged", type=int, default=64)
    p.add_argument("--completion", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=128, help="opsd_kit loss chunk size")
    p.add_argument("--json")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def build(args):
    """The LoRA policy (gradient checkpointing on) and the batch, identical in every process."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsd_kit.policy import LoraSettings, Policy

    heads = max(1, args.hidden // 64)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), head_dim=64,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg).to(args.device)
        student_ids_BT = torch.randint(0, args.vocab, (args.batch, args.prompt + args.completion))
        teacher_prefix = torch.randint(0, args.vocab, (args.batch, args.prompt + args.privileged))
    teacher_ids_BT = torch.cat([teacher_prefix, student_ids_BT[:, args.prompt:]], 1)
    policy = Policy(model, None, lora=LoraSettings(r=16, alpha=32), gradient_checkpointing=True, seed=0)
    return policy, student_ids_BT.to(args.device), teacher_ids_BT.to(args.device)


def loss_ours(args, policy, student_ids_BT, teacher_ids_BT):
    import torch

    from opsd_kit.losses import DivergenceSpec, chunked_divergence

    c = args.completion
    student_hidden_BCH = policy.backbone_hidden(student_ids_BT)[:, -c - 1:-1]
    with policy.teacher():
        teacher_hidden_BCH = policy.backbone_hidden(teacher_ids_BT)[:, -c - 1:-1]
    mask_BC = torch.ones(student_hidden_BCH.shape[:2], dtype=torch.bool, device=student_hidden_BCH.device)
    loss_sum, _ = chunked_divergence(student_hidden_BCH, teacher_hidden_BCH, policy.head, mask_BC,
                                     DivergenceSpec("forward_kl", chunk_size=args.chunk))
    return loss_sum / mask_BC.sum()


def loss_trl(args, policy, student_ids_BT, teacher_ids_BT):
    import torch
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    c, model = args.completion, policy.model

    def logits(ids_BT):  # SDFTTrainer._forward_logits at temperature 1
        return model(input_ids=ids_BT, use_cache=False, logits_to_keep=c + 1).logits[:, :-1][:, -c:]

    student_logits_BCV = logits(student_ids_BT)
    with torch.no_grad(), model.disable_adapter():
        teacher_logits_BCV = logits(teacher_ids_BT)
    per_token_BC = compute_full_logit_self_distillation_loss(student_logits_BCV, teacher_logits_BCV,
                                                             distillation_alpha=0.0)
    return per_token_BC.mean(-1).mean()


def worker(args):
    import torch

    policy, student_ids_BT, teacher_ids_BT = build(args)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    _common.touch_parameters(policy.model)
    loss_fn = loss_ours if args.worker == "ours" else loss_trl
    t0 = time.perf_counter()
    with _common.PeakMemory(args.device) as mem:
        loss = loss_fn(args, policy, student_ids_BT, teacher_ids_BT)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"impl": args.worker, "loss": float(loss.detach()), "mem_peak": mem.peak, "mem_growth": mem.growth,
            "mem_start": mem.start, "seconds": time.perf_counter() - t0}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return 0
    machine = _common.machine()
    print("settings:", json.dumps(vars(args)))
    print("machine:", json.dumps(machine))
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("json", "worker", "worker_out")]
    res = {impl: _common.run_worker(Path(__file__), [*forwarded, "--worker", impl]) for impl in ("ours", "trl")}
    mib = 2**20
    for impl, r in res.items():
        print(f"{impl:4s}: loss {r['loss']:.8f}, peak growth {r['mem_growth'] / mib:.0f} MiB, "
              f"absolute peak {r['mem_peak'] / mib:.0f} MiB, {r['seconds']:.1f} s")
    ratio = res["ours"]["mem_growth"] / res["trl"]["mem_growth"]
    diff = abs(res["ours"]["loss"] - res["trl"]["loss"])
    print(f"peak memory growth ours/TRL: {ratio:.3f}; |loss diff| {diff:.2e} "
          f"({'equal' if diff <= LOSS_TOL else 'NOT EQUAL: comparison void'})")
    if args.json:
        _common.write_results(args.json, "bench/memory.py", argv, machine, args, peak_memory_ratio=ratio,
                              loss_abs_diff=diff, **res)
    return 0 if diff <= LOSS_TOL else 1


if __name__ == "__main__":
    sys.exit(main())
