"""README.md's commands: the two newcomer commands, CI's command, the install lines and the API snippet."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_two_commands_and_ci_runs_the_test_command():
    first = [line.split("#")[0].strip() for line in code_blocks("bash")[0].splitlines() if line.strip()]
    assert first == ["make demo", "make test"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == ["make test"]
    for target in ("demo", "test"):  # the targets exist and create the venv first
        plan = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True)
        assert plan.returncode == 0 and "pip install -q -r requirements.txt" in plan.stdout


def test_install_lines_are_real():
    install = code_blocks("bash")[1]
    assert "pip install -r requirements.txt" in install
    hf = Path(sys.executable).parent / "hf"
    assert "hf download VAST-AI/MIDI-3D --local-dir pretrained_weights/MIDI-3D" in install
    result = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--local-dir" in result.stdout
    assert "bash quickstart_lora_training.sh" in README


def test_demo_runs_end_to_end(tmp_path):
    """`make demo` runs demo.py on midi-mini: data -> train -> resume -> evaluate base and LoRA -> compare."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--output_dir", str(out), "--steps", "4", "--train_scenes", "4",
                           "--test_scenes", "3"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = out / "lora-run"
    assert (run / "lora-final" / "adapter_model.safetensors").is_file()
    assert (run / "lora-final" / "custom_adapter.safetensors").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert any((run / "logs").rglob("events.out.tfevents*"))
    assert "resumed from" in (out / "demo.log").read_text()
    comparison = json.loads((out / "eval" / "base-vs-lora" / "comparison.json").read_text())
    assert comparison["paired_scenes"] >= 2 and comparison["b"]["generation"]["lora"] is not None
    with Image.open(out / "comparison.png") as sheet:  # input | ground truth | base | LoRA, one row per scene
        assert sheet.width == 4 * 256 and sheet.height in [k * (256 + 16) for k in (2, 3)]
    assert "scene F-score (tau 0.1, icp): base" in proc.stdout and f"Everything is under {out}" in proc.stdout


def test_api_snippet_runs_on_the_upstream_tiny_folder():
    """The README's Python example, pointed at the recorded upstream tiny pipeline on the CPU."""
    snippet = code_blocks("python")[0]
    snippet = (snippet.replace('"pretrained_weights/MIDI-3D"', repr(str(REPO / "tests/fixtures/upstream/tiny_pipeline")))
               .replace("torch.bfloat16", "torch.float32").replace('"cuda"', '"cpu"')
               .replace('"blocks.8", "blocks.9", "blocks.10", "blocks.11", "blocks.12"', '"blocks.3", "blocks.4"')
               .replace("num_inference_steps=50", "num_inference_steps=2, output_type='latent'"))
    scene = Image.new("RGB", (40, 40), "white")
    namespace = {"instance_images": [scene, scene], "instance_masks": [Image.new("L", (40, 40), 255)] * 2, "scene": scene}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["out"].samples.shape == (2, 64, 8)


@pytest.mark.parametrize("script", ["train_lora.py", "inference_with_lora.py", "prepare_data.py"])
def test_scripts_answer_help(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "usage" in result.stdout.lower()


def test_demo_refuses_to_wipe_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "demo.py", "--output_dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "not made by the demo" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_midi_mini_commands_of_the_readme_run(tmp_path):
    """The README's midi-mini inference line runs as written (output redirected); its app lines parse."""
    lines = [line.strip() for block in code_blocks("bash") for line in block.splitlines()]
    infer = [line for line in lines if line.startswith("python inference_with_lora.py") and "models/midi-mini" in line]
    assert len(infer) == 1
    words = shlex.split(infer[0])
    words[words.index("--output") + 1] = str(tmp_path / "chairs.glb")
    proc = subprocess.run([sys.executable, *words[1:], "--num_inference_steps", "4", "--no_progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "chairs.glb").is_file()
    import app

    for line in (line for line in lines if line.startswith("python app.py")):
        args = app.parse_args(shlex.split(line.split("#")[0])[2:])
        assert args.model == "tiny" or (REPO / args.model).is_dir() or args.model.startswith("pretrained_weights")
