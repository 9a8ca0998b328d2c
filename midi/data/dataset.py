"""The reading side used by training (numpy and PIL only, no torch).

:func:`open_dataset` indexes a dataset in either layout, our "midi-scenes" manifest or the 3D-Front
(MIDI) layout, into :class:`SceneRecord` objects; :func:`load_scene_sample` turns one record and
one view into a training sample (:class:`SceneSample`), deterministically for a given generator.

Example::

    records = open_dataset("data/my_scenes", split="train")
    rng = np.random.default_rng(0)
    sample = load_scene_sample(records[0], None, 20480, rng, image_size=512)
    sample.surfaces.shape  # (N, 20480, 6): xyz + normals per kept instance
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from midi.data import front3d, layout
from midi.data.images import (
    WHITE,
    Colour,
    instance_images,
    pad_to_square,
    read_label_map,
    read_rgb,
    resize_labels,
    resize_rgb,
)
from midi.data.surface_io import load_surface
from midi.errors import DataError

DEFAULT_MIN_MASK_FRACTION = 0.001  # MIDI's test config: masks with <= 0.1% of the pixels are dropped


@dataclass(frozen=True)
class SceneRecord:
    """One scene of a dataset, as paths only (cheap to build and to pickle into loader workers)."""

    scene_id: str  # scene id (``<house>-<room>`` for 3D-Front)
    object_names: tuple[str, ...]  # object names in id order (id map value k+1 = object k)
    surface_paths: tuple[Path, ...]  # one surface file per object
    views: tuple[tuple[Path, Path], ...]  # ``(scene image, id map)`` per view
    layout: str = layout.FORMAT  # ``"midi-scenes"`` or ``"3d-front"``


@dataclass
class SceneSample:
    """One training sample: a scene seen from one view, per kept instance."""

    scene_id: str  # scene id
    view_index: int  # index into ``record.views``
    surfaces: np.ndarray  # (N, P, 6) float32, xyz + normals in the scene's normalised frame
    # (N, H, W, 3) float32 in [0, 1]: the scene image with every pixel outside instance k set to the background colour
    instance_images: np.ndarray
    masks: np.ndarray  # (N, H, W) float32 in {0, 1}
    scene_image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    object_names: list[str]  # names of the N kept instances
    object_indices: list[int]  # their indices in ``record.object_names``
    # ``(name, reason)`` of instances left out (empty or too small mask)
    dropped: list[tuple[str, str]] = field(default_factory=list)

    num_instances = property(lambda self: len(self.object_names), doc="Number of kept instances N.")


def open_dataset(root: str | Path, split: str = "all") -> list[SceneRecord]:
    """Indexes the ``split`` (train, val, test or all) of a dataset, in manifest (or room list) order.

    ``root`` is a "midi-scenes" root (with ``manifest.json``) or a 3D-Front root (with
    ``3D-FRONT-SURFACE`` and ``midi_room_ids.json``/``valid_room_ids.json``).

    Raises:
        DataError: Unknown layout, unreadable manifest or unknown split.
    """
    root = Path(root)
    if split not in (*layout.SPLITS, "all"):
        raise DataError(f"unknown split {split!r} (train, val, test or all)")
    opener = {layout.FORMAT: _open_manifest, layout.FRONT3D: _open_front3d}.get(layout.detect_layout(root))
    if opener:
        return opener(root, split)
    raise DataError(f"{root}: neither a midi-scenes dataset (manifest.json) nor a 3D-Front root")


def read_manifest(root: str | Path) -> dict:
    """Reads and checks the format of ``<root>/manifest.json``.

    Raises:
        DataError: Missing or unreadable, another format, or a newer version.
    """
    path = Path(root) / layout.MANIFEST
    try:
        manifest = layout.read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != layout.FORMAT:
        raise DataError(f"{path}: not a {layout.FORMAT} manifest")
    if int(manifest.get("version", 0)) > layout.VERSION:
        raise DataError(f"{path}: version {manifest.get('version')} is newer than this reader ({layout.VERSION})")
    return manifest


def manifest_entries(manifest: dict, path: str | Path) -> list[dict]:
    """Returns the validated scene entries of a manifest (``id``, ``objects``, ``views``).

    Raises:
        DataError: ``"<path>: <problem>"`` for a malformed scene list or entry.
    """
    scenes = manifest.get("scenes", [])
    if not isinstance(scenes, list):
        raise DataError(f'{path}: "scenes" is not a list')
    for k, entry in enumerate(scenes):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise DataError(f'{path}: scene entry {k} has no "id"')
        for key in ("objects", "views"):
            value = entry.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(f'{path}: scene {entry["id"]}: "{key}" is not a list of names')
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DataError(f'{path}: "splits" is not a mapping of split name to scene ids')
    return scenes


def _open_manifest(root: Path, split: str) -> list[SceneRecord]:
    manifest, listing = read_manifest(root), root / layout.MANIFEST
    fmt = str(manifest.get("surface_format", "npy"))
    wanted = None if split == "all" else set(manifest.get("splits", {}).get(split, []))
    records = []
    for entry in manifest_entries(manifest, listing):  # every entry is checked, also those of other splits
        folder = layout.inside(root / layout.SCENES_DIR, entry["id"], listing)
        names = tuple(entry["objects"])
        surfaces = tuple(layout.inside(folder / layout.SURFACES_DIR, f"{n}.{fmt}", listing) for n in names)
        for view in entry["views"]:
            layout.inside(folder / layout.VIEWS_DIR, view, listing)
        views = tuple(layout.view_paths(folder, v) for v in entry["views"])
        if wanted is None or entry["id"] in wanted:
            records.append(SceneRecord(entry["id"], names, surfaces, views, layout.FORMAT))
    return records


def _open_front3d(root: Path, split: str) -> list[SceneRecord]:
    rooms = front3d.read_rooms(root)
    indices = range(len(rooms)) if split == "all" else front3d.room_splits(root, len(rooms))[split]
    return [SceneRecord(front3d.room_scene_id(room), tuple(names), tuple(front3d.surface_paths(root, room, names)),
                        tuple((img, idm) for img, idm, _ in front3d.room_views(root, room)), layout.FRONT3D)
            for room, names in (rooms[i] for i in indices)]


def read_view(image: Path, ids: Path, num_objects: int | None = None, image_size: int | None = None,
              background: Colour = WHITE) -> tuple[np.ndarray, np.ndarray]:
    """Reads one view, the same way for prepare, --check and training.

    The image is RGBA-composited on ``background``; with ``image_size`` both are padded to a square
    (image with the background, id map with 0) and resized (bicubic / nearest), which leaves square
    (prepared) views unstretched. With ``num_objects``, a label above it is refused (see :func:`check_labels`).

    Returns:
        ``(image (S, S, 3) float32 in [0, 1], labels (S, S) int32)``.

    Raises:
        DataError: Unreadable files, different sizes, or a label with no object.
    """
    rgb, labels = read_rgb(image, background), read_label_map(ids)
    if rgb.shape[:2] != labels.shape:
        raise DataError(f"{ids}: id map is {labels.shape[::-1]} but the image is {rgb.shape[1::-1]}")
    if num_objects is not None:
        check_labels(labels, num_objects, ids)
    if image_size is not None:
        rgb = resize_rgb(pad_to_square(rgb, background), image_size)
        labels = resize_labels(pad_to_square(labels, 0), image_size)
    return rgb, labels


def load_view(record: SceneRecord, view_index: int, image_size: int | None,
              background: Colour) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_view` of ``record.views[view_index]``, labels checked against the record's objects."""
    image, ids = record.views[view_index]
    return read_view(image, ids, len(record.object_names), image_size, background)


