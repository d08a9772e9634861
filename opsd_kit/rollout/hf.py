"""Rollouts with Hugging Face ``generate`` (the reference engine), and what every engine shares: the
settings, the result, left padding, the seeded batching loop and stop-token trimming.

Completions are returned as *ids*, exactly as sampled: the trainer feeds these same ids to both the
student and the teacher, never a re-tokenisation of decoded text (docs/algorithm.md, Pitfalls, 1 and 2).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationSettings:
    """How the student samples."""

    max_new_tokens: int = 256
    """Completion length cap in tokens (paper: 1024)."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding (paper rollouts: 1.1)."""
    top_p: float = 1.0
    """Nucleus truncation; 1.0 is off (paper: 0.95)."""
    top_k: int = 0
    """Top-k truncation; 0 is off (paper: 20)."""
    n: int = 1
    """Samples per prompt (OPSD: 1; GRPO: the group size; evaluation: k)."""
    batch_size: int = 16
    """Sequences per ``generate`` call (prompts x samples)."""
    min_new_tokens: int = 0
    """Stop tokens are banned before this many tokens (0: off). For fixed-length benchmarks: it
    changes the sampled distribution, so training leaves it off."""

    def __post_init__(self):
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "n": self.n >= 1,
            "batch_size": self.batch_size >= 1,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"GenerationSettings.{key} has an invalid value {getattr(self, key)!r}")


@dataclass
class Rollouts:
    """Sampled completions; row r answers prompt ``prompt_index[r]``."""

    prompt_index: list[int]
    completion_ids: list[list[int]]
    """Generated ids, up to and including EOS when it was produced; never padded."""
    texts: list[str]
    """Decoded completions without special tokens (for grading and display only)."""
    finished: list[bool]
    """True when the row ended with EOS, False when cut at ``max_new_tokens``."""
    seconds: float = 0.0
    logprobs: list[list[float]] | None = None
    """With ``logprobs=True``: per completion token, its log-probability under the distribution it
    was sampled from (after temperature, top-k, top-p); aligned with ``completion_ids``."""

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def __len__(self) -> int:
        return len(self.completion_ids)


def left_pad(rows: list[list[int]], pad_id: int):
    """Left-pad id lists into ``(input_ids_BL, attention_mask_BL)`` tensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def generate(model, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings, *,
             seed: int | None = None, progress: bool = False, logprobs: bool = False) -> Rollouts:
    """Sample ``settings.n`` completions per prompt with HF ``generate``.

    Seeded: the same seed, model and prompts give the same completions on the same device.
    The model is put in eval mode for sampling and restored afterwards. ``logprobs=True`` also
    returns each sampled token's log-probability (see `Rollouts.logprobs`).
    """
    import torch

    sample = settings.temperature > 0
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=_eos_ids(model, tokenizer), use_cache=True,
                  **dict(_NEUTRAL, min_new_tokens=settings.min_new_tokens or None))
    if sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    else:  # greedy: unset sampling knobs that a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if logprobs:
        kwargs.update(output_scores=True, return_dict_in_generate=True)

    def decode(ids_BL, mask_BL, rows):
        with torch.no_grad():
            gen = model.generate(input_ids=ids_BL, attention_mask=mask_BL, **kwargs)
        new_ids_BN = (gen.sequences if logprobs else gen)[:, ids_BL.shape[1]:]
        return new_ids_BN, (_sampled_logprobs(gen.scores, new_ids_BN) if logprobs else None)

    return _sample_in_batches(model, tokenizer, prompt_ids, settings, decode, seed=seed, progress=progress,
                              logprobs=logprobs)


def _sample_in_batches(model, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings, decode, *,
                       seed: int | None, progress: bool, logprobs: bool) -> Rollouts:
    """The loop every backend but vLLM shares: ``settings.n`` rows per prompt, in calls of
    ``settings.batch_size`` left-padded rows, each seeded (``seed * 100_003 + call``), decoded by
    ``decode(ids_BL, mask_BL, rows) -> (new_ids_BN, logprobs_BN | None)`` (``rows``: the call's
    indices into the row list) and cut after the first stop token. The model is in eval mode
    while sampling and restored afterwards."""
    import time

    import torch
    from tqdm.auto import tqdm

    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    eos_ids = _eos_ids(model, tokenizer)
    rows = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(settings.n)]
    out = Rollouts([], [], [], [], logprobs=[] if logprobs else None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        starts = range(0, len(rows), settings.batch_size)
        for call, s in enumerate(tqdm(starts, desc="generate", disable=not progress, leave=False)):
            chunk = rows[s:s + settings.batch_size]
            ids, mask = left_pad([p for _, p in chunk], tokenizer.pad_token_id)
            if seed is not None:
                torch.manual_seed(seed * 100_003 + call)
            new_ids_BN, logprobs_BN = decode(ids.to(device), mask.to(device), range(s, s + len(chunk)))
            for r, ((pi, _), row) in enumerate(zip(chunk, new_ids_BN.tolist())):
                completion, done = _trim(row, eos_ids)
                out.prompt_index.append(pi)
                out.completion_ids.append(completion)
                out.finished.append(done)
                if logprobs:
                    out.logprobs.append(logprobs_BN[r, :len(completion)].tolist())
    finally:
        model.train(was_training)
    out.texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    out.seconds = time.perf_counter() - start
    return out


#: Logits processors a model's generation_config may switch on (Qwen2.5-Instruct ships
#: repetition_penalty=1.05): off, so rollouts come from exactly the distribution the loss models.
_NEUTRAL = dict(repetition_penalty=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                no_repeat_ngram_size=0, min_new_tokens=None, min_length=0, bad_words_ids=None,
                suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
                forced_eos_token_id=None)


def _sampled_logprobs(scores_N_BV, new_ids_BN):
    """[B, N] log-probabilities of the generated tokens under the processed scores ``generate``
    sampled from (one [B, V] tensor per decode step), one step at a time (no [B, N, V] tensor)."""
    import torch

    return torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new_ids_BN[:, t, None]).squeeze(-1)
                        for t, s in enumerate(scores_N_BV)], 1)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    ids.discard(None)
    return sorted(ids)


def _trim(row: list[int], eos_ids: list[int]) -> tuple[list[int], bool]:
    """Cut a generated row after its first stop token. HF writes padding only after a row has
    stopped, so the first stop token is always a sampled one (also when pad equals an EOS), and
    a row that never stopped holds no padding to remove."""
    for j, t in enumerate(row):
        if t in eos_ids:
            return row[: j + 1], True
    return row, False


def backend_error(backend: str, *, quantization: str | None, use_lora: bool) -> str | None:
    """Why rollout ``backend`` cannot sample this policy, or None: the one statement of these rules
    (`TrainConfig.validate` raises it before any model loads, the engines when built)."""
    if backend == "vllm" and quantization is not None:
        return ("rollout_backend='vllm' cannot be combined with quantization='4bit' (vLLM cannot serve bitsandbytes "
                "QLoRA; TRL #3654, unsloth #1930): use rollout_backend='hf' or quantization=None")
    if backend == "fast" and quantization is not None:
        return ("rollout_backend='fast' cannot be combined with quantization='4bit': merging LoRA into 4-bit base "
                "weights is not exact; use rollout_backend='hf' or quantization=None")
    if backend == "fast" and not use_lora:
        return ("rollout_backend='fast' merges the LoRA adapter while sampling and needs a LoRA adapter "
                "(use_lora=True); use rollout_backend='hf'")
    return None
