"""midi.evaluation: analytic cases, agreement with a brute-force (cdist) version of upstream's
formulas, ICP vs upstream's broken ICP, reading predictions, reports and the paired comparison."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.spatial.transform import Rotation
from threadpoolctl import threadpool_info, threadpool_limits

from midi.data.camera import Camera, camera_record
from midi.data.dataset import SceneRecord
from midi.data.images import instance_colours
from midi.evaluation import MAX_OBJECT_CD, METRIC_KEYS, score_points
from midi.evaluation.metrics import kabsch
from midi.evaluation.nearest import BACKENDS, Tree, coherent_order, threads
from midi.evaluation.predictions import EvalError, SceneTruth, predict_from_file, read_scene_meshes
from midi.evaluation.report import bootstrap_ci, compare, comparison_image, difference_image, splat, summarise

TAU = 0.1


def box_surface(rng: np.random.Generator, n: int, centre, half=(0.3, 0.15, 0.08)) -> np.ndarray:
    """(n, 3) points on the surface of an anisotropic box (no rotational symmetry)."""
    p = rng.uniform(-1, 1, (n, 3))
    axis = rng.integers(0, 3, n)
    p[np.arange(n), axis] = np.sign(p[np.arange(n), axis])
    return p * half + centre


@pytest.fixture
def scene():
    rng = np.random.default_rng(1)
    return [box_surface(rng, 600, c) for c in [(-0.4, 0, 0), (0.3, 0.2, 0.1), (0, -0.3, 0.3)]]


# ---------------------------------------------------------------------------------------- reference
def dense_cd_f(p: np.ndarray, g: np.ndarray, tau: float) -> tuple[float, float, float]:
    """``(cd_1, cd_2, F)`` from the full distance matrix: no tree, no ordering, no pruning."""
    d = cdist(p, g)  # (N, M) plain distances
    d_pg, d_gp = d.min(1), d.min(0)
    precision, recall = (d_pg < tau).mean(), (d_gp < tau).mean()
    return (d_pg**2).mean(), (d_gp**2).mean(), 2 * precision * recall / (precision + recall + 1e-8)


def norm(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(0), x.max(0)
    r = np.where(hi - lo == 0, 1, hi - lo)
    return 1.9 * (x - lo) / r - 0.95


def reference(
    pred: list[np.ndarray], gt: list[np.ndarray], tau: float, objects: list[np.ndarray] | None = None
) -> dict[str, float]:
    """Upstream's compute_metrics with use_icp=False, written independently with dense cdist.

    ``objects``: the normalised predicted clouds to score at object level (default: ``norm(pred)``),
    e.g. after an alignment; the scene level scores ``pred`` as given.
    """

    def iou(p, g):
        inter = np.prod(np.clip(np.minimum(p.max(0), g.max(0)) - np.maximum(p.min(0), g.min(0)), 0, None))
        vp, vg = np.prod(p.max(0) - p.min(0)), np.prod(g.max(0) - g.min(0))
        return inter / (vp + vg - inter + 1e-8)

    c1, c2, f = dense_cd_f(np.concatenate(pred), np.concatenate(gt), tau)
    objects = [norm(p) for p in pred] if objects is None else objects
    scores = [dense_cd_f(o, norm(g), tau) for o, g in zip(objects, gt)]
    return {
        "scene_cd": c1 + c2,
        "scene_cd_1": c1,
        "scene_cd_2": c2,
        "scene_fscore": f,
        "object_cd": np.mean([a + b for a, b, _ in scores]),
        "object_fscore": np.mean([o[2] for o in scores]),
        "iou_bbox": np.mean([iou(p, g) for p, g in zip(pred, gt)]),
    }


@pytest.mark.parametrize("noise", [0.002, 0.03, 0.2])
def test_no_alignment_matches_upstream_formulas(scene, noise):
    rng = np.random.default_rng(2)
    pred = [g + rng.normal(0, noise, g.shape) + [0.02, 0, -0.01] for g in scene]
    pred[1] = pred[1][:450]  # instance clouds of different sizes
    got, want = score_points(pred, scene, align="none"), reference(pred, scene, TAU)
    assert set(got) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-10, rel=1e-10), key
    assert got["scene_fscore"] < 1 if noise > 0.01 else True


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_matches_brute_force_across_instances(scene, backend):
    """Coherent order, per-cloud trees and either backend give the dense cdist numbers, also
    where a point's nearest neighbour at scene level lies in another instance."""
    rng = np.random.default_rng(4)
    pred = [
        scene[1][::2] + rng.normal(0, 0.01, (300, 3)),  # instance 0 predicted onto instance 1's surface
        scene[1] + rng.normal(0, 0.01, scene[1].shape),
        (scene[0] + scene[2]) / 2 + rng.normal(0, 0.01, scene[2].shape),  # between instances 0 and 2
    ]
    owner = np.repeat(np.arange(len(scene)), [len(g) for g in scene])
    assert (owner[cdist(pred[0], np.concatenate(scene)).argmin(1)] != 0).mean() > 0.9  # the case is real
    got, want = score_points(pred, scene, align="none", backend=backend), reference(pred, scene, TAU)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12, rel=1e-12), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_and_extra_clouds_match_brute_force(scene, backend):
    rng = np.random.default_rng(7)
    pred = [scene[0] + rng.normal(0, 0.02, scene[0].shape), None, scene[2][:400] + 0.03]
    extra = [scene[1][:200] + 0.05, rng.uniform(-1, 1, (50, 3))]
    got = score_points(
        pred, scene, align="none", tau=[TAU, 0.04], extra=extra, missing_cd=5.0, backend=backend
    )
    scene_pred, scene_gt = np.concatenate([pred[0], pred[2]] + extra), np.concatenate(scene)
    for tau, key in [(TAU, "scene_fscore"), (0.04, "scene_fscore@0.04")]:
        assert got[key] == pytest.approx(dense_cd_f(scene_pred, scene_gt, tau)[2], abs=1e-12), key
    c1, c2, _ = dense_cd_f(scene_pred, scene_gt, TAU)
    assert (got["scene_cd_1"], got["scene_cd_2"]) == pytest.approx((c1, c2), rel=1e-12)
    objects = [dense_cd_f(norm(pred[k]), norm(scene[k]), TAU) for k in (0, 2)]
    assert got["object_cd"] == pytest.approx((sum(a + b for a, b, _ in objects) + 5.0) / 3, rel=1e-12)
    assert got["object_fscore"] == pytest.approx(sum(f for _, _, f in objects) / 3, abs=1e-12)


