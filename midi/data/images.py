"""The one reader of scene images and instance id maps (numpy and PIL only).

Used by the data tools, training and inference alike, so a map gives the same instances in the
same order everywhere.

**Id maps.** Label images are read as raw values: the palette index of ``"P"``, the grey value of
``"L"``, the 16-bit value of ``"I;16"``/``"I"``. Colour-coded RGB(A) maps (one flat colour per
instance, black background) are decoded too: colours covering under 0.1 % of the image are
anti-aliased fringe and become background (with a note); if every remaining colour belongs to
:data:`BASIC_PALETTE` its label is its index there (red 1, green 2, blue 3, ...), otherwise labels
follow ascending luminance, ties broken by ``(R, G, B)``. Instances are listed by ascending label.
Lossy maps (JPEG, or colours with almost no solid area: interpolated, anti-aliased) are refused,
since their noise would read as extra instances. ``order="upstream"`` reproduces upstream's
script instead: the map converted to ``"L"`` and sorted by grey level (equal luminance merges).

**Images** are ``(H, W, 3)`` float32 in [0, 1]; transparency is composited on a background
(``rgba="upstream"`` drops alpha as upstream's ``convert("RGB")`` does). Id maps are written as
8-bit ``"L"`` PNGs, or 16-bit when a label exceeds 255, and only ever resized nearest-neighbour.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from midi.data.atomic import atomic_write
from midi.errors import DataError

Colour = tuple[float, float, float]

InstanceOrder = Literal["default", "upstream"]
WHITE: Colour = (1.0, 1.0, 1.0)
BACKGROUNDS: dict[str, Colour] = {"white": WHITE, "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}

# Black, the primaries and secondaries, then their half-intensity versions.
BASIC_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0), (128, 0, 128), (0, 128, 128),
)

# A colour-coded map with more colours than this is almost surely anti-aliased, not flat.
MAX_CODED_COLOURS = 256
FRINGE_FRACTION = 0.001  # RGB maps: colours covering less than 0.1 % of the image are fringe
SOLID_FRACTION = 0.1  # RGB maps: an instance colour with fewer solid pixels than this share is interpolated
SAVE_AS_PNG = "save the instance map as PNG (lossless, without anti-aliasing or resampling)"
LABEL_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "1", "LA", "PA", "La")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


@dataclass
class Instance:
    """One instance of an id map."""

    label: int  # its value in :attr:`IdMap.labels`
    key: str  # the label as text (``"3"``, or the colour ``"ff0000"`` for an RGB map); used for names
    pixels: int  # area in pixels
    name: str = ""  # node name (set by inference: ``instance_<key>`` unless a mapping names it)


@dataclass
class IdMap:
    """A decoded id map: labels ``(H, W)`` int32 (0 = background) and its instances by ascending label.

    ``kind`` is ``"palette"``, ``"grey"``, ``"rgb"`` or ``"upstream-grey"``; ``notes`` are one-line
    remarks for the user (ignored fringe colours, merged grey levels).
    """

    labels: np.ndarray
    instances: list[Instance]
    kind: str
    notes: list[str] = field(default_factory=list)


def parse_background(text: str | Sequence[float]) -> Colour:
    """Parses ``"white"``/``"black"``/``"gray"``, a grey level ``"0.5"``, ``"r,g,b"`` or a sequence, in [0, 1].

    Raises:
        ValueError: Unknown name or values outside [0, 1].
    """
    if isinstance(text, str) and text.lower() in BACKGROUNDS:
        return BACKGROUNDS[text.lower()]
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    values *= 3 if len(values) == 1 else 1
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"background must be a name, a grey level or r,g,b in [0, 1]: {text!r}")
    return tuple(values)


def open_image(path: str | Path) -> Image.Image:
    """Opens and fully decodes an image, so truncated or corrupt files fail here.

    Raises:
        DataError: missing, not a file, empty, truncated or undecodable (``str()`` starts with the path).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", path=path)
    try:
        image = Image.open(path)
        image.load()
    except Exception as exc:
        raise DataError(f"cannot read image ({type(exc).__name__}: {exc})", path=path) from None
    return image


