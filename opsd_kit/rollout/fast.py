"""The fast engine (``rollout_backend="fast"``, ``EvalConfig.engine="fast"``): `FastEngine` samples
without ``generate``, through `fused_decoder.FusedDecoder` (the LoRA adapter, if any, merged into a copy
of the weights, fused projections, a static KV cache); for a model the fused decoder does not support,
``generate`` with the adapter merged (restored bit for bit after). A `Prefill` is the caller's own
pass over the prompts to start from.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from opsd_kit.rollout import hf
from opsd_kit.rollout.hf import GenerationSettings, Rollouts, _eos_ids, _sample_in_batches, backend_error


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
class FastEngine:
    """Rollouts (and evaluation samples) without Hugging Face ``generate`` (``rollout_backend="fast"``).

    Where `fused_decoder.FusedDecoder` supports the model (Llama, SmolLM2, Qwen2, Qwen3 with
    plain LoRA or no adapter) it samples: before every call the current adapter is merged into a
    copy of the projections (fused, on CPU prepacked), then decoding uses a static KV cache; the
    model itself is never written to. Otherwise (``self.fallback`` says why, with a warning) it
    samples with `generate` inside `merged`. Either way the sampled distribution is the model's up
    to floating-point rounding (bench/rollout.py measures greedy agreement and log-probabilities
    against the student's own forward; bench/eval.py the greedy evaluation). Extra memory while
    sampling: one copy of the decoder's projection weights, released when the call returns.

    ``model``: a peft model with a LoRA adapter (training) or a plain transformers causal LM
    (evaluating a base model: its weights are used as they are). A 4-bit base is refused
    (`hf.backend_error`): merging LoRA into 4-bit weights is not exact.
    """

    def __init__(self, model, tokenizer):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        from opsd_kit.rollout.fused_decoder import FusedDecoder

        self.has_adapter = isinstance(model, PeftModel)
        """False for a plain causal LM: nothing to merge."""
        error = backend_error("fast", use_lora=True, quantization="4bit" if is_quantized(model, bits=4) else None)
        if error:
            raise ValueError(error)
        self.model, self.tokenizer = model, tokenizer
        self.fallback = FusedDecoder.unsupported(model)
        """None when the fused decoder samples; else why `generate` (with the adapter merged) does."""
        self._decoder: FusedDecoder | None = None
        self._base_weights = []  # what `merged` snapshots and restores (the fallback only)
        if self.fallback:
            import warnings

            self._base_weights = [m.get_base_layer().weight for m in model.modules() if isinstance(m, LoraLayer)]
            merged = " with the adapter merged" if self.has_adapter else ""
            warnings.warn(f"the fast engine: the fused decoder cannot run this model ({self.fallback}); "
                          f"sampling with generate{merged} instead", stacklevel=2)

    def generate(self, prompt_ids: list[list[int]], settings: GenerationSettings, *, seed: int | None = None,
                 progress: bool = False, logprobs: bool = False, prefill: Prefill | None = None) -> Rollouts:
        """`generate`'s arguments and result. ``prefill``: the caller's own pass over the prompts
        (one row per prompt, ``settings.n == 1``), which the decoder starts from instead of its own."""
        if prefill is not None and (self.fallback or settings.n != 1):
            raise ValueError("FastEngine.generate: a prefill needs the fused decoder and settings.n == 1 "
                             f"(fallback: {self.fallback}, n={settings.n})")
        if self.fallback:
            with self.merged():
                return hf.generate(self.model, self.tokenizer, prompt_ids, settings, seed=seed, progress=progress,
                                logprobs=logprobs)
        from opsd_kit.rollout.fused_decoder import FusedDecoder

        if self._decoder is None:  # building it merges the adapter as it stands
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
        it is unmerged and the base weights are restored bit for bit. A model without an
        adapter is yielded as it is."""
        import torch

        if not self.has_adapter:
            yield self.model
            return
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


def is_quantized(model, bits: tuple | int = (4, 8)) -> bool:
    """Whether ``model``'s base (under a peft wrapper, or the model itself) is loaded in ``bits`` bits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(getattr(base, f"is_loaded_in_{b}bit", False) for b in ((bits,) if isinstance(bits, int) else bits))