def test_backends_and_input_order_give_the_same_numbers(scene):
    rng = np.random.default_rng(5)
    turn = Rotation.from_rotvec([0.02, 0.08, 0.0]).as_matrix()
    pred = [g @ turn.T + rng.normal(0, 0.01, g.shape) + [0.02, 0, 0] for g in scene]
    shuffled_gt = [g[rng.permutation(len(g))] for g in scene]
    for align in ("none", "similarity", "icp"):
        runs = [score_points(pred, scene, align=align, backend=b) for b in BACKENDS]
        runs.append(score_points(pred, shuffled_gt, align=align))
        if align != "icp":  # ICP's seeded subset is drawn in the order the predictions come in
            runs.append(score_points([p[::-1] for p in pred], scene, align=align))
        for run in runs[1:]:
            for key in METRIC_KEYS:
                assert run[key] == pytest.approx(runs[0][key], rel=1e-12, abs=1e-15), (align, key)


def reference_icp(src: np.ndarray, dst: np.ndarray, rng: np.random.Generator, fit_points: int) -> np.ndarray:
    """Plain ICP: dense nearest neighbours, Kabsch on a seeded subset, upstream's stopping rule."""
    fit = src if len(src) <= fit_points else src[rng.choice(len(src), fit_points, replace=False)]
    rotation, shift, prev = np.eye(3), np.zeros(3), np.inf
    for _ in range(50):
        paired = dst[cdist(fit, dst).argmin(1)]
        r, t = kabsch(fit, paired)
        fit = fit @ r.T + t
        rotation, shift = r @ rotation, r @ shift + t
        error = np.linalg.norm(fit - paired, axis=1).mean()
        if abs(prev - error) < 1e-5:
            break
        prev = error
    return src @ rotation.T + shift


