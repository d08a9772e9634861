"""Chunked divergence from hidden states vs the naive loss on materialised [B, T, V] logits.

Forward + backward of the forward-KL loss (sum over tokens / token count, as the trainer
normalises) with a frozen output layer (as under LoRA): gradient w.r.t. the student's hidden
states only. Each variant runs in a fresh subprocess, so its peak memory is its own:
ru_maxrss growth during the computation on CPU, torch.cuda.max_memory_allocated above the
inputs on GPU. Reports median time after one warm-up, the chunked/naive ratios, and the
largest differences in loss and gradient. Targets (reported, not asserted): chunked peak
memory <= 25% of naive; max abs differences < 1e-4 in float32.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loss.py            # a few minutes on one CPU core
    .venv/bin/python bench/loss.py --device cuda --dtype bfloat16 --T 4096
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from opsd_kit.losses import KINDS, DivergenceSpec, chunked_divergence, per_token_divergence

MEMORY_TARGET = 0.25
DIFF_TARGET = 1e-4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--V", type=int, default=151936, help="Qwen's logits dim")
    parser.add_argument("--H", type=int, default=2048, help="hidden size (Qwen3-1.7B: 2048)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--kind", default="forward_kl", choices=KINDS)
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_worker(args) -> None:
    """Build seeded inputs, run one variant warm-up + repeats times, save its results."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.H, args.V, bias=False, device=device, dtype=dtype).requires_grad_(False)
    # hidden scale 4 gives logits of std about 2.3 (peaked, LM-like); the teacher is a perturbed student
    student_BTH = (4 * torch.randn(args.B, args.T, args.H, device=device, dtype=dtype)).requires_grad_()
    teacher_BTH = student_BTH.detach() + 2 * torch.randn_like(student_BTH)
    mask_BT = torch.ones(args.B, args.T, dtype=torch.bool, device=device)
    n_tokens = int(mask_BT.sum())

    def step(span: slice) -> torch.Tensor:
        student_BTH.grad = None
        student_Bth, teacher_Bth, mask_Bt = student_BTH[:, span], teacher_BTH[:, span], mask_BT[:, span]
        if args.worker == "naive":
            student_BtV = head(student_Bth)
            with torch.no_grad():
                teacher_BtV = head(teacher_Bth)
            div_Bt = per_token_divergence(student_BtV, teacher_BtV, args.kind)
            loss_sum = torch.where(mask_Bt, div_Bt, 0.0).sum()
        else:
            loss_sum, _ = chunked_divergence(
                student_Bth, teacher_Bth, head, mask_Bt, DivergenceSpec(args.kind, chunk_size=args.chunk_size)
            )
        loss = loss_sum / n_tokens
        loss.backward()
        return loss.detach()

    step(slice(0, 2))  # one-time costs (lazy imports, kernel set-up) before the baseline
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _max_rss_bytes()
    step(slice(None))
    seconds = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        loss = step(slice(None))
        _sync(device)
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _max_rss_bytes()) - base
    torch.save({"loss": loss.cpu(), "grad": student_BTH.grad.cpu(), "peak": peak, "seconds": seconds}, args.out)


def run_variant(variant: str, argv: list[str], folder: str) -> dict:
    out = os.path.join(folder, f"{variant}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", variant, "--out", out]
    # glibc: return every block of 64 KiB or more to the OS when freed, so RSS follows live memory
    subprocess.run(cmd, check=True, env={"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ})
    return torch.load(out)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    logits_mib = args.B * args.T * args.V * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size() / 2**20
    print(
        f"settings: B={args.B} T={args.T} V={args.V} H={args.H} dtype={args.dtype} device={args.device} "
        f"kind={args.kind} chunk_size={args.chunk_size} repeats={args.repeats} (+1 warm-up) "
        f"threads={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"one [B,T,V] logits tensor: {logits_mib:.0f} MiB; head frozen, grad w.r.t. student hidden only")
    with tempfile.TemporaryDirectory() as folder:
        results = {variant: run_variant(variant, argv, folder) for variant in ("naive", "chunked")}
    memory_unit = "allocated" if args.device.startswith("cuda") else "ru_maxrss growth"
    for variant, result in results.items():
        print(
            f"{variant:>8}: peak memory {result['peak'] / 2**20:8.0f} MiB ({memory_unit}), "
            f"median fwd+bwd {statistics.median(result['seconds']):7.2f} s, loss {result['loss'].item():.6f}"
        )
    naive, chunked = results["naive"], results["chunked"]
    memory_ratio = chunked["peak"] / naive["peak"]
    time_ratio = statistics.median(chunked["seconds"]) / statistics.median(naive["seconds"])
    loss_diff = (chunked["loss"].double() - naive["loss"].double()).abs().item()
    grad_diff = (chunked["grad"].double() - naive["grad"].double()).abs().max().item()
    print(f"memory chunked/naive: {memory_ratio:.3f}  [{'PASS' if memory_ratio <= MEMORY_TARGET else 'MISS'}"
          f" target <= {MEMORY_TARGET}]")
    print(f"time chunked/naive:   {time_ratio:.3f}")
    verdict = "PASS" if max(loss_diff, grad_diff) < DIFF_TARGET else "MISS"
    if args.dtype != "float32":
        verdict = f"{verdict}; the target is set for float32"
    print(f"max |loss diff| {loss_diff:.3e}, max |grad diff| {grad_diff:.3e}  [{verdict} target < {DIFF_TARGET}]")


if __name__ == "__main__":
    main()
