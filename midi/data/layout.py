"""The on-disk layout "midi-scenes" (version 1) and helpers to name its files.

Layout::

    <root>/
      manifest.json                 # written last; lists every finished scene and the splits
      scenes/<scene_id>/
        scene.json                  # written last inside the scene; its presence = scene finished
        surfaces/<object>.npy       # dict {"surface_points", "surface_normals"} (or .npz)
        views/<view>.png            # scene image (RGB)
        views/<view>_ids.png        # instance ids: 0 = background, k+1 = objects[k]

The 3D-Front layout of the MIDI authors is described in :mod:`midi.data.front3d`; its folder
and list names live here too, so that this module alone knows every on-disk layout (and
:func:`detect_layout` needs no import of the reader). Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from midi.errors import DataError

FORMAT = "midi-scenes"
VERSION = 1
MANIFEST = "manifest.json"
SCENE_JSON = "scene.json"
SCENES_DIR = "scenes"
SURFACES_DIR = "surfaces"
VIEWS_DIR = "views"
TMP_MARK = ".tmp-"
SPLITS = ("train", "val", "test")
FRONT3D = "3d-front"
RENDER_DIR = "3D-FRONT-RENDER"
SURFACE_DIR = "3D-FRONT-SURFACE"
LIST_PAIRS = (("midi_room_ids", "midi_furniture_ids"), ("valid_room_ids", "valid_furniture_ids"))
# Written last by ``prepare_data.py --export_midi``: the rooms' splits as index ranges, the room of
# every scene and the data config for upstream's loader (see midi.data.export_midi).
EXPORT_JSON = "midi_export.json"
EXPORT_CONFIG = "midi_data_config.yaml"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, fallback: str = "item") -> str:
    """Turns any text (a file stem, a node name, a room path...) into a safe file name (letters, digits, ``._-``),
    never empty (then ``fallback``) or hidden."""
    # ".tmp-" marks scenes being written; a scene id must never look like one.
    return _UNSAFE.sub("_", name).strip("._-").replace(TMP_MARK, "_tmp-") or fallback


def unique_names(names: Iterable[str]) -> list[str]:
    """Makes names unique (case-insensitively, for case-folding file systems) in order, repeats suffixed ``_2``...."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, k = name, 2
        while candidate.lower() in seen:
            candidate, k = f"{name}_{k}", k + 1
        seen.add(candidate.lower())
        out.append(candidate)
    return out


def inside(root: Path, name: str, listed_in: object) -> Path:
    """``root / name``, refusing a name that leaves ``root`` (``..``, an absolute path).

    Every path named by a manifest, an ``instances.json``, a 3D-Front list or a scene file goes
    through here, so a crafted list cannot make the tools read (or write) elsewhere. The test is
    lexical: symlinks inside the root (data kept on another disk) stay allowed.

    Raises:
        DataError: ``"<listed_in>: <name> leaves <root>"``.
    """
    base = os.path.normpath(root)
    path = os.path.normpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base or path == base:
        raise DataError(f"{listed_in}: {name!r} leaves {root} (names must stay inside it)")
    return Path(path)


def view_name(index: int) -> str:
    """Returns the name of view ``index`` (``view_00``, ``view_01``...)."""
    return f"view_{index:02d}"


def scene_dir(root: Path, scene_id: str) -> Path:
    """Returns ``<root>/scenes/<scene_id>``."""
    return Path(root) / SCENES_DIR / scene_id


def surface_path(scene: Path, object_name: str, surface_format: str = "npy") -> Path:
    """Returns the surface file of one object inside a scene folder."""
    return Path(scene) / SURFACES_DIR / f"{object_name}.{surface_format}"


def view_paths(scene: Path, view: str) -> tuple[Path, Path]:
    """Returns ``(image, id map)`` of one view inside a scene folder."""
    base = Path(scene) / VIEWS_DIR
    return base / f"{view}.png", base / f"{view}_ids.png"


def is_finished(scene: Path) -> bool:
    """True when the scene folder holds its ``scene.json`` (written last, so the scene is complete)."""
    return (Path(scene) / SCENE_JSON).is_file()


def is_tmp_name(name: str) -> bool:
    """True for the temporary names used while writing (never part of a dataset)."""
    return TMP_MARK in name


def read_json(path: Path) -> object:
    """Reads a JSON file (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def list_file(root: Path, stem: str) -> Path | None:
    """The 3D-Front list ``<root>/<stem>.json`` (or ``.txt``), None when there is none."""
    return next((root / f"{stem}{s}" for s in (".json", ".txt") if (root / f"{stem}{s}").is_file()), None)


def detect_layout(root: Path) -> str | None:
    """``"midi-scenes"`` (our manifest), ``"3d-front"`` (surface folder and a room list) or None."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return FORMAT
    if (root / SURFACE_DIR).is_dir() and any(list_file(root, rooms) for rooms, _ in LIST_PAIRS):
        return FRONT3D
    return None


def shard_of(scene_id: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) that prepares a scene: a stable hash of its id alone, so every
    machine of a sharded run agrees without coordination and a scene never changes shard when
    others are added (Python's ``hash`` is salted per process, crc32 is not)."""
    return zlib.crc32(scene_id.encode()) % num_shards


def assign_splits(scene_ids: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0,
                  existing: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Assigns scenes to train/val/test from a seeded hash of each id.

    The split of a new scene depends only on its id and the seed. With two or more scenes and
    ``val_fraction > 0`` at least one scene goes to val (the one with the smallest hash among the
    new train scenes). Scenes listed in ``existing`` (the splits of an earlier run) keep their
    split, so adding scenes in a later run never moves earlier ones (ids no longer present are dropped).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    kept: dict[str, str] = {}
    for name, ids in (existing or {}).items():
        for sid in ids if name in splits else ():
            kept.setdefault(sid, name)
    units = {}
    for sid in scene_ids:
        if sid in kept:
            splits[kept[sid]].append(sid)
        else:
            # A stable number in [0, 1) per scene, so a scene keeps its split across runs.
            units[sid] = zlib.crc32(f"{seed}:{sid}".encode()) / 2**32
    for sid, u in units.items():
        splits["test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"].append(sid)
    new_train = [sid for sid, u in units.items() if u >= test_fraction + val_fraction]
    if val_fraction > 0 and not splits["val"] and len(splits["train"]) >= 2 and new_train:
        pick = min(new_train, key=lambda s: units[s])
        splits["train"].remove(pick)
        splits["val"].append(pick)
    return {name: sorted(ids) for name, ids in splits.items()}
