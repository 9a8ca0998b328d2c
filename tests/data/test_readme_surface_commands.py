"""TRAINING_README's watertight, VAE-check and Blender commands, run for real on tiny box scenes
(the model path replaced by the tiny model, the Blender interpreter by the one found here)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from midi.config import TINY_MODEL
from midi.data.blender import find_python
from tests.data.helpers import write_boxes

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--image_size", "32", "--num_samples", "2048", "--workers", "1", "--no_progress"]
SECTIONS = ("### Watertight surfaces", "### Checking the data with the model's VAE", "### Textured renders (Blender)")


def section_command(title: str) -> list[str]:
    text = (ROOT / "TRAINING_README.md").read_text()
    section = text.split(title, 1)[1].split("\n#", 1)[0]
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
             for line in block.splitlines() if line.startswith("python prepare_data.py")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[2:]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_surface_commands_run(tmp_path):
    for k, name in enumerate(("hall", "kitchen")):
        write_boxes(tmp_path / "data" / "raw_scenes" / name, {"a": (0, 0, 0), "b": (2 + k, 0, 0)})
    watertight, vae, blender = (section_command(t) for t in SECTIONS)

    done = _run([*watertight, *TINY, "--watertight_resolution", "24"], tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / _value(watertight, "--output_dir") / "scenes" / "hall" / "scene.json").read_text())
    assert all(o["watertight"]["resolution"] == 24 for o in record["objects"])

    vae[vae.index("--vae") + 1] = TINY_MODEL
    vae[vae.index("--check") + 1] = _value(watertight, "--output_dir")
    done = _run([*vae, "--vae_threshold", "0.0"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "vae round trip" in done.stdout
    report = json.loads((tmp_path / _value(vae, "--check") / "check_report.json").read_text())
    assert report["vae"]["threshold"] == 0.0 and report["vae"]["objects"] == len(report["vae"]["objects_scored"]) == 4

    python = find_python()
    blender[blender.index("--blender_python") + 1] = python or str(tmp_path / "no-bpy")
    done = _run([*blender, *TINY, "--blender_samples", "2", "--no-relight"], tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / _value(blender, "--output_dir") / "scenes" / "hall" / "scene.json").read_text())
    if python is None:  # no bpy here: the note, and embree's views
        assert "rendering with embree" in done.stderr and "renderer" not in record["views"][0]
    else:
        assert record["views"][0]["renderer"] == "blender"
