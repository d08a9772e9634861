"""A training run's rollouts: the backend, per-step and per-process seeds, the engines' lifecycle.
"""
from __future__ import annotations

from opsd_kit.rollout import hf
from opsd_kit.rollout.fast import FastEngine, Prefill
from opsd_kit.rollout.hf import GenerationSettings, Rollouts
from opsd_kit.rollout.vllm_engine import VLLMEngine


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
        return hf.generate(self.policy.model, self.policy.tokenizer, prompt_ids, settings, seed=seed)
