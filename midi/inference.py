"""Inference driver: one RGB image + its instance map -> a 3D scene with one mesh per instance.

Stages (each a function here; ``inference_with_lora.py`` only wires them to the command line):

1. **Inputs** (cheap: numpy + PIL only, so bad input fails before the model is imported):
   :func:`read_rgb` composites RGBA on white (``rgba="upstream"``: drops alpha, as upstream's
   ``convert("RGB")`` does); :func:`read_segmentation` turns the instance map into
   integer labels (0 = background) and an ordered instance list; :func:`prepare_scene` checks
   sizes and counts, pads, and names the instances; :func:`split_instances` makes the per-instance
   pipeline inputs exactly as upstream's script does.
2. **Model** (:func:`build_pipeline`): the released folder or the in-process ``tiny`` pipeline,
   optionally with a LoRA (any format :func:`midi.lora.read_lora` detects), scaled through
   upstream's ``attention_kwargs["scale"]`` or merged.
3. **Generation** (:func:`generate_latents`, :func:`run_scene`): denoising, then surface
   extraction per instance (:mod:`midi.extraction`).
4. **Output** (:func:`save_outputs`): one scene file (format from the extension) with one node
   per instance named after its label, optional per-instance files and a preview PNG. The set is
   all-or-nothing: everything is encoded first, written under temporary names, then renamed; on
   any failure the files of this call are removed and :class:`OutputError` is raised. Temporary
   files that a killed run left behind are removed by the next write into the same folder.

Instance order (it decides which noise row each instance gets, so it matters for reproducibility):

- ``default``: label maps ("P", "L", 16-bit) by ascending label value (palette index / grey value);
  RGB colour-coded maps by ascending colour ``(R, G, B)`` (lexicographic). Black is the background.
- ``upstream``: the map converted to "L" and sorted by grey level, as upstream's script does
  (palette colours become luminance: blue 29 < red 76 < green 150 < yellow 226; colours with equal
  luminance merge; no fringe filtering). This reproduces upstream's instance order only: an RGBA
  image is still composited on white unless ``rgba="upstream"`` (CLI ``--rgba upstream``) drops the
  alpha channel as upstream does (transparent pixels then keep their stored, often black, colour).

Non-square images are centred on a white square (the processors centre-crop, and upstream's
mask channel is resized without the crop, so a non-square frame would lose and misalign
instances); ``do_image_padding`` applies upstream's padding instead (width/height swap fixed).

Node names are ``instance_<label>`` (label value, or the hex colour ``rrggbb`` for RGB maps), or
the names given in a JSON mapping ``{"<label>": "name"}``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

MESH_FORMATS = ("glb", "gltf", "obj", "ply", "stl")
SINGLE_MESH_FORMATS = ("ply", "stl")
DEFAULT_MODEL = "pretrained_weights/MIDI-3D"
MIDI_MI_BLOCKS = ["blocks.8", "blocks.9", "blocks.10", "blocks.11", "blocks.12"]
DEFAULT_MAX_INSTANCES = 16
FRINGE_FRACTION = 0.001  # RGB maps: colours covering less than 0.1 % of the image are fringe
SOLID_FRACTION = 0.1  # RGB maps: an instance colour with fewer solid pixels than this share is interpolated
SAVE_AS_PNG = "save the instance map as PNG (lossless, without anti-aliasing or resampling)"
RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LABEL_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "1")
DOWNLOAD_HINT = (
    "download it with `hf download VAST-AI/MIDI-3D --local-dir pretrained_weights/MIDI-3D`, "
    "or pass --pretrained_model_name_or_path tiny for a small random demo model"
)


class _FileError(Exception):
    @classmethod
    def at(cls, path: str | os.PathLike | None, problem: str):
        """Builds the error for ``path`` (or without a file when None)."""
        return cls(f"{path}: {problem}" if path is not None else problem)


class InputError(_FileError):
    """Bad user input; ``str()`` is ``"<file>: <problem>"`` (the CLI prints ``error: `` + it)."""


class OutputError(_FileError):
    """The outputs could not be written (none of the set is left); ``str()`` is ``"<file>: <problem>"``."""


class OutOfMemory(Exception):
    """The device (or host) ran out of memory; ``stage`` says where ("denoising", "surface extraction")."""

    def __init__(self, stage: str):
        super().__init__(f"out of memory during {stage}")
        self.stage = stage


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and CPU allocation failures (a RuntimeError saying so)."""
    if type(exc).__name__ in ("OutOfMemoryError", "MemoryError") or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "DefaultCPUAllocator" in text)


