"""Training under faults (issue 9): full disk, kills, tampered or truncated checkpoints, non-finite
steps, failed starts, preview determinism and the dry-run report. Tiny model, CPU, in-process."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil

import pytest
import torch

import train_lora
from midi.training.checkpoints import list_checkpoints
from training.conftest import nan_steps, tiny_args, tiny_config


def _main(argv: list[str]) -> int:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # a clean accelerate singleton, as a new process would have
    GradientState._reset_state()
    return train_lora.main(argv)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A finished 2-step run with checkpoint-2, copied by the tests that tamper with it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert _main(tiny_args(data_root, out, max_steps=2)) == 0
    return out


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ----------------------------------------------------------------------------- item 1: previews in eval mode
def test_previews_generate_in_eval_mode_and_restore_training(data_root, tmp_path):
    import numpy as np

    from midi.training.batches import SampleSettings, open_split
    from midi.training.build import build_pipeline
    from midi.training.objective import FlowMatchingModel
    from midi.training.validation import preview_scene

    cfg = tiny_config(data_root, tmp_path / "out", "--lora.dropout", "0.1", "--validation.num_inference_steps", "2",
                      "--validation.octree_depth", "3")
    pipe = build_pipeline(cfg, torch.float32, "cpu")
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_()  # B = 0 at init would hide the dropout
    FlowMatchingModel(pipe).train()  # as during training: the LoRA'd transformer in train mode
    record = open_split(cfg.data.root, "val")[0]
    settings = SampleSettings.from_config(cfg.data, train=False)
    (image_a, meshes_a), (image_b, meshes_b) = (preview_scene(pipe, record, settings, cfg, seed=3) for _ in range(2))
    assert any(m is not None for m in meshes_a)
    for a, b in zip(meshes_a, meshes_b, strict=True):  # dropout off: equal seeds give equal generations
        assert (a is None) == (b is None) and (a is None or np.array_equal(a.vertices, b.vertices))
    assert np.array_equal(image_a, image_b)
    assert pipe.transformer.training and not pipe.image_encoder_1.training  # modes restored as they were


# ----------------------------------------------------------------------------- items 11, 16: unusable checkpoints
class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["MIDI_TEST_MARKER"],))


def test_a_refused_rng_state_refuses_the_resume(trained, tmp_path, data_root, capsys, monkeypatch):
    out = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MIDI_TEST_MARKER", str(marker))
    rng = out / "checkpoint-2" / "random_states_0.pkl"
    rng.write_bytes(pickle.dumps(_Payload()))
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest", max_steps=3)) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and str(rng) in lines[0] and "refused" in lines[0]
    assert not marker.exists() and not (out / "checkpoint-3").exists()


def test_a_truncated_optimizer_state_is_one_error_line(trained, tmp_path, data_root, capsys):
    out = _copy(trained, tmp_path)
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest", max_steps=3)) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and str(optimizer) in lines[0]


# ----------------------------------------------------------------------------- item 14: leftovers of a kill
def test_stale_temporary_folders_are_removed_and_half_deleted_checkpoints_do_not_count(trained, tmp_path, data_root):
    from midi.training.checkpoints import rotate_checkpoints

    out = _copy(trained, tmp_path)
    leftovers = [out / ".best.tmp.tmp-123", out / ".best.old-456", out / "checkpoint-4.tmp", out / "best.tmp"]
    for path in leftovers:
        (path / "lora").mkdir(parents=True)
    (out / "config.yaml.tmp-789").write_text("partial")
    half = out / "checkpoint-1"
    shutil.copytree(out / "checkpoint-2", half)
    shutil.rmtree(half / "lora")  # a rotation killed half way: the completion marker must not survive it
    (half / "trainer_state.json").unlink()
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest", max_steps=3)) == 0
    assert not any(p.exists() for p in leftovers) and not (out / "config.yaml.tmp-789").exists()
    assert not half.exists()
    # Rotation removes the completion marker first: a folder it could not finish deleting never counts.
    real_rmtree = shutil.rmtree
    seen = []

    def interrupted(path, *args, **kwargs):
        seen.append((path / "trainer_state.json").exists())
        raise KeyboardInterrupt

    shutil.rmtree = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            rotate_checkpoints(out, 1)
    finally:
        shutil.rmtree = real_rmtree
    assert seen == [False] and [s for s, _ in list_checkpoints(out)] == [3]


# ----------------------------------------------------------------------------- item 15: non-finite steps


def test_resuming_an_emergency_checkpoint_resets_the_count_and_names_the_scenes(data_root, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("midi.training.objective.training_step", nan_steps({1, 2}))
    assert _main(tiny_args(data_root, out, "--train.max_consecutive_nonfinite", "2")) == 1  # a failed run, not bad input
    (line,) = _error_lines(capsys)
    assert "2 non-finite steps in a row" in line and "non-finite loss in scenes: synthetic_" in line
    monkeypatch.setattr("midi.training.objective.training_step", nan_steps({1}))  # one more bad step after the resume
    assert _main(tiny_args(data_root, out, "--train.max_consecutive_nonfinite", "2", "--resume_from_checkpoint",
                           str(out / "emergency-2"), max_steps=4)) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 3 and state["consecutive_nonfinite"] == 0


# ----------------------------------------------------------------------------- item 17: a failed start writes nothing
def test_a_run_that_fails_before_its_first_step_leaves_no_config_or_logs(data_root, tmp_path, capsys, monkeypatch):
    from midi.errors import DataError

    def broken(*args, **kwargs):
        raise DataError("scene_0000: unreadable")

    monkeypatch.setattr("midi.training.objective.training_step", broken)
    out = tmp_path / "run"
    args = tiny_args(data_root, out, max_steps=2)
    args[args.index("--logging.report_to") + 1] = "tensorboard"
    assert _main(args) == 2
    assert _error_lines(capsys) == ["error: scene_0000: unreadable"]
    assert not (out / "config.yaml").exists() and not (out / "logs").exists()


# ----------------------------------------------------------------------------- item 13: full disk
def _fail_fsync_of(name: str):
    """os.fsync that fails with ENOSPC (as a full disk does, without a file name) for files named ``name*``."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    return fsync


