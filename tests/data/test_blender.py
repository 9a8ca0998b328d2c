"""--renderer blender: textures, materials and exact id maps through bpy (skipped without bpy)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy import ndimage

from midi.data import blender
from midi.data.blender import BlenderSettings, find_python, render_blender, scene_objects, unavailable_note
from midi.data.camera import Camera
from midi.data.jobs import PrepareOptions, normalise_objects
from midi.data.meshes import load_object
from midi.data.prepare import prepare_dataset
from midi.data.render import render_scene
from tests.data.helpers import MESHES

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
FAST = BlenderSettings(samples=8, relight=False)
needs_bpy = pytest.mark.skipif(find_python() is None, reason="no bpy: install requirements-blender.txt "
                               "(or set MIDI_BLENDER_PYTHON to an interpreter that has it)")


def _checker_cube(path: Path, x: float = 0.0) -> None:
    """A cube at ``x`` whose faces carry an 8x8 black-and-white checker texture (GLB with UVs and an image)."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    corners = box.vertices[np.asarray(box.faces).ravel()]  # three own vertices per face: UVs per face
    axis = np.repeat(np.abs(box.face_normals).argmax(axis=1), 3)
    # Planar UVs from the two axes each face spans.
    uv = np.stack([np.where(axis == 0, corners[:, 1], corners[:, 0]),
                   np.where(axis == 2, corners[:, 1], corners[:, 2])], axis=1) + 0.5
    cube = trimesh.Trimesh(corners + [x, 0.0, 0.0], np.arange(len(corners)).reshape(-1, 3), process=False)
    board = ((np.indices((256, 256)) // 32).sum(axis=0) % 2 * 255).astype(np.uint8)
    cube.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(np.stack([board] * 3, axis=2)))
    cube.export(path)


def _red_obj(folder: Path, x: float = 0.0) -> None:
    """A cube OBJ at ``x`` whose only colour is in its MTL (Kd red)."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    lines = ["mtllib red.mtl", "usemtl red"] + [f"v {vx + x} {vy} {vz}" for vx, vy, vz in box.vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in box.faces]
    (folder / "red.obj").write_text("\n".join(lines) + "\n")
    (folder / "red.mtl").write_text("newmtl red\nKd 0.8 0.05 0.05\nKa 0 0 0\nKs 0 0 0\n")


def _scene(tmp_path: Path) -> Path:
    """Three objects side by side: a textured GLB, an OBJ + MTL, and trimesh's textured duck (~1.7 wide)."""
    folder = tmp_path / "room"
    folder.mkdir(parents=True, exist_ok=True)
    _checker_cube(folder / "checker.glb", -2.0)
    _red_obj(folder, 2.0)
    shutil.copy(MESHES / "Duck.glb", folder / "duck.glb")
    return folder


def _render_both(folder: Path, names: list[str], settings: BlenderSettings = FAST):
    """The Blender view and the embree rendering of the same objects and camera."""
    objects, norm = normalise_objects([load_object(folder / n) for n in names], 0.95)
    radius = float(max(np.linalg.norm(o.mesh.vertices, axis=1).max() for o in objects))
    sources = scene_objects("folder", folder, [o.source for o in objects], [o.mesh.bounds for o in objects])
    camera = Camera(elevation=25, azimuth=30)
    view = render_blender(sources, norm.to_json(), [camera], radius, SIZE, (1.0, 1.0, 1.0), settings)[0]
    flat = render_scene([o.mesh for o in objects], camera, SIZE)
    return view, flat


def _local_std(rgb: np.ndarray) -> np.ndarray:
    grey = rgb.astype(np.float64).mean(axis=2)
    mean = ndimage.uniform_filter(grey, 3, mode="nearest")
    return np.sqrt(np.maximum(ndimage.uniform_filter(grey**2, 3, mode="nearest") - mean**2, 0.0))


def _interior(ids: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one label only (not on an edge)."""
    lo = ndimage.minimum_filter(ids, 3, mode="nearest")
    hi = ndimage.maximum_filter(ids, 3, mode="nearest")
    return lo == hi


@needs_bpy
def test_id_map_is_the_embree_id_map_but_for_edges(tmp_path):
    view, flat = _render_both(_scene(tmp_path), ["duck.glb", "red.obj"])
    inside = _interior(flat.ids)
    assert set(np.unique(view.ids)) == {0, 1, 2}
    assert np.array_equal(view.ids[inside], flat.ids[inside])
    assert (view.ids == flat.ids).mean() > 0.97
    assert view.camera == flat.camera  # the very same camera record


@needs_bpy
def test_textured_glb_keeps_its_texture(tmp_path):
    view, flat = _render_both(_scene(tmp_path), ["checker.glb"])
    mask = _interior(flat.ids) & (flat.ids == 1)
    assert mask.sum() > 200
    # Colour variance within 3x3 windows: a flat-shaded face has none, the checker has it everywhere.
    textured, shaded = (np.median(_local_std(rgb)[mask]) for rgb in (view.rgb, flat.rgb))
    assert textured > 20 and textured > 10 * shaded


@needs_bpy
def test_obj_mtl_material_survives(tmp_path):
    view, flat = _render_both(_scene(tmp_path), ["red.obj"])
    red = view.rgb[_interior(flat.ids) & (flat.ids == 1)].astype(np.float64).mean(axis=0)
    assert red[0] > 2.0 * red[1] and red[0] > 2.0 * red[2]


@needs_bpy
def test_prepare_renders_relit_twins_and_reuses_one_process(tmp_path):
    inputs = tmp_path / "in"
    _scene(inputs)
    (inputs / "room" / "checker.glb").unlink()
    shutil.copytree(inputs / "room", inputs / "room2")
    options = PrepareOptions(num_samples=256, image_size=SIZE, renderer="blender",
                             blender=BlenderSettings(samples=4, relight=True))
    report = prepare_dataset(inputs, tmp_path / "out", options)
    assert report.written == ["room", "room2"] and not report.skipped
    record = json.loads((tmp_path / "out" / "scenes" / "room" / "scene.json").read_text())
    first, relit = record["views"]
    assert first["renderer"] == "blender" and relit["relit_of"] == first["name"]
    assert first["camera"] == relit["camera"] and first["instance_pixels"] == relit["instance_pixels"]
    rgb = [np.asarray(Image.open(tmp_path / "out" / "scenes" / "room" / v["image"])) for v in (first, relit)]
    assert np.abs(rgb[0].astype(int) - rgb[1].astype(int)).mean() > 5  # another lighting
    (process,) = blender._PROCESSES.values()
    pid = process.proc.pid
    _render_both(_scene(tmp_path / "again"), ["red.obj"], BlenderSettings(samples=4, relight=False))
    assert process.proc.pid == pid  # the same Blender process served every scene


@needs_bpy
def test_a_scene_blender_cannot_import_is_skipped_with_the_reason(tmp_path):
    scene = tmp_path / "in" / "room"
    scene.mkdir(parents=True)
    trimesh.creation.box().export(scene / "box.off")
    options = PrepareOptions(num_samples=256, image_size=SIZE, renderer="blender", blender=FAST)
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", options)
    assert report.skipped == [{"scene": "room", "reason": "box.off: Blender cannot import .off files "
                                                           "(use --renderer embree)"}]


def test_without_bpy_prepare_falls_back_to_embree_with_a_note(tmp_path, monkeypatch):
    monkeypatch.delenv(blender.ENV_PYTHON, raising=False)
    missing = tmp_path / "no-such-python"
    assert "not found; rendering with embree" in unavailable_note(BlenderSettings(python=str(missing)))
    here = unavailable_note(BlenderSettings(python=sys.executable))
    assert (here is None) == (importlib.util.find_spec("bpy") is not None)
    assert here is None or "cannot import bpy" in here
    scene = tmp_path / "in" / "room"
    scene.mkdir(parents=True)
    trimesh.creation.box().export(scene / "box.obj")
    cmd = [sys.executable, str(ROOT / "prepare_data.py"), "--input_dir", str(tmp_path / "in"), "--output_dir",
           str(tmp_path / "out"), "--renderer", "blender", "--blender_python", str(missing), "--image_size", "32",
           "--num_samples", "256", "--workers", "1", "--no_progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("note:")] == [
        f"note: --blender_python {missing}: not found; rendering with embree"]
    record = json.loads((tmp_path / "out" / "scenes" / "room" / "scene.json").read_text())
    assert "renderer" not in record["views"][0]  # embree's record
