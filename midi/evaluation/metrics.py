"""Point-cloud metrics of one scene, defined as MIDI-3D's evaluation defines them.

numpy, and exact float64 nearest neighbours from :mod:`midi.evaluation.nearest` (pykdtree, or
scipy's cKDTree: the same numbers), which are ~85% of the time (``bench/bench_evaluation.py``).

Definitions (upstream's ``MIDISystem.compute_metrics``; ``align="none"`` reproduces them exactly):

- scene level: all instances concatenated, pred ``(Np, 3)`` vs gt ``(Ng, 3)``;
- ``cd`` = mean over pred of the **squared** nearest distance to gt (``_1``) + the same gt -> pred
  (``_2``);
- ``fscore`` at ``tau`` on **plain** nearest distances: P = fraction of pred points with distance
  ``< tau`` (strict), R likewise gt -> pred, F = 2PR / (P + R + 1e-8);
- ``iou_bbox``: per instance, axis-aligned bbox volume IoU of the raw (never aligned) clouds,
  ``inter / (union + 1e-8)``; mean over instances;
- object level: each instance's pred and gt independently min-max normalised per axis to
  [-0.95, 0.95] (a zero range counts as 1), then cd and fscore as above; mean over instances.

Alignment of pred onto gt before cd/fscore, at scene level and again per object:

- ``none``: none (upstream with ``use_icp=False``);
- ``icp``: rigid point-to-point ICP, Kabsch with reflection guard, exact nearest-neighbour pairs,
  at most 50 iterations, stop when the mean correspondence distance changes by < 1e-5 (upstream's
  numbers). Each object converges on its own. The transform is fitted on a seeded subset of
  ``icp_points`` source points (all correspondences still come from the full gt cloud) and
  applied to the whole cloud: a Kabsch fit on 4096 pairs is as good as on 20480 and 5x cheaper;
- ``icp_upstream``: upstream's ICP including its bug (``torch.svd``'s V taken for V^T, so the
  "rotation" is V^T U^T) and its joint stopping rule over the objects; all points. Only for
  comparing with published MIDI numbers: it moves good predictions away and is unstable;
- ``similarity``: translation + uniform scale (centroids and RMS radii matched), no rotation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from midi.evaluation.nearest import BACKENDS, Tree, bounds, coherent_order, threads

ALIGNMENTS = ("none", "icp", "icp_upstream", "similarity")
METRIC_KEYS = (
    "scene_cd",
    "scene_cd_1",
    "scene_cd_2",
    "scene_fscore",
    "object_cd",
    "object_fscore",
    "iou_bbox",
)
HIGHER_IS_BETTER = {"scene_fscore": True, "object_fscore": True, "iou_bbox": True}  # the rest: CDs, lower
ICP_ITERATIONS = 50
ICP_TOLERANCE = 1e-5
ICP_POINTS = 4096
F_EPS = 1e-8
IOU_EPS = 1e-8
NORMALISED_HALF = 0.95  # object clouds go to [-0.95, 0.95] per axis
# Upper bound of an object CD after normalisation: both clouds lie in the same cube of side 1.9,
# so no squared distance exceeds 3 * 1.9^2, and the CD sums two such means.
MAX_OBJECT_CD = 2 * 3 * (2 * NORMALISED_HALF) ** 2
UPSTREAM_WARNING = (
    "align='icp_upstream' reproduces upstream MIDI-3D's broken ICP (svd misuse): it rotates good "
    "predictions away and 1e-6 input noise moves its F-scores by up to 0.17; use it only to "
    "compare with published MIDI numbers, never to rank methods"
)


def higher_is_better(key: str) -> bool:
    """Whether a larger value of metric ``key`` is better (F-scores, IoU) or worse (CDs)."""
    return HIGHER_IS_BETTER.get(key.split("@")[0], False)


@dataclass
class _Cloud:
    """A point cloud with its KD-tree (built once, reused by ICP and the final distances)."""

    points: np.ndarray  # (N, 3) float64, in coherent order (see midi.evaluation.nearest)
    tree: Tree

    @classmethod
    def of(cls, points: np.ndarray, backend: str, workers: int) -> _Cloud:
        tree = Tree(points, backend, workers)
        return cls(tree.points, tree)


def _cd_f(pred: np.ndarray, gt: _Cloud, taus: Sequence[float]) -> tuple[float, float, list[float]]:
    """``(cd_1, cd_2, [F at each tau])`` between two clouds (see the module docstring)."""
    d_pg = gt.tree.query(pred)[0]
    d_gp = Tree(pred, gt.tree.backend, gt.tree.workers).query(gt.points)[0]
    fscores = []
    for tau in taus:
        precision, recall = float(np.mean(d_pg < tau)), float(np.mean(d_gp < tau))
        fscores.append(2 * precision * recall / (precision + recall + F_EPS))
    return float(np.mean(d_pg**2)), float(np.mean(d_gp**2)), fscores


# numpy runs a (N, 3) array against a (3,) vector, or reduces it over axis 0, with an inner loop
# of length 3: 5-20x slower than the same arithmetic one column at a time. These helpers work per
# column; each element sees the same IEEE operations, so the results are bit for bit those of the
# broadcasting expressions they replace (the means excepted: another summation order, ~1e-16).
def _mean(points: np.ndarray) -> np.ndarray:
    """(3,) centroid of ``(N, 3)`` points (one BLAS matrix-vector product)."""
    return np.ones(len(points)) @ points / len(points)


def _columnwise(ufunc: np.ufunc, points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``ufunc(points, values)`` for ``(N, 3)`` points and a (3,) vector, column by column."""
    out = np.empty_like(points)
    for j in range(3):
        ufunc(points[:, j], values[j], out=out[:, j])
    return out


