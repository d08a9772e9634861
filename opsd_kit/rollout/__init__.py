"""How the student samples: Hugging Face ``generate`` (the reference), the fast engine (fused decoder),
vLLM, and a training run's `RolloutSampler`.

Imports nothing else from opsd_kit.
"""
