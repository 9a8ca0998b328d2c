"""The 3D-Front layout published by the MIDI authors (standard library only).

::

    <root>/
      midi_room_ids.json         # ["<house>/<room>", ...]   (or valid_room_ids.json; .txt: a room a line)
      midi_furniture_ids.json    # [[object names of room 0], ...]   (.txt: a line of comma-separated names a room)
      3D-FRONT-RENDER/<house>/<room>/render_0000.webp, rerender_0003.webp, semantic_0000.png ...
      3D-FRONT-SURFACE/<house>/<room>/<object>.npy
      3D-FRONT-SCENE/<house>/<room>/<object>.glb           (not needed here)

The id map of ``<prefix>_<name>.<ext>`` is ``semantic_<name>.png`` in the same folder; pixel
value k+1 is object k of the room's furniture list, 0 is background.

Splits (our choice, documented): the last ``min(1000, n // 10)`` rooms are test (the MIDI README
names the last 1000 rooms of ``midi_room_ids.json`` as its test set); the ``min(20, max(1, n // 20))``
rooms before them are val; the rest are train. Upstream's val overlaps train and test; ours does not.
A root written by ``prepare_data.py --export_midi`` records its splits as index ranges in
``midi_export.json`` (the ``train_indices``/``val_indices``/``test_indices`` of upstream's config);
those are used instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from midi.data.layout import (
    EXPORT_JSON,
    LIST_PAIRS,
    RENDER_DIR,
    SPLITS,
    SURFACE_DIR,
    inside,
    list_file,
    safe_name,
)
from midi.errors import DataError

IMAGE_PREFIXES = ("render", "rerender")
IDMAP_PREFIX = "semantic"
IMAGE_SUFFIXES = (".webp", ".png", ".jpg", ".jpeg")


def _read_list(path: Path, nested: bool = False) -> list:
    """Reads a list file: JSON, or ``.txt`` with one entry a line (in a ``nested`` furniture list: the
    comma-separated object names of one room). DataError ``"<file>: <problem>"``: invalid JSON or structure."""
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if nested:
            return [[name.strip() for name in line.split(",") if name.strip()] for line in lines]
        return lines
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path.name}: invalid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list")
    if nested and not all(isinstance(names, list) for names in data):
        raise DataError(f"{path.name}: expected a list of lists of object names (one list per room)")
    if not nested and not all(isinstance(room, str) for room in data):
        raise DataError(f"{path.name}: expected a list of room paths")
    return data


def read_rooms(root: Path) -> list[tuple[str, list[str]]]:
    """Reads the room list and the parallel furniture lists (the ``midi_*`` pair when present).

    Returns:
        ``[(room path "<house>/<room>", [object names]), ...]`` in file order.

    Raises:
        DataError: No lists, or lists of different lengths.
    """
    root = Path(root)
    for rooms_stem, furniture_stem in LIST_PAIRS:
        rooms_file, furniture_file = list_file(root, rooms_stem), list_file(root, furniture_stem)
        if rooms_file and furniture_file:
            rooms, furniture = _read_list(rooms_file), _read_list(furniture_file, nested=True)
            if len(rooms) != len(furniture):
                raise DataError(f"{rooms_file.name} lists {len(rooms)} rooms but {furniture_file.name} "
                                f"{len(furniture)}")
            out = [(str(r), [str(n) for n in names]) for r, names in zip(rooms, furniture)]
            for room, names in out:  # the lists name folders and files: none may leave the root
                for top in (RENDER_DIR, SURFACE_DIR):
                    inside(root / top, room, rooms_file.name)
                for name in names:
                    inside(root / SURFACE_DIR / room, f"{name}.npy", furniture_file.name)
            return out
    raise DataError(f"{root}: no room list with furniture list (midi_room_ids/midi_furniture_ids)")


def room_scene_id(room: str) -> str:
    """The scene id of a room, ``<house>-<room>`` (as upstream names samples)."""
    return safe_name(room.strip("/").replace("/", "-"), fallback="room")


def room_views(root: Path, room: str) -> list[tuple[Path, Path, str]]:
    """The views of a room with both an image and an id map: ``[(image, id map, "<prefix>_<name>"), ...]``,
    render views first, names sorted."""
    folder = Path(root) / RENDER_DIR / room
    if not folder.is_dir():
        return []
    files = {p.name: p for p in folder.iterdir()}
    views = []
    for prefix in IMAGE_PREFIXES:
        for name in sorted(files):
            stem, dot, suffix = name.rpartition(".")
            if not dot or not stem.startswith(prefix + "_") or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
                continue
            key = stem[len(prefix) + 1 :]
            # Upstream strips these variant tags when deriving the id map's name.
            plain = key.replace("_controlnet", "").replace("_inpaint", "")
            idmap = files.get(f"{IDMAP_PREFIX}_{plain}.png")
            if idmap is not None:
                views.append((files[name], idmap, f"{prefix}_{key}"))
    return views


def surface_paths(root: Path, room: str, names: list[str]) -> list[Path]:
    """Returns ``3D-FRONT-SURFACE/<room>/<name>.npy`` for every object."""
    return [Path(root) / SURFACE_DIR / room / f"{name}.npy" for name in names]


def split_indices(count: int) -> dict[str, range]:
    """Index ranges of the train/val/test rooms (see the module docstring)."""
    n_test = min(1000, count // 10)
    n_val = min(20, max(1, count // 20)) if count - n_test >= 2 else 0
    train_end = count - n_test - n_val
    return {"train": range(0, train_end), "val": range(train_end, train_end + n_val),
            "test": range(train_end + n_val, count)}


def room_splits(root: Path, count: int) -> dict[str, range]:
    """The train/val/test index ranges of a root's ``count`` rooms: those recorded in
    ``midi_export.json`` when the root is an export, else :func:`split_indices`.

    Raises:
        DataError: The recorded ranges do not cut ``0..count`` into consecutive train, val, test
            (the room list was edited after the export).
    """
    path = Path(root) / EXPORT_JSON
    if not path.is_file():
        return split_indices(count)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["splits"]
        ranges = {name: range(int(recorded[name][0]), int(recorded[name][1])) for name in SPLITS}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path}: unreadable splits ({type(exc).__name__}: {exc})") from exc
    bounds = [ranges["train"].start, ranges["train"].stop, ranges["val"].stop, ranges["test"].stop]
    if bounds[0] != 0 or ranges["val"].start != bounds[1] or ranges["test"].start != bounds[2] \
            or bounds[3] != count or bounds != sorted(bounds):
        raise DataError(f"{path}: its splits cover rooms {bounds[0]}..{bounds[3]} but the room list has {count}; "
                        "export again, or delete the file to use the default splits")
    return ranges
