"""The MIDI-3D rectified-flow training objective and one training step.

Convention (upstream-facts 5.3, the sign MIDI's sampler integrates): with data ``x0``, noise
``eps`` and ``sigma`` in (0, 1]

    x_sigma  = (1 - sigma) x0 + sigma eps          (:func:`make_noisy_latents`)
    timestep = T sigma, T = scheduler.config.num_train_timesteps (1000; the DiT's input scale)
    target   = x0 - eps                              (:func:`flow_target`; NOT diffusers' eps - x0)

so the scheduler's Euler step ``x + (sigma_i - sigma_{i+1}) v`` moves towards the data. One sigma
is drawn per *scene* and shared by all its instances (MIDI denoises a scene's instances jointly),
and both image conditions of a scene are replaced by zeros together (exactly the pipeline's
negative embedding) with probability ``condition_drop_prob``.

A batch holds the instance rows of several scenes back to back; ``rows_per_scene`` says how many
rows each scene occupies and ``num_instances`` how many of those are real instances (equal in
packed mode; in upstream's padded mode the remaining rows are duplicates that attend alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from midi.models.autoencoders.autoencoder_kl_triposg import DiagonalGaussianDistribution
from midi.schedulers.scheduling_rectified_flow import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting,
)
from midi.training.batches import TrainBatch, item_seed

NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------- pure objective
def make_noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma noise`` with one sigma per row.

    Args:
        x0: clean latents ``(R, T, C)``.
        noise: ``(R, T, C)``.
        sigma: ``(R,)`` in [0, 1].
    """
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the DiT regresses: ``x0 - noise`` (data minus noise)."""
    return x0 - noise


def repeat_per_scene(values: torch.Tensor, rows_per_scene: Sequence[int]) -> torch.Tensor:
    """Repeats one value per scene over that scene's rows: ``(S,) -> (sum rows,)``."""
    counts = torch.as_tensor(list(rows_per_scene), device=values.device)
    return values.repeat_interleave(counts, dim=0)


