"""quickstart_lora_training.sh and midi.quickstart: the planning logic in-process, the wizard end to end
in a pseudo-terminal (pexpect) on the tiny path.

The wizard runs with ``--no_venv`` and ``MIDI_PYTHON`` = this interpreter (nothing is installed) and
``--runs_dir`` in a temporary folder (nothing is written into the repository). One interactive run
does a real dry run (the budget fits the first candidate); the others use ``--no_measure`` or stop
before the plan. The full run that trains 2 steps is ``slow``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import yaml

from midi import quickstart as qs
from midi.quickstart import Candidate, Measurement

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "quickstart_lora_training.sh"

DRY_RUN_SAMPLE = """\
2026-01-01 00:00:00,000 INFO train_lora: mixed precision no, frozen weights torch.float32, 1 process(es), 60 optimizer steps
dry run on cpu (1 process(es)), mixed precision no
  model: tiny (64 latent tokens per instance)
  trainable parameters: 110,080 (transformer 110,080)
  adapter size: 0.42 MB in float32 (lora-final/ holds it twice: PEFT + custom_adapter)
  data: 6 training scenes -> 3 batches per epoch of up to 2 scenes; measured batch: 5 instance rows
  step time (data + forward + backward + optimizer, 1 micro-step(s)): 2.786 s
  peak memory: 0.50 GiB (peak resident memory of the process)
  estimate: 0.1 min per epoch (3 steps), 0.05 h for 60 steps
"""


# ----------------------------------------------------------------------------- dry-run parsing
def test_parse_dry_run_reads_the_trainer_report():
    assert qs.parse_dry_run(DRY_RUN_SAMPLE) == pytest.approx((0.50, 2.786))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("peak memory: 512 MiB\nstep time (x, 2 micro-step(s)): 250 ms", (0.5, 0.25)),
        ("Peak Memory : 2 GB (CUDA allocator peak)\nSTEP TIME: 1 s", (2e9 / 2**30, 1.0)),
        ("peak memory: 1.0 GiB\nstep time (a): 3.0 s\npeak memory: 7.5 GiB\nstep time (b): 4.0 s", (7.5, 4.0)),
    ],
)
def test_parse_dry_run_units_case_and_last_occurrence(text, expected):
    assert qs.parse_dry_run(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "peak memory: 1.2 GiB", "step time: 1 s", "peak memory: lots\nstep time: 1 s"])
def test_parse_dry_run_returns_none_when_a_value_is_missing(text):
    assert qs.parse_dry_run(text) is None


def test_classify_dry_run():
    assert qs.classify_dry_run(0, DRY_RUN_SAMPLE) == Measurement("ok", pytest.approx(0.5), pytest.approx(2.786))
    assert qs.classify_dry_run(1, "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory.").status == "oom"
    assert qs.classify_dry_run(-9, "").status == "oom"  # killed by the kernel's OOM killer
    failed = qs.classify_dry_run(2, "error: data.root: /x does not exist")
    assert failed.status == "failed" and "data.root" in failed.detail
    assert qs.classify_dry_run(0, "dry run finished, new format").status == "unparsed"


# ----------------------------------------------------------------------------- planning
def fake_measure(peaks: dict[Candidate, float | str]):
    """A measuring function from a table: a number = peak GiB, a string = that status."""
    calls: list[Candidate] = []

    def measure(c: Candidate) -> Measurement:
        calls.append(c)
        value = peaks[c]
        if isinstance(value, str):
            return Measurement(value, detail=f"{value} detail")
        return Measurement("ok", value, 1.0)

    return measure, calls


LADDER = qs.DEFAULT_LADDER


def test_default_ladder_goes_from_largest_to_smallest():
    assert LADDER[0] == Candidate(4, 16, False) and LADDER[-1] == Candidate(1, 8, True)
    assert [c.batch_size for c in LADDER] == sorted((c.batch_size for c in LADDER), reverse=True)


def test_plan_picks_the_largest_setting_that_fits_and_stops_measuring():
    peaks = {LADDER[0]: 30.0, LADDER[1]: 22.0, LADDER[2]: 12.0, LADDER[3]: 7.0, LADDER[4]: 6.0}
    measure, calls = fake_measure(peaks)
    plan = qs.plan_settings(LADDER, measure, budget_gib=24.0, progress=lambda _: None)
    # 22.0 > 0.9 x 24 = 21.6: the headroom rules out LADDER[1]
    assert plan.chosen == LADDER[2] and plan.fits
    assert calls == list(LADDER[:3])
    table = qs.format_plan(plan)
    assert re.search(r"batch 2, rank 16, checkpointing on .*12\.00 GiB.*yes  <- chosen", table)
    assert "30.00 GiB" in table and "21.6 GiB" in table


def test_plan_headroom_boundary():
    measure, _ = fake_measure({LADDER[0]: 9.0})
    assert qs.plan_settings(LADDER[:1], measure, 10.0, progress=lambda _: None).fits
    measure, _ = fake_measure({LADDER[0]: 9.01})
    assert not qs.plan_settings(LADDER[:1], measure, 10.0, progress=lambda _: None).fits


def test_plan_counts_out_of_memory_as_not_fitting():
    measure, calls = fake_measure({LADDER[0]: "oom", LADDER[1]: "oom", LADDER[2]: 3.0})
    plan = qs.plan_settings(LADDER, measure, 8.0, progress=lambda _: None)
    assert plan.chosen == LADDER[2] and len(calls) == 3
    assert "out of memory" in qs.format_plan(plan)


def test_plan_when_nothing_fits_offers_the_smallest():
    measure, calls = fake_measure(dict.fromkeys(LADDER, 50.0))
    plan = qs.plan_settings(LADDER, measure, 8.0, progress=lambda _: None)
    assert not plan.fits and plan.chosen == LADDER[-1] and calls == list(LADDER)
    assert "nothing fits" in qs.format_plan(plan)


def test_plan_unparsable_output_falls_back_and_a_real_failure_raises():
    measure, calls = fake_measure({LADDER[0]: "unparsed"})
    messages: list[str] = []
    plan = qs.plan_settings(LADDER, measure, 8.0, progress=messages.append)
    assert plan.chosen is None and plan.fits and calls == [LADDER[0]]
    assert any("could not read" in m for m in messages)
    measure, _ = fake_measure({LADDER[0]: "failed"})
    with pytest.raises(qs.QuickstartError, match="failed"):
        qs.plan_settings(LADDER, measure, 8.0, progress=lambda _: None)
    with pytest.raises(qs.QuickstartError, match="budget"):
        qs.plan_settings(LADDER, measure, 0.0, progress=lambda _: None)


@pytest.fixture
def tiny_run_config(tmp_path):
    """A run config (tiny model, an existing data folder) as the wizard writes it before planning."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"format": "midi-scenes", "version": 1, "scenes": []}')
    cfg = qs.build_run_config(REPO / "configs/train/tiny.yaml", qs.RunSettings(data_root=str(data)))
    return qs.write_run_config(cfg, tmp_path / "config.yaml")


