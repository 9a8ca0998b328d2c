#!/usr/bin/env python
"""Scoring time per scene: 20480 points per instance x 10 instances, one KD-tree thread.

The case is a good prediction, as a trained model's would be: each instance's gt surface
resampled (other points on the same box surfaces), noise 0.002, the scene turned 3 degrees and
shifted 0.01. The ``--upstream`` run adds ``icp_upstream`` (all points, upstream's stopping rule).

Usage::

    PYTHONPATH=. python bench/bench_evaluation.py
    PYTHONPATH=. python bench/bench_evaluation.py --points 20480 --instances 10 --repeats 5 --upstream
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo is the package root
import argparse
import os
import time
import warnings

import numpy as np
from scipy.spatial.transform import Rotation

from midi.evaluation import score_points


def box_surface(rng: np.random.Generator, n: int, centre: np.ndarray, half: np.ndarray) -> np.ndarray:
    """(n, 3) uniform-ish points on the faces of an axis-aligned box."""
    p = rng.uniform(-1, 1, (n, 3))
    axis = rng.integers(0, 3, n)
    p[np.arange(n), axis] = np.sign(p[np.arange(n), axis])
    return p * half + centre


def make_scene(points: int, instances: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(pred, gt)``: ``instances`` clouds of ``(points, 3)`` each."""
    rng = np.random.default_rng(seed)
    centres, halves = rng.uniform(-0.6, 0.6, (instances, 3)), rng.uniform(0.05, 0.25, (instances, 3))
    gt = [box_surface(rng, points, c, h) for c, h in zip(centres, halves)]
    turn = Rotation.from_rotvec(
        np.radians(3.0) * np.array([0.2, 1.0, 0.1]) / np.linalg.norm([0.2, 1.0, 0.1])
    ).as_matrix()
    pred = [
        (box_surface(rng, points, c, h) + rng.normal(0, 0.002, (points, 3))) @ turn.T + 0.01
        for c, h in zip(centres, halves)
    ]
    return pred, gt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=20480)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--upstream", action="store_true", help="also time align='icp_upstream'")
    args = p.parse_args()
    pred, gt = make_scene(args.points, args.instances)
    aligns = ["none", "icp"] + (["icp_upstream"] if args.upstream else [])
    print(
        f"{args.instances} instances x {args.points} points, {args.repeats} repeats, workers=1, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for align in aligns:
        times, cpu = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                scores = score_points(pred, gt, align=align)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        # CPU seconds: on a shared machine, wall time also counts the waits for a core.
        print(
            f"align={align:<13} median {np.median(times):.3f} s/scene wall, {np.median(cpu):.3f} s CPU  "
            f"scene_fscore {scores['scene_fscore']:.4f}  scene_cd {scores['scene_cd']:.2e}  "
            f"object_fscore {scores['object_fscore']:.4f}"
        )


if __name__ == "__main__":
    main()
