"""The quickstart wizard: midi.quickstart's functions with an injected ``input``, the memory plan from
fabricated dry-run reports, and one pexpect smoke test of quickstart_lora_training.sh on the tiny path.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pexpect
import pytest

from midi import memory_plan as mp
from midi import quickstart as qs
from midi.config_load import load_config
from midi.errors import InputError, ModelError, TrainingError
from midi.memory_plan import Candidate, Measurement

REPO = Path(__file__).resolve().parents[2]


def answers(*replies):
    """An ``input`` replacement: returns the replies in order, records the prompts; an exception is raised."""
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        reply = replies[len(prompts) - 1]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    read.prompts = prompts
    return read


# ----------------------------------------------------------------------------- questions
def test_ask_takes_the_default_and_asks_again_after_a_bad_answer(capsys):
    read = answers("", "x", "3")
    ask = qs.Asker(read=read)
    assert ask("Scenes?", "8", qs.whole_number(2)) == 8
    assert ask("Scenes?", "8", qs.whole_number(2)) == 3
    assert read.prompts == ["Scenes? [8]: "] * 3
    assert "give a whole number >= 2" in capsys.readouterr().out


def test_a_bad_flag_or_closed_input_is_fatal_and_yes_takes_defaults(capsys):
    with pytest.raises(InputError, match="whole number >= 0 and <= 1"):
        qs.Asker(read=answers())("GPUs", "0", qs.whole_number(0, 1), given="two")
    with pytest.raises(InputError, match="input closed"):
        qs.Asker(read=answers(EOFError()))("GPUs", "0")
    assert qs.Asker(yes=True, read=answers())("Budget", "12.5", qs.positive_gb) == 12.5
    assert "Budget [12.5]: 12.5" in capsys.readouterr().out  # the default is shown with --yes too
    yes_no = qs.Asker(read=answers("maybe", "N", "")).yes_no
    assert yes_no("Start?", True) is False and yes_no("Start?", True) is True
    with pytest.raises(InputError):
        qs.positive_gb("0")


# ----------------------------------------------------------------------------- model, name, data, command
def test_check_model(tmp_path):
    assert qs.check_model("TINY") == "tiny"
    with pytest.raises(ModelError, match="hf download VAST-AI/MIDI-3D"):
        qs.check_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no model_index.json"):
        qs.check_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    assert qs.check_model(str(tmp_path)) == str(tmp_path)
    assert qs.default_model(tmp_path) == "tiny"
    mini = qs.check_model("midi-mini")  # the shipped model, by name
    assert mini == str(REPO / "models" / "midi-mini") and qs.model_kind(mini) == "mini"
    assert qs.model_kind("tiny") == "tiny" and qs.model_kind(str(tmp_path)) == "midi"
    assert Path(qs.default_model(REPO)).resolve() == REPO / "models" / "midi-mini"  # no release weights here


def test_run_names(tmp_path):
    assert qs.suggest_name(tmp_path, "tiny") == "tiny-lora" and qs.suggest_name(tmp_path, "mini") == "mini-lora"
    (tmp_path / "midi-lora").mkdir()
    assert qs.suggest_name(tmp_path, "midi") == "midi-lora-2"
    assert qs.check_name("ok_1.2", tmp_path) == "ok_1.2"
    for bad, why in (("bad name", "a run name is"), ("-x", "a run name is"), ("midi-lora", "already exists")):
        with pytest.raises(InputError, match=why):
            qs.check_name(bad, tmp_path)


def test_data_kind(tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text("{}")
    (tmp_path / "raw" / "scene").mkdir(parents=True)
    (tmp_path / "raw" / "scene" / "chair.OBJ").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("")
    assert qs.data_kind(tmp_path / "prepared") == "midi-scenes"
    assert qs.data_kind(tmp_path / "raw") == "raw"
    with pytest.raises(InputError, match="no such folder"):
        qs.data_kind(tmp_path / "missing")
    with pytest.raises(InputError, match="no mesh files"):
        qs.data_kind(tmp_path / "other")


def test_training_command_uses_the_shipped_accelerate_configs():
    cfg = Path("runs/x/config.yaml")
    assert qs.training_command(cfg, 0, 0, "py") == "py train_lora.py --config runs/x/config.yaml"
    assert qs.training_command(cfg, 0, 2, "py").startswith("CUDA_VISIBLE_DEVICES= py train_lora.py")
    one = shlex.split(qs.training_command(cfg, 1, 8, "py"))
    assert one[:5] == ["py", "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/single_gpu.yaml"]
    four = shlex.split(qs.training_command(cfg, 4, 8, "py"))
    assert four[4:10] == ["configs/accelerate/multi_gpu.yaml", "--num_processes", "4", "--gpu_ids", "0,1,2,3",
                          "train_lora.py"]
    assert "--gpu_ids" not in qs.training_command(cfg, 8, 8, "py")
    assert all((REPO / path).is_file() for path in qs.ACCELERATE_CONFIGS.values())


def test_doctor_fails_on_a_missing_package_and_warns_on_a_version(tmp_path, capsys):
    req = tmp_path / "requirements.txt"
    req.write_text("# pins\npyyaml==0.0.1\npexpect==0.0.1  # optional\n")
    assert qs.doctor(req, tmp_path) is True
    out = capsys.readouterr().out
    assert "[warn] pyyaml" in out and "[warn] pexpect" in out and "RAM:" in out and "disk:" in out
    req.write_text("no-such-package-xyz==1.0\n")
    assert qs.doctor(req, tmp_path) is False
    assert "[FAIL] no-such-package-xyz is not installed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- memory plan
def write_report(path: Path, **fields) -> Path:
    path.write_text(json.dumps(fields))
    return path


def test_read_report_uses_the_json_only(tmp_path):
    ok = write_report(tmp_path / "a.json", peak_memory_gib=1.5, step_seconds=[0.5, 0.2, 0.3])
    assert mp.read_report(0, ok, "peak memory: 99 GiB") == Measurement("ok", 1.5, 0.3)  # median; the text is ignored
    median = write_report(tmp_path / "b.json", peak_memory_gib=2, step_seconds_median=0.25, step_seconds=[9.0])
    assert mp.read_report(0, median) == Measurement("ok", 2.0, 0.25)
    oom = write_report(tmp_path / "c.json", status="oom")
    assert mp.read_report(1, oom).status == "oom"
    assert mp.read_report(137, tmp_path / "absent.json").status == "oom"  # killed by the kernel
    failed = mp.read_report(1, tmp_path / "absent.json", "\n".join(f"line {i}" for i in range(40)))
    assert failed.status == "failed" and failed.detail.splitlines() == [f"line {i}" for i in range(25, 40)]
    assert mp.read_report(0, tmp_path / "absent.json").status == "unread"
    assert mp.read_report(0, write_report(tmp_path / "d.json", peak_memory_gib=1)).status == "unread"


def fake_measure(peaks):
    """A measuring function returning the given peaks (or statuses) in ladder order; records the calls."""
    calls = []

    def measure(c):
        value = peaks[len(calls)]
        calls.append(c)
        return Measurement("ok", value, 0.1) if isinstance(value, float) else Measurement(value, detail="boom")

    measure.calls = calls
    return measure


def test_plan_picks_the_largest_fitting_setting_and_stops_measuring():
    measure = fake_measure([30.0, 8.9, 5.0])
    plan = mp.plan_settings(mp.DEFAULT_LADDER, measure, 10.0, progress=lambda _: None)
    assert plan.fits and plan.chosen == mp.DEFAULT_LADDER[1] and len(measure.calls) == 2
    table = mp.format_plan(plan)
    assert re.search(r"checkpointing on +8.90 GiB +0.100 s +yes  <- chosen", table) and table.count("<- chosen") == 1 and "fits in 9.0 GiB" in table
    at_limit = mp.plan_settings(mp.DEFAULT_LADDER, fake_measure([9.0]), 10.0, progress=lambda _: None)
    assert at_limit.chosen == mp.DEFAULT_LADDER[0]  # exactly (1 - headroom) x budget fits


def test_plan_out_of_memory_nothing_fits_unread_and_failures():
    quiet = {"progress": lambda _: None}
    oom = mp.plan_settings(mp.DEFAULT_LADDER, fake_measure(["oom", 4.0]), 10.0, **quiet)
    assert oom.chosen == mp.DEFAULT_LADDER[1] and "out of memory" in mp.format_plan(oom)
    none = mp.plan_settings(mp.DEFAULT_LADDER, fake_measure([20.0] * 5), 10.0, **quiet)
    assert not none.fits and none.chosen == mp.DEFAULT_LADDER[-1] and "nothing fits" in mp.format_plan(none)
    unread = mp.plan_settings(mp.DEFAULT_LADDER, fake_measure(["unread"]), 10.0, **quiet)
    assert unread.chosen is None and unread.fits
    with pytest.raises(TrainingError, match="boom"):
        mp.plan_settings(mp.DEFAULT_LADDER, fake_measure([20.0, "failed"]), 10.0, **quiet)


def test_dry_run_command_measures_the_candidate(tmp_path):
    cmd = mp.dry_run_command("c.yaml", Candidate(2, 8, True), 2.0, tmp_path)
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert cmd[1].endswith("train_lora.py") and "--dry_run" in cmd
    assert flags["--dry_run_json"] == str(tmp_path / "dry_run.json") and flags["--train.output_dir"] == str(tmp_path)
    assert (flags["--train.batch_size"], flags["--lora.rank"], flags["--lora.alpha"]) == ("2", "8", "16.0")
    assert flags["--model.gradient_checkpointing"] == "true"


# ----------------------------------------------------------------------------- the wizard in-process
def test_interactive_run_plans_and_writes_the_config(tmp_path, monkeypatch, capsys):
    measure = fake_measure([20.0, 13.0])
    monkeypatch.setattr(mp, "subprocess_measure", lambda config, env, ratio: measure)
    monkeypatch.setattr(qs.torch.cuda, "device_count", lambda: 0)
    read = answers("", "", "synthetic", "2", "", "16", "n")
    rc = qs.main(["--runs_dir", str(tmp_path / "runs"), "--max_steps", "3"], read=read)
    out = capsys.readouterr().out
    assert rc == 0, out
    run = tmp_path / "runs" / "mini-lora"  # Enter: midi-mini, the default without release weights
    cfg = load_config(run / "config.yaml", environment=True)
    assert Path(cfg.model.pretrained_model_name_or_path) == REPO / "models" / "midi-mini"
    assert (cfg.train.batch_size, cfg.lora.rank, cfg.model.gradient_checkpointing) == (4, 16, True)
    scene = json.loads(next((run / "data" / "scenes").iterdir()).joinpath("scene.json").read_text())
    assert "target" in json.dumps(scene)  # furniture, the domain midi-mini never saw
    assert cfg.lora.alpha == 16 and cfg.train.max_steps == 3 and Path(cfg.train.output_dir) == run
    assert Path(cfg.data.root) == run / "data" and (run / "data-check" / "check_report.json").is_file()
    assert "measured peak 13.00 GiB for a 16 GB budget" in (run / "config.yaml").read_text()
    assert f"{sys.executable} train_lora.py --config {run / 'config.yaml'}" in out
    assert read.prompts[-1] == "Start training now? [Y/n]: " and "Not started" in out


def test_bad_answers_are_asked_again_and_ctrl_c_removes_the_run_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "earlier").mkdir(parents=True)
    read = answers(str(tmp_path / "nope"), "tiny", "bad name!", "new", KeyboardInterrupt())
    assert qs.main(["--runs_dir", str(runs)], read=read) == 130
    out = capsys.readouterr().out
    assert "model folder not found" in out and "a run name is" in out
    assert read.prompts[-1] == "Data folder, or 'synthetic' [synthetic]: "
    assert f"cleaned up: removed {runs / 'new'}" in out and [p.name for p in runs.iterdir()] == ["earlier"]


def test_yes_with_bad_data_fails_and_removes_what_it_created(tmp_path, capsys):
    runs = tmp_path / "a" / "runs"
    rc = qs.main(["--yes", "--runs_dir", str(runs), "--data", str(tmp_path / "no-data")], read=answers())
    assert rc == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # the runs folder's missing parents, too


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        qs.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--gpus", "--memory_gb", "--name", "--no_train", "--yes", "--no_measure",
                 "--max_steps", "--runs_dir", "--num_synthetic", "--no_venv", "MIDI_PYTHON"):
        assert flag in out


# ----------------------------------------------------------------------------- the launcher
def test_launcher_smoke_tiny_path_with_a_real_dry_run(tmp_path):
    """bash launcher -> python -m midi.quickstart -> one real dry run whose JSON report is read."""
    env = {**os.environ, "MIDI_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    child = pexpect.spawn("bash", [str(REPO / "quickstart_lora_training.sh"), "--yes", "--no_train", "--model", "tiny",
                                   "--runs_dir",
                                   str(tmp_path / "runs"), "--num_synthetic", "2", "--gpus", "0",
                                   "--memory_gb", "16"], cwd=tmp_path, env=env, encoding="utf-8", timeout=120)
    child.expect(r"batch 4, rank 16, checkpointing off +[0-9.]+ GiB +[0-9.]+ s +yes  <- chosen")
    child.expect("Not starting training")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    cfg = load_config(tmp_path / "runs" / "tiny-lora" / "config.yaml", environment=True)
    assert (cfg.train.batch_size, cfg.model.gradient_checkpointing) == (4, False)