def check_labels(labels: np.ndarray, num_objects: int, where: object) -> None:
    """Refuses an id map with a label that has no object (the same message for --check and training).

    Raises:
        DataError: ``"<where>: labels [...] but the scene has N objects (labels 1..N)"``.
    """
    extra = np.setdiff1d(np.unique(labels), np.arange(num_objects + 1))
    if len(extra):
        shown = ", ".join(map(str, extra[:8])) + (f", ... ({len(extra)} in all)" if len(extra) > 8 else "")
        raise DataError(f"{where}: labels [{shown}] but the scene has {num_objects} objects (labels 1..{num_objects})")


def instance_masks(labels: np.ndarray, names: Sequence[str], min_mask_fraction: float
                   ) -> tuple[list[int], list[tuple[str, str]]]:
    """Selects the instances whose mask is larger than ``min_mask_fraction`` of the image.

    Returns ``(kept indices, [(name, reason) for dropped ones])``.
    """
    counts = np.bincount(labels.ravel().clip(0), minlength=len(names) + 1)
    limit = min_mask_fraction * labels.size
    kept, dropped = [], []
    for k, name in enumerate(names):
        pixels = int(counts[k + 1])
        if pixels == 0:
            dropped.append((name, "empty mask"))
        elif pixels <= limit:
            dropped.append((name, f"mask too small ({pixels} px <= {min_mask_fraction:g} of {labels.size})"))
        else:
            kept.append(k)
    return kept, dropped