@pytest.mark.parametrize("where", ["torch.save", "safetensors", "json"])
def test_a_full_disk_is_one_error_line_and_keeps_the_previous_checkpoints(data_root, tmp_path, capsys, monkeypatch,
                                                                          where):
    out = tmp_path / "run"
    if where == "torch.save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if "checkpoint-4" in str(f):
                # What torch 2.x raised on a real 1 MB tmpfs (the disk-full message has no errno).
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 116160 vs 116052")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        real_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    else:
        real_replace = os.replace
        name = "adapter_model.safetensors" if where == "safetensors" else "trainer_state.json"

        def replace(src, dst):  # arm the failure once checkpoint-2 is in place
            real_replace(src, dst)
            if str(dst).endswith("checkpoint-2"):
                monkeypatch.setattr(os, "fsync", _fail_fsync_of(name))

        monkeypatch.setattr(os, "replace", replace)
    assert _main(tiny_args(data_root, out, "--validation.every_n_steps", "0")) == 1  # outputs not written
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(out) in lines[0]
    left = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert left == [] and [s for s, _ in list_checkpoints(out)] == [2]
    assert (out / "checkpoint-2" / "lora" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- item 19: the dry run
def test_dry_run_times_several_steps_and_writes_a_json_report(data_root, tmp_path, capsys):
    out, report = tmp_path / "run", tmp_path / "dry.json"
    assert _main(tiny_args(data_root, out, "--dry_run", "--dry_run_json", str(report))) == 0
    text = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["timed_steps"] >= 3 and data["warmup_steps"] >= 1 and len(data["step_seconds"]) == data["timed_steps"]
    times = sorted(data["step_seconds"])
    assert data["step_seconds_min"] == times[0] and times[0] <= data["step_seconds_median"] <= times[-1]
    assert data["peak_memory_gib"] > 0 and data["trainable_parameters"] == 110080
    assert f"median {data['step_seconds_median']:.3f} s" in text and not out.exists()
