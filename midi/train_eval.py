"""Validation during training: a deterministic validation loss and preview generations.

The validation loss uses the first ``validation.num_scenes`` scenes of the val split, view 0,
the posterior mean, no condition dropout and fixed noise at fixed sigmas, so two evaluations of
the same weights give the same number. Previews run the real pipeline (few steps on the tiny
model) on a few val scenes, turn the decoded fields into meshes and render them next to the
input image.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from midi.data.dataset import SceneRecord, load_scene_sample
from midi.train_data import Collator, ConditionPreprocessor, SampleSettings, SceneDataset, item_seed
from midi.training import FlowMatchingModel, validation_loss

logger = logging.getLogger(__name__)


def validation_keys(num_scenes: int, batch_size: int, seed: int, rank: int, num_processes: int) -> list[list[tuple[int, int]]]:
    """This process's share of the validation batches (scene indices with fixed item seeds)."""
    keys = [(i, item_seed(seed, i)) for i in range(num_scenes)][rank::num_processes]
    return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]


@torch.no_grad()
def evaluate_loss(accelerator, model: FlowMatchingModel, vae, dataset: SceneDataset, cfg, num_tokens: int) -> float:
    """Mean validation loss over the val scenes, averaged across processes."""
    v = cfg.validation
    collate = Collator(dataset.settings.pad_to)
    batches = validation_keys(min(v.num_scenes, len(dataset)), cfg.train.batch_size, v.seed,
                              accelerator.process_index, accelerator.num_processes)  # fmt: skip
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


def _colour(k: int) -> np.ndarray:
    palette = np.array([[0.90, 0.35, 0.30], [0.30, 0.65, 0.90], [0.45, 0.80, 0.40], [0.95, 0.75, 0.25],
                        [0.70, 0.45, 0.85], [0.30, 0.80, 0.75], [0.85, 0.55, 0.70], [0.60, 0.60, 0.60]])  # fmt: skip
    return palette[k % len(palette)]


def render_meshes(meshes: list, image_size: int) -> np.ndarray:
    """Renders meshes (None entries skipped) from the default dataset camera: ``(S, S, 3)`` uint8."""
    from midi.data.camera import Camera
    from midi.data.render import render_scene

    present = [(k, m) for k, m in enumerate(meshes) if m is not None and len(m.faces)]
    if not present:
        return np.full((image_size, image_size, 3), 255, np.uint8)
    colours = np.stack([_colour(k) for k, _ in present]).astype(np.float32)
    return render_scene([m for _, m in present], Camera(), image_size, colours=colours).rgb


@contextlib.contextmanager
def eval_mode(pipe) -> Iterator[None]:
    """Runs the pipeline's models in eval mode (LoRA dropout off) and restores each one's mode after."""
    models = [getattr(pipe, n) for n in ("transformer", "image_encoder_1", "image_encoder_2", "vae")]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.no_grad()
def generate_preview(pipe, record: SceneRecord, settings: SampleSettings, cfg, seed: int) -> tuple[np.ndarray, list]:
    """Generates one val scene with the pipeline and renders it next to its input image.

    Returns:
        ``(image (S, 2S, 3) uint8: input | generated meshes, meshes)``.
    """
    from midi.mesh import marching_cubes_mesh

    v = cfg.validation
    sample = load_scene_sample(record, 0, settings.num_surface_points, np.random.default_rng(seed),
                               image_size=settings.image_size, background=settings.background,
                               min_mask_fraction=settings.min_mask_fraction)  # fmt: skip
    count = min(sample.num_instances, settings.max_num_instances)
    images, masks, scene = ConditionPreprocessor.to_pil(sample.instance_images[:count], sample.masks[:count],
                                                        sample.scene_image)  # fmt: skip
    device = pipe.transformer.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(pipe):  # in train mode LoRA dropout would perturb every denoising step
        latents = pipe(images, masks, [scene] * count, num_inference_steps=v.num_inference_steps,
                       guidance_scale=v.guidance_scale, generator=generator,
                       attention_kwargs={"num_instances": count}, output_type="latent").samples  # fmt: skip
        with torch.autocast(torch.device(device).type, enabled=False):  # the VAE decodes in float32, not the outer bf16
            fields, grid_sizes, bbox_sizes, bbox_mins, _ = pipe.decode_latents(latents.float(),
                                                                               octree_depth=v.octree_depth)  # fmt: skip
    meshes = [marching_cubes_mesh(f.float().cpu(), grid_sizes[0], bbox_mins[0], bbox_sizes[0]) for f in fields]
    size = v.preview_image_size
    rendered = render_meshes(meshes, size)
    source = np.asarray(scene.resize((size, size), PIL.Image.Resampling.BICUBIC))
    return np.concatenate([source, rendered], axis=1), meshes


def write_previews(pipe, records: list[SceneRecord], settings: SampleSettings, cfg, step: int,
                   output_dir: Path) -> dict[str, np.ndarray]:  # fmt: skip
    """Generates, saves (PNG + GLB under ``previews/step-N/``) and returns the preview images."""
    import trimesh

    from midi.trainer import cleaned_on_failure

    final = output_dir / "previews" / f"step-{step}"
    folder = final.with_name(f"{final.name}.tmp")  # published whole (a full disk leaves no half-written previews)
    images = {}
    with cleaned_on_failure(folder.parent, f"previews/{final.name}"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, record in enumerate(records[: cfg.validation.num_preview_scenes]):
            image, meshes = generate_preview(pipe, record, settings, cfg, seed=cfg.validation.seed + i)
            PIL.Image.fromarray(image).save(folder / f"{record.scene_id}.png")
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
