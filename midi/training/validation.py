"""Validation during training: a deterministic validation loss, preview generations and scene metrics.

The validation loss uses the first ``validation.num_scenes`` scenes of the val split, view 0,
the posterior mean, no condition dropout and fixed noise at fixed sigmas, so two evaluations of
the same weights give the same number. Previews run the inference path
(:func:`midi.inference.generation.generate_meshes`, models in eval mode) on a few val scenes and
render the meshes next to the input image. Scene metrics generate the first
``validation.metrics_num_scenes`` val scenes the same way and score them with evaluate.py's
code (:mod:`midi.evaluation`: its gt and prediction sampling, instance matching and
:func:`~midi.evaluation.score_points` with ``align="icp"``, ``tau=0.1``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from midi.data.dataset import SceneRecord
from midi.data.images import conditions_to_pil
from midi.errors import MidiError, one_line
from midi.evaluation import score_points
from midi.evaluation.predictions import EvalError, load_truth, predict_from_meshes
from midi.inference.export import render_preview
from midi.inference.extraction import ExtractionConfig
from midi.inference.generation import free_device_memory, generate_meshes, is_out_of_memory
from midi.training.batches import Collator, SampleSettings, SceneDataset, item_seed, load_images
from midi.training.checkpoints import cleaned_on_failure
from midi.training.objective import FlowMatchingModel, validation_loss

logger = logging.getLogger(__name__)
METRICS = ("scene_fscore", "scene_cd", "object_fscore", "iou_bbox")  # logged as val/<key>


def validation_keys(num_scenes: int, batch_size: int, seed: int, rank: int,
                    num_processes: int) -> list[list[tuple[int, int]]]:
    """This process's share of the validation batches (scene indices with fixed item seeds)."""
    keys = [(i, item_seed(seed, i)) for i in range(num_scenes)][rank::num_processes]
    return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]


@torch.no_grad()
def evaluate_loss(accelerator, model: FlowMatchingModel, vae, dataset: SceneDataset, cfg, num_tokens: int) -> float:
    """Mean validation loss over the val scenes, averaged across processes."""
    v = cfg.validation
    collate = Collator(dataset.settings.pad_to)
    batches = validation_keys(min(v.num_scenes, len(dataset)), cfg.train.batch_size, v.seed,
                              accelerator.process_index, accelerator.num_processes)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, keys in enumerate(batches):
            batch = collate([dataset[k] for k in keys]).to(accelerator.device)
            with accelerator.autocast():
                s, c = validation_loss(model, vae, batch, v.sigmas, num_tokens, seed=item_seed(v.seed, 1, i))
            total, count = total + s, count + c
    finally:
        model.train(was_training)
    sums = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device, dtype=torch.float64), "sum")
    return float(sums[0] / sums[1]) if float(sums[1]) > 0 else float("nan")


def generate_view0(pipe, record: SceneRecord, settings: SampleSettings, cfg, seed: int,
                   max_instances: int | None = None) -> tuple[list, Image.Image, list[int]]:
    """Generates one val scene from view 0 (image + id map) with the validation sampler settings.

    Returns:
        ``(one mesh or None per instance, scene image, the instances' indices in the record)``.
    """
    v = cfg.validation
    sample = load_images(record, 0, settings, np.random.default_rng(seed), surfaces=False)
    count = min(sample.num_instances, max_instances or sample.num_instances)
    images, masks, scene = conditions_to_pil(sample.instance_images[:count], sample.masks[:count] > 0.5,
                                             sample.scene_image)
    meshes = generate_meshes(pipe, images, masks, scene, num_inference_steps=v.num_inference_steps,
                             guidance_scale=v.guidance_scale, seed=seed,
                             extraction=ExtractionConfig(octree_depth=v.octree_depth))
    return meshes, scene, sample.object_indices[:count]


