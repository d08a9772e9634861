"""Rollouts: the student samples its own answers.

`generate` runs Hugging Face ``generate`` (KV cache, left padding) over token-id prompts and
returns the completion *ids*, exactly as sampled: the trainer feeds these same ids to both the
student and the teacher, never a re-tokenisation of decoded text (docs/algorithm.md, Pitfalls, 1 and 2).

`FastEngine` (``rollout_backend="fast"``) samples without ``generate``: the LoRA adapter merged
into a copy of the weights, fused projections, a static KV cache (`fused_decoder`); for a model
the fused decoder does not support, ``generate`` with the adapter merged (restored bit for bit
after). "fast" is refused with a 4-bit base.

The vLLM backend (GPU, bf16 + LoRA) is imported lazily; vLLM with a 4-bit model is refused
(docs/algorithm.md, Pitfalls, 7; TRL #3654: vLLM cannot serve bitsandbytes QLoRA adapters).
"""
from __future__ import annotations

from contextlib import contextmanager
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


@dataclass
class Prefill:
    """The student's pass over the prompts, done by the caller, for `FastEngine` to sample from
    instead of running its own: every layer's key and value states ``[B, G, W, D]`` in the layout
    of ``left_pad(prompt_ids)`` (W: the longest prompt), and the next-token logits ``[B, V]``."""

    keys: list
    values: list
    logits_BV: "torch.Tensor"  # noqa: F821

    @classmethod
    def concat(cls, parts: list["Prefill"]) -> "Prefill":
        """Consecutive groups of rows as one, each left-padded (zeros, masked) to the widest."""
        import torch
        import torch.nn.functional as F

        width = max(p.keys[0].shape[-2] for p in parts)

        def cat(tensors_per_part):
            return torch.cat([F.pad(t, (0, 0, width - t.shape[-2], 0)) for t in tensors_per_part])

        return cls(keys=[cat(ks) for ks in zip(*(p.keys for p in parts))],
                   values=[cat(vs) for vs in zip(*(p.values for p in parts))],
                   logits_BV=torch.cat([p.logits_BV for p in parts]))

    def rows(self, rows: range, width: int) -> "Prefill":
        """``rows``, the last ``width`` columns (the layout of left-padding those rows alone)."""
        def cut(t):
            return t[rows.start:rows.stop, :, t.shape[-2] - width:]

        return Prefill([cut(k) for k in self.keys], [cut(v) for v in self.values],
                       self.logits_BV[rows.start:rows.stop])


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


class FastEngine:
    """Rollouts from a LoRA policy without Hugging Face ``generate`` (``rollout_backend="fast"``).

    Where `fused_decoder.FusedDecoder` supports the model (Llama, SmolLM2, Qwen2, Qwen3 with
    plain LoRA) it samples: before every call the current adapter is merged into a copy of the
    projections (fused, on CPU prepacked), then decoding uses a static KV cache; the model itself
    is never written to. Otherwise (``self.fallback`` says why, with a warning) it samples with
    `generate` inside `merged`. Either way the sampled distribution is the student's up to floating-point
    rounding (bench/rollout.py measures greedy agreement and log-probabilities against the
    student's own forward). Extra memory while sampling: one copy of the decoder's projection weights,
    released when the call returns.
    """

    def __init__(self, model, tokenizer):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        from .fused_decoder import FusedDecoder

        if not isinstance(model, PeftModel):
            raise ValueError("rollout_backend='fast' needs a LoRA adapter; this model has none (use 'hf')")
        if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
            check_backend("fast", "4bit")
        self.model, self.tokenizer = model, tokenizer
        self.fallback = FusedDecoder.unsupported(model)
        """None when the fused decoder samples; else why `generate` with the adapter merged does."""
        self._decoder: FusedDecoder | None = None
        self._base_weights = []  # what `merged` snapshots and restores (the fallback only)
        if self.fallback:
            import warnings

            self._base_weights = [m.get_base_layer().weight for m in model.modules() if isinstance(m, LoraLayer)]
            warnings.warn(f"rollout_backend='fast': the fused decoder cannot run this model ({self.fallback}); "
                          "sampling with generate and the adapter merged instead", stacklevel=2)

    def generate(self, prompt_ids: list[list[int]], settings: GenerationSettings, *, seed: int | None = None,
                 progress: bool = False, logprobs: bool = False, prefill: Prefill | None = None) -> Rollouts:
        """`generate`'s arguments and result. ``prefill``: the caller's own pass over the prompts
        (one row per prompt, ``settings.n == 1``), which the decoder starts from instead of its own."""
        if prefill is not None and (self.fallback or settings.n != 1):
            raise ValueError("FastEngine.generate: a prefill needs the fused decoder and settings.n == 1 "
                             f"(fallback: {self.fallback}, n={settings.n})")
        if self.fallback:
            with self.merged():
                return generate(self.model, self.tokenizer, prompt_ids, settings, seed=seed, progress=progress,
                                logprobs=logprobs)
        from .fused_decoder import FusedDecoder

        if self._decoder is None:  # building it merges the adapter as it is now
            self._decoder = FusedDecoder(self.model, rows_hint=settings.batch_size)
        else:
            self._decoder.refresh()
        knobs = dict(max_new_tokens=settings.max_new_tokens, eos_ids=_eos_ids(self.model, self.tokenizer),
                     pad_id=self.tokenizer.pad_token_id, temperature=settings.temperature, top_k=settings.top_k,
                     top_p=settings.top_p, min_new_tokens=settings.min_new_tokens, logprobs=logprobs)

        def decode(ids_BL, mask_BL, rows):
            part = None if prefill is None else prefill.rows(rows, ids_BL.shape[1])
            return self._decoder.decode(ids_BL, mask_BL, prefill=part, **knobs)

        try:
            return _sample_in_batches(self.model, self.tokenizer, prompt_ids, settings, decode, seed=seed,
                                      progress=progress, logprobs=logprobs)
        finally:  # the merged copy is not held between rollouts (the loss's activations need the memory)
            self._decoder.release()

    @contextmanager
    def merged(self):
        """Inside, the adapter is merged into the base weights; on exit (also on an exception)
        it is unmerged and the base weights are restored bit for bit."""
        import torch

        with torch.no_grad():
            saved = [w.detach().clone() for w in self._base_weights]
        self.model.merge_adapter()
        try:
            yield self.model
        finally:
            self.model.unmerge_adapter()
            with torch.no_grad():
                for w, original in zip(self._base_weights, saved):
                    w.copy_(original)


