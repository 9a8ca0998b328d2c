#!/usr/bin/env python
"""Where does a model put its instances? Centroid errors of an evaluate.py run, next to a blind guess.

For every matched instance of the scenes an ``evaluate.py`` run scored, the distance between the
centroid of the predicted surface and that of the ground truth (both sampled as evaluate.py samples
them, scene frame, no alignment), next to the same distance for a guess that needs no image: every
instance at the centre of its scene's ground truth. A model that reads the layout from its input
beats the guess by far; one at or above it places its instances blindly, however good its shapes
(scene F-score concatenates the instances, so it hardly sees this; ``iou_bbox`` does).

Usage::

    python evaluate.py --gt data/mini-base-test --split test --max_scenes 32 --generate ... --output_dir outputs/proof/base-base
    PYTHONPATH=. python bench/bench_layout.py outputs/proof/base-base [outputs/proof/base-lora ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo is the package root
import argparse
import json

import numpy as np

from midi.data.dataset import open_dataset
from midi.errors import run_cli
from midi.evaluation.predictions import EvalError, find_scene_file, load_truth, predict_from_file


def centroid_errors(run_dir: Path) -> dict[str, float]:
    """Mean centroid error and the scene-centre guess's over the run's matched instances."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    protocol, pred_dir = metrics["protocol"], Path(metrics["run"]["pred"])
    scored = {s["scene_id"] for s in metrics["scenes"] if s["status"] == "ok"}
    errors, guesses, missing = [], [], 0
    for record in open_dataset(protocol["gt"], protocol["split"]):
        if record.scene_id not in scored:
            continue
        n, seed = protocol["points_per_instance"], protocol["sampling_seed"]
        try:
            truth = load_truth(record, n, seed, protocol["view"])
            pred = predict_from_file(find_scene_file(pred_dir, record.scene_id), record, truth, n, seed)
        except EvalError as exc:
            raise SystemExit(f"error: {exc}") from None
        gt = np.stack([p.mean(0) for p in truth.points])  # (N, 3) instance centroids
        centre = gt.mean(0)
        for k, points in enumerate(pred.points):
            if points is None:
                missing += 1
                continue
            errors.append(float(np.linalg.norm(points.mean(0) - gt[k])))
            guesses.append(float(np.linalg.norm(centre - gt[k])))
    return {"scenes": len(scored), "instances": len(errors), "missing": missing,
            "centroid_error": float(np.mean(errors)), "scene_centre_guess": float(np.mean(guesses))}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="evaluate.py output folders (with metrics.json)")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'run':<40} {'scenes':>6} {'instances':>9} {'centroid error':>15} {'scene-centre guess':>19} {'ratio':>6}")
    for run in args.runs:
        r = centroid_errors(run)
        rows.append(r)
        print(f"{str(run):<40} {r['scenes']:>6} {r['instances']:>9} {r['centroid_error']:>15.3f} "
              f"{r['scene_centre_guess']:>19.3f} {r['centroid_error'] / r['scene_centre_guess']:>6.2f}")
    return rows


if __name__ == "__main__":
    # One-line errors (a missing metrics.json, a bad config key), never a traceback.
    sys.exit(run_cli(lambda argv: (main(argv), 0)[1]))
