"""Rendering (RGB + exact id map + recorded camera) and synthetic scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh

from midi.data.camera import Camera, project_points
from midi.data.images import read_label_map
from midi.data.render import render_scene
from midi.data.surface_io import load_surface
from midi.data.synthetic import footprint_radius, make_synthetic_scene
from tests.data.helpers import synthetic


def _two_objects() -> list[trimesh.Trimesh]:
    sphere = trimesh.creation.icosphere(radius=0.3)
    sphere.apply_translation([-0.5, 0.0, 0.0])
    box = trimesh.creation.box(extents=(0.4, 0.4, 0.4))
    box.apply_translation([0.5, 0.0, 0.0])
    return [sphere, box]


def test_id_map_rgb_and_camera_agree():
    background = (1.0, 1.0, 1.0)
    rendering = render_scene(_two_objects(), Camera(elevation=20, azimuth=0), 96, background)
    ids, rgb = rendering.ids, rendering.rgb
    assert set(np.unique(ids)) == {0, 1, 2}
    assert np.all(rgb[ids == 0] == 255)  # background exactly where no object was hit
    assert np.all(np.any(rgb[ids > 0] != 255, axis=1))
    uv, depth = project_points(rendering.camera, np.array([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0]]))
    assert np.all(depth > 0)
    assert [ids[int(v), int(u)] for u, v in uv] == [1, 2]
    # every visible vertex of the sphere projects into the image, left of the box's pixels
    cols_sphere = np.nonzero(ids == 1)[1]
    cols_box = np.nonzero(ids == 2)[1]
    assert cols_sphere.max() < cols_box.min()


def test_render_is_deterministic_and_sized():
    a = render_scene(_two_objects(), Camera(), 48)
    b = render_scene(_two_objects(), Camera(), 48)
    assert a.rgb.shape == (48, 48, 3) and a.ids.shape == (48, 48)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.ids, b.ids)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_synthetic_scene_on_floor_without_overlap(seed):
    scene = make_synthetic_scene(seed)
    assert 2 <= len(scene) <= 5
    centres = []
    for _, mesh in scene:
        assert mesh.bounds[0][1] == pytest.approx(0.0, abs=1e-9)  # standing on the floor
        lo, hi = mesh.bounds
        centres.append(((lo[0] + hi[0]) / 2, (lo[2] + hi[2]) / 2))
    for i in range(len(scene)):
        for j in range(i + 1, len(scene)):
            mi, mj = scene[i][1].copy(), scene[j][1].copy()
            mi.apply_translation([-centres[i][0], 0, -centres[i][1]])
            mj.apply_translation([-centres[j][0], 0, -centres[j][1]])
            gap = np.hypot(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1])
            assert gap >= footprint_radius(mi) + footprint_radius(mj)
    again = make_synthetic_scene(seed)
    assert [n for n, _ in again] == [n for n, _ in scene]
    np.testing.assert_array_equal(again[0][1].vertices, scene[0][1].vertices)


def test_synthetic_dataset_id_maps_match_objects(tmp_path):
    report = synthetic(tmp_path, 3, seed=5, image_size=64, num_samples=1024, views=2)
    assert len(report.written) == 3 and not report.skipped
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_surface_points"] == 1024 and manifest["image_size"] == 64
    for entry in manifest["scenes"]:
        scene = tmp_path / "scenes" / entry["id"]
        record = json.loads((scene / "scene.json").read_text())
        assert [o["name"] for o in record["objects"]] == entry["objects"]
        for view in entry["views"]:
            labels = read_label_map(scene / "views" / f"{view}_ids.png")
            assert labels.shape == (64, 64)
            assert set(np.unique(labels)) == set(range(len(entry["objects"]) + 1))
        for name in entry["objects"]:
            points, normals = load_surface(scene / "surfaces" / f"{name}.npy")
            assert points.shape == (1024, 3)
            assert np.abs(points).max() <= 0.95 + 1e-5
            np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)


def test_synthetic_dataset_is_reproducible(tmp_path):
    synthetic(tmp_path / "a", 2, seed=9, image_size=32, num_samples=256)
    synthetic(tmp_path / "b", 2, seed=9, image_size=32, num_samples=256)
    for path in sorted((tmp_path / "a").rglob("*")):
        if path.suffix in (".npy", ".png"):
            twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
            assert path.read_bytes() == twin.read_bytes(), path.name
