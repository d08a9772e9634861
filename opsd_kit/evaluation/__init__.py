"""Evaluation and statistics: grading, avg@k evaluation, intervals and paired tests, diagnostics,
the study (checkpoints evaluated, tokens to equal accuracy), reports and figures.

Imports `data`, `prompts`, `losses`, `rollout`, `config`, `run`, `policy`; never the algorithms or the trainer.
"""
