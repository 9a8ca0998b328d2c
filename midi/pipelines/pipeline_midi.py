"""MIDIPipeline: instance images + masks + scene image -> per-instance shape latents / fields.

Behaviour follows upstream MIDI-3D (conditioning, CFG order, noise draw, Euler loop and
decoding); the differences are fixes that never change upstream's numbers on valid input:
inputs are checked, tensors are accepted by both image encoders, ``num_instances`` defaults to
"all images are one scene" when multi-instance attention is on, and folders are loaded with
validation (see :mod:`midi.pipelines.loading`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from midi.data.atomic import write_json
from midi.loaders.custom_adapter import CustomAdapterMixin
from midi.models.attention_processor import MIAttnProcessor2_0
from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel
from midi.models.transformers.triposg_transformer import TripoSGDiTModel
from midi.pipelines.loading import load_components
from midi.schedulers.scheduling_rectified_flow import RectifiedFlowScheduler

logger = logging.getLogger(__name__)

# Upstream's grid box: [-1.005, 1.005]^3, flattened with x slowest.
DEFAULT_BBOX_MIN = np.array([-1.005, -1.005, -1.005])
DEFAULT_BBOX_MAX = np.array([1.005, 1.005, 1.005])


def grid_axes(bbox_min: Sequence[float], bbox_max: Sequence[float], octree_depth: int) -> list[np.ndarray]:
    """The ``2^depth + 1`` float32 coordinates per axis of the dense grid over the box."""
    return [np.linspace(bbox_min[i], bbox_max[i], 2**octree_depth + 1, dtype=np.float32) for i in range(3)]


def generate_dense_grid_points(bbox_min: np.ndarray, bbox_max: np.ndarray, octree_depth: int, indexing: str = "ij"
                               ) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Grid points ``((2^d + 1)^3, 3)`` float32, the grid size per axis and the bbox extent."""
    axes = grid_axes(bbox_min, bbox_max, octree_depth)
    xyz = np.stack(np.meshgrid(*axes, indexing=indexing), axis=-1).reshape(-1, 3)
    return xyz, [len(axes[0])] * 3, np.asarray(bbox_max) - np.asarray(bbox_min)


@dataclass
class MIDIPipelineOutput(BaseOutput):
    """``samples``: latents ``(N, T, C)`` or decoded fields ``(N, Q, 1)``; the grid lists are
    None for latents, one entry for a dense decode, one per instance for a progressive one."""

    samples: torch.Tensor
    grid_sizes: list | None = None
    bbox_sizes: list | None = None
    bbox_mins: list | None = None
    bbox_maxs: list | None = None


def _as_list(images: Any) -> list:
    return list(images) if isinstance(images, torch.Tensor | list | tuple) else [images]