def subsample_surface(path: Path, count: int, rng: np.random.Generator) -> np.ndarray:
    """Loads one surface file and draws ``count`` rows without replacement: (count, 6) float32 xyz + normals.

    Raises:
        DataError: Unreadable file or fewer than ``count`` points.
    """
    points, normals = load_surface(path)
    if len(points) < count:
        raise DataError(f"{path}: {len(points)} surface points, {count} requested")
    rows = rng.choice(len(points), size=count, replace=False)
    return np.concatenate([points[rows], normals[rows]], axis=1).astype(np.float32)


def load_scene_sample(record: SceneRecord, view_index: int | None, num_surface_points: int, rng: np.random.Generator,
                      *, image_size: int | None = None, background: Colour = WHITE,
                      min_mask_fraction: float = DEFAULT_MIN_MASK_FRACTION, surfaces: bool = True) -> SceneSample:
    """Builds one training sample from a scene and one of its views.

    Instances whose mask is empty or covers at most ``min_mask_fraction`` of the image are
    dropped together with their surface (listed in ``dropped``). The result depends only on the
    files and the state of ``rng`` (used for the view when ``view_index`` is None, then for the
    surface subsets in object order).

    Args:
        view_index: Index into ``record.views``; None draws one with ``rng``.
        num_surface_points: P, surface rows per instance (without replacement).
        image_size: Side of the square output images; None keeps the stored size.
        background: RGB in [0, 1] used for compositing and outside the instance masks.
        surfaces: False reads the view only (training with the VAE cache): ``surfaces`` is then
            (N, 0, 6) and ``rng`` is not used for surface subsets.

    Raises:
        DataError: No views, unreadable files, or no instance left.
    """
    if not record.views:
        raise DataError(f"{record.scene_id}: scene has no views")
    if view_index is None:
        view_index = int(rng.integers(len(record.views)))
    rgb, labels = load_view(record, view_index, image_size, background)
    kept, dropped = instance_masks(labels, record.object_names, min_mask_fraction)
    if not kept:
        raise DataError(f"{record.scene_id} view {view_index}: no instance left ({len(dropped)} dropped)")
    images, masks = instance_images(rgb, labels, [k + 1 for k in kept], background)  # (N, H, W, 3), (N, H, W)
    points = (np.stack([subsample_surface(record.surface_paths[k], num_surface_points, rng) for k in kept])
              if surfaces else np.zeros((len(kept), 0, 6), np.float32))
    return SceneSample(record.scene_id, view_index, points, images, masks.astype(np.float32), rgb,
                       [record.object_names[k] for k in kept], kept, dropped)
