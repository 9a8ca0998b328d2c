"""The toolkit's errors: one base class, and the one place that turns them into an exit code.

Every problem a user can fix is a :class:`MidiError`. ``str()`` is ``"<path>: <message>"`` on one
line, plus one line per entry of ``problems`` (a config reports all of its problems at once).
The command-line scripts end in ``sys.exit(run_cli(main))``: :func:`run_cli` prints each line as
``error: <line>`` on stderr and returns the error's ``exit_code``, so no script has its own ladder
of ``except`` clauses. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


def one_line(message: object, limit: int = 400) -> str:
    """``message`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MidiError(Exception):
    """A problem the user can fix; ``exit_code`` is what the command line returns for it."""

    exit_code: int = 2

    def __init__(self, message: object = "", *, path: str | os.PathLike[str] | None = None,
                 problems: Sequence[str] = ()) -> None:
        self.message = " ".join(str(message).split())
        self.path = None if path is None else os.fspath(path)
        self.problems = list(problems)
        super().__init__(self.message)

    def __str__(self) -> str:
        prefix = f"{self.path}: " if self.path is not None else ""
        lines = ([self.message] if self.message else []) + self.problems
        return "\n".join(prefix + line for line in lines) or prefix.removesuffix(": ")


class ConfigError(MidiError, ValueError):
    """One or more config problems, all at once (``problems``: one line each, naming the key)."""

    def __init__(self, problems: Sequence[str] = (), source: str | os.PathLike[str] | None = None) -> None:
        super().__init__(path=source, problems=problems)  # source: the config file (None: the command line)


class InputError(MidiError):
    """Bad user input: an argument, an input file, a model or adapter that does not fit."""


class DataError(InputError):
    """A problem with one input file or one scene; the data tools skip that scene and go on."""


class UsageError(MidiError):
    """Bad arguments, or settings that do not match the run being resumed."""


class ModelError(InputError, ValueError):
    """A pipeline folder (or Hub id) that cannot be loaded as a MIDI-3D pipeline."""


class AdapterError(InputError, ValueError):
    """A LoRA or custom-adapter file that does not fit the pipeline it is loaded into."""


class OutputError(MidiError):
    """The outputs could not be written (none of the set is left behind)."""

    exit_code = 1


class TrainingError(MidiError, RuntimeError):
    """Training cannot go on: non-finite losses, a failed export check, an unusable checkpoint."""

    exit_code = 1


class OutOfMemory(MidiError):
    """The device (or the host) ran out of memory; ``stage`` says where (``"denoising"``, ...)."""

    exit_code = 1

    def __init__(self, stage: str, message: str = "") -> None:
        super().__init__(message or f"out of memory during {stage}")
        self.stage = stage


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Runs a command line's ``main(argv)`` and returns its exit code.

    A :class:`MidiError` prints ``error: <line>`` for each line of it on stderr and returns its
    ``exit_code``; an OSError (a full disk, a folder without write permission) prints one line
    naming the file and returns 2; Ctrl-C returns 130 without a traceback.
    """
    try:
        return main(argv)
    except MidiError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