def one_line(message: str, limit: int = 400) -> str:
    """``message`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class Instance:
    """One instance of a segmentation map.

    Attributes:
        label: its value in :attr:`Segmentation.labels`.
        key: the label as text (``"3"``, or ``"ff0000"`` for an RGB map); used for names.
        pixels: area in pixels.
        name: node name (``instance_<key>`` unless a mapping names it).
    """

    label: int
    key: str
    pixels: int
    name: str = ""


@dataclass
class Segmentation:
    """A parsed instance map: labels ``(H, W)`` int64 (0 = background) and instances in order."""

    labels: np.ndarray
    instances: list[Instance]
    kind: str  # "palette" | "grey" | "rgb" | "upstream-grey"
    notes: list[str] = field(default_factory=list)


@dataclass
class SceneInput:
    """A validated scene: RGB image and segmentation of the same (square) size."""

    rgb_path: Path
    seg_path: Path
    rgb: Image.Image
    segmentation: Segmentation

    @property
    def names(self) -> list[str]:
        return [inst.name for inst in self.segmentation.instances]


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image.

    Raises:
        InputError: missing, unreadable or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError.at(path, "file not found" if not path.exists() else "not a file")
    try:
        image = Image.open(path)
        image.load()
    except Exception as exc:
        raise InputError.at(path, f"cannot read image ({type(exc).__name__}: {exc})") from None
    return image


def read_rgb(path: str | os.PathLike, rgba: str = "white") -> Image.Image:
    """Reads the scene image as RGB; transparency is composited on white (``rgba="upstream"``: alpha dropped)."""
    image = open_image(path)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") else max(1.0, float(array.max()))
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha and rgba == "white":
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def read_segmentation(path: str | os.PathLike, order: str = "default", min_pixels: int | None = None) -> Segmentation:
    """Parses an instance map (see the module docstring for formats and order).

    Args:
        path: the map: palette/grey/16-bit label image, or an RGB(A) colour-coded image.
        order: ``"default"`` or ``"upstream"``.
        min_pixels: RGB maps: colours with fewer pixels are anti-aliased fringe and ignored
            (default: 0.1 % of the image area).

    Raises:
        InputError: unreadable file or unsupported image mode.
    """
    image = open_image(path)
    if image.format in ("JPEG", "MPO"):  # its noise invents colours and grey levels: junk instances
        raise InputError.at(path, f"{image.format} is lossy, so its colours near every edge read as extra "
                                  f"instances; {SAVE_AS_PNG}")
    if order == "upstream":
        return _upstream_segmentation(image, path)
    if order != "default":
        raise ValueError(f"instance order must be 'default' or 'upstream', got {order!r}")
    if image.mode in LABEL_MODES or image.mode in ("LA", "PA", "La"):
        array = np.asarray(image)
        labels = (array[..., 0] if array.ndim == 3 else array).astype(np.int64)
        return _label_segmentation(labels, "palette" if image.mode in ("P", "PA") else "grey")
    if image.mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgba = np.asarray(image.convert("RGBA"))
        rgb = np.where(rgba[..., 3:4] > 0, rgba[..., :3], 0).astype(np.int64)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return _label_segmentation(rgb[..., 0], "grey")  # a grey label map saved as RGB
        threshold = min_pixels if min_pixels is not None else max(1, math.ceil(FRINGE_FRACTION * rgb[..., 0].size))
        return _colour_segmentation(rgb, threshold, Path(path))
    raise InputError.at(path, f"unsupported image mode {image.mode!r} for an instance map "
                              "(use a palette, grey or RGB image)")


def _label_segmentation(labels: np.ndarray, kind: str) -> Segmentation:
    values, counts = np.unique(labels, return_counts=True)
    instances = [Instance(int(v), str(int(v)), int(c)) for v, c in zip(values, counts) if v != 0]
    return Segmentation(labels, instances, kind)


def _colour_segmentation(rgb: np.ndarray, threshold: int, path: Path) -> Segmentation:
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(code.ravel(), return_inverse=True, return_counts=True)
    keep = (colours != 0) & (counts >= threshold)
    fringe = (colours != 0) & ~keep
    lut = np.zeros(len(colours), np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)  # ascending colour code = ascending (R, G, B)
    # Colours made by interpolation (JPEG noise re-saved as PNG, anti-aliased or resized maps) are
    # speckles and edge lines: almost none of their pixels has 4 neighbours of the same colour.
    padded = np.pad(code, 1, mode="edge")
    solid = ((code == padded[:-2, 1:-1]) & (code == padded[2:, 1:-1]) & (code == padded[1:-1, :-2])
             & (code == padded[1:-1, 2:]))  # (H, W)
    thin = keep & (np.bincount(inverse.ravel()[solid.ravel()], minlength=len(colours)) < SOLID_FRACTION * counts)
    if thin.any():
        raise InputError.at(path, f"{int(thin.sum())} of {int(keep.sum())} instance colours (e.g. "
                                  f"#{int(colours[thin][0]):06x}) have almost no solid area, so the map looks lossy "
                                  f"or anti-aliased; {SAVE_AS_PNG}")
    labels = lut[inverse].reshape(code.shape)
    instances = [Instance(i + 1, f"{int(c):06x}", int(n)) for i, (c, n) in enumerate(zip(colours[keep], counts[keep]))]
    notes = []
    if fringe.any():
        notes.append(f"{path.name}: ignored {int(fringe.sum())} colour(s) with fewer than {threshold} pixels each "
                     f"({int(counts[fringe].sum())} pixels, anti-aliased fringe?); they count as background")
    return Segmentation(labels, instances, "rgb", notes)


def _upstream_segmentation(image: Image.Image, path: str | os.PathLike) -> Segmentation:
    grey = np.asarray(image.convert("L")).astype(np.int64)
    segmentation = _label_segmentation(grey, "upstream-grey")
    if image.mode not in ("L", "1"):
        try:
            default = read_segmentation(path, "default", min_pixels=1)
        except InputError:
            return segmentation
        if len(default.instances) > len(segmentation.instances):
            segmentation.notes.append(
                f"{Path(path).name}: upstream order merges {len(default.instances)} labels into "
                f"{len(segmentation.instances)} grey levels (labels with equal luminance), as upstream does")
    return segmentation


def read_label_names(path: str | os.PathLike) -> dict[str, str]:
    """Reads ``{"<label>": "name"}`` (label as in the map: ``"3"``, or ``"ff0000"``/``"#ff0000"``).

    Raises:
        InputError: unreadable file, not a JSON object of strings.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError.at(path, f"cannot read label names ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise InputError.at(path, 'label names must be a JSON object {"<label>": "<non-empty name>"}')
    return {str(k).lower().lstrip("#"): v for k, v in data.items()}


def name_instances(instances: Sequence[Instance], names: dict[str, str] | None, names_path: Path | None) -> None:
    """Sets each instance's name; raises InputError when two instances would share one."""
    seen: dict[str, str] = {}
    for inst in instances:
        inst.name = (names or {}).get(inst.key, f"instance_{inst.key}")
        if inst.name in seen:
            raise InputError.at(names_path, f"name {inst.name!r} given to labels {seen[inst.name]} and {inst.key}")
        seen[inst.name] = inst.key


def upstream_padding(rgb: Image.Image, labels: np.ndarray) -> tuple[Image.Image, np.ndarray]:
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
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, (x0, y0))
    padded = np.zeros((side, side), labels.dtype)
    padded[y0 : y0 + height, x0 : x0 + width] = labels
    return canvas, padded


