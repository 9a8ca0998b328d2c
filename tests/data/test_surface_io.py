"""Surface files: both formats round-trip, upstream-style files load, pickles cannot run code."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from midi.data.surface_io import load_surface, save_surface
from midi.errors import DataError


def _surface(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    normals = points / np.linalg.norm(points, axis=1, keepdims=True)
    return points, normals


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_roundtrip(tmp_path, suffix):
    points, normals = _surface()
    path = tmp_path / f"obj{suffix}"
    save_surface(path, points, normals)
    got_points, got_normals = load_surface(path)
    assert got_points.dtype == np.float32 and got_normals.dtype == np.float32
    np.testing.assert_array_equal(got_points, points)
    np.testing.assert_array_equal(got_normals, normals)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_reads_upstream_style_dict_npy(tmp_path):
    points, normals = _surface()
    path = tmp_path / "upstream.npy"
    np.save(
        path, {"surface_points": points.astype(np.float64), "surface_normals": normals}, allow_pickle=True
    )
    got_points, _ = load_surface(path)
    np.testing.assert_allclose(got_points, points, atol=1e-7)


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_reads_older_pickle_protocols(tmp_path, protocol):
    points, normals = _surface()
    array = np.empty((), dtype=object)
    array[()] = {"surface_points": points, "surface_normals": normals}
    path = tmp_path / "old.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(array, f, protocol=protocol)
    np.testing.assert_array_equal(load_surface(path)[0], points)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    array = np.empty((), dtype=object)
    array[()] = {"surface_points": _Evil(str(marker)), "surface_normals": np.zeros((2, 3), np.float32)}
    path = tmp_path / "evil.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError, match=r"refused to unpickle.*system"):
        load_surface(path)
    assert not marker.exists()


def test_non_dict_and_bad_shapes_are_refused(tmp_path):
    path = tmp_path / "list.npy"
    np.save(path, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):
        load_surface(path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, surface_points=np.zeros((4, 2)), surface_normals=np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"\(P, 3\)"):
        load_surface(bad)
    missing = tmp_path / "missing.npz"
    np.savez(missing, surface_points=np.zeros((4, 3)))
    with pytest.raises(DataError, match="missing"):
        load_surface(missing)


def test_trimesh_tracked_arrays_load_as_plain_arrays(tmp_path):
    # What trimesh-based pipelines write: sample_surface returns trimesh's TrackedArray (an
    # ndarray subclass), which np.save pickles by class name.
    import trimesh

    mesh = trimesh.creation.box()
    points, faces = trimesh.sample.sample_surface(mesh, 64, seed=0)
    path = tmp_path / "tracked.npy"
    normals = mesh.face_normals[faces]
    np.save(path, {"surface_points": points, "surface_normals": normals}, allow_pickle=True)
    assert b"TrackedArray" in path.read_bytes()
    got_points, got_normals = load_surface(path)
    assert type(got_points) is np.ndarray and type(got_normals) is np.ndarray
    np.testing.assert_array_equal(got_points, np.asarray(points, np.float32))
    np.testing.assert_array_equal(got_normals, np.asarray(normals, np.float32))


def test_refusal_says_how_to_convert(tmp_path):
    marker = tmp_path / "pwned"
    array = np.empty((), dtype=object)
    array[()] = {"surface_points": _Evil(str(marker)), "surface_normals": np.zeros((2, 3), np.float32)}
    path = tmp_path / "evil.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError, match=r"python -c .*np\.save") as info:
        load_surface(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