@pytest.mark.parametrize(
    "peaks, rc, expected",
    [
        ({LADDER[0]: "oom", LADDER[1]: 5.0}, 0, (4, 16, True)),  # rewritten with the choice
        (dict.fromkeys(LADDER, 50.0), 3, (2, 16, True)),  # nothing fits: tiny.yaml's values stay
        ({LADDER[0]: "unparsed"}, 0, (2, 16, True)),  # unreadable report: tiny.yaml's values stay
    ],
)
def test_plan_command_rewrites_the_config_only_with_a_measured_fit(tiny_run_config, monkeypatch, capsys, peaks,
                                                                     rc, expected):  # fmt: skip
    from midi.config import load_config

    measure, _ = fake_measure(peaks)
    monkeypatch.setattr(qs, "subprocess_measure", lambda *a, **k: measure)
    assert qs.main(["plan", "--config", str(tiny_run_config), "--budget-gb", "8", "--write"]) == rc
    cfg = load_config(tiny_run_config)
    assert (cfg.train.batch_size, cfg.lora.rank, cfg.model.gradient_checkpointing) == expected
    values = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert values["fits"] == ("0" if rc == 3 else "1")
    if rc == 3:  # the smallest setting is offered
        assert (values["batch_size"], values["rank"], values["gradient_checkpointing"]) == ("1", "8", "1")


