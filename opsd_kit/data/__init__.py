"""Problems and their reference solutions: readers, the built-in sets, reasoning-gym tasks, splits and
the leakage check, and the answer parser that data loading and grading share.

Imports nothing else from opsd_kit.
"""
