"""A training run's bookkeeping: its folder (resume or refuse), checkpoints, the token ledger, metrics
and the model card.

Imports `config` and `models` only.
"""
