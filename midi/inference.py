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

import glob
import io
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Old import paths (transition: package B moves these callers to midi.config / midi.data.* / midi.errors).
from midi.config import DEFAULT_MI_BLOCKS, DEFAULT_MODEL_DIR, RGB_SUFFIXES, check_model_path, is_tiny  # noqa: F401
from midi.data.atomic import write_all
from midi.data.images import (  # noqa: F401
    IdMap,
    Instance,
    conditions_to_pil,
    instance_images,
    pad_to_square,
    read_id_map,
    read_rgb,
    to_uint8,
    upstream_padding,
)
from midi.errors import InputError, OutOfMemory, OutputError, one_line  # noqa: F401

logger = logging.getLogger(__name__)

MESH_FORMATS = ("glb", "gltf", "obj", "ply", "stl")
SINGLE_MESH_FORMATS = ("ply", "stl")
DEFAULT_MODEL = DEFAULT_MODEL_DIR
DEFAULT_MAX_INSTANCES = 16
Segmentation = IdMap  # old name (transition: package B renames it)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and CPU allocation failures (a RuntimeError saying so)."""
    if type(exc).__name__ in ("OutOfMemoryError", "MemoryError") or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "DefaultCPUAllocator" in text)


# ---------------------------------------------------------------------------------------- inputs
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


def read_segmentation(path: str | os.PathLike, order: str = "default", min_pixels: int | None = None) -> IdMap:
    """Old name of :func:`midi.data.images.read_id_map` (transition: package B drops it)."""
    return read_id_map(path, order=order, min_pixels=min_pixels)  # type: ignore[arg-type]


def read_label_names(path: str | os.PathLike) -> dict[str, str]:
    """Reads ``{"<label>": "name"}`` (label as in the map: ``"3"``, or ``"ff0000"``/``"#ff0000"``).

    Raises:
        InputError: unreadable file, not a JSON object of strings.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read label names ({type(exc).__name__}: {exc})", path=path) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise InputError('label names must be a JSON object {"<label>": "<non-empty name>"}', path=path)
    return {str(k).lower().lstrip("#"): v for k, v in data.items()}


def name_instances(instances: Sequence[Instance], names: dict[str, str] | None, names_path: Path | None) -> None:
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
    rgb = read_rgb(rgb_path, rgba="upstream" if options.rgba == "upstream" else "composite")
    seg = read_id_map(seg_path, order=options.order, min_pixels=options.min_pixels)  # type: ignore[arg-type]
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
        rgb, seg.labels = upstream_padding(rgb, seg.labels)
    elif rgb.shape[0] != rgb.shape[1]:
        seg.notes.append(f"{rgb_path.name}: {rgb.shape[1]}x{rgb.shape[0]} is not square; centred on a white square")
        rgb, seg.labels = pad_to_square(rgb, 1.0), pad_to_square(seg.labels, 0)
    for note in seg.notes if log_notes else ():
        logger.info("%s", note)
    return SceneInput(rgb_path, seg_path, Image.fromarray(to_uint8(rgb)), seg)


def split_instances(scene: SceneInput) -> tuple[list[Image.Image], list[Image.Image], list[Image.Image]]:
    """Per instance: the RGB with every other pixel white, its "L" mask (0/255), the full RGB."""
    rgb = np.asarray(scene.rgb, np.float32) / 255.0
    labels = [inst.label for inst in scene.segmentation.instances]
    images, masks, _ = conditions_to_pil(*instance_images(rgb, scene.segmentation.labels, labels), rgb)
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
    from midi.tiny import load_pipeline

    return load_pipeline(model, dtype, tiny_seed=tiny_seed)


def default_mi_blocks(config) -> list[str]:
    """The multi-instance blocks of a base transformer: the release's 8-12 (of 21), the tiny model's.

    Raises:
        InputError: any other model (its blocks cannot be guessed: ``--mi_blocks`` names them).
    """
    from midi.tiny import TINY_MI_BLOCKS, TINY_TRANSFORMER

    if config.get("num_layers") == 21:
        return list(DEFAULT_MI_BLOCKS)
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
        raise InputError(f"LoRA does not fit the model ({type(exc).__name__}: {exc})", path=adapter.source) from None
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
    description = f"model {options.model}" + (f" (seed {tiny_seed})" if is_tiny(options.model) else "")
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
        raise InputError(f"unsupported output format {('.' + ext) if ext else '(no extension)'}; "
                                  f"use one of {', '.join('.' + f for f in MESH_FORMATS)}", path=path)
    return ext


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

    All-or-nothing: every file is encoded first, then written by :func:`midi.data.atomic.write_all`;
    a failure leaves none of them (a preview that cannot be *rendered* is only a warning).

    Raises:
        InputError: no instance has a surface (nothing is written).
        OutputError: a file could not be encoded or written (``"<file>: <reason>"``; nothing is left).
    """
    fmt = output_format(output)
    if not result.meshes:
        raise InputError(f"no instance produced a surface ({len(result.surfaces)} tried); "
                                                   "nothing written", path=result.scene.seg_path)
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
        raise OutputError(exc.strerror or str(exc), path=path) from exc
    except Exception as exc:
        raise OutputError(f"cannot encode {fmt.upper()} ({type(exc).__name__}: {exc})", path=path) from exc
    if fmt in SINGLE_MESH_FORMATS and len(scene.geometry) > 1:
        logger.info("%s: %s holds a single mesh; the %d instances are concatenated (use --save_instances or .glb "
                    "for separate nodes)", output.name, fmt.upper(), len(scene.geometry))
    if preview:
        try:
            files.append((output.with_suffix(".png"), render_preview(result, preview_size)))
        except Exception as exc:  # a preview must never cost the user the scene
            logger.warning("%s: preview not written (%s: %s)", output.name, type(exc).__name__, exc)
    try:
        write_all(files)
    except OSError as exc:
        where = exc.filename or output
        raise OutputError(exc.strerror or str(exc), path=where) from exc
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
