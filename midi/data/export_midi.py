"""Exporting a prepared dataset in the 3D-Front layout of the MIDI authors, for upstream's own loader.

``prepare_data.py --export_midi DATASET --output_dir OUT`` writes::

    OUT/
      midi_room_ids.json          # ["<house>/<room>", ...]: train rooms, then val, then test (written last)
      midi_furniture_ids.json     # [[object names of room 0], ...] in id order
      3D-FRONT-RENDER/<house>/<room>/render_0000.webp   # view k, lossless (the PNG's exact pixels)
      3D-FRONT-RENDER/<house>/<room>/semantic_0000.png  # its id map: 8-bit "L" (16-bit beyond 255 objects)
      3D-FRONT-SURFACE/<house>/<room>/<object>.npy      # {"surface_points", "surface_normals"}: (P, 3) float32
      midi_export.json            # splits as index ranges, the room of every scene, upstream's data config
      midi_data_config.yaml       # the ``data:`` keys for upstream's MultiObjectDataModule (absolute paths)

What upstream's ``MultiObjectDataset`` needs and this writes (checked against its source):
room paths joined to both roots; the furniture list parallel to the room list; images named
``<image_prefix>_<name>.<image_suffix>`` and id maps ``<idmap_prefix>_<name>.png`` in one folder
for every name of the config's ``image_names`` (so those are the view names every room has);
id maps read as raw pixel values (pixel k+1 = object k); surfaces loaded with
``np.load(allow_pickle=True).tolist()`` and subsampled to ``num_surface_samples_per_object`` rows
without replacement, which fails for objects with fewer points: the export refuses a dataset
(or skips a room) with fewer than ``min_points`` (20480, upstream's value) unless told the
smaller count that the config will then carry. Upstream splits by index slices
(``train_indices`` ...), not by our hashed splits, so the rooms are listed split by split and the
slices recorded; :func:`midi.data.front3d.room_splits` reads them back, so this project's reader
sees the same splits. A scene converted from 3D-Front keeps its room path; any other scene
becomes ``scenes/<scene id>`` (upstream then names it ``scenes-<scene id>``).

Every room folder is written under a temporary name and renamed when complete; the room list is
removed first and written last, so an interrupted export is never taken for a 3D-Front root. A
second export into the same folder replaces the first (rooms of the first that the second does
not list stay on disk, unused).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, features

from midi.data import front3d, layout
from midi.data.atomic import atomic_write, commit_dir, make_tmp_dir, remove_stale_tmp, write_json, write_text
from midi.data.dataset import SceneRecord, check_labels, open_dataset, read_manifest
from midi.data.images import labels_to_image, read_label_map, read_rgb, save_png, to_uint8
from midi.data.prepare import FATAL_ERRNOS, LOCK_NAME, output_lock, worker_init
from midi.data.surface_io import load_surface, save_surface
from midi.errors import DataError, UsageError

EXPORT_FORMAT = "midi-3d-front-export"
EXPORT_VERSION = 1
UPSTREAM_POINTS = 20480  # upstream's num_surface_samples_per_object (configs/test/3dfront.yaml)
EXPORT_HOUSE = "scenes"  # the <house> folder of scenes that did not come from 3D-Front
ROOMS_LIST, FURNITURE_LIST = (f"{stem}.json" for stem in layout.LIST_PAIRS[0])
IMAGE_PREFIX, IMAGE_SUFFIX = "render", "webp"
# Files an export (and --check of it) leaves in its folder; anything else means the folder is not ours.
OWN_NAMES = frozenset({layout.RENDER_DIR, layout.SURFACE_DIR, ROOMS_LIST, FURNITURE_LIST, layout.EXPORT_JSON,
                       layout.EXPORT_CONFIG, LOCK_NAME, "check_report.json", "contact_sheet.png"})


@dataclass
class ExportReport:
    """Summary of an export."""

    output_dir: str  # the export's root
    rooms: list[str] = field(default_factory=list)  # room paths written, in list order (train, val, test)
    splits: dict[str, list[int]] = field(default_factory=dict)  # ``[start, stop)`` room indices per split
    image_names: list[str] = field(default_factory=list)  # view names every room has (upstream's image_names)
    skipped: list[dict[str, str]] = field(default_factory=list)  # ``{"scene", "reason"}`` of rooms not exported
    warnings: list[str] = field(default_factory=list)  # one line each

    def to_json(self) -> dict[str, Any]:  # as returned to scripts
        return asdict(self)

    def summary(self) -> str:
        """A human-readable multi-line summary."""
        sizes = ", ".join(f"{name} {stop - start}" for name, (start, stop) in self.splits.items())
        lines = [f"exported {len(self.rooms)} room(s) ({sizes}) in upstream MIDI's 3D-Front layout to "
                 f"{self.output_dir}; {len(self.skipped)} skipped; upstream's data config: "
                 f"{self.output_dir}/{layout.EXPORT_CONFIG}"]
        lines += [f"  skipped {s['scene']}: {s['reason']}" for s in self.skipped]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def export_midi(dataset: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
                min_points: int = UPSTREAM_POINTS, workers: int = 1) -> ExportReport:
    """Exports a prepared "midi-scenes" dataset in upstream MIDI's 3D-Front layout (see the module docstring).

    ``min_points``: the ``num_surface_samples_per_object`` upstream's config will use; objects
    need at least that many surface points.

    Raises:
        UsageError: Not a prepared dataset, surfaces with fewer than ``min_points`` points, an
            output folder holding other files (or the dataset itself), no WebP support.
        DataError: An unreadable manifest.
    """
    dataset, output_dir = Path(dataset), Path(output_dir)
    if layout.detect_layout(dataset) != layout.FORMAT:
        raise UsageError(f"{dataset}: not a prepared dataset ({layout.MANIFEST}); prepare it first "
                         "(a 3D-Front root is already in this layout)")
    manifest = read_manifest(dataset)
    stored = int(manifest.get("num_surface_points", 0))
    if min_points < 1 or stored < min_points:
        raise UsageError(f"{dataset}: surfaces hold {stored} points, but upstream's loader draws "
                         f"num_surface_samples_per_object={min_points} without replacement and fails below that; "
                         f"prepare again with --num_samples {min_points}, or export with --num_samples {stored} "
                         f"(written into {layout.EXPORT_CONFIG} for upstream's config)")
    if not features.check("webp"):
        raise UsageError("this Pillow has no WebP support, which upstream's render_XXXX.webp images need")
    _check_output(dataset, output_dir)
    records = open_dataset(dataset, "all")
    ordered = [r for split in layout.SPLITS for r in _in_split(records, manifest, split)]
    rooms = room_paths(dataset, ordered)
    output_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(output_dir):
        for top in (layout.RENDER_DIR, layout.SURFACE_DIR):
            for house in (output_dir / top).glob("*"):
                remove_stale_tmp(house)
        # The room list goes first and comes back last: a half-done export is no 3D-Front root.
        for name in (ROOMS_LIST, layout.EXPORT_JSON):
            (output_dir / name).unlink(missing_ok=True)
        background = tuple(float(c) for c in manifest.get("background", (1.0, 1.0, 1.0)))
        tasks = [(r, room, output_dir, min_points, background) for r, room in zip(ordered, rooms)]
        report = ExportReport(str(output_dir))
        done: list[tuple[SceneRecord, str, int]] = []
        for (record, room, *_), outcome in zip(tasks, _run(tasks, workers)):
            if isinstance(outcome, str):
                report.skipped.append({"scene": record.scene_id, "reason": outcome})
            else:
                done.append((record, room, outcome))
        _write_lists(output_dir, dataset, manifest, done, min_points, report)
    return report


def _check_output(dataset: Path, output_dir: Path) -> None:
    if output_dir.resolve() == dataset.resolve():
        raise UsageError(f"{output_dir}: export into another folder than the dataset")
    foreign = sorted(p.name for p in output_dir.iterdir()
                     if p.name not in OWN_NAMES and not layout.is_tmp_name(p.name)) if output_dir.is_dir() else []
    if foreign:
        raise UsageError(f"{output_dir}: holds files that are not an export ({', '.join(foreign[:3])}); "
                         "export into an empty or new folder")


def _in_split(records: list[SceneRecord], manifest: dict[str, Any], split: str) -> list[SceneRecord]:
    wanted = set(manifest.get("splits", {}).get(split, []))
    return [r for r in records if r.scene_id in wanted]


def room_paths(dataset: Path, records: Sequence[SceneRecord]) -> list[str]:
    """The ``<house>/<room>`` of every scene: a 3D-Front scene's own room when it maps back to the
    scene id (upstream's id is ``<house>-<room>``), else ``scenes/<scene id>``."""
    rooms, seen = [], set()
    for record in records:
        try:
            source = layout.read_json(layout.scene_dir(dataset, record.scene_id) / layout.SCENE_JSON).get("source", {})
        except (OSError, ValueError, AttributeError):
            source = {}
        room = source.get("room") if isinstance(source, dict) and source.get("kind") == layout.FRONT3D else None
        parts = room.split("/") if isinstance(room, str) else []
        if not (len(parts) == 2 and all(p == layout.safe_name(p) for p in parts)
                and front3d.room_scene_id(room) == record.scene_id):
            room = f"{EXPORT_HOUSE}/{record.scene_id}"
        if room.lower() in seen:  # never two scenes in one folder (case-folding file systems included)
            room = f"{EXPORT_HOUSE}/{record.scene_id}"
        seen.add(room.lower())
        rooms.append(room)
    return rooms


def _run(tasks: list[tuple], workers: int) -> Iterator[int | str]:
    if workers <= 1 or len(tasks) <= 1:
        yield from (export_room(*t) for t in tasks)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=worker_init, initargs=(os.getpid(),)) as pool:
        yield from pool.map(export_room, *zip(*tasks), chunksize=4)


