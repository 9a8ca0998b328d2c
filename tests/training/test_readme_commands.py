"""Every command in TRAINING_README.md is exercised: training commands are parsed and validated
through ``train_lora.main`` (with the tiny config standing in for the real model), launch configs
exist and load, helper scripts answer ``--help``. Runs themselves are covered by the other tests
(tiny training, resume, dry run, torchrun with two processes)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "TRAINING_README.md"
LAUNCHERS = ("python", "accelerate", "torchrun", "pip", "tensorboard", "hf", "bash")


def readme_commands() -> list[str]:
    """Command lines inside the README's fenced code blocks (and inline `...` commands)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S):
        commands += [line.strip() for line in block.splitlines() if line.strip().split(" ")[0] in LAUNCHERS]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [c for c in re.findall(r"`([^`\n]+)`", prose) if c.split(" ")[0] in LAUNCHERS and len(c.split()) >= 3]
    return commands


def _train_args(command: str) -> list[str]:
    """The train_lora.py arguments of a command, pointed at the tiny model (midi-mini's recipe keeps its
    own config, with the tiny model and a synthetic set standing in for the folders built first)."""
    words = shlex.split(command)
    args = words[words.index("train_lora.py") + 1:]
    if "configs/train/mini_pretrain.yaml" in args:
        args += ["--model.pretrained_model_name_or_path", "tiny", "--data.synthetic_if_missing", "8"]
    if "configs/train/mini_lora.yaml" in args:  # the shipped midi-mini itself; data/mini-target may not exist yet
        args += ["--data.synthetic_if_missing", "8"]
    return ["configs/train/tiny.yaml" if a == "configs/train/lora_finetune.yaml" else a for a in args]


def test_the_readme_has_commands():
    commands = readme_commands()
    assert any("--dry_run" in c for c in commands) and any("--resume_from_checkpoint latest" in c for c in commands)
    assert any(c.startswith("accelerate launch") for c in commands) and any(c.startswith("torchrun") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    words = shlex.split(command)
    if "train_lora.py" in words:
        import train_lora

        if words[0] == "accelerate":
            from accelerate.commands.config.config_args import ClusterConfig

            ClusterConfig.from_yaml_file(words[words.index("--config_file") + 1])
        if words[0] == "torchrun":
            assert shutil.which("torchrun") or (Path(sys.executable).parent / "torchrun").is_file()
        assert train_lora.main([*_train_args(command), "--print_config"]) == 0, capsys.readouterr().err
    elif words[:2] == ["pip", "install"]:
        requirements = (REPO / words[words.index("-r") + 1]).read_text()
        for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "tensorboard", "pyyaml", "tqdm"):
            assert f"{package}==" in requirements
    elif words[:2] == ["hf", "download"]:
        hf = Path(sys.executable).parent / "hf"
        result = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "--local-dir" in result.stdout
    elif words[0] == "tensorboard":
        assert (Path(sys.executable).parent / "tensorboard").is_file()
        assert words[1] == "--logdir" and words[2].endswith("/logs")
    elif words[:2] == ["python", "inference_with_lora.py"] and "--help" not in words:
        import inference_with_lora

        args = inference_with_lora.parse_args(words[2:])  # argparse exits on an unknown flag
        assert args.lora_path is not None or args.rgb_image is not None
    elif words[0] == "bash" and words[1].endswith(".sh"):
        result = subprocess.run(["bash", words[1], "--help"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0 and "--yes" in result.stdout + result.stderr
    elif words[:3] == ["python", "-m", "midi.quickstart"]:  # the wizard the bash launcher runs
        result = subprocess.run([sys.executable, "-m", "midi.quickstart", "--help"], cwd=REPO, capture_output=True,
                                text=True)
        assert result.returncode == 0 and "--yes" in result.stdout, result.stderr[-1000:]
    elif words[:3] == ["python", "-m", "midi.mini.build"]:
        from midi.mini.build import main

        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0 and "--vae" in capsys.readouterr().out
        assert words[3] and words[words.index("--vae") + 1]  # OUT and --vae VAE given
    elif words[0] == "python" and words[1].endswith(".py"):
        result = subprocess.run([sys.executable, words[1], "--help"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-1000:]
    else:
        pytest.fail(f"README command not covered by a test: {command}")
