"""TRAINING_README's "Many machines" and export commands, run for real on tiny box scenes (in the same
order as written: every array job, the merge of the expanded glob, the check, the export)."""

from __future__ import annotations

import glob
import importlib.util
import json
import re
import shlex
from pathlib import Path

from midi.data import layout
from tests.data.helpers import write_boxes

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--image_size", "32", "--num_samples", "64", "--workers", "1", "--no_progress"]


def section_commands() -> list[str]:
    text = (ROOT / "TRAINING_README.md").read_text()
    section = text.split("### Many machines", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("python prepare_data.py")]


def _cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", ROOT / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_many_machines_and_export_commands_run(tmp_path, monkeypatch, capsys):
    commands = section_commands()
    assert [c.split()[2] for c in commands] == ["--input_dir", "--merge", "--check", "--export_midi"]
    monkeypatch.chdir(tmp_path)
    for k, name in enumerate(("hall", "kitchen", "study")):
        write_boxes(tmp_path / "data" / "raw_scenes" / name, {"a": (0, 0, 0), "b": (2 + k, 0, 0)})
    cli = _cli()
    array_job = commands[0]
    shards = int(shlex.split(array_job)[shlex.split(array_job).index("--num_shards") + 1])
    for task in range(shards):  # what SLURM runs, one job per array index
        assert cli.main([*shlex.split(array_job.replace("$SLURM_ARRAY_TASK_ID", str(task)))[2:], *TINY]) == 0
    for command in commands[1:]:
        words = [w2 for w in shlex.split(command)[2:] for w2 in (sorted(glob.glob(w)) if "*" in w else [w])]
        assert cli.main([*words, *TINY]) == 0, capsys.readouterr()
    merged = json.loads((tmp_path / "data" / "midi-scenes" / layout.MANIFEST).read_text())
    assert sorted(s["id"] for s in merged["scenes"]) == ["hall", "kitchen", "study"]
    export = Path(shlex.split(commands[3])[shlex.split(commands[3]).index("--output_dir") + 1])
    assert len(json.loads((export / "midi_room_ids.json").read_text())) == 3