def export_room(record: SceneRecord, room: str, output_dir: Path, min_points: int,
                background: tuple[float, float, float]) -> int | str:
    """Writes one room's render and surface folders (worker entry point; never raises for bad data).

    Returns the number of views written, or the one-line reason the room was skipped.
    """
    temps: list[Path] = []
    try:
        try:
            render, surface = (_room_tmp(output_dir / top, room, temps) for top in (layout.RENDER_DIR,
                                                                                   layout.SURFACE_DIR))
            for name, path in zip(record.object_names, record.surface_paths):
                points, normals = load_surface(path)
                if len(points) < min_points:
                    raise DataError(f"{path}: {len(points)} surface points < {min_points}, which upstream's "
                                    "loader samples (num_surface_samples_per_object)")
                save_surface(surface / f"{name}.npy", points, normals)
            for k, (image, ids) in enumerate(record.views):
                _export_view(image, ids, render, f"{k:04d}", len(record.object_names), background)
            commit_dir(surface, output_dir / layout.SURFACE_DIR / room)
            commit_dir(render, output_dir / layout.RENDER_DIR / room)
        finally:
            for tmp in temps:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already when committed
        return len(record.views)
    except DataError as exc:
        return str(exc)
    except Exception as exc:  # one room's failure must not stop the export...
        if isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS:
            raise  # ...but a full or read-only disk does
        return str(DataError(f"{type(exc).__name__}: {exc}"))