def test_dry_run_command_measures_the_candidate():
    cmd = qs.dry_run_command("runs/x/config.yaml", Candidate(2, 8, True), base_alpha_ratio=2.0)
    assert cmd[0] == sys.executable and cmd[1].endswith("train_lora.py") and "--dry_run" in cmd
    rest = [a for a in cmd[2:] if a != "--dry_run"]
    pairs = dict(zip(rest[::2], rest[1::2]))
    assert pairs["--config"] == "runs/x/config.yaml"
    assert pairs["--train.batch_size"] == "2" and pairs["--lora.rank"] == "8"
    assert float(pairs["--lora.alpha"]) == 16.0 and pairs["--model.gradient_checkpointing"] == "true"


# ----------------------------------------------------------------------------- files
def test_run_config_round_trips_and_keeps_the_alpha_ratio(tmp_path):
    from midi.config import load_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"format": "midi-scenes", "version": 1, "scenes": []}')
    settings = qs.RunSettings(model="tiny", data_root=str(data), output_dir=str(tmp_path / "run"), max_steps=3,
                              batch_size=1, rank=8, gradient_checkpointing=False)  # fmt: skip
    cfg = qs.build_run_config(REPO / "configs/train/tiny.yaml", settings)
    out = qs.write_run_config(cfg, tmp_path / "config.yaml")
    back = load_config(out, environment=True)
    assert (back.train.batch_size, back.lora.rank, back.model.gradient_checkpointing) == (1, 8, False)
    assert back.lora.alpha == 8.0  # tiny.yaml: alpha 16 / rank 16 = 1
    assert back.train.max_steps == 3 and back.data.root == str(data) and back.data.synthetic_if_missing == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "data"]  # no temporary files left


