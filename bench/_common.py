"""Shared helpers for the bench scripts: peak memory, fresh-subprocess workers, models, problems.

Peak memory: on CPU the high-water mark of resident memory (VmHWM) is reset with
``/proc/self/clear_refs`` just before the measured region (after setup, with every weight page
made resident by `touch_parameters`), so ``peak - rss_at_start`` is the memory the region itself
needed, allocator retention included; the absolute peak is reported too. On CUDA: ``torch.cuda.reset_peak_memory_stats`` then
``max_memory_allocated``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_kib("VmRSS") * 1024


def reset_peak() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0). False when not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Resident high-water mark since the last `reset_peak` (or process start)."""
    return _status_kib("VmHWM") * 1024


def touch_parameters(model) -> None:
    """Read every parameter once, so lazily mapped weight pages are resident before a baseline."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu" and p.numel():
                float(p.view(-1)[:: max(1, 4096 // max(1, p.element_size()))].float().sum())


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` (absolute) and ``m.growth``
    (peak minus usage at entry), in bytes."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.peak = self.growth = self.start = 0

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            if not reset_peak():
                raise RuntimeError("cannot reset VmHWM via /proc/self/clear_refs on this machine")
            self.start = rss_bytes()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes()
        self.growth = self.peak - self.start
        return False


# ----------------------------------------------------------------------------------- workers
def run_worker(script: Path, args: list[str], env_extra: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``script --worker-out FILE args`` in a fresh interpreter; return the JSON it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, **(env_extra or {}))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, str(script), *args, "--worker-out", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"worker failed (rc={proc.returncode}): {' '.join(cmd)}")
        return json.loads(out.read_text())


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("transformers", "peft", "trl", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: just not reported
            info[mod] = None
    return info


def write_results(path, script: str, argv, machine_info: dict, args, **figures) -> None:
    """Write a benchmark's figures as JSON: the command, the UTC date, the machine, the settings
    and the figures (ratios first, then the raw per-repeat numbers)."""
    import time

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([script, *(argv if argv is not None else sys.argv[1:])])
    Path(path).write_text(json.dumps({"command": command, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                      "machine": machine_info, "settings": vars(args), **figures}, indent=2))


def median(xs):
    import statistics

    return statistics.median(xs) if xs else float("nan")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences hold different tokens, or None where they do
    not (equal, or one a prefix of the other: no pair of tokens to compare)."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def logit_gap(model, ids: list[int], a: int, b: int) -> dict:
    """The model's logit gap (token ``b`` minus token ``a``) at the next position after ``ids``, and
    the rounding tolerance for it: two computations of a logit in the model's dtype differ by at most
    ``2 * layers * max(hidden, intermediate) * eps * max|logit|`` (as tests/_numerics.py: a reduction's
    width times eps, through every layer, two computations compared). Where two greedy decodes of
    the same weights part with a gap inside it, the tokens were tied to rounding."""
    import torch

    cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    with torch.no_grad():
        logits_V = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
    bound = 2 * cfg.num_hidden_layers * max(cfg.hidden_size, cfg.intermediate_size) \
        * torch.finfo(model.dtype).eps * float(logits_V.abs().max())
    return {"gap": float(logits_V[b] - logits_V[a]), "tolerance": bound,
            "top2": [float(x) for x in logits_V.topk(2).values]}


# ----------------------------------------------------------------------------------- models
#: Config shapes of Qwen3-1.7B (no download): used by --model qwen3-1.7b-random.
QWEN3_17B = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 40960, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": True}
#: A small Qwen3-shaped model for smoke tests of the random-weight path on CPU.
QWEN3_SMALL = {"vocab_size": 151936, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
               "max_position_embeddings": 4096, "tie_word_embeddings": True}
RANDOM_MODELS = {"qwen3-1.7b-random": QWEN3_17B, "qwen3-small-random": QWEN3_SMALL}


def materialise_model(name: str, dtype: str = "float32") -> str:
    """A model name `opsd_kit.models` can load: random-weight names are built once into a cached
    folder (Qwen3 config, random weights, the tiny byte-level tokenizer with a ChatML template);
    anything else is returned unchanged."""
    if name not in RANDOM_MODELS:
        return name
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsd_kit.models import build_tiny_tokenizer, cache_dir

    folder = cache_dir() / f"bench-{name}-{dtype}"
    if (folder / "config.json").is_file():
        return str(folder)
    tok = build_tiny_tokenizer()
    cfg = Qwen3Config(**RANDOM_MODELS[name], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    build_on = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1.7B weights: seconds on a GPU
    with torch.random.fork_rng(devices=[]), torch.device(build_on):
        torch.manual_seed(0)
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return str(folder)


# ----------------------------------------------------------------------------------- problems
def bench_problems(n: int, source: str = "reasoning_gym:chain_sum?max_terms=2&max_digits=2", seed: int = 0):
    """The first ``n`` problems of the cpu-demo task (deterministic). Without reasoning_gym
    (a bare GPU machine), the same kind of two-term sums is synthesised here."""
    import importlib.util

    if importlib.util.find_spec("reasoning_gym") is not None:
        from opsd_kit.data.sources import load_source

        problems, _ = load_source(source, size=max(n, 8), seed=seed)
        return list(problems)[:n]
    import random

    from opsd_kit.data.problems import Problem

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append(Problem(id=f"sum-{i}", question=f"State the final answer to the following arithmetic problem: "
                           f"{a} + {b} =", solution=f"{a} + {b} = {a + b}.\nThe answer is \\boxed{{{a + b}}}",
                           answer=str(a + b), source="bench-synthetic"))
    return out