def _row_squares(d: np.ndarray) -> np.ndarray:
    """(N,) squared norms of the rows of ``(N, 3)`` (summed in np.linalg.norm's order)."""
    x, y, z = d.T
    return x * x + y * y + z * z


def bbox_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Axis-aligned bounding-box volume IoU of two clouds ``(N, 3)``, ``(M, 3)``."""
    (lo_p, hi_p), (lo_g, hi_g) = bounds(pred), bounds(gt)
    inter = np.prod(np.clip(np.minimum(hi_p, hi_g) - np.maximum(lo_p, lo_g), 0, None))
    vol_p, vol_g = np.prod(np.clip(hi_p - lo_p, 0, None)), np.prod(np.clip(hi_g - lo_g, 0, None))
    return float(inter / (vol_p + vol_g - inter + IOU_EPS))


def normalise(points: np.ndarray) -> np.ndarray:
    """Per-axis min-max normalisation of ``(N, 3)`` to [-0.95, 0.95] (zero range: divided by 1)."""
    lo, hi = bounds(points)
    span = np.where(hi - lo == 0, 1.0, hi - lo)
    out = np.empty_like(points)
    for j in range(3):  # 2 * 0.95 * (points - lo) / span - 0.95, per column
        out[:, j] = 2 * NORMALISED_HALF * (points[:, j] - lo[j]) / span[j] - NORMALISED_HALF
    return out


def kabsch(src: np.ndarray, dst: np.ndarray, upstream: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rigid ``(R (3, 3), t (3,))`` minimising ``|src @ R.T + t - dst|`` over paired rows.

    ``upstream=True`` reproduces upstream's bug: torch.svd returns V, upstream transposes it as if
    it were V^T, so its rotation is built from V^T where V belongs (numpy's ``vh`` is that V^T).
    """
    mu_s, mu_d = _mean(src), _mean(dst)
    h = _columnwise(np.subtract, src, mu_s).T @ _columnwise(np.subtract, dst, mu_d)  # (3, 3)
    u, _, vh = np.linalg.svd(h)  # h = u diag(s) vh
    v = vh if upstream else vh.T
    # Reflection guard: flip the weakest axis when the best orthogonal map is a reflection.
    d = np.sign(np.linalg.det(v @ u.T))
    rotation = v @ np.diag([1.0, 1.0, d]) @ u.T
    return rotation, mu_d - rotation @ mu_s


