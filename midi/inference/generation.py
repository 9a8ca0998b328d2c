"""The model side of inference: build the pipeline (with an optional LoRA), denoise, extract.

:func:`build_pipeline` loads the released folder or the in-process ``tiny`` pipeline and installs
multi-instance attention and the LoRA (any format :func:`midi.lora.read_lora` detects), scaled
through upstream's ``attention_kwargs["scale"]`` or merged. :func:`run_scene` denoises all
instances of a scene together and extracts one surface per instance; :func:`generate_meshes` is
the same path for callers that hold a pipeline already (the training previews).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trimesh
from diffusers.utils import scale_lora_layers, unscale_lora_layers
from PIL import Image
from tqdm.auto import tqdm

from midi.config import DEFAULT_MODEL_DIR, is_tiny
from midi.errors import AdapterError, InputError, OutOfMemory
from midi.inference.extraction import ExtractionConfig, Surface, extract_surfaces
from midi.inference.scene import SceneInput
from midi.lora import LoadedAdapter, load_adapter, merge_lora, read_lora
from midi.tiny import load_pipeline, mi_blocks_for

logger = logging.getLogger(__name__)

MODELS = ("transformer", "vae", "image_encoder_1", "image_encoder_2")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's ``torch.OutOfMemoryError`` and for CPU allocation failures (a RuntimeError
    whose text says so: the CPU allocator has no exception type of its own)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "can't allocate memory" in text)


def free_device_memory() -> None:
    """Returns cached CUDA blocks after an out-of-memory error, so the next scene starts clean."""
    torch.cuda.empty_cache()  # a no-op while CUDA is not initialised


# ---------------------------------------------------------------------------------------- model
@dataclass
class ModelOptions:
    """Which model to build (see :func:`build_pipeline`)."""

    model: str = DEFAULT_MODEL_DIR
    lora_path: Path | None = None
    lora_scale: float = 1.0
    merge_lora: bool = False
    device: str = "auto"
    dtype: str = "auto"
    lora_alpha: float | None = None  # for adapters that do not record it (upstream's custom-adapter files)
    mi_blocks: list[str] | None = None  # None: the adapter's, else the model's (midi.tiny.mi_blocks_for)


@dataclass
class LoadedPipeline:
    """A ready pipeline and the LoRA scale to pass per call (None: no LoRA, or merged)."""

    pipe: Any
    lora_scale: float | None
    description: str


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` device: CUDA when available, else CPU; ``auto`` dtype: bfloat16 on CUDA, float32 otherwise."""
    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError as exc:
        raise InputError(f"--device {device}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return dev, getattr(torch, dtype) if dtype != "auto" else torch.bfloat16 if dev.type == "cuda" else torch.float32


def _install_lora(pipe, adapter: LoadedAdapter, mi_blocks: list[str], alpha: float | None) -> str:
    ranks = sorted({c["r"] for c in adapter.lora_configs.values()})
    if alpha is not None:
        for config in adapter.lora_configs.values():
            config["lora_alpha"] = alpha
    elif not adapter.alpha_known:
        logger.warning("LoRA %s: no midi_adapter.json, so lora_alpha is unknown; assuming lora_alpha = rank (%s); "
                       "pass --lora_alpha if it was trained with another alpha", adapter.source,
                       ", ".join(map(str, ranks)))
    try:
        load_adapter(pipe, adapter, mi_blocks)
    except AdapterError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as exc:  # e.g. PEFT refusing a config
        raise InputError(f"LoRA does not fit the model ({type(exc).__name__}: {exc})", path=adapter.source) from None
    alphas = sorted({c["lora_alpha"] for c in adapter.lora_configs.values()})
    return f"LoRA {adapter.source} ({adapter.format}, {', '.join(adapter.lora_configs)}, rank {ranks}, alpha {alphas})"


def build_pipeline(options: ModelOptions) -> LoadedPipeline:
    """Loads the model, installs multi-instance attention and the LoRA (optionally merged).

    Raises:
        InputError: the model folder or the LoRA cannot be loaded / does not fit, in words.
    """
    device, dtype = resolve_device_dtype(options.device, options.dtype)
    adapter = read_lora(Path(options.lora_path)) if options.lora_path is not None else None
    # A LoRA trained on the tiny model only fits the tiny model built from the same seed.
    tiny_seed = adapter.tiny_seed if adapter is not None and adapter.tiny_seed is not None else 0
    recorded = adapter.mi_blocks if adapter is not None else None
    mi_blocks = list(options.mi_blocks or recorded or mi_blocks_for(options.model))  # before the (slow) load
    if options.mi_blocks and recorded and list(recorded) != mi_blocks:
        logger.warning("--mi_blocks %s replaces the blocks the LoRA was trained with (%s)", mi_blocks, recorded)
    pipe = load_pipeline(options.model, dtype, tiny_seed=tiny_seed)
    description = f"model {options.model}" + (f" (seed {tiny_seed})" if is_tiny(options.model) else "")
    scale: float | None = None
    if adapter is None:
        try:
            pipe.init_custom_adapter(set_self_attn_module_names=mi_blocks, exact_module_names=True)
        except ValueError as exc:
            raise InputError(f"--mi_blocks: {exc}") from None
    else:
        description += ", " + _install_lora(pipe, adapter, mi_blocks, options.lora_alpha)
        if options.merge_lora:
            description += f", merged at scale {options.lora_scale} ({merge_lora(pipe, options.lora_scale)} layers)"
        else:
            scale = options.lora_scale
            description += f", scale {scale}"
    if any(p.dtype != dtype for m in MODELS for n, p in getattr(pipe, m).named_parameters() if "lora_" not in n):
        pipe.to(dtype=dtype)  # only when a base (non-LoRA) weight needs it: diffusers warns on every dtype cast
    pipe.to(device=device)
    for name in MODELS:
        getattr(pipe, name).eval()  # PEFT adds its LoRA modules (dropout included) in training mode
    return LoadedPipeline(pipe, scale, description + f", {device} {str(dtype).removeprefix('torch.')}")


# ---------------------------------------------------------------------------------------- generation
@dataclass
class GenerationOptions:
    """Denoising and extraction settings."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    seed: int = 42
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    progress: bool = True


@dataclass
class SceneResult:
    """Everything :func:`midi.inference.export.save_outputs` needs, plus timings and decoder query counts."""

    scene: SceneInput
    surfaces: list[Surface]  # one per instance, in instance order
    denoise_seconds: float
    extract_seconds: float

    @property
    def queries(self) -> int:
        return sum(s.queries for s in self.surfaces)

    @property
    def meshes(self) -> list[trimesh.Trimesh | None]:
        """One mesh per instance, None where the instance has no surface."""
        return [s.mesh for s in self.surfaces]


@contextlib.contextmanager
def eval_mode(pipe) -> Iterator[None]:
    """Runs the pipeline's models in eval mode (LoRA dropout off) and restores each one's mode after
    (training previews call in with the models in train mode)."""
    models = [getattr(pipe, name) for name in MODELS]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@contextlib.contextmanager
def _encoder_lora_scale(pipe, scale: float | None) -> Iterator[None]:
    """Scales the image encoders' LoRA layers for one call (attention_kwargs only reaches the transformer)."""
    encoders = [m for m in (pipe.image_encoder_1, pipe.image_encoder_2)
                if getattr(m, "peft_config", None) and scale not in (None, 1.0)]
    for model in encoders:
        scale_lora_layers(model, scale)
    try:
        yield
    finally:
        for model in encoders:
            unscale_lora_layers(model, scale)


@torch.no_grad()
def generate_latents(pipe, images: Sequence[Image.Image], masks: Sequence[Image.Image], scene: Image.Image, *,
                     num_inference_steps: int, guidance_scale: float, seed: int, lora_scale: float | None = None,
                     progress: bool = False) -> torch.Tensor:
    """Runs the denoising loop for all instances together; returns latents ``(N, T, C)``.

    ``seed < 0`` draws unseeded noise; ``lora_scale`` scales an unmerged LoRA (None: none or merged).
    """
    attention_kwargs = {"num_instances": len(images), **({} if lora_scale is None else {"scale": lora_scale})}
    generator = torch.Generator(device=pipe.device).manual_seed(seed) if seed >= 0 else None
    pipe.set_progress_bar_config(desc="denoising", disable=not progress, leave=False)
    with _encoder_lora_scale(pipe, lora_scale):
        out = pipe(image=list(images), mask=list(masks), image_scene=[scene] * len(images),
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
                   attention_kwargs=attention_kwargs, output_type="latent")
    return out.samples


def _extract(pipe, latents: torch.Tensor, config: ExtractionConfig, progress: bool = False) -> list[Surface]:
    """One :class:`Surface` per latent ``(N, T, C)``, decoded in the VAE's own dtype outside autocast
    (under a training loop's bf16 autocast the field would lose its sign near the surface)."""

    bar = functools.partial(tqdm, desc=f"extracting ({config.method})", unit="instance", disable=not progress, leave=False)
    with torch.no_grad(), torch.autocast(pipe.device.type, enabled=False):
        return extract_surfaces(pipe, latents.to(pipe.vae.dtype), config, progress=bar)


def generate_meshes(pipe, images: list, masks: list, scene: Image.Image, *, num_inference_steps: int,
                    guidance_scale: float, seed: int, extraction: ExtractionConfig) -> list[trimesh.Trimesh | None]:
    """One mesh per instance (None: no surface), with the models in eval mode for the call."""
    with eval_mode(pipe):
        latents = generate_latents(pipe, images, masks, scene, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, seed=seed)
        return [s.mesh for s in _extract(pipe, latents, extraction)]


def run_scene(loaded: LoadedPipeline, scene: SceneInput, options: GenerationOptions) -> SceneResult:
    """Denoises and extracts one mesh per instance; instances without surface are logged, not fatal.

    Raises:
        OutOfMemory: the device or host ran out of memory (``stage`` names the step).
    """
    start, stage = time.perf_counter(), "denoising"
    try:
        latents = generate_latents(loaded.pipe, *scene.conditions(), num_inference_steps=options.num_inference_steps,
                                   guidance_scale=options.guidance_scale, seed=options.seed,
                                   lora_scale=loaded.lora_scale, progress=options.progress)
        denoised, stage = time.perf_counter(), "surface extraction"
        surfaces = _extract(loaded.pipe, latents, options.extraction, options.progress)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(stage) from exc
    for name, surface in zip(scene.names, surfaces):
        if surface.mesh is None:
            logger.warning("%s: %s", name, surface.problem)
        else:
            logger.info("%s: %d vertices, %d faces (%s decoder queries, %.2f s)", name, len(surface.mesh.vertices),
                        len(surface.mesh.faces), f"{surface.queries:,}", surface.seconds)
    return SceneResult(scene, surfaces, denoised - start, time.perf_counter() - denoised)
