"""``--generate``: the predictions of a split, made by :mod:`midi.inference.generation` (resumable, sharded).

Each scene is generated from view ``view`` (its image and id map, the id map reduced to the
instances that are scored, see :mod:`midi.evaluation.predictions`), with the same seed for every
scene, and saved as ``<pred>/<scene id>.glb`` (node ``instance_<label>`` per instance). A scene
that cannot be generated leaves ``<scene id>.error.txt`` with the reason, so the scoring reports
it. Finished scenes are skipped on a rerun; ``generation.json`` records the settings, and a rerun
with other settings is refused (its scenes would mix two models). Under ``accelerate launch`` the
scenes are split across the processes; ranks wait for each other before scoring.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from tqdm.auto import tqdm

import midi
from midi.config import check_model_path
from midi.data.atomic import write_json, write_text
from midi.data.dataset import DEFAULT_MIN_MASK_FRACTION, SceneRecord, instance_masks, load_view
from midi.data.images import labels_to_image, save_png
from midi.data.layout import read_json
from midi.errors import AdapterError, DataError, InputError, OutOfMemory, OutputError, one_line
from midi.evaluation.predictions import ERROR_SUFFIX, SCENE_SUFFIXES, EvalError
from midi.inference.export import save_outputs
from midi.inference.extraction import ExtractionConfig
from midi.inference.generation import GenerationOptions, ModelOptions, build_pipeline, run_scene
from midi.inference.scene import InputOptions, prepare_scene
from midi.lora import find_adapter_dir

logger = logging.getLogger(__name__)
SETTINGS_FILE = "generation.json"
WHITE = (1.0, 1.0, 1.0)


@dataclass
class GenerationSettings:
    """What ``--generate`` runs (all of it except ``device`` decides the predictions)."""

    model: str
    lora_path: Path | None = None
    lora_scale: float = 1.0
    seed: int = 42
    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    octree_depth: int = 8
    view: int = 0
    dtype: str = "auto"
    device: str = "auto"
    extraction: str = "dense"  # or "coarse_to_fine" (midi.inference.extraction)


def lora_identity(path: Path | None) -> dict[str, Any] | None:
    """Path and sha256 of the adapter files that would be loaded (None without a LoRA).

    Raises:
        EvalError: the path does not exist or holds no adapter.
    """
    if path is None:
        return None
    path = Path(path)
    try:
        files = (
            [path] if path.is_file() else sorted(p for p in find_adapter_dir(path).iterdir() if p.is_file())
        )
    except (AdapterError, OSError) as exc:
        raise EvalError(f"{path}: {exc}") from None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + file.read_bytes())
    return {"path": str(path), "files": [f.name for f in files], "sha256": digest.hexdigest()}


def identity(settings: GenerationSettings) -> dict[str, Any]:
    """The settings as recorded in ``generation.json`` and in ``metrics.json``."""
    record = asdict(settings) | {
        "lora": lora_identity(settings.lora_path),
        "toolkit_version": midi.__version__,
    }
    record.pop("device")
    record.pop("lora_path")
    return record


def prepare_output(pred_dir: Path, settings: GenerationSettings) -> dict[str, Any]:
    """Checks the model path and ``generation.json``; writes it (main process). Returns the identity.

    Raises:
        EvalError: model missing, LoRA unreadable, or the folder holds another run's scenes.
    """
    try:
        check_model_path(settings.model)
    except InputError as exc:
        raise EvalError(str(exc)) from None
    ident = identity(settings)
    previous = pred_dir / SETTINGS_FILE
    if previous.is_file():
        old = {"extraction": "dense"} | read_json(previous)  # written before extraction was a setting: dense
        if old != ident:
            changed = sorted(k for k in ident.keys() | old.keys() if old.get(k) != ident.get(k))
            raise EvalError(
                f"{previous}: the scenes there were generated with other settings ({', '.join(changed)} "
                "differ); use another --pred folder or delete it"
            )
    elif PartialState().is_main_process:
        pred_dir.mkdir(parents=True, exist_ok=True)
        write_json(previous, ident)
    return ident


def scene_inputs(record: SceneRecord, view: int, folder: Path) -> tuple[Path, Path]:
    """The view's image and an id map holding only the scored instances (label k+1 = object k).

    Raises:
        EvalError: unreadable view files.
    """
    try:
        _, labels = load_view(record, view, None, WHITE)
    except DataError as exc:
        raise EvalError(f"{record.scene_id}: {exc}") from None
    kept, _ = instance_masks(labels, record.object_names, DEFAULT_MIN_MASK_FRACTION)
    labels[~np.isin(labels - 1, kept)] = 0  # (H, W): tiny masks and unknown labels become background
    seg = folder / f"{record.scene_id}_seg.png"
    folder.mkdir(parents=True, exist_ok=True)
    save_png(seg, labels_to_image(labels))
    return record.views[view][0], seg


def is_main_process() -> bool:
    """Whether this process scores and writes the report (rank 0 under ``accelerate launch``)."""
    return PartialState().is_main_process


def generate(
    records: list[SceneRecord], pred_dir: Path, settings: GenerationSettings, progress: bool = True
) -> int:
    """Generates this process's share of the scenes that have no file yet; returns how many it made.

    Raises:
        EvalError: the model or LoRA cannot be loaded, or an output cannot be written.
    """
    state = PartialState()
    mine = records[state.process_index :: state.num_processes]
    todo = [r for r in mine if not any((pred_dir / f"{r.scene_id}{s}").is_file() for s in SCENE_SUFFIXES)]
    made = 0
    if todo:
        device = str(state.device) if settings.device == "auto" else settings.device
        try:
            loaded = build_pipeline(
                ModelOptions(
                    settings.model,
                    settings.lora_path,
                    settings.lora_scale,
                    device=device,
                    dtype=settings.dtype,
                )
            )
        except InputError as exc:
            raise EvalError(str(exc)) from None
        options = GenerationOptions(
            settings.num_inference_steps,
            settings.guidance_scale,
            settings.seed,
            ExtractionConfig(method=settings.extraction, octree_depth=settings.octree_depth),
            progress=False,
        )
        bar = tqdm(
            todo,
            desc=f"generating (rank {state.process_index})",
            unit="scene",
            disable=not progress,
            position=state.process_index,
        )
        for record in bar:
            error = pred_dir / f"{record.scene_id}{ERROR_SUFFIX}"
            try:
                rgb, seg = scene_inputs(record, settings.view, pred_dir / "inputs")
                scene = prepare_scene(rgb, seg, InputOptions(), log_notes=False)
                save_outputs(
                    run_scene(loaded, scene, options), pred_dir / f"{record.scene_id}.glb", preview=False
                )
                error.unlink(missing_ok=True)
                made += 1
            except OutputError as exc:  # disk full, permissions: every next scene would fail alike
                raise EvalError(str(exc)) from None
            except (InputError, OutOfMemory, EvalError) as exc:  # this scene only; scored as failed
                write_text(error, one_line(str(exc)) + "\n")
                logger.warning("%s: %s", record.scene_id, one_line(str(exc)))
    state.wait_for_everyone()
    return made
