"""The comparison study: evaluate every saved checkpoint of the OPSD, GRPO and SFT runs (and
the base model) on one held-out set, then read off accuracy against generated tokens.

One model load serves every evaluation: the base is the policy with its adapter switched off,
and each checkpoint's adapter is loaded into the same LoRA slots.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def run_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """``(step, adapter folder)`` for every complete checkpoint and the final adapter."""
    from .checkpoint import complete_checkpoints

    found = {int(p.name.split("-")[1]): p / "adapter" for p in complete_checkpoints(run_dir)}
    final = Path(run_dir) / "adapter"
    metrics = Path(run_dir) / "metrics.jsonl"
    if final.is_dir() and metrics.is_file():
        lines = metrics.read_text().splitlines()
        if lines:
            found[json.loads(lines[-1])["step"]] = final
    return sorted(found.items())


def evaluate_runs(runs: dict, problems, *, settings, mode: str = "lenient", seed: int = 0,
                  out_dir=None, progress: bool = False):
    """One row per (method, step): held-out avg@k and pass@k in both grading modes, with the
    generated tokens, training tokens and wall time the run had spent at that step.

    ``runs`` maps a method name to its run folder; all runs must share model and LoRA settings.
    Step 0 of each method is the base model. Evaluations are saved under ``out_dir``.
    """
    import pandas as pd

    from .evaluate import evaluate_model
    from .metrics import read_metrics

    if not runs:
        raise ValueError("evaluate_runs needs at least one run")
    configs = {m: json.loads((Path(d) / "config.json").read_text()) for m, d in runs.items()}
    keys = {m: _model_key(c) for m, c in configs.items()}
    if len(set(keys.values())) != 1:
        raise ValueError(f"runs differ in model or LoRA settings, cannot share one model: {keys}")
    policy, builder = load_run_policy(next(iter(runs.values())))

    def evaluate(tag: str):
        result = evaluate_model(policy.model, policy.tokenizer, problems, builder=builder, settings=settings,
                                mode=mode, seed=seed, progress=progress)
        if out_dir is not None:
            result.save(Path(out_dir) / tag)
        return result.summary

    with policy.model.disable_adapter():
        base = evaluate("base")
    rows = []
    for method, run_dir in runs.items():
        metrics = read_metrics(Path(run_dir) / "metrics.jsonl").set_index("step")
        rows.append(_row(method, 0, base, generated=0, trained=0, seconds=0.0))
        for step, adapter in run_checkpoints(run_dir):
            policy.load_adapter(adapter)
            at = metrics.loc[step]
            rows.append(_row(method, step, evaluate(f"{method}-step{step}"),
                             generated=int(at["tokens/generated_total"]), trained=int(at["tokens/train_total"]),
                             seconds=float(at["time/elapsed"])))
    return pd.DataFrame(rows)


def results_table(points, mode: str = "lenient"):
    """The last checkpoint of each method, and the base model."""
    import pandas as pd

    base = points[points["step"] == 0].iloc[[0]].assign(method="base")
    last = points.sort_values("step").groupby("method", sort=False).tail(1)
    columns = ["method", "step", f"{mode}/avg@k", "strict/avg@k", "lenient/avg@k", f"{mode}/pass@k",
               "boxed_rate", "mean_response_tokens", "generated_tokens", "train_tokens", "train_seconds"]
    return pd.concat([base, last[last["step"] > 0]])[columns].reset_index(drop=True)


def tokens_to_equal_accuracy(points, *, mode: str = "lenient", a: str = "opsd", b: str = "grpo") -> dict:
    """Generated tokens each method needed to first reach the best accuracy both reached.

    ``ratio`` = tokens(b) / tokens(a): how many times fewer tokens ``a`` needed. It is None,
    with a ``reason``, when either method never improved on the base model.
    """
    column = f"{mode}/avg@k"
    base = float(points.loc[points["step"] == 0, column].iloc[0])
    best = {m: float(points.loc[points["method"] == m, column].max()) for m in (a, b)}
    target = min(best.values())
    out = {"mode": mode, "base_accuracy": base, "target_accuracy": target, f"best_{a}": best[a],
           f"best_{b}": best[b], f"tokens_{a}": None, f"tokens_{b}": None, "ratio": None, "reason": ""}
    if not target > base:
        out["reason"] = (f"no common improvement over the base model ({base:.3f}): best {a} {best[a]:.3f}, "
                         f"best {b} {best[b]:.3f}")
        return out
    for m in (a, b):
        rows = points[(points["method"] == m) & (points[column] >= target) & (points["step"] > 0)]
        out[f"tokens_{m}"] = int(rows["generated_tokens"].min())
    if out[f"tokens_{a}"] == 0:
        out["reason"] = f"{a} generated no tokens"
        return out
    out["ratio"] = out[f"tokens_{b}"] / out[f"tokens_{a}"]
    return out


def _row(method: str, step: int, summary: dict, *, generated: int, trained: int, seconds: float) -> dict:
    row = {"method": method, "step": step, "generated_tokens": generated, "train_tokens": trained,
           "train_seconds": seconds, "k": summary["eval/k"], "n_problems": summary["eval/n_problems"],
           "boxed_rate": summary["eval/boxed_rate"], "mean_response_tokens": summary["eval/mean_response_tokens"],
           "truncation_rate": summary["eval/truncation_rate"], "eval_seconds": summary["eval/seconds"]}
    for mode in ("strict", "lenient"):
        row[f"{mode}/avg@k"] = summary[f"eval/{mode}/avg@k"]
        row[f"{mode}/pass@k"] = summary[f"eval/{mode}/pass@k"]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _model_key(cfg: dict) -> tuple:
    return (cfg["model"], cfg["dtype"], cfg["quantization"], cfg["use_lora"], cfg["lora_r"], cfg["lora_alpha"],
            cfg["lora_dropout"], tuple(cfg["lora_target_modules"]))


def load_run_policy(run_dir, adapter=None):
    """The policy and prompt builder a run trained with, its adapter loaded when given."""
    from .policy import LoraSettings, Policy
    from .prompts import build_prompts

    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    if not cfg["use_lora"]:
        raise ValueError("evaluate_runs compares LoRA adapters; a run with use_lora=False has none")
    lora = LoraSettings(r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                        target_modules=tuple(cfg["lora_target_modules"]))
    policy = Policy.from_pretrained(cfg["model"], dtype=cfg["dtype"], quantization=cfg["quantization"], lora=lora,
                                    teacher="frozen", seed=cfg["seed"])
    builder = build_prompts(cfg, policy.tokenizer)  # an older config.json without templates: the defaults
    if adapter is not None:
        policy.load_adapter(adapter)
    return policy, builder
