"""A scene's inputs: the RGB image and its instance map, read, checked, padded and named.

The image and the map are decoded by :mod:`midi.data.images` (the one reader, shared with the data
tools and training), so a map gives the same instances in the same order everywhere; that order
decides which noise row each instance gets. ``order="upstream"`` reproduces upstream's grey-level
order only: an RGBA image is still composited on white unless ``rgba="upstream"`` (CLI ``--rgba
upstream``) drops the alpha channel as upstream does.

Non-square images are centred on a white square (the processors centre-crop, and upstream's mask
channel is resized without the crop, so a non-square frame would lose and misalign instances);
``do_image_padding`` applies upstream's padding instead (width/height swap fixed). Node names are
``instance_<label>`` (label value, or the hex colour ``rrggbb`` for RGB maps), or the names given in
a JSON mapping ``{"<label>": "name"}``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from midi.config import RGB_SUFFIXES
from midi.data import images
from midi.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_MAX_INSTANCES = 16


@dataclass
class SceneInput:
    """A validated scene: RGB image and id map of the same (square) size."""

    rgb_path: Path
    seg_path: Path
    rgb: Image.Image
    segmentation: images.IdMap

    @property
    def names(self) -> list[str]:
        return [inst.name for inst in self.segmentation.instances]

    def conditions(self) -> tuple[list[Image.Image], list[Image.Image], Image.Image]:
        """The pipeline inputs: per instance the RGB with every other pixel white and its "L" mask
        (0/255), then the full RGB."""
        rgb = np.asarray(self.rgb, np.float32) / 255.0  # (H, W, 3)
        labels = [inst.label for inst in self.segmentation.instances]
        return images.conditions_to_pil(*images.instance_images(rgb, self.segmentation.labels, labels), rgb)


def read_label_names(path: str | os.PathLike) -> dict[str, str]:
    """Reads ``{"<label>": "name"}`` (label as in the map: ``"3"``, or ``"ff0000"``/``"#ff0000"``);
    InputError for an unreadable file or one that is not a JSON object of strings."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read label names ({type(exc).__name__}: {exc})", path=path) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise InputError('label names must be a JSON object {"<label>": "<non-empty name>"}', path=path)
    return {str(k).lower().lstrip("#"): v for k, v in data.items()}


def name_instances(instances: Sequence[images.Instance], names: dict[str, str] | None,
                   names_path: Path | None) -> None:
    """Sets each instance's name; raises InputError when two instances would share one."""
    seen: dict[str, str] = {}
    for inst in instances:
        inst.name = (names or {}).get(inst.key, f"instance_{inst.key}")
        if inst.name in seen:
            raise InputError(f"name {inst.name!r} given to labels {seen[inst.name]} and {inst.key}", path=names_path)
        seen[inst.name] = inst.key


@dataclass
class InputOptions:
    """How to read a scene's inputs (see :func:`prepare_scene`)."""

    order: images.InstanceOrder = "default"
    do_image_padding: bool = False
    max_instances: int = DEFAULT_MAX_INSTANCES
    min_pixels: int | None = None
    label_names: Path | None = None
    rgba: str = "white"  # "white": composite transparency on white; "upstream": drop alpha (upstream's convert)


def prepare_scene(rgb_path: str | os.PathLike, seg_path: str | os.PathLike, options: InputOptions,
                  log_notes: bool = True) -> SceneInput:
    """Reads, checks, pads and names one scene's inputs. Notes (ignored fringe colours, merged grey
    levels, square padding) are kept in ``scene.segmentation.notes`` and logged when ``log_notes``.

    Raises InputError for unreadable files, different sizes, no instance, too many instances, bad names.
    """
    rgb_path, seg_path = Path(rgb_path), Path(seg_path)
    rgb = images.read_rgb(rgb_path, rgba="upstream" if options.rgba == "upstream" else "composite")
    seg = images.read_id_map(seg_path, order=options.order, min_pixels=options.min_pixels)
    if rgb.shape[:2] != seg.labels.shape:
        (h, w), (rh, rw) = seg.labels.shape, rgb.shape[:2]
        raise InputError(f"size {w}x{h} differs from the image {rgb_path.name} ({rw}x{rh})", path=seg_path)
    if not seg.instances:
        raise InputError("no instance (every pixel is background: label 0 / black)", path=seg_path)
    if len(seg.instances) > options.max_instances:
        raise InputError(f"{len(seg.instances)} instances, more than --max_instances {options.max_instances}",
                         path=seg_path)
    names = read_label_names(options.label_names) if options.label_names else None
    name_instances(seg.instances, names, options.label_names)
    if options.do_image_padding:
        rgb, seg.labels = images.upstream_padding(rgb, seg.labels)
    elif rgb.shape[0] != rgb.shape[1]:
        seg.notes.append(f"{rgb_path.name}: {rgb.shape[1]}x{rgb.shape[0]} is not square; centred on a white square")
        rgb, seg.labels = images.pad_to_square(rgb, 1.0), images.pad_to_square(seg.labels, 0)
    for note in seg.notes if log_notes else ():
        logger.info("%s", note)
    return SceneInput(rgb_path, seg_path, Image.fromarray(images.to_uint8(rgb)), seg)


def find_pairs(input_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(name, X_rgb.*, X_seg.*)`` for every pair in a folder, sorted by name; InputError for a
    missing folder, an image without its seg map, or no pair at all."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError("input folder not found", path=folder)
    pairs = []
    for rgb in sorted(p for p in folder.iterdir() if p.stem.endswith("_rgb") and p.suffix.lower() in RGB_SUFFIXES):
        name = rgb.stem[: -len("_rgb")]
        segs = sorted(p for p in folder.glob(f"{glob.escape(name)}_seg.*") if p.suffix.lower() in RGB_SUFFIXES)
        if not segs:
            raise InputError(f"no matching {name}_seg.png", path=rgb)
        pairs.append((name, rgb, segs[0]))
    if not pairs:
        raise InputError("no X_rgb.png / X_seg.png pairs", path=folder)
    return pairs
