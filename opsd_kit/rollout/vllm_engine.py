"""The vLLM backend (GPU, bf16 + LoRA), imported lazily; vLLM with a 4-bit model is refused
(docs/algorithm.md, Pitfalls, 7; TRL #3654: vLLM cannot serve bitsandbytes QLoRA adapters).
"""
from __future__ import annotations

from opsd_kit.rollout.hf import GenerationSettings, Rollouts, backend_error


class VLLMEngine:
    """Rollouts with vLLM (GPU only), serving the current LoRA adapter.

    The adapter is saved to ``adapter_dir`` before each call and passed as a ``LoRARequest``
    with a fresh id, so vLLM always samples from the current student.
    """

    def __init__(self, model_name: str, *, quantization: str | None, dtype: str = "bfloat16",
                 max_model_len: int = 4096, gpu_memory_utilization: float = 0.3, max_lora_rank: int = 64):
        error = backend_error("vllm", quantization=quantization, use_lora=True)
        if error:
            raise ValueError(error)
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
