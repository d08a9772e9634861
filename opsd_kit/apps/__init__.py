"""Entry points: the ``opsd-kit`` command, the demo pipeline, the notebooks' helpers and adapter export.

Imports anything in opsd_kit; nothing imports it.
"""
