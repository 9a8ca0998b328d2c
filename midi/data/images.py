"""Scene images and instance id maps (numpy and PIL only).

Id maps are read as raw pixel values: the palette index for ``"P"`` images, the grey value for
``"L"``, the 16-bit value for ``"I;16"``/``"I"``. Colour-coded RGB maps (one flat colour per
instance, black background) are decoded too: if every colour belongs to :data:`BASIC_PALETTE`
the label is its index there (the palette the MIDI example maps use), otherwise labels follow the
ascending grey level of the colours (the MIDI inference script's ordering). Id maps are written as
8-bit ``"L"`` PNGs, or 16-bit when a label exceeds 255, and only ever resized nearest-neighbour.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from midi.data.atomic import atomic_write
from midi.data.errors import DataError

Colour = tuple[float, float, float]

BACKGROUNDS: dict[str, Colour] = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}

# Black, the primaries and secondaries, then their half-intensity versions.
BASIC_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0), (128, 0, 128), (0, 128, 128),
)  # fmt: skip

# A colour-coded map with more colours than this is almost surely anti-aliased, not flat.
MAX_CODED_COLOURS = 256


def parse_background(text: str | Sequence[float]) -> Colour:
    """Parses a background colour: a name, a grey level, ``"r,g,b"`` in [0, 1], or a sequence.

    Args:
        text: ``"white"``, ``"black"``, ``"gray"``, ``"0.5"``, ``"1,1,1"`` or ``(1, 1, 1)``.

    Returns:
        An RGB triple in [0, 1].

    Raises:
        ValueError: Unknown name or values outside [0, 1].
    """
    if isinstance(text, str):
        if text.lower() in BACKGROUNDS:
            return BACKGROUNDS[text.lower()]
        values = [float(v) for v in text.split(",")]
    else:
        values = [float(v) for v in text]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"background must be a name, a grey level or r,g,b in [0, 1]: {text!r}")
    return (values[0], values[1], values[2])


def open_image(path: str | Path) -> Image.Image:
    """Opens and fully decodes an image, so truncated or corrupt files fail here.

    Raises:
        DataError: Missing, empty, truncated or undecodable file.
    """
    path = Path(path)
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return image


def composite(array: np.ndarray, background: Colour) -> np.ndarray:
    """Composites an RGBA float image onto a background colour (straight alpha).

    Args:
        array: (H, W, 4) in [0, 1].
        background: RGB in [0, 1].

    Returns:
        (H, W, 3) float32 in [0, 1].
    """
    alpha = array[..., 3:4]
    return (array[..., :3] * alpha + np.asarray(background, np.float32) * (1.0 - alpha)).astype(np.float32)


def image_to_rgb_float(image: Image.Image, background: Colour) -> np.ndarray:
    """Converts any PIL image to (H, W, 3) float32 RGB in [0, 1], compositing alpha on ``background``."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return composite(np.asarray(image.convert("RGBA"), np.float32) / 255.0, background)
    if image.mode in ("I;16", "I"):
        # 16-bit grey photos are rare; scale them to [0, 1] rather than clip.
        grey = np.asarray(image, np.float32) / (65535.0 if image.mode == "I;16" else max(1.0, np.max(image)))
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


def read_rgb(path: str | Path, background: Colour) -> np.ndarray:
    """Reads a scene image as (H, W, 3) float32 in [0, 1], RGBA composited on ``background``."""
    return image_to_rgb_float(open_image(path), background)