def sample_scene_sigmas(
    num_scenes: int,
    scheduler,
    timestep_sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One sigma per scene: ``u`` from the configured density, then the scheduler's shift.

    Returns:
        ``(num_scenes,)`` float32 on CPU, in (0, 1).
    """
    u = compute_density_for_timestep_sampling(
        timestep_sampling, num_scenes, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
        generator=generator)
    return scheduler.shift_sigmas(u.float()).float()


def drop_conditions(embeds: torch.Tensor, drop_rows: torch.Tensor) -> torch.Tensor:
    """Replaces the rows flagged in ``drop_rows`` by zeros (the pipeline's negative embedding)."""
    mask = drop_rows.to(embeds.device).view(-1, *([1] * (embeds.ndim - 1)))
    return torch.where(mask, torch.zeros_like(embeds), embeds)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean(w * (pred - target)^2)``: every element counts once, so every instance row has equal weight.

    Args:
        pred, target: ``(R, T, C)``.
        weights: ``(R,)`` per-row loss weights.
    """
    per_row = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    return (weights.to(per_row) * per_row).mean()


def attention_kwargs_for(batch: TrainBatch) -> dict[str, Any]:
    """Multi-instance attention arguments: per-scene counts, packed or padded."""
    kwargs: dict[str, Any] = {"num_instances": list(batch.num_instances)}
    if batch.num_instances_per_batch is not None:
        kwargs["num_instances_per_batch"] = batch.num_instances_per_batch
    return kwargs


# ----------------------------------------------------------------------------- model wrapper
class FlowMatchingModel(nn.Module):
    """The trainable part of MIDI-3D in one module (what accelerate/DDP wraps).

    Holds the pipeline's transformer and image encoders as submodules (the same objects, so the
    pipeline keeps working for previews and export) and runs the conditioning through the
    pipeline's own ``encode_image_1`` / ``encode_image_2``, i.e. exactly the inference path.
    """

    def __init__(self, pipe) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.image_encoder_1 = pipe.image_encoder_1
        self.image_encoder_2 = pipe.image_encoder_2
        self._pipe = [pipe]  # a list, so the pipeline is not registered as a submodule

    @property
    def pipe(self):
        """The pipeline whose models this module trains."""
        return self._pipe[0]

    def train(self, mode: bool = True) -> FlowMatchingModel:
        """Train mode only where something trains (frozen encoders stay in eval mode)."""
        for module in (self.transformer, self.image_encoder_1, self.image_encoder_2):
            module.train(mode and _trains(module))
        self.training = mode
        return self

    def encode_conditions(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP and DINOv2 embeddings of the batch (cached ones are used as they are)."""
        device = self.transformer.device
        if batch.embeds_1 is not None and batch.embeds_2 is not None:
            # Cached (float16 on disk): hand them over in the dtype the encoders would produce.
            dtype_1 = next(self.image_encoder_1.parameters()).dtype
            dtype_2 = next(self.image_encoder_2.parameters()).dtype
            return batch.embeds_1.to(device, dtype_1), batch.embeds_2.to(device, dtype_2)
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(self.image_encoder_1)):
            embeds_1, _ = self.pipe.encode_image_1(batch.pixels_1, device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(self.image_encoder_2)):
            embeds_2, _ = self.pipe.encode_image_2(batch.pixels_2_instance, batch.pixels_2_scene, batch.masks, device)
        return embeds_1, embeds_2

    def forward(
        self, x_sigma: torch.Tensor, timestep: torch.Tensor, batch: TrainBatch, drop_rows: torch.Tensor
    ) -> torch.Tensor:
        """Predicted velocity ``(R, T, C)`` for noisy latents; ``drop_rows`` zeroes both conditions."""
        embeds_1, embeds_2 = self.encode_conditions(batch)
        return self.velocity(x_sigma, timestep, batch, drop_conditions(embeds_1, drop_rows),
                             drop_conditions(embeds_2, drop_rows))

    def velocity(self, x_sigma: torch.Tensor, timestep: torch.Tensor, batch: TrainBatch, embeds_1: torch.Tensor,
                 embeds_2: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity ``(R, T, C)`` under given embeddings (CLIP ``(R, 1, C1)``, DINOv2
        ``(R, T2, C2)``), with the batch's multi-instance grouping."""
        return self.transformer(
            x_sigma,
            timestep,
            encoder_hidden_states=embeds_1,
            encoder_hidden_states_2=embeds_2,
            attention_kwargs=attention_kwargs_for(batch),
            return_dict=False,
        )[0]


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------- step
@dataclass
class StepOutput:
    """What one micro-step produced (tensors stay on the training device)."""

    loss: torch.Tensor
    sigmas: torch.Tensor  # (S,) per scene
    dropped: torch.Tensor  # (S,) bool
    num_rows: int
    num_tokens: int


def seed_step(seed: int, *keys: int) -> torch.Generator:
    """Seeds torch's global RNG (LoRA dropout) and returns the CPU generator of every other draw of a
    micro-step, both from ``(seed, *keys)``: the same masks and noise whether or not a run was resumed."""
    step_seed = item_seed(seed, *keys)
    torch.manual_seed(step_seed)
    return torch.Generator().manual_seed(step_seed)


@torch.no_grad()
def encode_x0(
    vae, batch: TrainBatch, num_tokens: int, sample_posterior: bool, generator: torch.Generator
) -> torch.Tensor:
    """Clean latents ``(R, T, C)`` in float32: the VAE posterior of every instance's surface.

    The surface path encodes with a seed drawn from ``generator`` (the VAE's random point subset);
    the cached path rebuilds the posterior from the stored ``[mean | logvar]``. Either way a
    posterior sample is drawn fresh with ``generator`` (or the mean is taken).
    """
    if batch.posterior is not None:
        posterior = DiagonalGaussianDistribution(batch.posterior.float())
    else:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        vae_dtype = next(vae.parameters()).dtype
        with torch.autocast(batch.surfaces.device.type, enabled=False):  # the VAE runs in its own (fp32) dtype
            posterior = vae.encode(batch.surfaces.to(vae_dtype), num_tokens=num_tokens, seed=seed).latent_dist
    x0 = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
    return x0.float()


def training_step(
    model: nn.Module,
    vae,
    scheduler,
    batch: TrainBatch,
    objective,
    num_tokens: int,
    generator: torch.Generator,
) -> StepOutput:
    """One forward pass of the objective on a batch (no backward).

    Args:
        model: a :class:`FlowMatchingModel` (possibly wrapped by accelerate/DDP).
        vae: the frozen VAE (unused when the batch carries cached posteriors).
        scheduler: the pipeline's :class:`RectifiedFlowScheduler` (for its sigma shift).
        batch: the batch, already on the training device.
        objective: a :class:`midi.config.ObjectiveConfig`.
        num_tokens: latent tokens per instance (``transformer.config.width``).
        generator: CPU generator for every random draw of the step (sigmas, dropout, noise).

    Returns:
        The :class:`StepOutput` with the scalar loss.
    """
    x0 = encode_x0(vae, batch, num_tokens, objective.sample_posterior, generator)
    device = x0.device
    num_scenes = len(batch.rows_per_scene)
    sigmas = sample_scene_sigmas(num_scenes, scheduler, objective.timestep_sampling, objective.logit_mean,
                                 objective.logit_std, objective.mode_scale, generator)
    dropped = torch.rand(num_scenes, generator=generator) < objective.condition_drop_prob
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
    sigma_rows = repeat_per_scene(sigmas, batch.rows_per_scene).to(device)
    x_sigma = make_noisy_latents(x0, noise, sigma_rows)
    num_train_timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", NUM_TRAIN_TIMESTEPS)
    pred = model(x_sigma, num_train_timesteps * sigma_rows, batch, repeat_per_scene(dropped, batch.rows_per_scene))
    weights = compute_loss_weighting(objective.loss_weighting, sigma_rows)
    loss = flow_matching_loss(pred, flow_target(x0, noise), weights)
    return StepOutput(loss, sigmas, dropped, batch.num_rows, batch.num_rows * num_tokens)


@torch.no_grad()
def validation_loss(
    model: FlowMatchingModel, vae, batch: TrainBatch, sigmas: Sequence[float], num_tokens: int, seed: int
) -> tuple[float, int]:
    """Loss of one batch at fixed sigmas with fixed noise (no condition dropout, posterior mean).

    Returns:
        ``(sum over sigmas and rows of the per-row loss, number of terms)``, to be averaged across
        batches and processes.
    """
    generator = torch.Generator().manual_seed(seed)
    x0 = encode_x0(vae, batch, num_tokens, sample_posterior=False, generator=generator)
    keep = torch.zeros(batch.num_rows, dtype=torch.bool)
    total, count = 0.0, 0
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        sigma_rows = torch.full((batch.num_rows,), float(sigma), device=x0.device)
        pred = model(make_noisy_latents(x0, noise, sigma_rows), NUM_TRAIN_TIMESTEPS * sigma_rows, batch, keep)
        per_row = (pred.float() - flow_target(x0, noise)).pow(2).mean(dim=(1, 2))
        total += float(per_row.sum())
        count += per_row.numel()
    return total, count


CONDITION_VARIANTS = ("own", "shuffled", "none")


def shifted_within_scenes(rows_per_scene: Sequence[int]) -> torch.Tensor:
    """Row order giving each instance the next instance's conditions in its scene (a cyclic shift within
    each scene; a one-instance scene keeps its own)."""
    order, start = [], 0
    for n in rows_per_scene:
        order += [start + (i + 1) % n for i in range(n)]
        start += n
    return torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def conditioning_losses(
    model: FlowMatchingModel, vae, batch: TrainBatch, sigmas: Sequence[float], num_tokens: int, seed: int
) -> dict[str, list[float]]:
    """How much the model reads its image conditions: the loss of one batch, per sigma, with each instance's
    own conditions, with another instance's of the same scene (:func:`shifted_within_scenes`) and with none
    (zeros, classifier-free guidance's negative).

    The three share the posterior mean and the noise of each sigma, as :func:`validation_loss` does, so
    their differences come from the conditions alone: ``own`` < ``shuffled`` says the model tells the
    instances of a scene apart by their images and masks, ``own`` < ``none`` that it uses the images at all.

    Returns:
        variant -> per sigma, the sum over rows of the per-row loss (divide by ``batch.num_rows``).
    """
    generator = torch.Generator().manual_seed(seed)
    x0 = encode_x0(vae, batch, num_tokens, sample_posterior=False, generator=generator)
    embeds_1, embeds_2 = model.encode_conditions(batch)
    shift = shifted_within_scenes(batch.rows_per_scene).to(embeds_1.device)
    variants = {"own": (embeds_1, embeds_2), "shuffled": (embeds_1[shift], embeds_2[shift]),
                "none": (torch.zeros_like(embeds_1), torch.zeros_like(embeds_2))}
    sums: dict[str, list[float]] = {name: [] for name in CONDITION_VARIANTS}
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        sigma_rows = torch.full((batch.num_rows,), float(sigma), device=x0.device)
        x_sigma = make_noisy_latents(x0, noise, sigma_rows)
        for name, (e1, e2) in variants.items():
            pred = model.velocity(x_sigma, NUM_TRAIN_TIMESTEPS * sigma_rows, batch, e1, e2)
            sums[name].append(float((pred.float() - flow_target(x0, noise)).pow(2).mean(dim=(1, 2)).sum()))
    return sums
