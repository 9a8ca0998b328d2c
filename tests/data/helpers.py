"""Shared builders for the data tests (not a test module; tests/training imports it too)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from midi.data.jobs import PrepareOptions
from midi.data.prepare import PrepareReport, prepare_synthetic
from midi.data.surface_io import load_surface

DATA = Path(__file__).parent
MESHES = DATA / "meshes"
SCENES = DATA / "scenes"


def synthetic(root: Path, num_scenes: int, seed: int = 0, workers: int = 1, **options) -> PrepareReport:
    """:func:`prepare_synthetic` with the options as keywords (``image_size=32, num_samples=256``...)."""
    return prepare_synthetic(root, num_scenes, seed=seed, options=PrepareOptions(**options), workers=workers)


def box_at(center, extents=(1.0, 1.0, 1.0)) -> trimesh.Trimesh:
    """An axis-aligned box centred at ``center``."""
    box = trimesh.creation.box(extents=extents)
    box.apply_translation(center)
    return box


def write_boxes(folder: Path, centres: dict[str, tuple], suffix: str = ".obj") -> None:
    """Writes one box mesh file per name into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, centre in centres.items():
        box_at(centre).export(folder / f"{name}{suffix}")


def front3d_from_prepared(prepared: Path, root: Path, webp: bool = True) -> list[tuple[str, list[str]]]:
    """Re-packs a prepared midi-scenes dataset into the 3D-Front (MIDI) layout.

    Returns:
        ``[(room, [object names]), ...]`` as listed in ``midi_room_ids.json``.
    """
    manifest = json.loads((prepared / "manifest.json").read_text())
    rooms = []
    for i, entry in enumerate(manifest["scenes"]):
        room = f"house{i:02d}/room{i:02d}"
        names = [f"{n}_uuid{i}_1" for n in entry["objects"]]
        scene = prepared / "scenes" / entry["id"]
        surf = root / "3D-FRONT-SURFACE" / room
        render = root / "3D-FRONT-RENDER" / room
        surf.mkdir(parents=True)
        render.mkdir(parents=True)
        for old, new in zip(entry["objects"], names):
            points, normals = load_surface(scene / "surfaces" / f"{old}.npy")
            np.save(
                surf / f"{new}.npy", {"surface_points": points, "surface_normals": normals}, allow_pickle=True
            )
        for k, view in enumerate(entry["views"]):
            image = Image.open(scene / "views" / f"{view}.png")
            if webp:
                image.save(render / f"render_{k:04d}.webp", lossless=True)
            else:
                image.save(render / f"render_{k:04d}.png")
            shutil.copy(scene / "views" / f"{view}_ids.png", render / f"semantic_{k:04d}.png")
        rooms.append((room, names))
    (root / "midi_room_ids.json").write_text(json.dumps([r for r, _ in rooms]))
    (root / "midi_furniture_ids.json").write_text(json.dumps([n for _, n in rooms]))
    return rooms