def pad_to_square(rgb: Image.Image, labels: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Centres a non-square image on a white square (labels on 0)."""
    height, width = labels.shape
    side = max(height, width)
    x0, y0 = (side - width) // 2, (side - height) // 2
    rgb = ImageOps.expand(rgb, border=(x0, y0, side - width - x0, side - height - y0), fill=(255, 255, 255))
    padded = np.zeros((side, side), labels.dtype)
    padded[y0 : y0 + height, x0 : x0 + width] = labels
    return rgb, padded


@dataclass
class InputOptions:
    """How to read a scene's inputs (see :func:`prepare_scene`)."""

    order: str = "default"
    do_image_padding: bool = False
    max_instances: int = DEFAULT_MAX_INSTANCES
    min_pixels: int | None = None
    label_names: Path | None = None
    rgba: str = "white"  # "white": composite transparency on white; "upstream": drop alpha (upstream's convert)


def prepare_scene(rgb_path: str | os.PathLike, seg_path: str | os.PathLike, options: InputOptions,
                  log_notes: bool = True) -> SceneInput:
    """Reads, checks, pads and names one scene's inputs.

    Notes (ignored fringe colours, merged grey levels, square padding) are kept in
    ``scene.segmentation.notes`` and logged when ``log_notes``.

    Raises:
        InputError: unreadable files, different sizes, no instance, too many instances, bad names.
    """
    rgb_path, seg_path = Path(rgb_path), Path(seg_path)
    rgb = read_rgb(rgb_path, options.rgba)
    seg = read_segmentation(seg_path, options.order, options.min_pixels)
    if rgb.size != seg.labels.shape[::-1]:
        w, h = seg.labels.shape[::-1]
        raise InputError.at(seg_path, f"size {w}x{h} differs from the image {rgb_path.name} ({rgb.size[0]}x{rgb.size[1]})")
    if not seg.instances:
        raise InputError.at(seg_path, "no instance (every pixel is background: label 0 / black)")
    if len(seg.instances) > options.max_instances:
        raise InputError.at(seg_path, f"{len(seg.instances)} instances, more than --max_instances {options.max_instances}")
    names = read_label_names(options.label_names) if options.label_names else None
    name_instances(seg.instances, names, options.label_names)
    if options.do_image_padding:
        rgb, seg.labels = upstream_padding(rgb, seg.labels)
    elif rgb.size[0] != rgb.size[1]:
        seg.notes.append(f"{rgb_path.name}: {rgb.size[0]}x{rgb.size[1]} is not square; centred on a white square")
        rgb, seg.labels = pad_to_square(rgb, seg.labels)
    for note in seg.notes if log_notes else ():
        logger.info("%s", note)
    return SceneInput(rgb_path, seg_path, rgb, seg)


def split_instances(scene: SceneInput) -> tuple[list[Image.Image], list[Image.Image], list[Image.Image]]:
    """Per instance: the RGB with every other pixel white, its "L" mask (0/255), the full RGB."""
    rgb = np.asarray(scene.rgb)
    images, masks = [], []
    for inst in scene.segmentation.instances:
        inside = scene.segmentation.labels == inst.label
        images.append(Image.fromarray(np.where(inside[..., None], rgb, 255).astype(np.uint8)))
        masks.append(Image.fromarray(inside.astype(np.uint8) * 255, mode="L"))
    return images, masks, [scene.rgb] * len(images)


# ---------------------------------------------------------------------------------------- model
@dataclass
class ModelOptions:
    """Which model to build (see :func:`build_pipeline`)."""

    model: str = DEFAULT_MODEL
    lora_path: Path | None = None
    lora_scale: float = 1.0
    merge_lora: bool = False
    device: str = "auto"
    dtype: str = "auto"
    lora_alpha: float | None = None  # for adapters that do not record it (upstream's custom-adapter files)
    mi_blocks: list[str] | None = None  # None: the adapter's, else the model's (default_mi_blocks)


@dataclass
class LoadedPipeline:
    """A ready pipeline and the LoRA scale to pass per call (None: no LoRA, or merged)."""

    pipe: Any
    lora_scale: float | None
    description: str


def check_model_path(model: str) -> None:
    """Cheap early check of ``--pretrained_model_name_or_path`` (before importing torch).

    Raises:
        InputError: the folder is missing and it is not a Hub repo id in the local cache.
    """
    if model == "tiny" or Path(model).is_dir():
        return
    if Path(model).exists():
        raise InputError.at(model, "not a folder (expected a MIDI-3D pipeline folder with model_index.json)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and model != DEFAULT_MODEL:
        from huggingface_hub.constants import HF_HUB_CACHE

        if (Path(HF_HUB_CACHE) / f"models--{model.replace('/', '--')}").is_dir():
            return
    raise InputError.at(model, f"model folder not found; {DOWNLOAD_HINT}")


def resolve_device_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    """``auto`` device: CUDA when available, else CPU; ``auto`` dtype: bfloat16 on CUDA, float32 otherwise."""
    import torch

    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError as exc:
        raise InputError(f"--device {device}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _load_base(model: str, dtype, tiny_seed: int) -> Any:
    if model == "tiny":
        from midi.testing import tiny_pipeline

        return tiny_pipeline(tiny_seed)
    from midi.pipelines.loading import PipelineLoadError
    from midi.pipelines.pipeline_midi import MIDIPipeline

    try:
        return MIDIPipeline.from_pretrained(model, torch_dtype=dtype)
    except PipelineLoadError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError.at(model, f"cannot load the model ({type(exc).__name__}: {exc})") from None


def default_mi_blocks(config) -> list[str]:
    """The multi-instance blocks of a base transformer: the release's 8-12 (of 21), the tiny model's.

    Raises:
        InputError: any other model (its blocks cannot be guessed: ``--mi_blocks`` names them).
    """
    from midi.testing import TINY_MI_BLOCKS, TINY_TRANSFORMER

    if config.get("num_layers") == 21:
        return list(MIDI_MI_BLOCKS)
    if all(config.get(k) == v for k, v in TINY_TRANSFORMER.items()):
        return list(TINY_MI_BLOCKS)
    raise InputError(f"the model's transformer has {config.get('num_layers')} layers; multi-instance blocks are "
                     "known only for the release (21 layers: blocks 8-12) and the tiny model: pass --mi_blocks")


def _read_adapter(path: Path):
    from midi.loaders.custom_adapter import AdapterError
    from midi.lora import read_lora

    try:
        return read_lora(path)
    except AdapterError as exc:
        raise InputError(str(exc)) from None


def _install_lora(pipe, adapter, mi_blocks: list[str], alpha: float | None) -> str:
    from midi.loaders.custom_adapter import AdapterError
    from midi.lora import apply_lora

    ranks = sorted({c["r"] for c in adapter.lora_configs.values()})
    if alpha is not None:
        for config in adapter.lora_configs.values():
            config["lora_alpha"] = alpha
    elif not adapter.alpha_known:
        logger.warning("LoRA %s: no midi_adapter.json, so lora_alpha is unknown; assuming lora_alpha = rank (%s); "
                       "pass --lora_alpha if it was trained with another alpha", adapter.source,
                       ", ".join(map(str, ranks)))
    try:
        apply_lora(pipe, adapter, mi_blocks)
    except AdapterError as exc:
        raise InputError(str(exc)) from None
    except (ValueError, KeyError, TypeError, OSError) as exc:  # e.g. PEFT refusing a config
        raise InputError.at(adapter.source, f"LoRA does not fit the model ({type(exc).__name__}: {exc})") from None
    alphas = sorted({c["lora_alpha"] for c in adapter.lora_configs.values()})
    return f"LoRA {adapter.source} ({adapter.format}, {', '.join(adapter.lora_configs)}, rank {ranks}, alpha {alphas})"


def _needs_cast(pipe, dtype) -> bool:
    """Whether any base (non-LoRA) weight of the three models is not in ``dtype``."""
    models = (pipe.transformer, pipe.vae, pipe.image_encoder_1, pipe.image_encoder_2)
    return any(p.dtype != dtype for m in models for n, p in m.named_parameters() if "lora_" not in n)


def build_pipeline(options: ModelOptions) -> LoadedPipeline:
    """Loads the model, installs multi-instance attention and the LoRA (optionally merged).

    Raises:
        InputError: the model folder or the LoRA cannot be loaded / does not fit, in words.
    """
    from midi.lora import merge_lora

    device, dtype = resolve_device_dtype(options.device, options.dtype)
    adapter = _read_adapter(Path(options.lora_path)) if options.lora_path is not None else None
    tiny_seed = adapter.tiny_seed if adapter is not None and adapter.tiny_seed is not None else 0
    pipe = _load_base(options.model, dtype, tiny_seed)
    description = f"model {options.model}" + (f" (seed {tiny_seed})" if options.model == "tiny" else "")
    recorded = adapter.mi_blocks if adapter is not None else None
    mi_blocks = list(options.mi_blocks or recorded or default_mi_blocks(pipe.transformer.config))
    if options.mi_blocks and recorded and list(recorded) != mi_blocks:
        logger.warning("--mi_blocks %s replaces the blocks the LoRA was trained with (%s)", mi_blocks, recorded)
    scale: float | None = None
    if adapter is None:
        try:
            pipe.init_custom_adapter(set_self_attn_module_names=mi_blocks, exact_module_names=True)
        except ValueError as exc:
            raise InputError(f"--mi_blocks: {exc}") from None
    else:
        description += ", " + _install_lora(pipe, adapter, mi_blocks, options.lora_alpha)
        scale = options.lora_scale
        if options.merge_lora:
            layers = merge_lora(pipe, options.lora_scale)
            description += f", merged at scale {options.lora_scale} ({layers} layers)"
            scale = None
        else:
            description += f", scale {options.lora_scale}"
    if _needs_cast(pipe, dtype):  # only when needed: diffusers warns on every dtype cast
        pipe.to(dtype=dtype)
    pipe.to(device=device)
    for model in (pipe.transformer, pipe.vae, pipe.image_encoder_1, pipe.image_encoder_2):
        model.eval()  # PEFT adds its LoRA modules (dropout included) in training mode
    return LoadedPipeline(pipe, scale, description + f", {device} {str(dtype).removeprefix('torch.')}")


# ---------------------------------------------------------------------------------------- generation
@dataclass
class GenerationOptions:
    """Denoising and extraction settings (``extraction`` is a :class:`midi.extraction.ExtractionConfig`)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    seed: int = 42
    extraction: Any = None
    progress: bool = True


@dataclass
class SceneResult:
    """Everything :func:`save_outputs` needs, plus timings and decoder query counts."""

    scene: SceneInput
    surfaces: list  # midi.extraction.Surface, one per instance, in instance order
    denoise_seconds: float
    extract_seconds: float

    @property
    def queries(self) -> int:
        return sum(s.queries for s in self.surfaces)

    @property
    def meshes(self) -> list[tuple[int, str, Any]]:
        """``(instance index, name, mesh)`` for the instances that have a surface."""
        return [(i, n, s.mesh) for i, (n, s) in enumerate(zip(self.scene.names, self.surfaces)) if s.mesh is not None]


def _set_encoder_lora_scale(pipe, scale: float | None, undo: bool = False) -> None:
    """The image encoders get the LoRA scale directly (attention_kwargs only reaches the transformer)."""
    if scale is None or scale == 1.0:
        return
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    for model in (pipe.image_encoder_1, pipe.image_encoder_2):
        if getattr(model, "peft_config", None):
            (unscale_lora_layers if undo else scale_lora_layers)(model, scale)


def generate_latents(loaded: LoadedPipeline, scene: SceneInput, options: GenerationOptions):
    """Runs the denoising loop for all instances of ``scene`` together; returns latents ``(N, T, C)``."""
    import torch

    pipe = loaded.pipe
    images, masks, scenes = split_instances(scene)
    attention_kwargs: dict[str, Any] = {"num_instances": len(images)}
    if loaded.lora_scale is not None:
        attention_kwargs["scale"] = loaded.lora_scale
    generator = torch.Generator(device=pipe.device).manual_seed(options.seed) if options.seed >= 0 else None
    pipe.set_progress_bar_config(desc="denoising", disable=not options.progress, leave=False)
    _set_encoder_lora_scale(pipe, loaded.lora_scale)
    try:
        out = pipe(image=images, mask=masks, image_scene=scenes, num_inference_steps=options.num_inference_steps,
                   guidance_scale=options.guidance_scale, generator=generator, attention_kwargs=attention_kwargs,
                   output_type="latent")
    finally:
        _set_encoder_lora_scale(pipe, loaded.lora_scale, undo=True)
    return out.samples


def run_scene(loaded: LoadedPipeline, scene: SceneInput, options: GenerationOptions) -> SceneResult:
    """Denoises and extracts one mesh per instance; instances without surface are logged, not fatal.

    Raises:
        OutOfMemory: the device or host ran out of memory (``stage`` names the step).
    """
    from tqdm.auto import tqdm

    from midi.extraction import ExtractionConfig, extract_surfaces

    config = options.extraction or ExtractionConfig()
    start = time.perf_counter()
    stage = "denoising"

    def progress(items):
        return tqdm(items, desc=f"extracting ({config.method})", unit="instance", disable=not options.progress, leave=False)

    try:
        latents = generate_latents(loaded, scene, options)
        denoised = time.perf_counter()
        stage = "surface extraction"
        surfaces = extract_surfaces(loaded.pipe, latents, config, progress=progress)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(stage) from exc
    result = SceneResult(scene, surfaces, denoised - start, time.perf_counter() - denoised)
    for name, surface in zip(scene.names, surfaces):
        if surface.mesh is None:
            logger.warning("%s: %s", name, surface.problem)
        else:
            logger.info("%s: %d vertices, %d faces (%s decoder queries, %.2f s)", name, len(surface.mesh.vertices),
                        len(surface.mesh.faces), f"{surface.queries:,}", surface.seconds)
    return result


# ---------------------------------------------------------------------------------------- output
def output_format(path: str | os.PathLike) -> str:
    """The mesh format named by ``path``'s extension.

    Raises:
        InputError: not one of :data:`MESH_FORMATS`.
    """
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in MESH_FORMATS:
        raise InputError.at(path, f"unsupported output format {('.' + ext) if ext else '(no extension)'}; "
                                  f"use one of {', '.join('.' + f for f in MESH_FORMATS)}")
    return ext


def write_all_or_nothing(files: Sequence[tuple[Path, bytes]]) -> None:
    """Writes every ``(path, data)`` under a temporary sibling, then renames them all.

    On any failure the temporary files and the files already renamed by this call are removed
    (an older file that one of them replaced is lost too), so no partial set is left.

    Raises:
        OSError: the first write or rename that failed, with ``filename`` the final path.
    """
    remove_stale_temps({path.parent for path, _ in files})
    temps = [path.with_name(f".{path.name}.tmp-{os.getpid()}") for path, _ in files]
    renamed: list[Path] = []
    current = None
    try:
        for (current, data), tmp in zip(files, temps):
            current.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        for (current, _), tmp in zip(files, temps):
            os.replace(tmp, current)
            renamed.append(current)
    except BaseException as exc:
        for leftover in temps + renamed:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:  # e.g. the folder itself is unusable: nothing was written there
                pass
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror or str(exc), str(current)) from exc
        raise


def remove_stale_temps(folders) -> None:
    """Removes the ``.<name>.tmp-<pid>`` files that a killed run (pid no longer alive) left in ``folders``.

    A kill between the renames of :func:`write_all_or_nothing` leaves the set partial: each removed
    file is named in a warning, with the output it stood for (rerun that scene).
    """
    import psutil

    for folder in folders:
        for tmp in folder.glob(".*.tmp-*") if folder.is_dir() else ():
            match = re.fullmatch(r"\.(.+)\.tmp-(\d+)", tmp.name)
            if match and tmp.is_file() and not psutil.pid_exists(int(match[2])):
                tmp.unlink(missing_ok=True)
                logger.warning("%s: removed a temporary file of an interrupted run (pid %s); %s may be missing or "
                               "incomplete: rerun that scene", tmp, match[2], folder / match[1])


def instance_colours(count: int) -> np.ndarray:
    """``(count, 4)`` uint8 RGBA colours (the data tools' palette), instance k -> colour k."""
    from midi.data.images import instance_colours as palette

    rgb = np.clip(np.rint(palette(count) * 255), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((count, 1), 255, np.uint8)], axis=1)


def build_trimesh_scene(result: SceneResult):
    """A ``trimesh.Scene`` with one node (and geometry) per meshed instance, named after it."""
    import trimesh

    colours = instance_colours(len(result.surfaces))
    scene = trimesh.Scene()
    for index, name, mesh in result.meshes:
        mesh = mesh.copy()
        mesh.visual.vertex_colors = colours[index]
        scene.add_geometry(mesh, geom_name=name, node_name=name)
    return scene


def export_bytes(scene, fmt: str) -> bytes:
    """Encodes a scene (or mesh) as ``fmt``; glTF gets its buffers embedded (one file)."""
    if fmt == "gltf":
        from trimesh.exchange.gltf import export_gltf

        return export_gltf(scene, embed_buffers=True)["model.gltf"]
    data = scene.export(file_type=fmt)
    return data.encode() if isinstance(data, str) else data


def render_preview(result: SceneResult, size: int = 384) -> bytes:
    """A PNG of the meshes (trimesh ray casting, Lambert shading, instance colours)."""
    from midi.data.camera import Camera
    from midi.data.render import render_scene

    meshes = [mesh for _, _, mesh in result.meshes]
    bounds = np.array([m.bounds for m in meshes])
    centre = (bounds[:, 0].min(axis=0) + bounds[:, 1].max(axis=0)) / 2
    colours = instance_colours(len(result.surfaces))[[i for i, _, _ in result.meshes], :3] / 255.0
    camera = Camera(elevation=20.0, azimuth=30.0, target=tuple(float(c) for c in centre))
    rendering = render_scene(meshes, camera, size, colours=colours)
    buffer = io.BytesIO()
    Image.fromarray(rendering.rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def safe_file_name(name: str) -> str:
    """A file-name-safe version of a node name."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "instance"


def save_outputs(result: SceneResult, output: Path, save_instances: bool = False, preview: bool = True,
                 preview_size: int = 384) -> list[Path]:
    """Writes the scene file, optionally ``<stem>_<name>.<ext>`` per instance, and ``<stem>.png``.

    All-or-nothing: every file is encoded first, then written by :func:`write_all_or_nothing`;
    a failure leaves none of them (a preview that cannot be *rendered* is only a warning).

    Raises:
        InputError: no instance has a surface (nothing is written).
        OutputError: a file could not be encoded or written (``"<file>: <reason>"``; nothing is left).
    """
    fmt = output_format(output)
    if not result.meshes:
        raise InputError.at(result.scene.seg_path, f"no instance produced a surface ({len(result.surfaces)} tried); "
                                                   "nothing written")
    scene = build_trimesh_scene(result)
    files: list[tuple[Path, bytes]] = []
    path = output
    try:
        if save_instances:
            for name, geometry in scene.geometry.items():
                path = output.with_name(f"{output.stem}_{safe_file_name(name)}{output.suffix}")
                files.append((path, export_bytes(geometry, fmt)))
        path = output
        files.append((output, export_bytes(scene, fmt)))
    except OSError as exc:
        raise OutputError.at(path, exc.strerror or str(exc)) from exc
    except Exception as exc:
        raise OutputError.at(path, f"cannot encode {fmt.upper()} ({type(exc).__name__}: {exc})") from exc
    if fmt in SINGLE_MESH_FORMATS and len(scene.geometry) > 1:
        logger.info("%s: %s holds a single mesh; the %d instances are concatenated (use --save_instances or .glb "
                    "for separate nodes)", output.name, fmt.upper(), len(scene.geometry))
    if preview:
        try:
            files.append((output.with_suffix(".png"), render_preview(result, preview_size)))
        except Exception as exc:  # a preview must never cost the user the scene
            logger.warning("%s: preview not written (%s: %s)", output.name, type(exc).__name__, exc)
    try:
        write_all_or_nothing(files)
    except OSError as exc:
        where = exc.filename or output
        raise OutputError.at(where, exc.strerror or str(exc)) from exc
    return [path for path, _ in files]


def summary_line(result: SceneResult, output: Path) -> str:
    """One line: instances meshed, seconds, decoder queries."""
    return (f"{output}: {len(result.meshes)}/{len(result.surfaces)} instances meshed; denoising "
            f"{result.denoise_seconds:.1f} s, extraction {result.extract_seconds:.1f} s, "
            f"{result.queries:,} decoder queries")


# ---------------------------------------------------------------------------------------- batch
def find_pairs(input_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(name, X_rgb.*, X_seg.*)`` for every pair in a folder, sorted by name.

    Raises:
        InputError: missing folder, an image without its seg map, or no pair at all.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError.at(folder, "input folder not found")
    pairs = []
    for rgb in sorted(p for p in folder.iterdir() if p.stem.endswith("_rgb") and p.suffix.lower() in RGB_SUFFIXES):
        name = rgb.stem[: -len("_rgb")]
        segs = sorted(p for p in folder.glob(f"{glob_escape(name)}_seg.*") if p.suffix.lower() in RGB_SUFFIXES)
        if not segs:
            raise InputError.at(rgb, f"no matching {name}_seg.png")
        pairs.append((name, rgb, segs[0]))
    if not pairs:
        raise InputError.at(folder, "no X_rgb.png / X_seg.png pairs")
    return pairs


def glob_escape(text: str) -> str:
    """Escapes glob metacharacters in a literal file-name part."""
    return re.sub(r"([*?\[])", r"[\1]", text)
