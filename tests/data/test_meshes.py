"""Mesh loading over tests/data/meshes, surface sampling and joint normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from midi.data.meshes import (
    joint_normalization,
    load_instances,
    load_object,
    object_rng,
    sample_surface,
)
from midi.errors import DataError

MESHES = Path(__file__).parent / "meshes"

# file -> number of instances when loaded as a scene file (nodes/objects/bodies are instances)
LOADABLE = {
    "Duck.glb": 1,
    "box.obj": 1,
    "bunny.ply": 1,
    "chair_model.obj": 4,
    "featuretype.STL": 1,
    "multibody.stl": 2,
    "nested.glb": 3,
    "suzanne.ply": 1,
    "teapot.stl": 1,
    "two_objects.obj": 2,
}
BROKEN = {"empty.stl": "empty", "points_ascii.ply": "no faces"}


@pytest.mark.parametrize("name", sorted(LOADABLE))
def test_every_format_loads(name):
    instances, skipped = load_instances(MESHES / name)
    assert len(instances) == LOADABLE[name] and not skipped
    obj = load_object(MESHES / name)
    assert obj.mesh.area > 0
    assert len(obj.mesh.faces) == sum(len(i.mesh.faces) for i in instances)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_fail_with_reason(name):
    with pytest.raises(DataError, match=BROKEN[name]) as info:
        load_object(MESHES / name)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_unreadable_and_zero_byte_files(tmp_path):
    garbage = tmp_path / "garbage.glb"
    garbage.write_bytes(b"not a glb at all" * 4)
    with pytest.raises(DataError, match="cannot read mesh"):
        load_object(garbage)
    empty = tmp_path / "zero.obj"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_object(empty)


def test_scene_graph_transforms_are_applied():
    instances, _ = load_instances(MESHES / "nested.glb")
    scene = trimesh.load_scene(MESHES / "nested.glb")
    lo = np.min([i.mesh.bounds[0] for i in instances], axis=0)
    hi = np.max([i.mesh.bounds[1] for i in instances], axis=0)
    np.testing.assert_allclose([lo, hi], scene.bounds, atol=1e-6)
    raw = np.concatenate([g.vertices for g in scene.geometry.values()])
    assert not np.allclose([raw.min(0), raw.max(0)], scene.bounds, atol=1e-3)  # transforms matter here


def test_obj_objects_are_separate_instances():
    instances, _ = load_instances(MESHES / "two_objects.obj")
    assert sorted(i.name for i in instances) == ["cube", "tetra"]
    faces = {i.name: len(i.mesh.faces) for i in instances}
    assert faces == {"cube": 12, "tetra": 4}


@pytest.mark.parametrize("name", ["suzanne.ply", "nested.glb", "two_objects.obj"])
def test_samples_lie_on_surface_with_face_normals(name):
    mesh = load_object(MESHES / name).mesh
    points, normals = sample_surface(mesh, 2048, np.random.default_rng(1))
    closest, distance, face = trimesh.proximity.closest_point(mesh, points)
    scale = float(np.max(mesh.extents))
    assert distance.max() < 1e-5 * scale
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    # the normal is the normal of the face the point lies on (points on shared edges may report a neighbour)
    agree = np.einsum("ij,ij->i", normals, mesh.face_normals[face]) > 0.999
    assert agree.mean() > 0.98


def test_box_samples_are_analytic_and_area_weighted():
    mesh = trimesh.creation.box(extents=(4.0, 1.0, 1.0))
    points, normals = sample_surface(mesh, 20000, np.random.default_rng(0))
    on_face = np.abs(np.abs(points) - [2.0, 0.5, 0.5]).min(axis=1)
    assert on_face.max() < 1e-6
    # the four 4x1 sides hold 16 of the 18 units of area
    small_faces = np.abs(np.abs(normals[:, 0]) - 1.0) < 1e-6
    assert abs(small_faces.mean() - 2.0 / 18.0) < 0.01
    np.testing.assert_allclose(np.abs(normals).max(axis=1), 1.0, atol=1e-6)


def test_sampling_is_seeded():
    mesh = trimesh.creation.icosphere()
    a = sample_surface(mesh, 512, object_rng(3, "scene", 0))[0]
    b = sample_surface(mesh, 512, object_rng(3, "scene", 0))[0]
    c = sample_surface(mesh, 512, object_rng(3, "scene", 1))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_joint_normalisation_keeps_layout():
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    meshes = []
    for c in centres:
        box = trimesh.creation.box(extents=(1.0, 2.0, 1.0))
        box.apply_translation(c)
        meshes.append(box)
    norm = joint_normalization(meshes, bound=0.95)
    moved = norm.apply(centres)
    d = lambda x, i, j: np.linalg.norm(x[i] - x[j])  # noqa: E731
    assert d(moved, 0, 1) / d(moved, 0, 2) == pytest.approx(d(centres, 0, 1) / d(centres, 0, 2))
    all_vertices = norm.apply(np.concatenate([m.vertices for m in meshes]))
    assert np.abs(all_vertices).max() == pytest.approx(0.95)
    # one object normalised alone fills the box itself (single-object mode)
    alone = joint_normalization(meshes[1:2], bound=0.95)
    assert np.abs(alone.apply(meshes[1].vertices)).max() == pytest.approx(0.95)
    assert alone.scale > norm.scale


@pytest.mark.parametrize("mirror", [(-1, 1, 1), (1, -1, 1), (1, 1, 1)])
def test_mirrored_instance_keeps_outward_normals(tmp_path, mirror):
    # A node with a reflecting transform reverses the orientation; the loader must flip the
    # winding so the sampled normals of a closed convex mesh still point outward.
    scene = trimesh.Scene()
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    matrix = np.diag([*mirror, 1.0])
    matrix[:3, 3] = (2.0, 0.5, -1.0)
    scene.add_geometry(box, node_name="mirrored", transform=matrix)
    path = tmp_path / "mirrored.glb"
    scene.export(path)
    obj = load_object(path)
    points, normals = sample_surface(obj.mesh, 500, np.random.default_rng(0))
    centroid = obj.mesh.vertices.mean(axis=0)
    assert np.all(np.einsum("ij,ij->i", points - centroid, normals) > 0)
