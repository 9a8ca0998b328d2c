"""Transition (issue 10): the old import path of :class:`midi.errors.DataError` and ``UsageError``.

Only midi/evaluation and evaluate.py still use it; delete this file once they import midi.errors.
"""

from midi.errors import DataError, UsageError

__all__ = ["DataError", "UsageError"]
