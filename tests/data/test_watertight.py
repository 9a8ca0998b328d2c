"""Watertight shells of real broken meshes: closed, close to the input, inner faces gone, failures reported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from midi.data import jobs
from midi.data.check import check_dataset
from midi.data.jobs import PrepareOptions
from midi.data.meshes import load_object
from midi.data.prepare import prepare_dataset
from midi.data.surface_io import load_surface
from midi.data.watertight import WatertightError, make_watertight
from tests.data.helpers import MESHES

RESOLUTION = 48  # small grids keep the tests fast; the offset (one voxel) is then 2% of the object


def _chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, count: int = 4000) -> float:
    """Mean nearest distance both ways between surface samples, relative to a's largest extent."""
    pa = a.sample(count, seed=1)
    pb = b.sample(count, seed=2)
    extent = float(np.max(a.bounds[1] - a.bounds[0]))
    return (cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean()) / extent


@pytest.mark.parametrize("name", ["suzanne.ply", "chair_model.obj", "Duck.glb", "featuretype.STL", "teapot.stl",
                                  "box.obj"])
def test_broken_meshes_come_out_watertight_and_close(name):
    raw = load_object(MESHES / name).mesh
    assert not raw.is_watertight  # open, holes, unmerged seams: the case the conversion is for
    result = make_watertight(raw, RESOLUTION)
    assert result.mesh.is_watertight and result.mesh.volume > 0  # closed and oriented outward
    # One voxel of offset each way is 2/RESOLUTION of the extent; anything far beyond it is a bug.
    assert _chamfer(raw, result.mesh) < 3.0 / RESOLUTION
    assert result.seconds > 0 and result.info()["resolution"] == RESOLUTION


def test_separate_bodies_stay_separate_shells():
    raw = load_object(MESHES / "multibody.stl").mesh
    assert len(raw.split(only_watertight=False)) == 2
    shell = make_watertight(raw, RESOLUTION).mesh
    assert shell.is_watertight and len(shell.split(only_watertight=False)) == 2


def test_inner_faces_are_removed():
    # two_objects.obj: a unit cube and a tetrahedron in its corner, whose slanted face lies inside.
    raw = load_object(MESHES / "two_objects.obj").mesh
    shell = make_watertight(raw, RESOLUTION).mesh
    assert shell.is_watertight and len(shell.split(only_watertight=False)) == 1

    def depth(points):  # distance inside the unit cube's boundary (0 on its faces)
        return np.minimum(points, 1.0 - points).min(axis=1)

    assert depth(raw.sample(4000, seed=0)).max() > 0.25  # the raw samples include the inner face...
    assert depth(shell.sample(4000, seed=0)).max() < 0  # ...the shell's are all outside the cube's faces


def test_a_single_sheet_becomes_a_thin_closed_shell():
    sheet = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]], process=False)
    result = make_watertight(sheet, RESOLUTION)
    assert result.mesh.is_watertight
    thickness = np.ptp(result.mesh.vertices[:, 2])
    assert 1.5 * result.voxel < thickness < 2.5 * result.voxel  # two offsets of one voxel
    assert _chamfer(sheet, result.mesh) < 3.0 / RESOLUTION


def test_grid_aligned_faces_do_not_break_the_shell():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))  # faces on the grid's lattice
    for resolution in (16, 32):
        assert make_watertight(box, resolution).mesh.is_watertight


@pytest.mark.slow
def test_cad_part_at_the_default_resolution():
    # featuretype.STL at 256: axis-aligned faces a whole number of voxels from grid points put the
    # distance exactly at the level, where marching cubes emitted non-manifold edges (fixed by the
    # half-voxel grid shift and the tie nudge).
    raw = load_object(MESHES / "featuretype.STL").mesh
    result = make_watertight(raw)
    assert result.mesh.is_watertight and _chamfer(raw, result.mesh) < 3.0 / 256


def test_bad_inputs_fail_with_a_reason():
    flat = trimesh.Trimesh([[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 2]], process=False)
    with pytest.raises(WatertightError, match="no extent"):
        make_watertight(flat)
    with pytest.raises(ValueError, match="resolution"):
        make_watertight(trimesh.creation.box(), 4)


def _folder(tmp_path):
    scene = tmp_path / "in" / "room"
    scene.mkdir(parents=True)
    shutil.copy(MESHES / "suzanne.ply", scene / "monkey.ply")
    shutil.copy(MESHES / "two_objects.obj", scene / "blocks.obj")
    return tmp_path / "in"


def test_prepare_samples_the_shell_and_records_the_time(tmp_path):
    options = PrepareOptions(num_samples=2048, image_size=32, watertight=True, watertight_resolution=RESOLUTION)
    report = prepare_dataset(_folder(tmp_path), tmp_path / "out", options)
    assert report.written == ["room"] and not report.warnings
    scene = tmp_path / "out" / "scenes" / "room"
    record = json.loads((scene / "scene.json").read_text())
    for obj in record["objects"]:
        assert obj["watertight"]["resolution"] == RESOLUTION and obj["watertight"]["seconds"] > 0
    points, normals = load_surface(scene / "surfaces" / "blocks.npy")
    # In the normalised frame the cube spans [lo, hi]; no sample may lie on the inner face any more.
    lo, hi = points.min(axis=0), points.max(axis=0)
    assert np.minimum(points - lo, hi - points).min(axis=1).max() < 0.05 * np.ptp(points, axis=0).max()
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-3)
    check = check_dataset(tmp_path / "out", write=False)
    assert check.to_json()["watertight"]["objects"] == 2 and check.to_json()["watertight"]["failed"] == 0


def test_a_failed_conversion_is_reported_and_keeps_the_raw_surface(tmp_path, monkeypatch):
    def fail(mesh, resolution):
        raise WatertightError("the shell at resolution 48 is not watertight (3 faces)")

    monkeypatch.setattr(jobs, "make_watertight", fail)
    options = PrepareOptions(num_samples=512, image_size=32, watertight=True, watertight_resolution=RESOLUTION)
    report = prepare_dataset(_folder(tmp_path), tmp_path / "out", options)
    assert report.written == ["room"]
    assert sorted(w["object"] for w in report.warnings) == ["blocks", "monkey"]
    assert all(w["detail"].startswith("not watertight (the shell at resolution 48") for w in report.warnings)
    check = check_dataset(tmp_path / "out", write=False)
    kinds = [p.kind for p in check.warnings]
    assert kinds.count("not_watertight") == 2 and "repaired_mesh" not in kinds


def test_contact_sheet_shows_the_raw_sources_under_the_shells(tmp_path):
    options = PrepareOptions(num_samples=1024, image_size=32, watertight=True, watertight_resolution=RESOLUTION)
    prepare_dataset(_folder(tmp_path), tmp_path / "out", options)
    plain = PrepareOptions(num_samples=1024, image_size=32)
    prepare_dataset(tmp_path / "in", tmp_path / "plain", plain)
    sheets = {}
    for name in ("out", "plain"):
        report = check_dataset(tmp_path / name, tmp_path / f"report_{name}")
        sheets[name] = np.asarray(Image.open(report.files["contact_sheet"]))
    # One scene: two rows (shell, then the raw sources) with --watertight, one without.
    assert sheets["out"].shape[0] == 2 * sheets["plain"].shape[0]
    raw_row = sheets["out"][sheets["plain"].shape[0]:]
    assert raw_row[:, 2 * 160 : 3 * 160].std() > 5  # the raw sources' points were drawn