def preview_scene(pipe, record: SceneRecord, settings: SampleSettings, cfg, seed: int) -> tuple[np.ndarray, list]:
    """Generates one val scene (view 0) and renders it next to its input image.

    Returns:
        ``(image (S, 2S, 3) uint8: input | generated meshes, meshes)``.
    """
    meshes, scene, _ = generate_view0(pipe, record, settings, cfg, seed, settings.max_num_instances)
    size = cfg.validation.preview_image_size
    source = np.asarray(scene.resize((size, size), Image.Resampling.BICUBIC))
    return np.concatenate([source, render_preview(meshes, size)], axis=1), meshes


def metric_meshes(pipe, record: SceneRecord, settings: SampleSettings, cfg) -> dict[str, trimesh.Trimesh]:
    """The generation scored by :func:`scene_metrics`, as evaluate.py would read it from the scene file.

    Every visible instance is generated (evaluate.py does not cap the count either), with the same
    seed for every scene as ``evaluate.py --generate``; nodes are named ``instance_<label>``.
    """
    meshes, _, indices = generate_view0(pipe, record, settings, cfg, cfg.validation.seed)
    return {f"instance_{k + 1}": m for k, m in zip(indices, meshes) if m is not None}


def score_scene(record: SceneRecord, meshes: dict[str, trimesh.Trimesh], cfg) -> dict[str, float]:
    """evaluate.py's scoring of one scene (its default protocol at ``validation.metrics_num_points``).

    Raises:
        EvalError, ValueError: unreadable gt, or no predicted instance.
    """
    points, seed = cfg.validation.metrics_num_points, cfg.validation.seed
    truth = load_truth(record, points, seed)
    pred = predict_from_meshes(meshes, record, truth, points, seed)
    return score_points(pred.points, truth.points, align="icp", tau=0.1, extra=list(pred.extra.values()), seed=seed)


def scene_metrics(pipe, records: list[SceneRecord], settings: SampleSettings, cfg) -> dict[str, float]:
    """Mean :data:`METRICS` over the first ``validation.metrics_num_scenes`` val scenes (empty when
    none could be scored); a scene that fails is a warning, so a bad generation never stops training."""
    scores = []
    for record in records[: cfg.validation.metrics_num_scenes]:
        try:
            scores.append(score_scene(record, metric_meshes(pipe, record, settings, cfg), cfg))
        except (MidiError, EvalError, ValueError, RuntimeError, MemoryError) as exc:
            if is_out_of_memory(exc):
                free_device_memory()
            logger.warning("scene metrics: %s skipped: %s", record.scene_id, one_line(f"{type(exc).__name__}: {exc}"))
    return {k: float(np.mean([s[k] for s in scores])) for k in METRICS} if scores else {}


def write_previews(pipe, records: list[SceneRecord], settings: SampleSettings, cfg, step: int,
                   output_dir: Path) -> dict[str, np.ndarray]:
    """Generates, saves (PNG + GLB under ``previews/step-N/``) and returns the preview images."""
    final = output_dir / "previews" / f"step-{step}"
    folder = final.with_name(f"{final.name}.tmp")  # published whole (a full disk leaves no half-written previews)
    images = {}
    with cleaned_on_failure(folder.parent, f"previews/{final.name}"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, record in enumerate(records[: cfg.validation.num_preview_scenes]):
            image, meshes = preview_scene(pipe, record, settings, cfg, seed=cfg.validation.seed + i)
            Image.fromarray(image).save(folder / f"{record.scene_id}.png")
            present = [m for m in meshes if m is not None]
            if present:
                trimesh.Scene(present).export(folder / f"{record.scene_id}.glb")
            images[f"preview/{record.scene_id}"] = image
        shutil.rmtree(final, ignore_errors=True)
        folder.rename(final)
    return images


def log_images(accelerator, images: dict[str, np.ndarray], step: int) -> None:
    """Sends images to every tracker that takes them (TensorBoard, W&B)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)
