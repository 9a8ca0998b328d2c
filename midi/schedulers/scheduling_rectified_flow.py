"""Rectified-flow Euler scheduler of TripoSG / MIDI-3D, plus its training-time helpers.

Convention (opposite to diffusers' FlowMatchEulerDiscreteScheduler): ``x_sigma = (1 - sigma) x0 +
sigma eps``, the model predicts ``v = x0 - eps``, and a step moves towards data with
``x_next = x + (sigma - sigma_next) * v``. The module path and class name are fixed by the
released ``model_index.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import training_utils
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


def compute_density_for_timestep_sampling(weighting_scheme: str, batch_size: int, logit_mean: float = 0.0,
                                          logit_std: float = 1.0, mode_scale: float | None = None,
                                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws ``u in (0, 1)`` (on CPU) from the density named by ``weighting_scheme``.

    diffusers' SD3 helper, plus upstream MIDI's ``logit_normal_dist`` (its default), which is the
    same distribution as ``logit_normal``: ``sigmoid(n), n ~ N(logit_mean, logit_std^2)``.
    ``mode`` needs ``mode_scale``; anything else is uniform.
    """
    if weighting_scheme == "logit_normal_dist":
        weighting_scheme = "logit_normal"
    if weighting_scheme == "mode" and mode_scale is None:
        raise ValueError("weighting_scheme='mode' needs mode_scale")
    return training_utils.compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
        device="cpu", generator=generator,
    )


def compute_loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (diffusers' SD3 schemes): ``sigma_sqrt`` -> ``sigma^-2``; ``cosmap`` ->
    ``2 / (pi (1 - 2s + 2s^2))``; anything else (MIDI's default) -> 1."""
    return training_utils.compute_loss_weighting_for_sd3(weighting_scheme, sigmas)


@dataclass
class RectifiedFlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class RectifiedFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for rectified flow with an optional (static or dynamic) sigma shift.

    Args:
        num_train_timesteps (int, default 1000): ``timestep = num_train_timesteps * sigma``.
        shift (float, default 1.0): static shift ``s*sigma / (1 + (s-1)*sigma)``.
        use_dynamic_shifting (bool, default False): shift with ``e^mu / (e^mu + 1/sigma - 1)``;
            ``set_timesteps`` then needs ``mu``.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False) -> None:
        timesteps = np.array([(1.0 - i / num_train_timesteps) * num_train_timesteps for i in range(num_train_timesteps)])
        sigmas = torch.from_numpy(timesteps).to(torch.float32) / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = self.shift_sigmas(sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None

    def shift_sigmas(self, sigmas, mu: float | None = None):
        """Applies the configured shift (see the class docstring) to sigmas, numpy or torch."""
        if not self.config.use_dynamic_shifting:
            s = self.config.shift
            return s * sigmas / (1 + (s - 1) * sigmas)  # the identity for s = 1
        if mu is None:
            raise ValueError("use_dynamic_shifting=True: pass mu")
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        """Builds the sampling schedule ``sigma_i = shift(1 - i/n)``, ``i = 0..n-1``, plus a final 0.

        Args:
            num_inference_steps: ``n``.
            device: where the tables live.
            sigmas: custom decreasing sigmas in (0, 1] (shifted like the default ones).
            mu: dynamic-shift parameter (only with ``use_dynamic_shifting``).
            timesteps: custom timesteps on the 0..T scale, used as given (no shift).
        """
        T = self.config.num_train_timesteps
        if timesteps is not None:
            sigma_np = np.asarray(timesteps, dtype=np.float64) / T
        else:
            if sigmas is None:
                if not num_inference_steps or num_inference_steps < 1:
                    raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
                # Computed in float64 like upstream, so timesteps match bit for bit after the cast.
                sigma_np = np.array([(1.0 - i / num_inference_steps) * T for i in range(num_inference_steps)]) / T
            else:
                sigma_np = np.asarray(sigmas, dtype=np.float64)
            sigma_np = self.shift_sigmas(sigma_np, mu)
        sigma_t = torch.from_numpy(np.asarray(sigma_np)).to(dtype=torch.float32, device=device)
        self.num_inference_steps = len(sigma_t)
        self.timesteps = sigma_t * T
        self.sigmas = torch.cat([sigma_t, torch.zeros(1, device=sigma_t.device)])
        self._step_index = None

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in the schedule; pass one of scheduler.timesteps")
        return indices[1 if len(indices) > 1 else 0].item()

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, **unused
             ) -> RectifiedFlowSchedulerOutput | tuple[torch.Tensor]:
        """One Euler step ``x + (sigma_i - sigma_{i+1}) * v`` computed in fp32, cast to the output dtype."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)):
            raise ValueError("pass one of scheduler.timesteps (a float), not an integer index")
        if self._step_index is None:  # the first step: find where the caller's schedule starts
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        prev = (sample.to(torch.float32) + (sigma - sigma_next) * model_output).to(model_output.dtype)
        self._step_index += 1
        return RectifiedFlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def scale_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``(1 - t/T) x0 + (t/T) eps``."""
        sigmas = timesteps.to(torch.float32) / self.config.num_train_timesteps
        while sigmas.ndim < original_samples.ndim:
            sigmas = sigmas.unsqueeze(-1)
        return (1.0 - sigmas) * original_samples + sigmas * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