def _room_tmp(top: Path, room: str, temps: list[Path]) -> Path:
    folder = layout.inside(top, room, "room path")
    temps.append(make_tmp_dir(folder.parent, folder.name))
    return temps[-1]


def _export_view(image: Path, ids: Path, render: Path, name: str, num_objects: int,
                 background: tuple[float, float, float]) -> None:
    rgb, labels = read_rgb(image, background), read_label_map(ids)
    if rgb.shape[:2] != labels.shape:
        raise DataError(f"{ids}: id map is {labels.shape[::-1]} but the image is {rgb.shape[1::-1]}")
    check_labels(labels, num_objects, ids)
    with atomic_write(render / f"{IMAGE_PREFIX}_{name}.{IMAGE_SUFFIX}") as f:
        # Lossless keeps the PNG's exact pixels; method 1 is about 4x faster than the default at the same size.
        Image.fromarray(to_uint8(rgb)).save(f, format="WEBP", lossless=True, method=1)
    # Re-encoded, not copied: upstream compares raw pixel values, so only a grey label map will do.
    save_png(render / f"{front3d.IDMAP_PREFIX}_{name}.png", labels_to_image(labels))


def upstream_config(output_dir: Path, splits: dict[str, list[int]], image_names: list[str], min_points: int,
                    image_size: int, background: Sequence[float]) -> dict[str, Any]:
    """The ``data:`` keys of upstream's ``MultiObjectDataModuleConfig`` for this export (absolute paths)."""
    root = output_dir.resolve()
    return {"scene_list": str(root / ROOMS_LIST), "object_list": str(root / FURNITURE_LIST),
            "surface_root_dir": str(root / layout.SURFACE_DIR), "surface_suffix": "npy",
            "num_surface_samples_per_object": min_points, "image_root_dir": str(root / layout.RENDER_DIR),
            "image_prefix": [IMAGE_PREFIX], "image_suffix": IMAGE_SUFFIX, "idmap_prefix": front3d.IDMAP_PREFIX,
            "idmap_suffix": "png", "background_color": [float(c) for c in background], "image_names": image_names,
            "height": image_size, "width": image_size, "skip_small_object": True, "small_image_proportion": 0.001,
            "train_indices": splits["train"], "val_indices": splits["val"], "test_indices": splits["test"]}