def composite(array: np.ndarray, background: Colour) -> np.ndarray:
    """Composites an (H, W, 4) RGBA float image onto an RGB background (straight alpha): (H, W, 3) float32."""
    alpha = array[..., 3:4]
    return (array[..., :3] * alpha + np.asarray(background, np.float32) * (1.0 - alpha)).astype(np.float32)


def read_rgb(path: str | Path, background: Colour = WHITE, *,
             rgba: Literal["composite", "upstream"] = "composite") -> np.ndarray:
    """Reads a scene image as (H, W, 3) float32 RGB in [0, 1].

    Transparency is composited on ``background`` (``rgba="upstream"``: alpha is dropped, so
    transparent pixels keep their stored colour). 16-bit and float grey images are scaled to [0, 1].

    Raises:
        DataError: unreadable file.
    """
    image = open_image(path)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.asarray(image, np.float32)
        grey = array / (65535.0 if image.mode.startswith("I;16") else max(1.0, float(array.max(initial=0))))
        return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    has_alpha = image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
    if has_alpha and rgba == "composite":
        return composite(np.asarray(image.convert("RGBA"), np.float32) / 255.0, background)
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


def resize_rgb(rgb: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes (H, W, 3) floats in [0, 1] bicubically (PIL's default for RGB) to a square side or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    if rgb.shape[:2] == (height, width):
        return rgb.astype(np.float32, copy=False)
    resized = Image.fromarray(to_uint8(rgb)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.float32) / 255.0


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Converts [0, 1] floats to uint8 with rounding."""
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def read_id_map(path: str | Path, *, order: InstanceOrder = "default", min_pixels: int | None = None) -> IdMap:
    """Reads an instance id map (see the module docstring for formats and ``order``).

    ``min_pixels``: RGB maps: colours with fewer pixels are fringe (default: 0.1 % of the image area).

    Raises:
        DataError: unreadable, lossy or undecodable map, or an unsupported image mode.
    """
    image = open_image(path)
    if image.format in ("JPEG", "MPO"):  # its noise invents colours and grey levels: junk instances
        raise DataError(f"{image.format} is lossy, so its colours near every edge read as extra instances; "
                        f"{SAVE_AS_PNG}", path=path)
    if order == "upstream":
        return _upstream_id_map(image, Path(path))
    if order != "default":
        raise ValueError(f"instance order must be 'default' or 'upstream', got {order!r}")
    if image.mode in LABEL_MODES:
        array = np.asarray(image)
        labels = (array[..., 0] if array.ndim == 3 else array).astype(np.int32)
        return _label_id_map(labels, "palette" if image.mode in ("P", "PA") else "grey")
    if image.mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"))
        rgb = np.where(rgba[..., 3:4] > 0, rgba[..., :3], 0).astype(np.int64)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return _label_id_map(rgb[..., 0].astype(np.int32), "grey")  # a grey label map saved as RGB
        threshold = min_pixels if min_pixels is not None else max(1, math.ceil(FRINGE_FRACTION * rgb[..., 0].size))
        return _colour_id_map(rgb, threshold, Path(path))
    raise DataError(f"unsupported image mode {image.mode!r} for an instance map (use a palette, grey or RGB "
                    "image)", path=path)


def read_label_map(path: str | Path) -> np.ndarray:
    """The labels of :func:`read_id_map` (default order): (H, W) int32, 0 = background."""
    return read_id_map(path).labels


def _label_id_map(labels: np.ndarray, kind: str) -> IdMap:
    values, counts = np.unique(labels, return_counts=True)
    instances = [Instance(int(v), str(int(v)), int(c)) for v, c in zip(values, counts) if v != 0]
    return IdMap(labels, instances, kind)


def _colour_id_map(rgb: np.ndarray, threshold: int, path: Path) -> IdMap:
    # One integer per colour: a 1-D unique is far faster than a row-wise one on megapixel maps.
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    codes, inverse, counts = np.unique(code.ravel(), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    keep = (codes != 0) & (counts >= threshold)
    fringe = (codes != 0) & ~keep
    if keep.sum() > MAX_CODED_COLOURS:
        raise DataError(f"colour-coded id map has {int(keep.sum())} colours (anti-aliased?); {SAVE_AS_PNG}", path=path)
    # Colours made by interpolation (JPEG noise re-saved as PNG, anti-aliased or resized maps) are
    # speckles and edge lines: almost none of their pixels has 4 neighbours of the same colour.
    padded = np.pad(code, 1, mode="edge")
    solid = ((code == padded[:-2, 1:-1]) & (code == padded[2:, 1:-1]) & (code == padded[1:-1, :-2])
             & (code == padded[1:-1, 2:]))
    thin = keep & (np.bincount(inverse[solid.ravel()], minlength=len(codes)) < SOLID_FRACTION * counts)
    if thin.any():
        raise DataError(f"{int(thin.sum())} of {int(keep.sum())} instance colours (e.g. #{int(codes[thin][0]):06x}) "
                        f"have almost no solid area, so the map looks lossy or anti-aliased; {SAVE_AS_PNG}", path=path)
    colours = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=1)[keep]
    found = [tuple(int(v) for v in c) for c in colours]
    if all(c in BASIC_PALETTE for c in found):
        kept_labels = np.array([BASIC_PALETTE.index(c) for c in found], np.int32)
    else:  # ascending luminance, ties broken by (R, G, B)
        grey = colours.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        kept_labels = np.empty(len(colours), np.int32)
        kept_labels[np.lexsort((colours[:, 2], colours[:, 1], colours[:, 0], grey))] = np.arange(1, len(colours) + 1)
    lut = np.zeros(len(codes), np.int32)
    lut[keep] = kept_labels
    labels = lut[inverse].reshape(code.shape)
    instances = sorted((Instance(int(label), f"{int(c):06x}", int(n))
                        for label, c, n in zip(kept_labels, codes[keep], counts[keep])), key=lambda i: i.label)
    notes = []
    if fringe.any():
        notes.append(f"{path.name}: ignored {int(fringe.sum())} colour(s) with fewer than {threshold} pixels each "
                     f"({int(counts[fringe].sum())} pixels, anti-aliased fringe?); they count as background")
    return IdMap(labels, instances, "rgb", notes)


def _upstream_id_map(image: Image.Image, path: Path) -> IdMap:
    id_map = _label_id_map(np.asarray(image.convert("L")).astype(np.int32), "upstream-grey")
    if image.mode not in ("L", "1"):
        try:
            default = read_id_map(path, min_pixels=1)
        except DataError:
            return id_map
        if len(default.instances) > len(id_map.instances):
            id_map.notes.append(f"{path.name}: upstream order merges {len(default.instances)} labels into "
                                f"{len(id_map.instances)} grey levels (labels with equal luminance), as upstream does")
    return id_map


def resize_labels(labels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W) labels to a square side or (width, height), sampling pixel centres
    like PIL's NEAREST."""
    width, height = (size, size) if isinstance(size, int) else size
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def pad_to_square(array: np.ndarray, fill: float | Sequence[float]) -> np.ndarray:
    """Pads (H, W[, C]) symmetrically to a square with ``fill`` (a colour, or 0 for labels), keeping the aspect."""
    height, width = array.shape[:2]
    if height == width:
        return array
    side = max(height, width)
    out = np.full((side, side, *array.shape[2:]), fill, array.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = array
    return out


def upstream_padding(rgb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's ``--do-image-padding``, with its width/height swap fixed (same on square images).

    The canvas grows to 1.25x the instances' centred extent when they fill more than 80 % of a
    side, the image is pasted centred on white (labels on 0), then padded right/bottom to a square.
    """
    height, width = labels.shape
    rows, cols = np.nonzero(labels > 0)
    if rows.size == 0:
        return rgb, labels
    extent = max(max(abs(rows.max() - height // 2), abs(rows.min() - height // 2)) * 2,
                 max(abs(cols.max() - width // 2), abs(cols.min() - width // 2)) * 2)
    new_w = int(extent / 4 * 5) if extent > width * 0.8 else width
    new_h = int(extent / 4 * 5) if extent > height * 0.8 else height
    x0, y0 = (new_w - width) // 2, (new_h - height) // 2
    side = max(new_w, new_h)
    canvas = np.ones((side, side, 3), rgb.dtype)
    padded = np.zeros((side, side), labels.dtype)
    canvas[y0 : y0 + height, x0 : x0 + width] = rgb
    padded[y0 : y0 + height, x0 : x0 + width] = labels
    return canvas, padded


def instance_images(rgb: np.ndarray, labels: np.ndarray, instances: Sequence[int],
                    background: Colour = WHITE) -> tuple[np.ndarray, np.ndarray]:
    """The per-instance pipeline inputs: each instance (a label) alone on the background, and its mask.

    Returns:
        ``(N, H, W, 3)`` float32 images and ``(N, H, W)`` bool masks.
    """
    masks = labels[None] == np.asarray(instances, labels.dtype).reshape(-1, 1, 1)
    images = np.where(masks[..., None], rgb[None].astype(np.float32), np.asarray(background, np.float32))
    return images.astype(np.float32, copy=False), masks


def conditions_to_pil(images: np.ndarray, masks: np.ndarray,
                      scene: np.ndarray) -> tuple[list[Image.Image], list[Image.Image], Image.Image]:
    """The pipeline's PIL inputs: RGB instance images, ``"L"`` masks (0/255) and the RGB scene image."""
    pil_images = [Image.fromarray(to_uint8(image)) for image in images]
    pil_masks = [Image.fromarray(mask.astype(np.uint8) * 255, mode="L") for mask in masks]
    return pil_images, pil_masks, Image.fromarray(to_uint8(scene))


def labels_to_image(labels: np.ndarray) -> Image.Image:
    """Makes an id map PIL image: 8-bit ``"L"`` up to label 255, 16-bit ``"I;16"`` beyond.

    Raises:
        DataError: Negative labels or labels above 65535.
    """
    high = int(labels.max()) if labels.size else 0
    if int(labels.min(initial=0)) < 0 or high > 65535:
        raise DataError(f"id map labels must lie in [0, 65535], got max {high}")
    return Image.fromarray(labels.astype(np.uint8 if high <= 255 else np.uint16))


def save_png(path: str | Path, image: Image.Image) -> None:
    """Saves a PIL image as PNG atomically."""
    with atomic_write(path) as f:
        image.save(f, format="PNG")


def instance_colours(count: int) -> np.ndarray:
    """Distinct, fairly saturated colours (golden-ratio hues) for instances 0..count-1: (count, 3) float32."""
    colours = [colorsys.hsv_to_rgb((0.08 + 0.618033988749895 * k) % 1.0, 0.65, 0.75 if k % 2 else 0.9)
               for k in range(count)]
    return np.asarray(colours, np.float32).reshape(count, 3)


def colourise_labels(labels: np.ndarray, background: Colour = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Colours a label map for display, (H, W, 3) uint8, with :func:`instance_colours` (label k+1 -> colour k)."""
    count = int(labels.max(initial=0))
    lut = np.concatenate([np.asarray([background], np.float32), instance_colours(count)], axis=0)
    return to_uint8(lut[np.clip(labels, 0, count)])