def _move(points: np.ndarray, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``points @ rotation.T + shift``."""
    return _columnwise(np.add, points @ rotation.T, shift)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``src`` moved and uniformly scaled so its centroid and RMS radius match ``dst``'s."""
    mu_s, mu_d = _mean(src), _mean(dst)
    src_c, dst_c = _columnwise(np.subtract, src, mu_s), _columnwise(np.subtract, dst, mu_d)
    rms_s, rms_d = np.sqrt(np.mean(_row_squares(src_c))), np.sqrt(np.mean(_row_squares(dst_c)))
    return _columnwise(np.add, src_c * (rms_d / rms_s if rms_s > 0 else 1.0), mu_d)


def icp(
    sources: Sequence[np.ndarray],
    targets: Sequence[_Cloud],
    upstream: bool = False,
    fit_points: int | None = ICP_POINTS,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Aligns each source ``(N_k, 3)`` onto its target; returns the ``(R, t)`` moving each.

    ``upstream=False``: correct Kabsch, every pair stops on its own, fitted on ``fit_points``
    seeded source points. ``upstream=True``: upstream's buggy Kabsch on all points, and one
    stopping rule for the whole batch (the mean distance over all objects' points, as upstream's
    batched ``icp`` computes it). The seeded subset is drawn from ``sources`` as given (their
    order picks it); the poses apply to the same points in any order.
    """
    rng = np.random.default_rng(seed)
    fits = [
        s
        if upstream or fit_points is None or len(s) <= fit_points
        else s[rng.choice(len(s), fit_points, replace=False)]
        for s in sources
    ]
    # Queries run in a coherent order (faster), the pairs stay in the fit order: Kabsch sums over
    # the same sequence as before, so the fit is bit for bit the one of a plain query.
    orders = [coherent_order(f) for f in fits]
    poses = [(np.eye(3), np.zeros(3)) for _ in sources]  # cumulative (R, t) per pair
    prev = [np.inf] * len(sources)
    active = list(range(len(sources)))
    for _ in range(ICP_ITERATIONS):
        errors = {}
        for k in active:
            moved = fits[k]
            index = np.empty(len(moved), dtype=np.intp)
            index[orders[k]] = targets[k].tree.query(moved[orders[k]])[1]
            paired = np.take(targets[k].points, index, axis=0)
            r, t = kabsch(moved, paired, upstream)
            fits[k] = _move(moved, r, t)
            poses[k] = (r @ poses[k][0], r @ poses[k][1] + t)
            errors[k] = np.sqrt(_row_squares(fits[k] - paired))
        if upstream:  # one error over every point of the batch, one decision for all
            error = float(np.mean(np.concatenate(list(errors.values()))))
            if abs(prev[0] - error) < ICP_TOLERANCE:
                break
            prev[0] = error
            continue
        for k, e in errors.items():
            error = float(np.mean(e))
            if abs(prev[k] - error) < ICP_TOLERANCE:
                active.remove(k)
            prev[k] = error
        if not active:
            break
    return poses


def _check(points: np.ndarray | None, what: str, allow_missing: bool) -> np.ndarray | None:
    if points is None or (allow_missing and len(points) == 0):
        if not allow_missing:
            raise ValueError(f"{what}: missing")
        return None
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise ValueError(f"{what}: expected a non-empty (N, 3) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(
            f"{what}: {int((~np.isfinite(array)).any(axis=1).sum())} points with NaN/inf coordinates"
        )
    return array


def _align(
    pred: list[np.ndarray],
    gt: list[_Cloud],
    align: str,
    as_given: Callable[[], list[np.ndarray]],
    icp_points: int | None,
    seed: int,
) -> list[np.ndarray]:
    """``pred`` clouds aligned onto ``gt``. ``as_given()``: the same clouds in the caller's order,
    made only for ICP: that order picks its seeded subset, so reordering changes no result."""
    if align in ("icp", "icp_upstream"):
        poses = icp(as_given(), gt, align == "icp_upstream", icp_points, seed)
        return [_move(p, r, t) for p, (r, t) in zip(pred, poses)]
    if align == "similarity":
        return [similarity(p, g.points) for p, g in zip(pred, gt)]
    return pred


def _coherent(points: np.ndarray | None) -> np.ndarray | None:
    """The cloud in a spatially coherent order (faster queries; every metric is order-free)."""
    return None if points is None else np.take(points, coherent_order(points), axis=0)


def _score(
    gts: list[np.ndarray],
    preds: list[np.ndarray | None],
    extras: list[np.ndarray],
    present: list[int],
    align: str,
    taus: list[float],
    icp_points: int | None,
    seed: int,
    backend: str,
    workers: int,
) -> tuple[float, float, list[float], np.ndarray, np.ndarray]:
    """Scene ``cd_1, cd_2, [F]`` and per-instance object CDs ``(K,)`` and Fs ``(K, len(taus))``
    (missing instances: 0, for the caller to charge)."""
    gts_c, preds_c = [_coherent(g) for g in gts], [_coherent(p) for p in preds]
    extras_c = [_coherent(e) for e in extras]

    # Scene level: every predicted cloud (matched or extra) vs every gt cloud, (sum N, 3).
    scene_gt = _Cloud.of(np.concatenate(gts_c), backend, workers)
    scene_pred = _align(
        [np.concatenate([preds_c[k] for k in present] + extras_c)],
        [scene_gt],
        align,
        lambda: [np.concatenate([preds[k] for k in present] + extras)],
        icp_points,
        seed,
    )[0]
    cd_1, cd_2, scene_f = _cd_f(scene_pred, scene_gt, taus)

    # Object level: normalised (and aligned) clouds per instance.
    obj_gt = [_Cloud.of(normalise(gts_c[k]), backend, workers) for k in present]
    obj_pred = _align(
        [normalise(preds_c[k]) for k in present],
        obj_gt,
        align,
        lambda: [normalise(preds[k]) for k in present],
        icp_points,
        seed,
    )
    cds, fs = np.zeros(len(gts)), np.zeros((len(gts), len(taus)))
    for k, p, g in zip(present, obj_pred, obj_gt):
        c1, c2, f = _cd_f(p, g, taus)
        cds[k], fs[k] = c1 + c2, f
    return cd_1, cd_2, scene_f, cds, fs


def score_points(
    pred: Sequence[np.ndarray | None],
    gt: Sequence[np.ndarray],
    align: str = "icp",
    tau: float | Sequence[float] = 0.1,
    *,
    extra: Sequence[np.ndarray] = (),
    missing_cd: float = MAX_OBJECT_CD,
    icp_points: int | None = ICP_POINTS,
    seed: int = 0,
    workers: int = 1,
    backend: str | None = None,
) -> dict[str, float]:
    """Scores one scene: pred and gt clouds of its instances, in the scene frame.

    Args:
        pred: ``(N_k, 3)`` per instance k; None (or empty) = instance missing from the prediction:
            it counts F = 0, CD = ``missing_cd`` and IoU = 0 at object level, and its gt points
            stay in the scene-level gt cloud.
        gt: ``(M_k, 3)`` per instance, same order.
        align: one of :data:`ALIGNMENTS` (module docstring).
        tau: F-score threshold, or several: the first gives ``*_fscore``, every one also
            ``*_fscore@<tau>``.
        extra: predicted clouds that match no gt instance (scene level only).
        missing_cd: object CD charged to a missing instance (default: its upper bound).
        icp_points: ``align="icp"``: source points the transform is fitted on (None: all).
        seed: seed of that subset.
        workers: KD-tree query threads (-1: all cores).
        backend: nearest-neighbour library, one of ``midi.evaluation.nearest.BACKENDS``
            (None: the fastest installed); every backend gives the same numbers.

    Returns:
        :data:`METRIC_KEYS` (+ ``*_fscore@<tau>``) as floats.

    Raises:
        ValueError: unknown ``align``, instance counts differ, malformed or non-finite clouds,
            or no predicted instance at all.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {', '.join(ALIGNMENTS)}, got {align!r}")
    if align == "icp_upstream":
        warnings.warn(UPSTREAM_WARNING, stacklevel=2)
    taus = [float(tau)] if np.isscalar(tau) else [float(t) for t in tau]
    if not taus or min(taus) <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if len(pred) != len(gt) or not gt:
        raise ValueError(f"{len(pred)} predicted instances for {len(gt)} ground-truth instances")
    gts = [_check(g, f"gt[{k}]", False) for k, g in enumerate(gt)]
    preds = [_check(p, f"pred[{k}]", True) for k, p in enumerate(pred)]
    extras = [_check(e, f"extra[{k}]", False) for k, e in enumerate(extra)]
    present = [k for k, p in enumerate(preds) if p is not None]
    if not present:
        raise ValueError("no predicted instance")

    backend = backend or BACKENDS[0]
    with threads(workers, backend):
        cd_1, cd_2, scene_f, cds, fs = _score(
            gts, preds, extras, present, align, taus, icp_points, seed, backend, workers
        )
    cds[[k for k in range(len(gts)) if preds[k] is None]] = float(missing_cd)
    ious = [bbox_iou(preds[k], gts[k]) if preds[k] is not None else 0.0 for k in range(len(gts))]
    scores = {
        "scene_cd": cd_1 + cd_2,
        "scene_cd_1": cd_1,
        "scene_cd_2": cd_2,
        "scene_fscore": scene_f[0],
        "object_cd": float(np.mean(cds)),
        "object_fscore": float(np.mean(fs[:, 0])),
        "iou_bbox": float(np.mean(ious)),
    }
    if len(taus) > 1:
        for j, t in enumerate(taus):
            scores[f"scene_fscore@{t:g}"] = scene_f[j]
            scores[f"object_fscore@{t:g}"] = float(np.mean(fs[:, j]))
    return scores
