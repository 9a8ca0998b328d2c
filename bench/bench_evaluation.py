#!/usr/bin/env python
"""Scoring time per scene: 20480 points per instance x 10 instances, CPU seconds on one thread.

The case is a good prediction, as a trained model's would be: each instance's gt surface
resampled (other points on the same box surfaces), noise 0.002, the scene turned 3 degrees and
shifted 0.01. Columns: ``before``, the scoring as it was before the speed work (kept here only,
below, as the yardstick: scipy cKDTree, random query order, numpy broadcasting), and
``score_points`` now with each installed nearest-neighbour backend. The variants run interleaved
in each repeat (the machine is shared: a ratio within one run is what counts), and ``max rel
diff`` is the largest relative difference of any metric from ``before``. ``--upstream`` adds
``icp_upstream`` (all points, upstream's stopping rule), without a ``before``.

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
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from threadpoolctl import threadpool_limits

from midi.evaluation import score_points
from midi.evaluation.metrics import (
    F_EPS,
    ICP_ITERATIONS,
    ICP_POINTS,
    ICP_TOLERANCE,
    NORMALISED_HALF,
    bbox_iou,
)
from midi.evaluation.nearest import BACKENDS


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


# ------------------------------------------------------------------------------- before (yardstick)
# The scoring before the speed work, condensed (align none and icp at the default settings only).
def _tree(points: np.ndarray) -> cKDTree:
    return cKDTree(points, balanced_tree=False, compact_nodes=False)


def _before_nearest(query: np.ndarray, query_tree: cKDTree, target: cKDTree) -> np.ndarray:
    """Exact distances: tree order, a bound from a probe, unbounded retry beyond it."""
    points = query[query_tree.indices]
    probe = target.query(points[:: max(1, len(points) // 256)], workers=1)[0]
    bound = 2 * float(np.quantile(probe, 0.9)) or np.inf
    dist_sorted = target.query(points, distance_upper_bound=bound, workers=1)[0]
    far = ~np.isfinite(dist_sorted)
    if far.any():
        dist_sorted[far] = target.query(points[far], workers=1)[0]
    dist = np.empty(len(points))
    dist[query_tree.indices] = dist_sorted
    return dist


def _before_cd_f(pred: np.ndarray, gt: np.ndarray, gt_tree: cKDTree, tau: float) -> tuple[float, ...]:
    pred_tree = _tree(pred)
    d_pg, d_gp = _before_nearest(pred, pred_tree, gt_tree), _before_nearest(gt, gt_tree, pred_tree)
    precision, recall = float(np.mean(d_pg < tau)), float(np.mean(d_gp < tau))
    fscore = 2 * precision * recall / (precision + recall + F_EPS)
    return float(np.mean(d_pg**2)), float(np.mean(d_gp**2)), fscore


def _before_normalise(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    span = np.where(hi - lo == 0, 1.0, hi - lo)
    return 2 * NORMALISED_HALF * (points - lo) / span - NORMALISED_HALF


def _before_icp(sources: list[np.ndarray], targets: list[tuple[np.ndarray, cKDTree]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    fits = [s if len(s) <= ICP_POINTS else s[rng.choice(len(s), ICP_POINTS, replace=False)] for s in sources]
    poses = [(np.eye(3), np.zeros(3)) for _ in sources]
    prev, active = [np.inf] * len(sources), list(range(len(sources)))
    for _ in range(ICP_ITERATIONS):
        for k in list(active):
            moved = fits[k]
            paired = targets[k][0][targets[k][1].query(moved, workers=1)[1]]
            mu_s, mu_d = moved.mean(0), paired.mean(0)
            u, _, vh = np.linalg.svd((moved - mu_s).T @ (paired - mu_d))
            r = vh.T @ np.diag([1.0, 1.0, np.sign(np.linalg.det(vh.T @ u.T))]) @ u.T
            t = mu_d - r @ mu_s
            fits[k] = moved @ r.T + t
            poses[k] = (r @ poses[k][0], r @ poses[k][1] + t)
            error = float(np.mean(np.linalg.norm(fits[k] - paired, axis=1)))
            if abs(prev[k] - error) < ICP_TOLERANCE:
                active.remove(k)
            prev[k] = error
        if not active:
            break
    return [s @ r.T + t for s, (r, t) in zip(sources, poses)]


def before_score(pred: list[np.ndarray], gt: list[np.ndarray], align: str, tau: float = 0.1) -> dict:
    """The metrics of ``score_points(pred, gt, align)`` (none or icp), computed as before."""
    scene_gt = np.concatenate(gt)
    scene_gt_tree = _tree(scene_gt)
    scene_pred = np.concatenate(pred)
    if align == "icp":
        scene_pred = _before_icp([scene_pred], [(scene_gt, scene_gt_tree)])[0]
    cd_1, cd_2, scene_f = _before_cd_f(scene_pred, scene_gt, scene_gt_tree, tau)
    obj_gt = [(g, _tree(g)) for g in map(_before_normalise, gt)]
    obj_pred = [_before_normalise(p) for p in pred]
    if align == "icp":
        obj_pred = _before_icp(obj_pred, obj_gt)
    objects = [_before_cd_f(p, g, tree, tau) for p, (g, tree) in zip(obj_pred, obj_gt)]
    return {
        "scene_cd": cd_1 + cd_2,
        "scene_cd_1": cd_1,
        "scene_cd_2": cd_2,
        "scene_fscore": scene_f,
        "object_cd": float(np.mean([c1 + c2 for c1, c2, _ in objects])),
        "object_fscore": float(np.mean([f for _, _, f in objects])),
        "iou_bbox": float(np.mean([bbox_iou(p, g) for p, g in zip(pred, gt)])),
    }


# ------------------------------------------------------------------------------------------ main
def _rel_diff(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=20480)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--upstream", action="store_true", help="also time align='icp_upstream'")
    args = p.parse_args()
    pred, gt = make_scene(args.points, args.instances)
    variants = {"before": lambda align: before_score(pred, gt, align)}
    for backend in BACKENDS:
        variants[backend] = lambda align, b=backend: score_points(pred, gt, align=align, backend=b)
    aligns = ["none", "icp"] + (["icp_upstream"] if args.upstream else [])
    seconds: dict[tuple[str, str], list[float]] = {}
    scores: dict[tuple[str, str], dict[str, float]] = {}
    with warnings.catch_warnings(), threadpool_limits(limits=1):  # one thread: BLAS and OpenMP too
        warnings.simplefilter("ignore")
        for _ in range(args.repeats):
            for align in aligns:
                for name, run in variants.items():
                    if name == "before" and align == "icp_upstream":
                        continue
                    start = time.process_time()  # CPU seconds: wall time also counts waits for a core
                    scores[align, name] = run(align)
                    seconds.setdefault((align, name), []).append(time.process_time() - start)
    print(
        f"{args.instances} instances x {args.points} points, median of {args.repeats} interleaved repeats, "
        f"CPU s/scene on one thread, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    backends = list(BACKENDS)
    header = " ".join(f"{b:>9} {'ratio':>6}" for b in backends)
    print(f"{'align':<13} {'before':>7} {header}  max rel diff")
    for align in aligns:
        base = np.median(seconds[align, "before"]) if (align, "before") in seconds else None
        cells = [f"{align:<13} {base:7.3f}" if base else f"{align:<13} {'-':>7}"]
        for b in backends:
            t = np.median(seconds[align, b])
            cells.append(f"{t:9.3f} {base / t:5.1f}x" if base else f"{t:9.3f} {'-':>6}")
        diff = max(_rel_diff(scores[align, "before"], scores[align, b]) for b in backends) if base else None
        print(" ".join(cells) + (f"  {diff:.1e}" if diff is not None else ""))
    s = scores["icp", backends[0]]
    print(
        f"icp scores: scene_fscore {s['scene_fscore']:.4f}  scene_cd {s['scene_cd']:.2e}  "
        f"object_fscore {s['object_fscore']:.4f}"
    )


if __name__ == "__main__":
    main()
