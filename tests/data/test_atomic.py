"""midi.data.atomic: files, folders and output sets are complete or absent."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import pytest

from midi.data import atomic


def test_files_are_written_whole(tmp_path):
    assert atomic.write_json(tmp_path / "a.json", {"x": 1}) == tmp_path / "a.json"
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    script = atomic.write_text(tmp_path / "train.sh", "#!/bin/sh\n", mode=0o755)
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    with pytest.raises(RuntimeError), atomic.atomic_write(tmp_path / "a.json", "w") as f:
        f.write("half")
        raise RuntimeError
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1} and sorted(os.listdir(tmp_path)) == [
        "a.json", "b.bin", "train.sh"]


def test_commit_dir_replaces_an_older_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    tmp = atomic.make_tmp_dir(tmp_path, "out")
    (tmp / "new.txt").write_text("new")
    assert atomic.commit_dir(tmp, tmp_path / "out") == tmp_path / "out"
    assert os.listdir(tmp_path / "out") == ["new.txt"] and os.listdir(tmp_path) == ["out"]
    (tmp_path / "scene.tmp-123").mkdir()
    (tmp_path / ".out.old-77").mkdir()
    (tmp_path / "keep").mkdir()
    assert atomic.remove_stale_tmp(tmp_path) == 2 and sorted(os.listdir(tmp_path)) == ["keep", "out"]


def test_write_all_leaves_no_partial_set(tmp_path, monkeypatch):
    files = [(tmp_path / "a.glb", b"a"), (tmp_path / "b.glb", b"b"), (tmp_path / "c.png", b"c")]
    replace, calls = os.replace, []

    def fails_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fails_third)
    with pytest.raises(OSError) as info:
        atomic.write_all(files)
    assert info.value.filename == str(tmp_path / "c.png") and os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "replace", replace)
    assert atomic.write_all(files) == [p for p, _ in files]


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path, caplog):
    """A kill between the renames leaves .<name>.tmp-<pid> files; the next write removes those of dead pids."""

    from midi.data.atomic import write_all

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "room_instance_1.glb").write_bytes(b"new")  # renamed before the kill
    (stale := tmp_path / f".room.glb.tmp-{dead_pid}").write_bytes(b"half")
    (alive := tmp_path / f".other.glb.tmp-{os.getppid()}").write_bytes(b"someone else, still running")
    (unrelated := tmp_path / ".notes.tmp-x").write_bytes(b"not ours")
    with caplog.at_level(logging.WARNING, logger="midi"):
        write_all([(tmp_path / "next.glb", b"scene")])
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert (tmp_path / "next.glb").read_bytes() == b"scene"
    assert any(stale.name in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records)
