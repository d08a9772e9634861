"""The algorithms: what they share (`base.Algorithm`), OPSD, and the GRPO, RLSD and SFT baselines.
Each turns a step's problems into typed micro-batches and a summed loss.

Imports everything below the trainer; never `trainer` or `apps`.
"""
