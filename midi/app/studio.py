"""The app's model side, without any web framework: one pipeline, base-vs-LoRA scenes, caches, files.

A :class:`Studio` holds one pipeline at a time: the base model, or the base model with the chosen
LoRA installed unmerged. The base side of a comparison is that same pipeline at LoRA scale 0,
which is exactly the base model (PEFT adds ``0 * lora(x)``; ``tests/inference`` checks the
equality), so a comparison needs one model in memory, not two. Both sides are cached by what
decides them (the base, the input bytes, the settings; for the LoRA side also the adapter and the
scale), so moving the scale slider re-runs only the LoRA side. Everything is written under the
studio's work folder (a temporary folder), one subfolder per result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midi.config import CUSTOM_ADAPTER_FILE, is_tiny
from midi.data import images
from midi.data.atomic import write_all
from midi.errors import InputError, MidiError, OutOfMemory, OutputError, one_line
from midi.inference.export import build_trimesh_scene, export_bytes, save_outputs
from midi.inference.extraction import METHODS, ExtractionConfig
from midi.inference.generation import (
    GenerationOptions,
    LoadedPipeline,
    ModelOptions,
    SceneResult,
    build_pipeline,
    free_device_memory,
    run_scene,
)
from midi.inference.scene import InputOptions, SceneInput, prepare_scene
from midi.lora import find_adapter_dir, read_lora
from midi.tiny import mi_blocks_for

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done, what runs now)
DOWNLOAD_FORMATS = ("glb", "obj", "ply")
MAX_LORAS_LISTED = 200
PREVIEW_SIZE = 320
SMALL_WIDTH = 256  # DiT widths up to this are small models (midi-mini: 128; the release: 2048)
SETTING_LIMITS = {"steps": (1, 500), "octree_depth": (3, 10), "seed": (-1, 2**31 - 1)}


@dataclass(frozen=True)
class Settings:
    """What decides a scene besides the inputs and the model: denoising and surface extraction."""

    steps: int = 50
    guidance: float = 7.0
    seed: int = 42
    method: str = "dense"  # or "coarse_to_fine"
    octree_depth: int = 8
    smooth: bool = True

    @classmethod
    def defaults_for(cls, model: str) -> Settings:
        """The command line's defaults; the tiny model gets few steps and a coarse grid so that a
        comparison takes seconds on a CPU (its shapes are meaningless anyway), and a small trained
        folder such as midi-mini (DiT width <= 256) the settings its model card measures with
        (coarse-to-fine at depth 6 gives the dense grid's F-scores with 5.5x fewer decoder queries)."""
        if is_tiny(model):
            return cls(steps=8, octree_depth=5)
        try:
            width = json.loads((Path(model) / "transformer" / "config.json").read_text())["width"]
        except (OSError, ValueError, KeyError, TypeError):
            width = None
        if isinstance(width, int) and width <= SMALL_WIDTH:
            return cls(steps=25, guidance=4.0, method="coarse_to_fine", octree_depth=6)
        return cls()

    def check(self) -> None:
        """InputError (one line, naming the setting) for values the page's controls would not allow."""
        for name in ("steps", "octree_depth", "seed"):
            low, high = SETTING_LIMITS[name]
            value = getattr(self, name)
            if not (isinstance(value, int) and low <= value <= high):
                raise InputError(f"{name} must be a whole number in {low}..{high}, got {value}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise InputError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.method not in METHODS:
            raise InputError(f"extraction must be one of {', '.join(METHODS)}, got {self.method!r}")

    def options(self, progress: bool) -> GenerationOptions:
        return GenerationOptions(self.steps, self.guidance, self.seed,
                                 ExtractionConfig(method=self.method, octree_depth=self.octree_depth, smooth=self.smooth),
                                 progress)


@dataclass
class Side:
    """One model's scene, written: viewer file, downloads, preview and per-instance rows."""

    label: str
    files: dict[str, Path]  # format -> file (DOWNLOAD_FORMATS)
    preview: Path
    rows: list[list]  # per instance: name, vertices, faces, size "x × y × z", note
    summary: str

    @property
    def glb(self) -> Path:
        return self.files["glb"]


@dataclass
class Comparison:
    """The base side, the LoRA side (None without a LoRA) and which of them came from the cache."""

    base: Side
    lora: Side | None
    cached: tuple[str, ...]  # "base" and/or "lora"
    seed: int  # the seed both sides used (drawn when the settings asked for a random one)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the same upload twice is one cache entry, whatever its temp name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shown_message(exc: MidiError, uploads: Path | None = None) -> str:
    """The command line's one-line message (without ``error:``); a path inside the upload folder is
    shown by its file name only (the server's temp path means nothing to the user)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if exc.path is not None and uploads is not None and Path(exc.path).resolve().is_relative_to(uploads.resolve()):
        text = text.replace(exc.path, Path(exc.path).name, 1)
    return one_line(text)


def instance_overlay(scene: SceneInput) -> np.ndarray:
    """``(H, 2W, 3)`` uint8: the image and the map as read, instance k in the colour its mesh gets."""
    labels = scene.segmentation.labels
    lut = np.zeros((int(labels.max(initial=0)) + 1, 3), np.float32)
    colours = images.instance_colours(len(scene.segmentation.instances))
    for colour, instance in zip(colours, scene.segmentation.instances):
        lut[instance.label] = colour
    return np.concatenate([np.asarray(scene.rgb), images.to_uint8(lut[labels])], axis=1)


def find_loras(runs: str | Path | None, depth: int = 3) -> list[Path]:
    """Adapter folders (and custom-adapter files) under ``runs``, newest run first: training outputs'
    ``lora-final``, ``best`` and ``checkpoint-N/lora``, exported or PEFT folders."""
    if runs is None or not Path(runs).is_dir():
        return []
    found: list[Path] = []
    level = [Path(runs)]
    for _ in range(depth + 1):
        next_level = []
        for folder in level:
            if (folder / "adapter_config.json").is_file() or (folder / CUSTOM_ADAPTER_FILE).is_file():
                found.append(folder)
                continue
            try:
                next_level += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:  # unreadable folder: not ours to report, just not listed
                continue
        level = next_level
    found.sort(key=lambda p: (-p.stat().st_mtime, str(p)))
    return found[:MAX_LORAS_LISTED]


def _stamp(adapter_dir: Path) -> float:
    """Newest modification time of an adapter's files (a LoRA re-exported in place is reloaded)."""
    files = [adapter_dir] if adapter_dir.is_file() else list(adapter_dir.rglob("*"))
    return max((p.stat().st_mtime for p in files if p.is_file()), default=0.0)


class Studio:
    """The model behind the page; thread-safe, one generation at a time (a pipeline is not reentrant).

    Args:
        model: a pipeline folder or the tiny model's name (as ``--pretrained_model_name_or_path``).
        workdir: the folder results are written to (the app passes a temporary folder).
        runs: a folder searched for LoRAs (:func:`find_loras`); None for none.
        uploads: where the web framework stores uploads (only to shorten paths in messages).
        cache_size: results kept (both sides together); older ones are deleted with their files.
    """

    def __init__(self, model: str, workdir: str | Path, *, runs: str | Path | None = None, device: str = "auto",
                 dtype: str = "auto", uploads: str | Path | None = None, cache_size: int = 8) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.workdir = Path(workdir)
        self.runs = Path(runs) if runs is not None else None
        self.uploads = Path(uploads) if uploads is not None else None
        self.cache_size = cache_size
        self.defaults = Settings.defaults_for(model)
        self.runs_made = {"base": 0, "lora": 0}  # scenes computed, not served from the cache
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Side] = OrderedDict()
        self._identities: dict[tuple, tuple] = {}
        self._serial = 0
        self._loaded_key: tuple | None = None
        self.loaded: LoadedPipeline | None = None
        self._pipeline(None)  # fail at start, not at the first click, for a bad --model
        self.description = self.loaded.description

    # ------------------------------------------------------------------------------------ LoRA
    def lora_choices(self) -> list[str]:
        return [str(p) for p in find_loras(self.runs)]

    @staticmethod
    def resolve_lora(choice: str | None) -> Path | None:
        """The adapter a choice names (None: no LoRA); InputError in the command line's words."""
        if choice is None or not str(choice).strip():
            return None
        path = Path(str(choice).strip()).expanduser()
        if not path.exists():
            raise InputError("LoRA path does not exist", path=path)
        return path if path.is_file() else find_adapter_dir(path)

    def _pipeline(self, lora: Path | None) -> LoadedPipeline:
        """The pipeline with ``lora`` installed unmerged (built only when it is not the loaded one)."""
        key = (None,) if lora is None else (str(lora), _stamp(lora))
        if key != self._loaded_key:
            self.loaded, self._loaded_key = None, None  # drop the old one first (one model in memory); a
            free_device_memory()  # failed load leaves no pipeline, and the next call builds again
            self.loaded = build_pipeline(ModelOptions(self.model, lora, 1.0, False, self.device, self.dtype))
            self._loaded_key = key
            logger.info("%s", self.loaded.description)
        return self.loaded

    def _base_identity(self, lora: Path | None) -> tuple:
        """What the base side depends on besides inputs and settings: the model, the tiny model's seed
        and the multi-instance blocks (a LoRA brings its own, as in build_pipeline)."""
        key = (None,) if lora is None else (str(lora), _stamp(lora))
        if key not in self._identities:
            adapter = read_lora(lora) if lora is not None else None
            seed = adapter.tiny_seed if adapter is not None and adapter.tiny_seed is not None else 0
            blocks = (adapter.mi_blocks if adapter is not None else None) or mi_blocks_for(self.model)
            self._identities[key] = (self.model, seed if is_tiny(self.model) else None, tuple(blocks))
        return self._identities[key]

    def _base_pipeline(self, lora: Path | None, identity: tuple) -> LoadedPipeline:
        """The base model: the loaded pipeline at LoRA scale 0 when it has the same base (no reload
        when the user switches the LoRA off), else a fresh one."""
        current = self._loaded_key[0] if self._loaded_key else None
        if lora is None and current is not None and self._base_identity(Path(current)) == identity:
            return dataclasses.replace(self.loaded, lora_scale=0.0)
        loaded = self._pipeline(lora)
        return loaded if lora is None else dataclasses.replace(loaded, lora_scale=0.0)

    # ------------------------------------------------------------------------------------ scenes
    def prepare(self, rgb: str | Path | None, seg: str | Path | None) -> SceneInput:
        """The scene the pipeline sees (InputError for a missing, unreadable or mismatched pair)."""
        if not rgb or not seg:
            raise InputError("give an RGB image and its instance map (or pick an example)")
        return prepare_scene(rgb, seg, InputOptions(), log_notes=False)

    def compare(self, rgb: str | Path | None, seg: str | Path | None, lora: str | None, scale: float,
                settings: Settings, progress: Progress | None = None) -> Comparison:
        """The base scene and (with a LoRA) the LoRA scene for one input pair.

        Raises:
            InputError: bad inputs, settings or LoRA (the command line's one-line messages).
            OutputError: the results could not be written.
            OutOfMemory: the device ran out of memory (the message says what to lower).
        """
        progress = progress or (lambda fraction, text: None)
        settings.check()
        if settings.seed < 0:  # one drawn seed for both sides: the comparison needs the same noise
            settings = dataclasses.replace(settings, seed=random.randrange(2**31))
        if not math.isfinite(scale):
            raise InputError(f"LoRA scale must be a finite number, got {scale}")
        scene = self.prepare(rgb, seg)
        with self._lock:
            adapter = self.resolve_lora(lora)
            identity = self._base_identity(adapter)
            inputs = (file_digest(rgb), file_digest(seg))
            keys = {"base": ("base", identity, inputs, settings)}
            if adapter is not None:
                keys["lora"] = ("lora", str(adapter), _stamp(adapter), float(scale), keys["base"])
            todo = [side for side, key in keys.items() if key not in self._cache]
            for done, side in enumerate(todo):
                progress(done / len(todo), f"{side}: loading the model")
                if side == "base":
                    loaded, label = self._base_pipeline(adapter, identity), "base model"
                else:
                    loaded, label = dataclasses.replace(self._pipeline(adapter), lora_scale=scale), \
                        f"LoRA {adapter.name} × {scale:g}"
                progress(done / len(todo), f"{side}: denoising and surface extraction")
                self._store(keys[side], self._write(self._run(loaded, scene, settings), label, side, Path(rgb)))
                self.runs_made[side] += 1
            progress(1.0, "done")
            for key in keys.values():
                self._cache.move_to_end(key)
            return Comparison(self._cache[keys["base"]], self._cache.get(keys.get("lora")),
                              tuple(side for side in keys if side not in todo), settings.seed)

    def _run(self, loaded: LoadedPipeline, scene: SceneInput, settings: Settings) -> SceneResult:
        try:
            return run_scene(loaded, scene, settings.options(progress=True))
        except OutOfMemory as exc:
            free_device_memory()
            raise OutOfMemory(exc.stage, f"out of memory during {exc.stage}; lower the octree depth, use "
                                         "coarse_to_fine extraction or fewer instances") from exc

    def _store(self, key: tuple, side: Side) -> None:
        self._cache[key] = side
        while len(self._cache) > self.cache_size:  # evicted results' files go too: the disk use stays bounded
            _, old = self._cache.popitem(last=False)
            shutil.rmtree(old.glb.parent, ignore_errors=True)

    def _write(self, result: SceneResult, label: str, side: str, rgb: Path) -> Side:
        """Writes GLB + preview (all-or-nothing, as the command line does), then OBJ and PLY."""
        self._serial += 1
        glb = self.workdir / "results" / f"{self._serial:05d}" / f"{images_stem(rgb)}-{side}.glb"
        glb.parent.mkdir(parents=True, exist_ok=True)
        save_outputs(result, glb, preview=True, preview_size=PREVIEW_SIZE)
        scene = build_trimesh_scene(result)
        files = {"glb": glb, **{fmt: glb.with_suffix(f".{fmt}") for fmt in DOWNLOAD_FORMATS[1:]}}
        try:
            write_all([(files[fmt], export_bytes(scene, fmt)) for fmt in DOWNLOAD_FORMATS[1:]])
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc), path=exc.filename or glb) from exc
        rows = []
        for name, surface in zip(result.scene.names, result.surfaces):
            mesh = surface.mesh
            if mesh is None:
                rows.append([name, 0, 0, "", surface.problem or "no surface"])
            else:
                rows.append([name, len(mesh.vertices), len(mesh.faces), " × ".join(f"{e:.2f}" for e in mesh.extents), ""])
        meshed = sum(m is not None for m in result.meshes)
        summary = (f"{label}: {meshed}/{len(result.surfaces)} instances meshed; denoising "
                   f"{result.denoise_seconds:.1f} s, extraction {result.extract_seconds:.1f} s")
        return Side(label, files, glb.with_suffix(".png"), rows, summary)


def images_stem(rgb: Path) -> str:
    """``room`` for ``room_rgb.png`` (the pair naming of ``--input_dir``), else the file's stem."""
    stem = rgb.stem.removesuffix("_rgb")
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "scene"