def test_icp_is_plain_icp_with_exact_correspondences(scene):
    """Coherent query order and reordered clouds leave ICP's correspondences, subset and fits as
    a plain ICP's (a subset drawn in another order would move the result by ~1e-4)."""
    rng = np.random.default_rng(8)
    turn = Rotation.from_rotvec([0.05, 0.15, -0.05]).as_matrix()
    moved = [g @ turn.T + rng.normal(0, 0.01, g.shape) + [0.03, -0.02, 0.0] for g in scene]
    got = score_points(moved, scene, align="icp", icp_points=200)
    scene_pred = reference_icp(np.concatenate(moved), np.concatenate(scene), np.random.default_rng(0), 200)
    objects_rng = np.random.default_rng(0)  # one generator across the objects, in instance order
    objects = [reference_icp(norm(p), norm(g), objects_rng, 200) for p, g in zip(moved, scene)]
    c1, c2, f = dense_cd_f(scene_pred, np.concatenate(scene), TAU)
    per_object = [dense_cd_f(o, norm(g), TAU) for o, g in zip(objects, scene)]
    assert (got["scene_cd_1"], got["scene_cd_2"]) == pytest.approx((c1, c2), rel=1e-9)
    assert got["scene_fscore"] == pytest.approx(f, abs=1e-12)
    assert got["object_cd"] == pytest.approx(np.mean([a + b for a, b, _ in per_object]), rel=1e-9)
    assert got["object_fscore"] == pytest.approx(np.mean([o[2] for o in per_object]), abs=1e-12)
    assert got["scene_cd"] < 0.5 * score_points(moved, scene, align="none")["scene_cd"]  # ICP did move it


def test_coherent_order_is_a_local_permutation():
    points = np.random.default_rng(6).uniform(-1, 1, (4000, 3))
    order = coherent_order(points)
    assert np.array_equal(np.sort(order), np.arange(len(points)))

    def mean_step(x):
        return np.linalg.norm(np.diff(x, axis=0), axis=1).mean()

    assert mean_step(points[order]) < 0.25 * mean_step(points)
    assert coherent_order(np.ones((5, 3))).tolist() == [0, 1, 2, 3, 4]  # no extent: kept as is


@pytest.mark.skipif("pykdtree" not in BACKENDS, reason="pykdtree is not installed")
def test_pykdtree_runs_on_the_requested_threads():
    Tree(np.zeros((4, 3)), "pykdtree")

    def pykdtree_threads():
        return [i["num_threads"] for i in threadpool_info() if "pykdtree" in i["filepath"]]

    with threadpool_limits(limits=2):  # whatever OMP_NUM_THREADS says, start from 2 threads
        with threads(1, "pykdtree"):
            assert pykdtree_threads() == [1]
        assert pykdtree_threads() == [2]  # and back after
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        score_points([np.zeros((4, 3))], [np.zeros((4, 3))], align="none", backend="nope")


def test_identical_clouds(scene):
    for align in ("none", "icp", "similarity"):
        s = score_points(scene, scene, align=align)
        assert s["scene_cd"] < 1e-20 and s["object_cd"] < 1e-20
        assert s["scene_fscore"] == pytest.approx(1, abs=1e-7) and s["object_fscore"] == pytest.approx(
            1, abs=1e-7
        )
        assert s["iou_bbox"] == pytest.approx(1, abs=1e-6)


def test_known_translation_exact_values():
    """Integer grid, shift of length 0.05: every nearest neighbour is the point's own copy."""
    grid = np.stack(np.meshgrid(*[np.arange(4.0)] * 3, indexing="ij"), -1).reshape(
        -1, 3
    )  # (64, 3), spacing 1
    shift = np.array([0.03, 0.04, 0.0])
    s = score_points([grid + shift], [grid], align="none", tau=[0.1, 0.05, 0.04])
    assert s["scene_cd_1"] == pytest.approx(0.0025, abs=1e-15) and s["scene_cd"] == pytest.approx(
        0.005, abs=1e-15
    )
    assert s["scene_fscore"] == pytest.approx(1 / (1 + 5e-9))
    assert s["scene_fscore@0.04"] == 0.0  # every distance is 0.05 > tau
    assert s["object_cd"] < 1e-25 and s["object_fscore@0.04"] == pytest.approx(
        1, abs=1e-7
    )  # normalisation undoes it
    inter = 2.97 * 2.96 * 3
    assert s["iou_bbox"] == pytest.approx(inter / (2 * 27 - inter + 1e-8), rel=1e-12)


def test_fscore_threshold_is_strict():
    gt = np.array([[0.0, 0, 0], [5, 5, 5]])
    pred = gt + [0.25, 0, 0]  # distance exactly 0.25 (a power-of-two fraction: exact in binary)
    assert score_points([pred], [gt], align="none", tau=0.25)["scene_fscore"] == 0.0
    assert score_points([pred], [gt], align="none", tau=0.2500001)["scene_fscore"] > 0.99


