"""bench/bench_layout.py: a prediction at the right places beats the scene-centre guess; one at the centre ties it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_layout as bench  # noqa: E402

from midi.data.dataset import open_dataset  # noqa: E402
from midi.evaluation.predictions import load_truth  # noqa: E402


def _run(tmp_path: Path, data_root: Path, at_centre: bool) -> Path:
    """An evaluate.py-like run folder whose scene files hold a small box per instance."""
    run, pred = tmp_path / ("centre" if at_centre else "right"), tmp_path / ("centre" if at_centre else "right") / "p"
    pred.mkdir(parents=True)
    records = open_dataset(data_root, "train")[:2]
    for record in records:
        truth = load_truth(record, 512, 0)
        centres = np.stack([p.mean(0) for p in truth.points])
        scene = trimesh.Scene()
        for k, c in zip(truth.indices, centres):
            box = trimesh.creation.box(extents=[0.05] * 3)
            box.apply_translation(centres.mean(0) if at_centre else c)
            scene.add_geometry(box, node_name=f"instance_{k + 1}", geom_name=f"instance_{k + 1}")
        scene.export(pred / f"{record.scene_id}.glb")
    metrics = {"protocol": {"gt": str(data_root), "split": "train", "points_per_instance": 512, "sampling_seed": 0,
                            "view": 0},
               "run": {"pred": str(pred)}, "scenes": [{"scene_id": r.scene_id, "status": "ok"} for r in records]}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_centroid_errors_against_the_scene_centre_guess(tmp_path, data_root, capsys):
    right, centre = bench.main([str(_run(tmp_path, data_root, False)), str(_run(tmp_path, data_root, True))])
    assert right["scenes"] == 2 and right["instances"] >= 4 and right["missing"] == 0
    assert right["centroid_error"] < 0.01 < right["scene_centre_guess"]
    assert centre["centroid_error"] == pytest.approx(centre["scene_centre_guess"], abs=0.01)
    assert "scene-centre guess" in capsys.readouterr().out
