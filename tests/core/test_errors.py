"""midi.errors: one base class, one line per problem, and run_cli's exit codes."""

from __future__ import annotations

import errno

import pytest

from midi import errors
from midi.errors import (
    AdapterError,
    ConfigError,
    DataError,
    InputError,
    MidiError,
    ModelError,
    OutOfMemory,
    OutputError,
    TrainingError,
    UsageError,
    one_line,
    run_cli,
)


def test_message_names_the_path_and_fits_on_one_line():
    assert str(InputError("no  such\nfile", path="a/b.png")) == "a/b.png: no such file"
    assert str(MidiError("plain")) == "plain"
    assert str(ConfigError(["x.y: bad", "x.z: worse"], "run.yaml")) == "run.yaml: x.y: bad\nrun.yaml: x.z: worse"
    error = ConfigError(problems=["train.batch_size: must be >= 1, got 0"])
    assert error.problems == ["train.batch_size: must be >= 1, got 0"] and error.path is None
    assert str(OutOfMemory("denoising")) == "out of memory during denoising"
    assert OutOfMemory("denoising", "try fewer chunks").stage == "denoising"


def test_hierarchy_keeps_the_old_contracts():
    assert all(issubclass(c, MidiError) for c in (ConfigError, InputError, DataError, UsageError, ModelError,
                                                  AdapterError, OutputError, TrainingError, OutOfMemory))
    assert issubclass(DataError, InputError) and issubclass(ModelError, InputError) and issubclass(AdapterError, InputError)
    # except-ValueError / except-RuntimeError sites of the old classes still catch them
    assert issubclass(ConfigError, ValueError) and issubclass(ModelError, ValueError)
    assert issubclass(AdapterError, ValueError) and issubclass(TrainingError, RuntimeError)
    assert {c.exit_code for c in (ConfigError, InputError, UsageError)} == {2}
    assert {c.exit_code for c in (OutputError, TrainingError, OutOfMemory)} == {1}


def test_one_line():
    assert one_line("a\n\nb  c") == "a b c"
    assert len(one_line("x" * 1000)) == 400 and one_line("x" * 1000).endswith("...")


@pytest.mark.parametrize("raised, code, lines", [
    (ConfigError(["a.b: bad", "a.c: bad"], "c.yaml"), 2, ["error: c.yaml: a.b: bad", "error: c.yaml: a.c: bad"]),
    (TrainingError("stopped"), 1, ["error: stopped"]),
    (OSError(errno.ENOSPC, "No space left on device", "/out/x.glb"), 2, ["error: /out/x.glb: No space left on device"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
])
def test_run_cli_maps_errors_to_lines_and_exit_codes(capsys, raised, code, lines):
    def main(argv):
        assert argv == ["--x"]
        raise raised

    assert run_cli(main, ["--x"]) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == lines


def test_run_cli_returns_main_status_and_keeps_bugs_loud():
    assert run_cli(lambda argv: 3) == 3
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda argv: 1 // 0)


def test_errors_is_stdlib_only():
    source = open(errors.__file__, encoding="utf-8").read()
    assert "import torch" not in source and "from midi" not in source