def test_invalid_run_config_writes_nothing(tmp_path):
    from midi.config import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size"):
        qs.build_run_config(REPO / "configs/train/tiny.yaml", qs.RunSettings(batch_size=0), check_paths=False)
    with pytest.raises(ConfigError, match="data.root"):
        qs.build_run_config(REPO / "configs/train/tiny.yaml", qs.RunSettings(data_root=str(tmp_path / "none")))
    assert main_rc(["write-config", "--base", str(REPO / "configs/train/tiny.yaml"), "--out",
                    str(tmp_path / "c.yaml"), "--rank", "0"]) == 2  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def main_rc(argv: list[str]) -> int:
    return qs.main(argv)


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "f.yaml"
    target.write_text("old")

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(qs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qs.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.yaml"]


@pytest.mark.parametrize("gpus, visible", [(0, 0), (0, 2), (1, 1), (4, 4), (3, 8)])
def test_accelerate_config_loads_with_accelerate(tmp_path, gpus, visible):
    from accelerate.commands.config.config_args import load_config_from_file

    path = qs.write_accelerate_config(tmp_path / "accelerate.yaml", gpus, visible)
    loaded = load_config_from_file(str(path))  # rejects unknown keys
    assert loaded.num_processes == max(1, gpus) and loaded.use_cpu == (gpus == 0)
    assert str(loaded.distributed_type).endswith("MULTI_GPU" if gpus >= 2 else "NO")
    raw = yaml.safe_load(path.read_text())
    if gpus >= 2:
        assert raw["gpu_ids"] == ("all" if gpus == visible else ",".join(map(str, range(gpus))))


def test_training_command():
    py = str(REPO / ".venv-x" / "bin" / "python")
    cpu = qs.training_command(str(REPO / "runs/a/config.yaml"), 0, py, "runs/a/accelerate.yaml", visible_gpus=0)
    assert cpu.shell() == ".venv-x/bin/python train_lora.py --config runs/a/config.yaml"
    hidden = qs.training_command("runs/a/config.yaml", 0, py, "runs/a/accelerate.yaml", visible_gpus=2)
    assert hidden.shell().startswith("CUDA_VISIBLE_DEVICES='' .venv-x/bin/python train_lora.py")
    one = qs.training_command("runs/a/config.yaml", 1, py, "runs/a/accelerate.yaml", visible_gpus=8)
    assert one.env == {} and one.argv[1:] == ["train_lora.py", "--config", "runs/a/config.yaml"]
    ddp = qs.training_command("runs/a/config.yaml", 4, sys.executable, str(REPO / "runs/a/accelerate.yaml"))
    text = ddp.shell()
    assert "--config_file runs/a/accelerate.yaml train_lora.py --config runs/a/config.yaml" in text
    assert re.search(r"accelerate launch|-m accelerate\.commands\.launch", text)


# ----------------------------------------------------------------------------- model, data, doctor
def test_check_model(tmp_path):
    assert qs.check_model("tiny") == qs.ModelChoice("tiny", qs.TINY_CONFIG, True)
    with pytest.raises(qs.QuickstartError, match="no such folder.*hf download VAST-AI/MIDI-3D"):
        qs.check_model(str(tmp_path / "missing"))
    with pytest.raises(qs.QuickstartError, match="no model_index.json"):
        qs.check_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    choice = qs.check_model(str(tmp_path))
    assert choice.base_config == qs.REAL_CONFIG and not choice.tiny and Path(choice.model) == tmp_path


def test_default_model_is_the_real_weights_only_when_they_are_there(tmp_path):
    assert qs.default_model(tmp_path) == "tiny"
    weights = tmp_path / qs.REAL_MODEL_DIR
    weights.mkdir(parents=True)
    assert qs.default_model(tmp_path) == "tiny"  # a folder without model_index.json is not a pipeline
    (weights / "model_index.json").write_text("{}")
    assert qs.default_model(tmp_path) == "pretrained_weights/MIDI-3D"
    assert qs.check_model(qs.default_model(tmp_path), root=tmp_path).model == "pretrained_weights/MIDI-3D"


def test_constants_match_the_project():
    from midi.config import TINY_MODEL
    from midi.data.meshes import MESH_SUFFIXES

    assert qs.TINY_MODEL == TINY_MODEL and set(qs.MESH_SUFFIXES) == set(MESH_SUFFIXES)
    assert (REPO / qs.TINY_CONFIG).is_file() and (REPO / qs.REAL_CONFIG).is_file()


def test_detect_data(tmp_path):
    assert qs.detect_data(tmp_path / "nope").kind == "missing"
    (tmp_path / "file").write_text("x")
    assert qs.detect_data(tmp_path / "file").kind == "not-a-folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert qs.detect_data(empty).kind == "empty"
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    manifest = {"format": "midi-scenes", "version": 1, "scenes": [{}, {}], "splits": {"val": ["a"]}}
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    got = qs.detect_data(prepared)
    assert got.kind == "prepared" and got.scenes == 2
    raw = tmp_path / "raw"
    (raw / "scene_a").mkdir(parents=True)
    (raw / "scene_a" / "chair.OBJ").write_text("v 0 0 0\n")
    (raw / "scene_b").mkdir()
    (raw / "scene_b" / "notes.txt").write_text("")
    got = qs.detect_data(raw)
    assert got.kind == "raw" and got.scenes == 1 and got.prepared_dir == tmp_path / "raw_prepared"
    partial = tmp_path / "partial"
    (partial / "scenes" / "s1").mkdir(parents=True)
    (partial / "scenes" / "s1" / "scene.json").write_text("{}")
    assert qs.detect_data(partial).kind == "partial"
    (empty / "readme.txt").write_text("")
    assert qs.detect_data(empty).kind == "unknown"


def test_run_names(tmp_path):
    assert qs.suggest_run_name(tmp_path, "tiny") == "tiny-lora"
    (tmp_path / "tiny-lora").mkdir()
    (tmp_path / "tiny-lora-2").mkdir()
    assert qs.suggest_run_name(tmp_path, "tiny") == "tiny-lora-3"
    assert qs.suggest_run_name(tmp_path, "pretrained_weights/MIDI-3D") == "midi-lora"
    assert qs.check_run_name("my_run.1", tmp_path) == "my_run.1"
    for bad in ("", "a b", "../x", "-x", "x" * 65):
        with pytest.raises(qs.QuickstartError, match="run name"):
            qs.check_run_name(bad, tmp_path)
    with pytest.raises(qs.QuickstartError, match="already exists"):
        qs.check_run_name("tiny-lora", tmp_path)


def test_dependency_check(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\npyyaml==0.0.1  # pinned\nno-such-package-xyz==1.0\npytest==9.9\nsomething>=2\n")
    assert qs.read_requirements(req) == [("pyyaml", "0.0.1"), ("no-such-package-xyz", "1.0"), ("pytest", "9.9")]
    status = {s.name: s for s in qs.check_dependencies(req)}
    assert status["pyyaml"].installed == yaml.__version__ and not status["pyyaml"].ok
    assert [s.name for s in qs.missing_required(list(status.values()))] == ["no-such-package-xyz"]
    assert qs._same_version("2.13.0+cu121", "2.13.0") and not qs._same_version("2.12.0", "2.13.0")


def test_doctor_reports_and_fails_on_missing_packages(tmp_path, capsys):
    hw = qs.Hardware(torch_version="2.13.0", gpus=[qs.GpuInfo(0, "Fake GPU", 79.2), qs.GpuInfo(1, "Fake GPU", 39.5)],
                     ram_total_gib=64.0, ram_available_gib=50.0)  # fmt: skip
    req = tmp_path / "requirements.txt"
    req.write_text(f"pyyaml=={yaml.__version__}\n")
    ok, values = qs.doctor(req, tmp_path, hw)
    assert ok and values["gpus"] == 2 and values["gpu_memory_gb"] == 39.5 and values["cpu_budget_gb"] == 40.0
    assert "GPU 1: Fake GPU, 39.5 GiB" in capsys.readouterr().err
    req.write_text("no-such-package-xyz==1.0\n")
    ok, values = qs.doctor(req, tmp_path, hw)
    assert not ok and not values["deps_ok"]
    assert "missing packages: no-such-package-xyz" in capsys.readouterr().err
    assert hw.default_budget_gib(0) == 40.0 and hw.default_budget_gib(2) == 39.5


# ----------------------------------------------------------------------------- the wizard
def wizard_env() -> dict[str, str]:
    env = dict(os.environ, MIDI_PYTHON=sys.executable, PYTHONUNBUFFERED="1", TERM="dumb")
    for key in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        env.pop(key, None)
    return env


def spawn(args: list[str], cwd: Path, timeout: float = 60) -> pexpect.spawn:
    child = pexpect.spawn("bash", [str(SCRIPT), *args], cwd=str(cwd), env=wizard_env(), encoding="utf-8",
                          timeout=timeout, dimensions=(50, 250))  # fmt: skip
    child.logfile_read = io.StringIO()
    return child


def finish(child: pexpect.spawn) -> tuple[int | None, str]:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.logfile_read.getvalue()


def printed_command(output: str) -> str:
    lines = output.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("Training command"))
    return lines[i + 1].strip()


def test_help_lists_every_flag():
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for flag in ("--model", "--data", "--gpus", "--memory_gb", "--name", "--no_venv", "--no_train", "--max_steps",
                 "--yes", "--help", "--runs_dir", "--no_measure", "MIDI_PYTHON"):  # fmt: skip
        assert flag in proc.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--gpus", "two"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--gpus" in bad.stderr


def test_interactive_tiny_path_measures_and_writes_the_run(tmp_path):
    """The tiny path answered by hand: one real dry run, no training; the written files work."""
    from accelerate.commands.config.config_args import load_config_from_file

    from midi.config import load_config

    runs = tmp_path / "runs"
    child = spawn(["--no_venv", "--runs_dir", str(runs), "--max_steps", "2"], cwd=tmp_path)
    child.expect(r"Base model folder, or 'tiny' \[tiny\]: ")
    child.sendline("tiny")
    child.expect(r"Run name .*\[tiny-lora\]: ")
    child.sendline("")
    child.expect(r"Data folder, or 'synthetic' \[synthetic\]: ")
    child.sendline("synthetic")
    child.expect(r"How many synthetic scenes\? \[8\]: ")
    child.sendline("4")
    child.expect(r"How many GPUs to train on \(0 = CPU\) \[0\]: ", timeout=120)
    child.sendline("")
    child.expect(r"Memory budget per process in GB \(RAM\) \[[0-9.]+\]: ")
    child.sendline("16")
    child.expect(r"Start training now\? \[Y/n\]: ", timeout=240)
    child.sendline("n")
    rc, out = finish(child)
    assert rc == 0, out

    run = runs / "tiny-lora"
    assert sorted(p.name for p in run.iterdir()) == ["accelerate.yaml", "config.yaml", "data", "data-check", "train.sh"]
    assert re.search(r"batch 4, rank 16, checkpointing off +[0-9.]+ GiB +[0-9.]+ s +yes  <- chosen", out), out
    cfg = load_config(run / "config.yaml", environment=True)
    assert (cfg.train.batch_size, cfg.lora.rank, cfg.model.gradient_checkpointing) == (4, 16, False)
    assert cfg.train.max_steps == 2 and cfg.model.pretrained_model_name_or_path == "tiny"
    assert Path(cfg.data.root) == run / "data" and Path(cfg.train.output_dir) == run
    assert len(json.loads((run / "data" / "manifest.json").read_text())["scenes"]) == 4
    acc = load_config_from_file(str(run / "accelerate.yaml"))
    assert acc.use_cpu and acc.num_processes == 1

    command = printed_command(out)
    argv = shlex.split(command)
    exe = str(REPO / argv[0]) if "/" in argv[0] else shutil.which(argv[0], path=wizard_env()["PATH"])
    assert os.path.samefile(exe, sys.executable)  # the interpreter the wizard was told to use
    assert argv[1:] == ["train_lora.py", "--config", str(run / "config.yaml")]
    assert f"exec {command} \"$@\"" in (run / "train.sh").read_text()
    # The printed command runs from the repository (checked cheaply: --print_config loads and validates).
    proc = subprocess.run(command + " --print_config", shell=True, cwd=REPO, env=wizard_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["batch_size"] == 4


def test_yes_runs_without_a_terminal(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(["bash", str(SCRIPT), "--yes", "--no_venv", "--no_measure", "--no_train", "--runs_dir",
                           str(runs), "--name", "quick", "--num_synthetic", "3", "--max_steps", "5"],
                          cwd=tmp_path, env=wizard_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from midi.config import load_config

    cfg = load_config(runs / "quick" / "config.yaml", environment=True)
    assert cfg.train.max_steps == 5 and cfg.train.batch_size == 2 and cfg.lora.rank == 16  # tiny.yaml's values
    assert "Skipping the dry runs" in proc.stdout and "Not starting training (--no_train)" in proc.stdout
    assert "Base model folder, or 'tiny' [tiny]: tiny" in proc.stdout  # every default is shown
    assert (runs / "quick" / "train.sh").stat().st_mode & 0o100


def test_raw_meshes_are_prepared_next_to_the_folder_and_checked(tmp_path):
    raw = tmp_path / "raw"
    for scene in ("s1", "s2"):
        (raw / scene).mkdir(parents=True)
        shutil.copy(REPO / "tests/data/meshes/box.obj", raw / scene / "box.obj")
    runs = tmp_path / "runs"
    proc = subprocess.run(["bash", str(SCRIPT), "--yes", "--no_venv", "--no_measure", "--no_train", "--runs_dir",
                           str(runs), "--data", "raw"], cwd=tmp_path, env=wizard_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prepared = tmp_path / "raw_prepared"
    assert "Prepare these meshes into" in proc.stdout and (prepared / "manifest.json").is_file()
    assert (runs / "tiny-lora" / "data-check" / "check_report.json").is_file()  # --check ran, report in the run
    from midi.config import load_config

    assert Path(load_config(runs / "tiny-lora" / "config.yaml").data.root) == prepared


def test_raw_meshes_that_all_fail_give_a_clear_message(tmp_path):
    raw = tmp_path / "raw"
    for scene in ("s1", "s2"):
        (raw / scene).mkdir(parents=True)
        shutil.copy(REPO / "tests/data/meshes/empty.stl", raw / scene / "empty.stl")
    proc = subprocess.run(["bash", str(SCRIPT), "--yes", "--no_venv", "--no_measure", "--no_train", "--runs_dir",
                           str(tmp_path / "runs"), "--data", "raw"], cwd=tmp_path, env=wizard_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "prepare_data.py wrote no scene from" in proc.stdout + proc.stderr


def test_yes_with_a_bad_model_errors_before_creating_anything(tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.run(["bash", str(SCRIPT), "--yes", "--no_venv", "--runs_dir", str(runs), "--model",
                           str(tmp_path / "no-model")], cwd=tmp_path, env=wizard_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr and "hf download VAST-AI/MIDI-3D" in proc.stderr
    assert not runs.exists()


def test_a_failure_after_the_run_folder_was_made_removes_it(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep").mkdir()  # someone else's run: never touched
    proc = subprocess.run(["bash", str(SCRIPT), "--yes", "--no_venv", "--runs_dir", "runs", "--name", "new",
                           "--data", "no/such/data"], cwd=tmp_path, env=wizard_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no such folder" in proc.stderr and "no usable training data" in proc.stderr
    assert re.search(r"cleaned up: removed \S*runs/new ", proc.stdout), proc.stdout
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["keep"]


def test_bad_model_answer_is_asked_again(tmp_path):
    not_a_pipeline = tmp_path / "weights"
    not_a_pipeline.mkdir()
    child = spawn(["--no_venv", "--runs_dir", str(tmp_path / "runs")], cwd=tmp_path)
    child.expect(r"Base model folder, or 'tiny' \[tiny\]: ")
    child.sendline("does/not/exist")
    child.expect("no such folder")
    child.expect(r"Base model folder, or 'tiny' \[tiny\]: ")
    child.sendline("weights")  # relative to where the script was started
    child.expect("no model_index.json")
    child.expect(r"Base model folder, or 'tiny' \[tiny\]: ")
    child.sendline("tiny")
    child.expect(r"Run name .*\[tiny-lora\]: ")
    child.sendline("bad name!")
    child.expect("a run name is")
    child.expect(r"Run name .*\[tiny-lora\]: ")
    child.sendintr()
    rc, out = finish(child)
    assert rc == 130, out
    assert "hf download VAST-AI/MIDI-3D" in out


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_interrupt_at_a_prompt_removes_the_run_folder(tmp_path, sig):
    runs = tmp_path / "runs"
    (runs / "earlier").mkdir(parents=True)  # an earlier run: never touched
    child = spawn(["--no_venv", "--runs_dir", str(runs), "--model", "tiny", "--name", "stopped"], cwd=tmp_path)
    child.expect(r"Data folder, or 'synthetic' \[synthetic\]: ")
    assert (runs / "stopped").is_dir()  # the run folder was started
    if sig == "INT":
        child.sendintr()
    else:
        child.kill(signal.SIGTERM)
    rc, out = finish(child)
    assert rc == (130 if sig == "INT" else 143), out
    assert re.search(r"cleaned up: removed \S*runs/stopped ", out), out
    assert [p.name for p in runs.iterdir()] == ["earlier"]


def test_interrupt_during_the_dry_run_leaves_nothing(tmp_path):
    runs = tmp_path / "runs"
    child = spawn(["--no_venv", "--runs_dir", str(runs), "--model", "tiny", "--name", "r", "--data", "synthetic",
                   "--num_synthetic", "2", "--gpus", "0", "--memory_gb", "16"], cwd=tmp_path, timeout=120)  # fmt: skip
    child.expect(r"measuring batch 4")
    assert (runs / "r" / "config.yaml").is_file()  # the draft config exists while measuring
    child.sendintr()
    rc, out = finish(child)
    assert rc == 130, out
    assert not runs.exists()  # the run folder, and runs/ which this invocation created
    assert not any(tmp_path.rglob("*.tmp-*"))


@pytest.mark.slow
def test_yes_trains_two_steps_with_the_printed_command(tmp_path):
    """The full non-interactive path: dry run, write, then the printed command trains 2 steps."""
    runs = tmp_path / "runs"
    proc = subprocess.run(["bash", str(SCRIPT), "--yes", "--no_venv", "--runs_dir", str(runs), "--name", "full",
                           "--num_synthetic", "4", "--memory_gb", "16", "--max_steps", "2"], cwd=tmp_path,
                          env=wizard_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    run = runs / "full"
    assert (run / "lora-final").is_dir() and (run / "checkpoint-2").is_dir()
    assert "Training finished" in proc.stdout and "<- chosen" in out


def test_the_wizard_reads_the_dry_run_json_report_and_still_parses_the_text(tmp_path):
    """The report ``train_lora.py --dry_run_json`` writes is what the wizard reads; the text stays parsable."""
    import torch

    from midi.config import load_config
    from midi.data.atomic import write_json
    from midi.trainer import dry_run_report, format_dry_run

    cfg = load_config(REPO / "configs" / "train" / "tiny.yaml")
    report = dry_run_report(cfg, torch.device("cpu"), 1, "no", {"transformer": 10}, [0.5, 0.2, 0.3], 1, 3 * 2**29,
                            3, 5, 64, 60, 6)  # fmt: skip
    write_json(tmp_path / "r.json", report)
    assert qs.read_dry_run_json(tmp_path / "r.json") == pytest.approx((1.5, 0.3))  # the median, not the last step
    assert qs.parse_dry_run(format_dry_run(cfg, report)) == pytest.approx((1.5, 0.3))
    assert qs.classify_dry_run(0, "no text report", (1.5, 0.3)) == Measurement("ok", 1.5, 0.3)
    assert qs.read_dry_run_json(tmp_path / "absent.json") is None
    assert "--dry_run_json" in qs.dry_run_command("c.yaml", Candidate(2, 8, True), 1.0, tmp_path / "r.json")
