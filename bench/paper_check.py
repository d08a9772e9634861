"""The `paper` profiles end to end on a random-weight model, no hub: a few optimizer steps of
each (profile, algorithm) asked for (`paper` and `paper-qlora` OPSD by default), the paper's
evaluation protocol (`eval_protocol_for`) on 3 problems at a short token cap, and OPSD with vLLM
rollouts where vLLM is installed. Every part runs on its own: a failure is recorded and the
next part still runs. What could not run is said with its reason (no CUDA, no bitsandbytes, no
vLLM, the hub benchmarks unreachable).

The profiles' values are kept except what a check on a random model must change: the model
folder, local training problems (`bench_problems`, written to a JSON Lines file), the step
count, the token caps (`--tokens`; SFT's target cap too), the checkpoint cadence, and on CPU
float32 with 2 problems a step and a 1,024-token prompt cap (the small model's context is 4,096).
A random model earns no reward, so GRPO and RLSD are rewarded here by the parity of a rollout's
index, which mixes every group (a group's rollouts are contiguous): their advantages, RLSD's
teacher pass and the loss then run. The steps check the path, not learning.

  python bench/paper_check.py --model qwen3-1.7b-random --device cuda --json paper.json
  python bench/paper_check.py --model qwen3-small-random --device cpu --steps 1 --tokens 4   # smoke
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _problems_file(folder: Path, n: int) -> tuple[str, list]:
    problems = _common.bench_problems(n)
    path = folder / "problems.jsonl"
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "question": p.question, "solution": p.solution, "answer": p.answer}) + "\n")
    return str(path), problems


def _overrides(args, model_folder: str, data: str, n: int, run_dir: Path, algorithm: str) -> dict:
    from opsd_kit.config import applies_to

    values = dict(model=model_folder, train_data=data, train_size=n, max_steps=args.steps, save_every=args.steps,
                  keep_checkpoints=1, max_new_tokens=args.tokens, run_dir=str(run_dir), progress=False,
                  generation_batch_size=32, max_generated_tokens=None)
    if algorithm == "sft":
        values["max_target_tokens"] = args.tokens
    if args.device == "cpu":  # minutes, not hours, on a CPU: float32, 2 problems a step, small groups, and
        # a prompt cap inside the small model's 4,096-token context
        values.update(dtype="float32", problems_per_step=2, micro_batch_size=2, num_generations=2,
                      max_prompt_tokens=1024)
    return {k: v for k, v in values.items() if algorithm in applies_to(k)}  # validate refuses the others


def train(args, profile: str, algorithm: str, model_folder: str, data: str, n: int, root: Path, **extra) -> dict:
    """A few steps of ``load_profile(profile, algorithm)`` with the random model: what ran."""
    import torch

    from opsd_kit.config import load_profile
    from opsd_kit.trainer import Trainer

    run_dir = root / f"{profile}-{algorithm}{'-' + extra['rollout_backend'] if extra else ''}"
    cfg = load_profile(profile, algorithm, **_overrides(args, model_folder, data, n, run_dir, algorithm), **extra)
    trainer = Trainer(cfg)
    if algorithm in ("grpo", "rlsd"):  # a random model earns no reward: a reward that varies within groups
        trainer.algorithm.reward = lambda rollouts, problems: ([float(i % 2) for i in range(len(rollouts))], {})
    before = {k: v.clone() for k, v in trainer.policy.lora_state_dict().items()}
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    after = trainer.policy.lora_state_dict()
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    shares = getattr(getattr(trainer.algorithm, "prompt_pass", None), "enabled", None)
    record = {
        "profile": profile, "algorithm": algorithm, "steps": result.steps, "seconds": round(seconds, 2),
        "lora_changed": any(not torch.equal(before[k], after[k]) for k in before),
        "loss": [r.get("loss/total") for r in rows], "grad_norm": [r.get("train/grad_norm") for r in rows],
        "zero_gradient_micro_batches": [r.get("train/zero_gradient_micro_batches") for r in rows],
        "config": {k: getattr(cfg, k) for k in ("dtype", "quantization", "lora_dropout", "student_prompt_format",
                                                "loss_normalisation", "grading_mode", "learning_rate",
                                                "rollout_backend", "teacher_weights", "max_prompt_tokens")},
        "shares_prompt_pass": shares, "run_dir": str(run_dir),
    }
    if torch.cuda.is_available():
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    del trainer
    if not any(record["grad_norm"]):
        raise RuntimeError(f"{profile}:{algorithm}: every step's gradient is 0 (zero_gradient_micro_batches="
                           f"{record['zero_gradient_micro_batches']}): the loss never ran")
    return record


def evaluate(args, run_dir: str, problems) -> dict:
    """The run's evaluation protocol (the paper's) on 3 problems at ``--eval-tokens``."""
    from opsd_kit.config import eval_protocol_for
    from opsd_kit.evaluation.evaluate import evaluate_model
    from opsd_kit.evaluation.study import eval_prompt, load_run_config, load_run_policy

    protocol = eval_protocol_for(load_run_config(run_dir), max_new_tokens=args.eval_tokens, k=2, batch_size=8)
    policy, builder = load_run_policy(run_dir, student_thinking=protocol.student_thinking,
                                      prompt=eval_prompt(protocol))
    prompt = policy.tokenizer.decode(builder.student_ids(problems[0]))
    t0 = time.perf_counter()
    result = evaluate_model(policy.model, policy.tokenizer, problems[:3], builder=builder,
                            settings=protocol.settings(), mode=protocol.mode, seed=protocol.seed, progress=False)
    return {"problems": 3, "k": protocol.k, "max_new_tokens": protocol.max_new_tokens,
            "temperature": protocol.temperature, "top_p": protocol.top_p, "mode": protocol.mode,
            "chat_templated_prompt": prompt.startswith("<|im_start|>"), "seconds": round(time.perf_counter() - t0, 2),
            "summary": {k: v for k, v in result.summary.items() if isinstance(v, (int, float, str))},
            "benchmarks_not_loaded": list(protocol.benchmarks)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-1.7b-random")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="rollout (and SFT target) cap")
    ap.add_argument("--eval-tokens", type=int, default=32)
    ap.add_argument("--runs", nargs="+", default=["paper:opsd", "paper-qlora:opsd"],
                    help="profile:algorithm pairs to train")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("FAIL: --device cuda but torch sees no CUDA device")
        return 1
    report: dict = {"args": vars(args), "machine": _common.machine(), "runs": [], "skipped": [], "failed": []}
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model_folder = _common.materialise_model(args.model, dtype)
    root = Path(tempfile.mkdtemp(prefix="paper_check-"))
    n = 8
    data, problems = _problems_file(root, n)

    def attempt(name: str, fn):
        try:
            out = fn()
            print(f"[{name}] ok {json.dumps(out, default=str)[:400]}")
            return out
        except Exception as err:  # noqa: BLE001 - record and go on with the next part
            print(f"[{name}] FAILED {type(err).__name__}: {err}")
            report["failed"].append({"part": name, "error": f"{type(err).__name__}: {err}",
                                     "traceback": traceback.format_exc()[-2000:]})
            return None

    first_run_dir = None
    for spec in args.runs:
        profile, algorithm = spec.split(":")
        if profile.endswith("qlora") and not (cuda and importlib.util.find_spec("bitsandbytes")):
            reason = "no CUDA" if not cuda else "bitsandbytes not importable"
            print(f"[{spec}] SKIPPED: 4-bit needs CUDA and bitsandbytes ({reason})")
            report["skipped"].append({"part": spec, "reason": reason})
            continue
        out = attempt(spec, lambda p=profile, a=algorithm: train(args, p, a, model_folder, data, n, root))
        if out:
            report["runs"].append(out)
            if first_run_dir is None and algorithm == "opsd":
                first_run_dir = out["run_dir"]
    if first_run_dir:
        report["eval"] = attempt("eval paper protocol", lambda: evaluate(args, first_run_dir, problems))
    else:
        print("[eval paper protocol] SKIPPED: no OPSD run finished")
        report["skipped"].append({"part": "eval", "reason": "no OPSD run finished"})
    if not cuda:
        print("[paper:opsd vllm] SKIPPED: vLLM rollouts need CUDA")
        report["skipped"].append({"part": "vllm", "reason": "no CUDA"})
    elif importlib.util.find_spec("vllm") is None:
        print("[paper:opsd vllm] SKIPPED: vllm is not installed")
        report["skipped"].append({"part": "vllm", "reason": "vllm not installed"})
    else:
        out = attempt("paper:opsd vllm", lambda: train(args, "paper", "opsd", model_folder, data, n, root,
                                                       rollout_backend="vllm"))
        if out:
            report["runs"].append(out)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"paper_check: {len(report['runs'])} runs, {len(report['skipped'])} skipped, "
          f"{len(report['failed'])} failed")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