def _write_lists(output_dir: Path, dataset: Path, manifest: dict[str, Any], done: list[tuple[SceneRecord, str, int]],
                 min_points: int, report: ExportReport) -> None:
    wanted = {split: set(manifest.get("splits", {}).get(split, [])) for split in layout.SPLITS}
    start = 0
    for split in layout.SPLITS:
        count = sum(record.scene_id in wanted[split] for record, _, _ in done)
        report.splits[split] = [start, start + count]
        start += count
    views = sorted({n for _, _, n in done})
    report.image_names = [f"{k:04d}" for k in range(views[0] if views else 0)]
    if len(views) > 1:
        report.warnings.append(f"rooms have {views[0]} to {views[-1]} views; upstream's image_names must exist in "
                               f"every room, so its config lists the first {views[0]} (this project's reader uses all)")
    report.warnings += [f"the {split} split is empty (upstream's {split}_indices select no room)"
                        for split in ("val", "test") if report.splits[split][0] == report.splits[split][1]]
    report.rooms = [room for _, room, _ in done]
    config = upstream_config(output_dir, report.splits, report.image_names, min_points,
                             int(manifest.get("image_size", 512)), manifest.get("background", (1.0, 1.0, 1.0)))
    write_json(output_dir / FURNITURE_LIST, [list(record.object_names) for record, _, _ in done])
    write_text(output_dir / layout.EXPORT_CONFIG, "# upstream MIDI-3D: the data: section of its training config\n"
               + yaml.safe_dump({"data": config}, sort_keys=False))
    write_json(output_dir / layout.EXPORT_JSON, {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "source": str(dataset), "splits": report.splits,
        "rooms": [{"scene": r.scene_id, "room": room, "views": n} for r, room, n in done],
        "upstream_data_config": config})
    write_json(output_dir / ROOMS_LIST, report.rooms)  # last: now the folder is a 3D-Front root
