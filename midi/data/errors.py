"""Exceptions shared by the data tools."""

from __future__ import annotations


class DataError(Exception):
    """A problem with one input file or one scene.

    The message is a single line that names the file (or scene) and the problem, so it can be
    printed as-is in a summary or stored as the ``reason`` of a skipped scene.
    """

    def __init__(self, message: object) -> None:
        # Collapse whitespace: a reason must fit on one line of the summary and the report.
        super().__init__(" ".join(str(message).split()))


class UsageError(Exception):
    """A problem with how the tools were called (bad arguments, mismatched settings on resume)."""