def resize_rgb(rgb: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes a float RGB image with bicubic filtering (PIL's default for RGB).

    Args:
        rgb: (H, W, 3) float in [0, 1].
        size: Side of the square output, or ``(width, height)``.

    Returns:
        (h, w, 3) float32 in [0, 1].
    """
    width, height = (size, size) if isinstance(size, int) else size
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb.astype(np.float32, copy=False)
    image = Image.fromarray(to_uint8(rgb))
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255.0


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Converts [0, 1] floats to uint8 with rounding."""
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def read_label_map(path: str | Path) -> np.ndarray:
    """Reads an instance id map as raw labels (see the module docstring for colour-coded maps).

    Args:
        path: The id map image.

    Returns:
        (H, W) int32 labels, 0 = background.

    Raises:
        DataError: Unreadable file or an undecodable colour-coded map.
    """
    image = open_image(path)
    if image.mode in ("P", "L", "I;16", "I;16B", "I;16L", "I", "1"):
        return np.asarray(image).astype(np.int32)
    if image.mode in ("LA", "La"):
        return np.asarray(image)[..., 0].astype(np.int32)
    if image.mode in ("RGB", "RGBA", "RGBX"):
        return colour_map_to_labels(np.asarray(image.convert("RGB")), Path(path))
    raise DataError(f"{path}: unsupported id map mode {image.mode}")


def colour_map_to_labels(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Decodes a colour-coded id map (flat colours, black background) into labels.

    Args:
        rgb: (H, W, 3) uint8.
        path: For error messages.

    Returns:
        (H, W) int32 labels.
    """
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].astype(np.int32)  # a grey label map stored as RGB
    # One integer per colour: a 1-D unique is far faster than a row-wise one on megapixel maps.
    keys = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    packed, inverse = np.unique(keys.ravel(), return_inverse=True)
    colours = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=1).astype(np.uint8)
    if len(colours) > MAX_CODED_COLOURS:
        raise DataError(f"{path}: colour-coded id map has {len(colours)} colours (anti-aliased?)")
    palette = {c: i for i, c in enumerate(BASIC_PALETTE)}
    found = [tuple(int(v) for v in c) for c in colours]
    if all(c in palette for c in found):
        lut = np.array([palette[c] for c in found], np.int32)
    else:
        lut = _grey_order_labels(colours)
    return lut[inverse.reshape(-1)].reshape(rgb.shape[:2])


def _grey_order_labels(colours: np.ndarray) -> np.ndarray:
    grey = colours.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    order = np.lexsort((colours[:, 2], colours[:, 1], colours[:, 0], grey))
    lut = np.empty(len(colours), np.int32)
    black_first = not np.any(colours[order[0]])
    lut[order] = np.arange(len(colours)) + (0 if black_first else 1)
    return lut


def resize_labels(labels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (sampling at pixel centres, like PIL's NEAREST).

    Args:
        labels: (H, W) integer labels.
        size: Side of the square output, or ``(width, height)``.

    Returns:
        (h, w) labels, same dtype.
    """
    width, height = (size, size) if isinstance(size, int) else size
    rows = np.minimum(
        ((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64), labels.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64), labels.shape[1] - 1
    )
    return labels[rows[:, None], cols[None, :]]


def pad_to_square(array: np.ndarray, fill: float | Sequence[float]) -> np.ndarray:
    """Pads an image or label map symmetrically to a square (keeps the aspect ratio on resize).

    Args:
        array: (H, W) or (H, W, C).
        fill: Value for the new pixels (a colour for images, 0 for labels).

    Returns:
        (S, S[, C]) with S = max(H, W).
    """
    height, width = array.shape[:2]
    side = max(height, width)
    if height == width:
        return array
    out = np.empty((side, side, *array.shape[2:]), array.dtype)
    out[...] = np.asarray(fill, array.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = array
    return out


def labels_to_image(labels: np.ndarray) -> Image.Image:
    """Makes an id map PIL image: 8-bit ``"L"`` up to label 255, 16-bit ``"I;16"`` beyond.

    Raises:
        DataError: Negative labels or labels above 65535.
    """
    high = int(labels.max()) if labels.size else 0
    if int(labels.min(initial=0)) < 0 or high > 65535:
        raise DataError(f"id map labels must lie in [0, 65535], got max {high}")
    if high <= 255:
        return Image.fromarray(labels.astype(np.uint8))
    return Image.fromarray(labels.astype(np.uint16))


def save_png(path: str | Path, image: Image.Image) -> None:
    """Saves a PIL image as PNG atomically."""
    with atomic_write(path) as f:
        image.save(f, format="PNG")


def instance_colours(count: int) -> np.ndarray:
    """Distinct, fairly saturated colours for instances 0..count-1 (golden-ratio hues).

    Args:
        count: Number of instances.

    Returns:
        (count, 3) float32 RGB in [0, 1].
    """
    colours = []
    for k in range(count):
        hue = (0.08 + 0.618033988749895 * k) % 1.0
        value = 0.9 if k % 2 == 0 else 0.75
        colours.append(colorsys.hsv_to_rgb(hue, 0.65, value))
    return np.asarray(colours, np.float32).reshape(count, 3)


def colourise_labels(labels: np.ndarray, background: Colour = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Colours a label map for display with :func:`instance_colours` (label k+1 -> colour k).

    Returns:
        (H, W, 3) uint8.
    """
    count = int(labels.max(initial=0))
    lut = np.concatenate([np.asarray([background], np.float32), instance_colours(count)], axis=0)
    return to_uint8(lut[np.clip(labels, 0, count)])
