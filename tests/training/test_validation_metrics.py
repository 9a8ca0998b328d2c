"""Training-time scene metrics (``validation.metrics_every_n_steps``): evaluate.py's numbers on a few
generated val scenes, logged to TensorBoard; off means nothing is generated or logged."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import trimesh
from accelerate.state import AcceleratorState, GradientState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import train_lora
from midi.config_load import load_config
from midi.training import validation
from midi.training.batches import SampleSettings, open_split
from midi.training.build import build_pipeline
from training.conftest import NUM_POINTS, tiny_args, tiny_config

FAST = ("--validation.num_inference_steps", "2", "--validation.octree_depth", "4")



@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    cfg = tiny_config(data_root, tmp_path_factory.mktemp("metrics") / "out", *FAST,
                      "--validation.metrics_num_scenes", "2", "--validation.metrics_num_points", str(NUM_POINTS))
    pipe = build_pipeline(cfg, torch.float32, "cpu")
    return cfg, pipe, open_split(cfg.data.root, "val"), SampleSettings.from_config(cfg.data, train=False)


def _main(argv: list[str]) -> int:
    AcceleratorState._reset_state(True)  # a clean accelerate singleton, as a new process would have
    GradientState._reset_state()
    return train_lora.main(argv)


def _spy(monkeypatch) -> list[dict[str, float]]:
    calls: list[dict[str, float]] = []
    original = validation.scene_metrics

    def recording(*args):
        calls.append(original(*args))
        return calls[-1]

    monkeypatch.setattr(validation, "scene_metrics", recording)
    return calls


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard event files (the tracker also writes an hparams folder)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({p.parent for p in (run / "logs").rglob("events.out.tfevents*")}):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert scalars, "no scalars in the event files"
    return scalars


def test_metrics_are_in_range_and_equal_evaluate_on_the_same_meshes(setup, data_root, tmp_path):
    cfg, pipe, records, settings = setup
    means = validation.scene_metrics(pipe, records, settings, cfg)
    assert sorted(means) == sorted(validation.METRICS) and all(math.isfinite(v) for v in means.values())
    assert 0 < means["scene_fscore"] <= 1 and 0 <= means["object_fscore"] <= 1 and 0 <= means["iou_bbox"] <= 1
    assert means["scene_cd"] > 0 and means["scene_fscore"] < 1  # a 2-step toy model is not the ground truth
    # The same generations written as scene files and scored by evaluate.py's command line.
    pred = tmp_path / "pred"
    pred.mkdir()
    for record in records[:2]:
        scene = trimesh.Scene()
        for name, mesh in validation.metric_meshes(pipe, record, settings, cfg).items():
            scene.add_geometry(mesh, node_name=name, geom_name=name)
        scene.export(pred / f"{record.scene_id}.glb")
    out = tmp_path / "eval"
    assert evaluate.main(["--gt", str(data_root), "--split", "val", "--pred", str(pred), "--output_dir", str(out),
                          "--max_scenes", "2", "--num_points", str(NUM_POINTS), "--sampling_seed",
                          str(cfg.validation.seed), "--num_renders", "0", "--no_progress"]) == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["scored"] == 2
    for key, value in means.items():
        assert value == pytest.approx(summary["metrics"][key]["mean"], rel=1e-4, abs=1e-6), key


def test_a_scene_that_fails_is_a_warning(setup, monkeypatch, caplog):
    cfg, pipe, records, settings = setup
    original = validation.metric_meshes

    def failing_first(pipe, record, *args):
        if record is records[0]:
            raise RuntimeError("generation broke")
        return original(pipe, record, *args)

    monkeypatch.setattr(validation, "metric_meshes", failing_first)
    with caplog.at_level(logging.WARNING, logger=validation.__name__):
        means = validation.scene_metrics(pipe, records, settings, cfg)
    assert f"{records[0].scene_id} skipped: RuntimeError: generation broke" in caplog.text
    one = validation.score_scene(records[1], original(pipe, records[1], settings, cfg), cfg)
    assert means == {k: one[k] for k in validation.METRICS}  # the mean of the scene that worked
    monkeypatch.setattr(validation, "metric_meshes", lambda *a: {})  # no mesh: score_points refuses
    assert validation.scene_metrics(pipe, records, settings, cfg) == {}


def test_training_logs_the_metrics_to_tensorboard(data_root, tmp_path, monkeypatch):
    calls = _spy(monkeypatch)
    run = tmp_path / "run"
    assert _main(tiny_args(data_root, run, *FAST, "--logging.report_to", "tensorboard",
                           "--validation.metrics_every_n_steps", "2", "--validation.metrics_num_scenes", "1",
                           "--validation.metrics_num_points", str(NUM_POINTS), max_steps=3)) == 0
    assert len(calls) == 2  # step 2 and the last step
    scalars = _scalars(run)
    for key in validation.METRICS:
        logged = scalars[f"val/{key}"]
        assert [s for s, _ in logged] == [2, 3]
        assert [v for _, v in logged] == pytest.approx([c[key] for c in calls], rel=1e-6)  # float32 events


def test_metrics_off_generates_and_logs_nothing(data_root, tmp_path, monkeypatch):
    calls = _spy(monkeypatch)
    generated = []
    monkeypatch.setattr(validation, "generate_meshes", lambda *a, **k: generated.append(1))
    run = tmp_path / "run"
    assert _main(tiny_args(data_root, run, "--logging.report_to", "tensorboard", max_steps=2)) == 0
    assert load_config(run / "config.yaml").validation.metrics_every_n_steps == 0  # tiny.yaml has it on
    scalars = _scalars(run)
    assert "val/loss" in scalars and not calls and not generated
    assert not [t for t in scalars if t.removeprefix("val/") in validation.METRICS]