def test_icp_recovers_a_rigid_motion_where_upstream_icp_does_not(scene):
    centre = np.concatenate(scene).mean(0)
    rotation = Rotation.from_rotvec(
        0.3 * np.array([0.3, 1.0, 0.2]) / np.linalg.norm([0.3, 1.0, 0.2])
    ).as_matrix()
    moved = [(g - centre) @ rotation.T + centre + [0.03, -0.02, 0.01] for g in scene]
    none = score_points(moved, scene, align="none")
    fixed = score_points(moved, scene, align="icp")
    with pytest.warns(UserWarning, match="never to rank methods"):
        broken = score_points(moved, scene, align="icp_upstream")
    assert none["scene_fscore"] < 0.9
    assert fixed["scene_cd"] < 1e-12 and fixed["scene_fscore"] == pytest.approx(1, abs=1e-7)
    assert broken["scene_cd"] > 1e-3 and broken["scene_fscore"] < 0.97
    assert fixed["iou_bbox"] == none["iou_bbox"] == broken["iou_bbox"]  # IoU is never aligned


def test_kabsch_is_a_proper_rotation_and_upstream_is_the_transposed_svd():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(50, 3))
    true = Rotation.from_rotvec([0.4, -0.2, 0.9]).as_matrix()
    r, t = kabsch(src, src @ true.T + [1, 2, 3])
    np.testing.assert_allclose(r, true, atol=1e-12)
    np.testing.assert_allclose(t, [1, 2, 3], atol=1e-12)
    mirrored = src * [1, 1, -1]  # the best orthogonal map is a reflection: the guard keeps det = +1
    assert np.linalg.det(kabsch(src, mirrored)[0]) == pytest.approx(1.0)
    bad, _ = kabsch(src, src @ true.T, upstream=True)
    assert np.abs(bad - true).max() > 0.1 and np.linalg.det(bad) == pytest.approx(1.0)


def test_similarity_undoes_scale_and_translation(scene):
    centre = np.concatenate(scene).mean(0)
    scaled = [(g - centre) * 1.3 + centre + [0.1, 0, 0] for g in scene]
    assert score_points(scaled, scene, align="similarity")["scene_cd"] < 1e-20
    assert score_points(scaled, scene, align="none")["scene_cd"] > 1e-3