class MIDIPipeline(DiffusionPipeline, CustomAdapterMixin):
    """Image-to-scene generation with multi-instance diffusion (MIDI-3D).

    Components: ``vae`` (TripoSGVAEModel), ``transformer`` (TripoSGDiTModel), ``scheduler``
    (RectifiedFlowScheduler), ``image_encoder_1`` (CLIPVisionModelWithProjection),
    ``image_encoder_2`` (Dinov2Model with 7 input channels), ``feature_extractor_1``
    (CLIPImageProcessor), ``feature_extractor_2`` (BitImageProcessor).
    """

    model_cpu_offload_seq = "image_encoder_1->image_encoder_2->transformer->vae"

    def __init__(self, vae: TripoSGVAEModel, transformer: TripoSGDiTModel, scheduler: RectifiedFlowScheduler,
                 image_encoder_1, image_encoder_2, feature_extractor_1, feature_extractor_2) -> None:
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler, image_encoder_1=image_encoder_1,
                              image_encoder_2=image_encoder_2, feature_extractor_1=feature_extractor_1,
                              feature_extractor_2=feature_extractor_2)
        self._guidance_scale = 1.0

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | dict | None = None, **kwargs):
        """Loads a folder in the released MIDI-3D layout (strict: keys and shapes are checked).

        Args:
            pretrained_model_name_or_path: the folder (or a Hub repo id already in the local cache).
            torch_dtype: model dtype (default: as stored), or a dict per component with an optional
                ``"default"``, e.g. ``{"vae": torch.float32, "default": torch.bfloat16}``.

        Raises:
            midi.errors.ModelError: with the component, key and shapes at fault.
        """
        unknown = set(kwargs) - {"local_files_only", "use_safetensors", "low_cpu_mem_usage"}
        if unknown:
            raise TypeError(f"MIDIPipeline.from_pretrained got unsupported arguments {sorted(unknown)}")
        return cls(**load_components(pretrained_model_name_or_path, torch_dtype=torch_dtype))

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """``DiffusionPipeline.save_pretrained``, writing processor class names as upstream does
        (``CLIPImageProcessor``, not the backend-specific ``CLIPImageProcessorPil``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_file = Path(save_directory) / "model_index.json"
        index = json.loads(index_file.read_text())
        for name in ("feature_extractor_1", "feature_extractor_2"):
            library, class_name = index[name]
            index[name] = [library, class_name.removesuffix("Pil").removesuffix("Fast")]
        write_json(index_file, index)  # diffusers wrote the keys sorted; json keeps that order

    # ----------------------------------------------------------------------------- properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def uses_multi_instance_attention(self) -> bool:
        return any(isinstance(p, MIAttnProcessor2_0) and p.use_mi for p in self.transformer.attn_processors.values())

    # ----------------------------------------------------------------------------- conditioning
    def encode_image_1(self, image, device, num_images_per_prompt: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP ``image_embeds`` as one token ``(N, 1, C1)`` and the zero negative embedding.

        ``image``: PIL images / arrays (run through ``feature_extractor_1``) or a pixel tensor.
        """
        dtype = next(self.image_encoder_1.parameters()).dtype
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor_1(image, return_tensors="pt").pixel_values
        embeds = self.image_encoder_1(image.to(device=device, dtype=dtype)).image_embeds
        embeds = self._repeat(embeds, num_images_per_prompt).unsqueeze(1)
        return embeds, torch.zeros_like(embeds)

    def prepare_image_2_input(self, image_one, image_two, mask) -> torch.Tensor:
        """The 7-channel DINOv2 input ``[instance RGB | scene RGB | mask]``.

        RGB inputs go through ``feature_extractor_2`` (a tensor is taken as already processed).
        Masks (PIL "L" 0/255, arrays, or a ``(N, 1, H, W)`` tensor in [0, 1]) are scaled to
        [0, 1] and nearest-resized from the full frame to the processed size without cropping,
        exactly as upstream (so they are misaligned when the processor crops).
        """
        rgb = [images.float() if isinstance(images, torch.Tensor)
               else self.feature_extractor_2(images, return_tensors="pt").pixel_values for images in (image_one, image_two)]
        if isinstance(mask, torch.Tensor):
            masks = mask.float()
            if masks.ndim == 3:
                masks = masks[:, None]
        else:
            arrays = [np.asarray(m) for m in _as_list(mask)]
            if any(a.ndim != 2 for a in arrays):
                raise ValueError("masks must be single-channel (PIL 'L' or 2-D arrays)")
            masks = torch.stack([torch.from_numpy((a / 255.0).astype(np.float32))[None] for a in arrays])
        masks = F.interpolate(masks, size=rgb[0].shape[-2:], mode="nearest")
        return torch.cat([rgb[0], rgb[1], masks.to(rgb[0].dtype)], dim=1)

    def encode_image_2(self, image_one, image_two, mask, device, num_images_per_prompt: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv2 ``last_hidden_state`` ``(N, T2, C2)`` of the 7-channel input, and zeros."""
        dtype = next(self.image_encoder_2.parameters()).dtype
        pixels = self.prepare_image_2_input(image_one, image_two, mask).to(device=device, dtype=dtype)
        embeds = self._repeat(self.image_encoder_2(pixels).last_hidden_state, num_images_per_prompt)
        return embeds, torch.zeros_like(embeds)

    def _repeat(self, embeds: torch.Tensor, copies: int) -> torch.Tensor:
        if copies == 1:
            return embeds
        if self.uses_multi_instance_attention:
            # Copy-major (copy 1: instances 0..n-1, copy 2: ...) keeps each scene copy one group for
            # multi-instance attention; upstream's interleaved repeat would mix copies in a group.
            return embeds.repeat(copies, *([1] * (embeds.ndim - 1)))
        return embeds.repeat_interleave(copies, dim=0)  # upstream order

    def prepare_latents(self, batch_size, num_tokens, num_channels, dtype, device, generator, latents=None):
        """Initial noise ``(batch, num_tokens, num_channels)`` in one draw (instance i is row i)."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        return randn_tensor((batch_size, num_tokens, num_channels), generator=generator, device=device, dtype=dtype)

    # ----------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, sampled_points: torch.Tensor | None = None,
                       decode_progressive: bool = False, decode_to_cpu: bool = False,
                       bbox_min: np.ndarray = DEFAULT_BBOX_MIN, bbox_max: np.ndarray = DEFAULT_BBOX_MAX,
                       octree_depth: int = 8, indexing: str = "ij", padding: float = 0.05, num_chunks: int = 50000
                       ) -> tuple[torch.Tensor, list, list, list, list]:
        """Decodes latents on a dense grid (or given points), upstream's way.

        With ``decode_progressive`` each instance is decoded again on a grid over the bbox of
        its points with value <= 0, padded by ``padding`` (upstream's selection; with the
        positive-inside convention this is the outside region, kept for identical numbers).
        When an instance has no such point the previous instance's bbox is reused, as upstream.

        Returns:
            ``(values (N, Q, 1), grid_sizes, bbox_sizes, bbox_mins, bbox_maxs)``.
        """
        boxes: list[tuple] = []  # (grid_size, bbox_size, bbox_min, bbox_max) of each grid decoded on

        def grid(low: np.ndarray, high: np.ndarray) -> torch.Tensor:
            points, grid_size, bbox_size = generate_dense_grid_points(low, high, octree_depth, indexing)
            boxes.append((grid_size, bbox_size, low, high))
            return torch.from_numpy(points).to(device=latents.device, dtype=latents.dtype)

        def decode(points: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latents, sampled_points=points, num_chunks=num_chunks, to_cpu=decode_to_cpu).sample

        if sampled_points is None:
            sampled_points = grid(bbox_min, bbox_max)[None].expand(latents.shape[0], -1, -1)
        output = decode(sampled_points)
        if decode_progressive:
            boxes.clear()
            grids = []
            for i in range(latents.shape[0]):
                selected = sampled_points[i][output[i].squeeze(-1).to(sampled_points.device) <= 0]
                if selected.shape[0] == 0:
                    logger.warning("decode_latents: instance %d has no point with value <= 0; reusing the previous bbox", i)
                else:
                    bbox_min = (selected.min(dim=0).values - padding).float().cpu().numpy()
                    bbox_max = (selected.max(dim=0).values + padding).float().cpu().numpy()
                grids.append(grid(bbox_min, bbox_max))
            output = decode(torch.stack(grids))
        return (output, *[list(column) for column in zip(*boxes)]) if boxes else (output, [], [], [], [])

    # ----------------------------------------------------------------------------- checks
    def check_inputs(self, image, mask, image_scene, num_images_per_prompt, attention_kwargs) -> dict[str, Any]:
        """Validates the call and returns the attention kwargs to use."""
        images, masks, scenes = (_as_list(x) for x in (image, mask, image_scene))
        if not images:
            raise ValueError("no instance images given")
        if not (len(images) == len(masks) == len(scenes)):
            raise ValueError("image, mask and image_scene must have one entry per instance; "
                             f"got {len(images)}, {len(masks)}, {len(scenes)}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        kwargs = dict(attention_kwargs or {})
        if self.uses_multi_instance_attention and kwargs.get("num_instances") is None:
            kwargs["num_instances"] = len(images)  # all given instances form one scene
        n = kwargs.get("num_instances")
        if isinstance(n, int) and len(images) % n != 0:
            raise ValueError(f"num_instances={n} does not divide the {len(images)} instance images")
        return kwargs

    # ----------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(self, image, mask, image_scene, num_inference_steps: int = 50, timesteps: list[float] | None = None,
                 guidance_scale: float = 7.0, num_images_per_prompt: int = 1, sampled_points: torch.Tensor | None = None,
                 decode_progressive: bool = False, decode_to_cpu: bool = False,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 attention_kwargs: dict[str, Any] | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, output_type: str = "mesh_vf",
                 return_dict: bool = True, octree_depth: int = 8) -> MIDIPipelineOutput | tuple:
        """Generates one latent set per instance image (all instances of one scene together).

        Args:
            image: instance images (the scene image with everything but instance i painted white).
            mask: instance masks (PIL "L", 255 inside).
            image_scene: the full scene image, once per instance.
            num_inference_steps: Euler steps.
            timesteps: custom timesteps (0..1000, decreasing) instead of the default schedule.
            guidance_scale: classifier-free guidance (on when > 1; negatives are zeros).
            num_images_per_prompt: scene copies to generate.
            sampled_points: query points for decoding (default: a dense grid).
            decode_progressive: re-decode on per-instance bboxes (see :meth:`decode_latents`).
            decode_to_cpu: move decoded chunks to CPU.
            generator: RNG for the initial noise.
            latents: initial noise instead of drawing it.
            attention_kwargs: ``num_instances``, ``num_instances_per_batch``, ``scale`` (LoRA scale).
            callback_on_step_end: ``fn(pipe, i, t, tensors) -> dict`` after every step.
            callback_on_step_end_tensor_inputs: tensor names passed to the callback.
            output_type: ``"latent"`` returns latents; anything else decodes the fields.
            return_dict: return :class:`MIDIPipelineOutput` rather than a 5-tuple.
            octree_depth: dense decoding grid of ``2^depth + 1`` points per axis.
        """
        attention_kwargs = self.check_inputs(image, mask, image_scene, num_images_per_prompt, attention_kwargs)
        self._guidance_scale = guidance_scale
        batch_size = len(_as_list(image))
        device = self._execution_device

        embeds_1, negative_1 = self.encode_image_1(image, device, num_images_per_prompt)
        embeds_2, negative_2 = self.encode_image_2(image, image_scene, mask, device, num_images_per_prompt)
        if self.do_classifier_free_guidance:  # rows: [uncond ; cond]
            embeds_1 = torch.cat([negative_1, embeds_1])
            embeds_2 = torch.cat([negative_2, embeds_2])

        self.scheduler.set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        schedule = self.scheduler.timesteps
        config = self.transformer.config
        latents = self.prepare_latents(batch_size * num_images_per_prompt, config.width, config.in_channels,
                                       embeds_1.dtype, device, generator, latents)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        with self.progress_bar(total=len(schedule)) as progress_bar:
            for i, t in enumerate(schedule):
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                pred = self.transformer(model_input, t.expand(model_input.shape[0]), encoder_hidden_states=embeds_1,
                                        encoder_hidden_states_2=embeds_2, attention_kwargs=attention_kwargs,
                                        return_dict=False)[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    values = {"latents": latents, "image_embeds_1": embeds_1, "image_embeds_2": embeds_2}
                    result = callback_on_step_end(self, i, t, {k: values[k] for k in tensor_inputs}) or {}
                    latents = result.get("latents", latents)
                progress_bar.update()

        output, grids = latents, (None, None, None, None)
        if output_type != "latent":
            output, *grids = self.decode_latents(latents, sampled_points, decode_progressive, decode_to_cpu,
                                                 octree_depth=octree_depth)
        self.maybe_free_model_hooks()
        return MIDIPipelineOutput(output, *grids) if return_dict else (output, *grids)