class VLLMEngine:
    """Rollouts with vLLM (GPU only), serving the current LoRA adapter.

    The adapter is saved to ``adapter_dir`` before each call and passed as a ``LoRARequest``
    with a fresh id, so vLLM always samples from the current student.
    """

    def __init__(self, model_name: str, *, quantization: str | None, dtype: str = "bfloat16",
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.3, max_lora_rank: int = 64):
        check_backend("vllm", quantization)
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("rollout_backend='vllm' needs vllm: pip install 'opsd_kit[gpu]'") from err
        self.llm = LLM(model=model_name, dtype=dtype, enable_lora=True, max_lora_rank=max_lora_rank,
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization)
        self._version = 0

    def generate(self, policy, prompt_ids: list[list[int]], settings: GenerationSettings, *,
                 adapter_dir: str, seed: int | None = None) -> Rollouts:
        import time

        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        policy.save_adapter(adapter_dir)
        self._version += 1
        params = [SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                 top_k=settings.top_k or -1, max_tokens=settings.max_new_tokens,
                                 min_tokens=settings.min_new_tokens,
                                 seed=None if seed is None else seed * 100_003 + i)  # one stream per prompt
                  for i in range(len(prompt_ids))]
        prompts = [{"prompt_token_ids": p} for p in prompt_ids]
        results = self.llm.generate(prompts, params,
                                    lora_request=LoRARequest("student", self._version, adapter_dir))
        out = Rollouts([], [], [], [])
        for i, res in enumerate(results):
            for o in res.outputs:
                out.prompt_index.append(i)
                out.completion_ids.append(list(o.token_ids))
                out.finished.append(o.finish_reason == "stop")
                out.texts.append(o.text)
        out.seconds = time.perf_counter() - start
        return out


def check_backend(backend: str, quantization: str | None) -> None:
    """Refuse impossible rollout backends (`TrainConfig.validate` refuses them too, before any model loads)."""
    if backend == "fast" and quantization is not None:
        raise ValueError(
            "rollout_backend='fast' cannot be combined with quantization='4bit': merging LoRA into 4-bit "
            "base weights is not exact. Use rollout_backend='hf' with 4-bit."
        )
    if backend == "vllm" and quantization is not None:
        raise ValueError(
            "rollout_backend='vllm' cannot be combined with quantization='4bit': vLLM cannot serve "
            "bitsandbytes QLoRA adapters (TRL #3654, unsloth #1930). Use rollout_backend='hf' with "
            "4-bit, or quantization=None (bf16) with vLLM."
        )


class RolloutSampler:
    """A training run's rollouts from the current student: the backend, the seeds, the vLLM engine.

    Args:
        policy: the `policy.Policy` being trained (its ``model`` and ``tokenizer`` sample with
            ``backend='hf'``; vLLM serves its adapter, saved to ``adapter_dir`` before each call).
        backend: ``"hf"`` (HF generate), ``"fast"`` (`FastEngine`: opsd_kit's fused decoder) or
            ``"vllm"``; `TrainConfig.validate` checks it.
        seed: the run's seed.
        num_processes / process_index: this process's place in the run; each samples its own stream.
        adapter_dir: where the vLLM backend saves the adapter it serves.
        engine: `VLLMEngine` keyword arguments; the engine starts at the first vLLM call.
    """

    def __init__(self, policy, *, backend: str, seed: int, num_processes: int = 1, process_index: int = 0,
                 adapter_dir: str = "vllm_adapter", engine: dict | None = None):
        self.policy = policy
        self.backend = backend
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.adapter_dir = adapter_dir
        self.engine_kwargs = engine or {}
        self._engine: VLLMEngine | FastEngine | None = None

    def step_seed(self, step: int) -> int:
        """The sampling seed of ``step`` on this process: a different stream per step and process."""
        return (self.seed * 1_000_003 + step) * self.num_processes + self.process_index

    def sample(self, prompt_ids: list[list[int]], settings: GenerationSettings, step: int,
               prefill: Prefill | None = None) -> Rollouts:
        """``settings.n`` completions per prompt for optimizer step (or GRPO batch) ``step``;
        ``prefill`` (backend 'fast' only): the student's pass over the prompts to sample from."""
        seed = self.step_seed(step)
        if prefill is not None and self.backend != "fast":
            raise ValueError(f"a prefill is for rollout_backend='fast', not {self.backend!r}")
        if self.backend == "vllm":
            if self._engine is None:
                self._engine = VLLMEngine(**self.engine_kwargs)
            return self._engine.generate(self.policy, prompt_ids, settings, seed=seed, adapter_dir=self.adapter_dir)
        if self.backend == "fast":
            if self._engine is None:
                self._engine = FastEngine(self.policy.model, self.policy.tokenizer)
            return self._engine.generate(prompt_ids, settings, seed=seed, prefill=prefill)
        return generate(self.policy.model, self.policy.tokenizer, prompt_ids, settings, seed=seed)