def test_missing_instance_is_charged(scene):
    full = score_points(scene, scene, align="none")
    s = score_points([scene[0], None, scene[2]], scene, align="none", missing_cd=9.0)
    assert s["object_fscore"] == pytest.approx(2 / 3, abs=1e-7)
    assert s["object_cd"] == pytest.approx(3.0, abs=1e-12) and s["iou_bbox"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["scene_cd_1"] < 1e-20 < s["scene_cd_2"] and s["scene_fscore"] < full["scene_fscore"]
    assert score_points([scene[0], None, scene[2]], scene, align="none")["object_cd"] == pytest.approx(
        MAX_OBJECT_CD / 3
    )
    extra = score_points(scene, scene, align="none", extra=[scene[0] + 5])  # far-away extra: precision drops
    assert (
        extra["scene_cd_2"] < 1e-20 < extra["scene_cd_1"] and extra["object_fscore"] == full["object_fscore"]
    )


@pytest.mark.parametrize("pred, gt, align, match", [
    ([np.full((4, 3), np.nan)], [np.zeros((4, 3))], "none", r"pred\[0\]: 4 points with NaN"),
    ([np.zeros((4, 2))], [np.zeros((4, 3))], "none", r"pred\[0\]: expected a non-empty \(N, 3\)"),
    ([np.zeros((4, 3))], [np.zeros((4, 3))] * 2, "none", "1 predicted instances for 2"),
    ([None], [np.zeros((4, 3))], "none", "no predicted instance"),
    ([np.zeros((4, 3))], [np.zeros((4, 3))], "rigid", "align must be one of"),
])
def test_bad_input_is_named(pred, gt, align, match):
    with pytest.raises(ValueError, match=match):
        score_points(pred, gt, align=align)


# ---------------------------------------------------------------------------------------- predictions
def _record(names: list[str]) -> SceneRecord:
    return SceneRecord("s0", tuple(names), tuple(), tuple())


def test_scene_file_nodes_are_matched_by_label_or_name(tmp_path, scene):
    mesh_scene = trimesh.Scene()
    for name, centre in [
        ("instance_1", (0, 0, 0)),
        ("chair", (1, 0, 0)),
        ("instance_9", (2, 0, 0)),
        ("lamp", (3, 0, 0)),
    ]:
        mesh_scene.add_geometry(
            trimesh.creation.box(extents=(0.2, 0.2, 0.2)).apply_translation(centre),
            geom_name=name,
            node_name=name,
        )
    path = tmp_path / "s0.glb"
    mesh_scene.export(path)
    truth = SceneTruth("s0", ["table", "chair"], [0, 1], scene[:2], ["lamp (empty mask)"])
    pred = predict_from_file(path, _record(["table", "chair", "lamp"]), truth, 100, 0)
    assert pred.points[0].mean(0) == pytest.approx([0, 0, 0], abs=0.03)  # instance_1 = object 0
    assert pred.points[1].mean(0) == pytest.approx([1, 0, 0], abs=0.03)  # by name
    assert list(pred.extra) == ["instance_9"] and pred.ignored == ["lamp"] and pred.missing(truth) == []
    again = predict_from_file(path, _record(["table", "chair", "lamp"]), truth, 100, 0)
    np.testing.assert_array_equal(again.points[0], pred.points[0])  # seeded


@pytest.mark.parametrize(
    "kind, match",
    [("garbage", "not a readable mesh file"), ("empty", "empty mesh"), ("nan", "NaN/inf vertices")],
)
def test_bad_scene_files(tmp_path, kind, match):
    path = tmp_path / "s0.glb"
    if kind == "garbage":
        path.write_bytes(b"this is not a glb")
    else:
        box = trimesh.creation.box()
        if kind == "nan":
            box.vertices[0] = np.nan
        else:
            box = trimesh.Trimesh(vertices=box.vertices, faces=np.zeros((1, 3), int))  # zero-area face
        trimesh.Scene({"instance_1": box}).export(path)
    with pytest.raises(EvalError, match=match):
        read_scene_meshes(path)


# ---------------------------------------------------------------------------------------- reports
def test_bootstrap_interval():
    assert bootstrap_ci([0.5]) == (0.5, 0.5) and bootstrap_ci([0.2, 0.2, 0.2]) == (0.2, 0.2)
    values = np.random.default_rng(0).normal(0.6, 0.1, 40)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high and high - low < 0.12
    assert bootstrap_ci(values) == (low, high)  # seeded


def _run(values: dict[str, float], align: str = "icp", failed: tuple = ()) -> dict:
    scenes = [
        {"scene_id": k, "status": "ok", "metrics": {"scene_fscore": v, "scene_cd": 1 - v}}
        for k, v in values.items()
    ]
    scenes += [{"scene_id": k, "status": "failed", "metrics": None, "error": "x"} for k in failed]
    return {"protocol": {"align": align}, "run": {}, "scenes": scenes}


def test_summary_counts_failed_scenes():
    s = summarise(_run({"a": 0.5, "b": 0.7}, failed=("c",))["scenes"])
    assert (s["scenes"], s["scored"], s["failed"]) == (3, 2, 1)
    assert s["metrics"]["scene_fscore"]["mean"] == pytest.approx(0.6)


def test_compare_is_paired_and_refuses_other_protocols():
    a = _run({"s1": 0.5, "s2": 0.6, "s3": 0.7, "s4": 0.1})
    b = _run({"s1": 0.6, "s2": 0.8, "s3": 0.6}, failed=("s4",))
    result = compare(a, b)
    f, cd = result["metrics"]["scene_fscore"], result["metrics"]["scene_cd"]
    assert result["paired_scenes"] == 3 and result["unpaired_scenes"] == ["s4"]
    assert f["mean_diff"] == pytest.approx(0.2 / 3) and (f["improved"], f["worse"]) == (2, 1)
    assert (cd["improved"], cd["worse"]) == (2, 1)  # lower CD is better
    assert f["ci95"][0] <= f["mean_diff"] <= f["ci95"][1]
    assert np.asarray(difference_image(result)).min() < 255
    with pytest.raises(EvalError, match="align differ"):
        compare(a, _run({"s1": 0.6}, align="none"))


def test_splat_draws_the_nearest_point_in_its_colour():
    camera = camera_record(Camera(elevation=0.0, azimuth=0.0), 1.0, 64, 64)  # looks along -z
    near, far = np.zeros((1, 3)) + [0, 0, 0.5], np.zeros((1, 3))
    image = splat([far, near], camera, 64)
    centre = image[32, 32].astype(int)
    assert (image.reshape(-1, 3) != 255).any(1).sum() == 1  # one pixel drawn
    assert np.abs(centre - instance_colours(2)[1] * 255).max() <= 1  # the near cloud (index 1) wins
    sheet = comparison_image([("s", None, [[near, far], [near, None]])], size=64)
    assert sheet.size == (128, 80)
    photo = Image.new("RGB", (32, 32), (255, 0, 0))
    sheet = comparison_image([("s", photo, [[near, far], [near, None], [None, far]])], ("gt", "A", "B"), size=64)
    assert sheet.size == (4 * 64, 80) and sheet.getpixel((10, 40)) == (255, 0, 0)  # the input comes first
