"""The rectified-flow objective: sign, interpolation, per-scene sigma, condition dropout, weighting.

The sampler check ties training and inference together: a stand-in transformer that returns the
ideal velocity built from :func:`make_noisy_latents` / :func:`flow_target` must drive MIDI's real
pipeline onto the target scene, and the same stand-in must give zero training loss. A sign error
in either function breaks both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midi.schedulers.scheduling_rectified_flow import RectifiedFlowScheduler, compute_loss_weighting
from midi.training.batches import TrainBatch
from midi.training.objective import (
    NUM_TRAIN_TIMESTEPS,
    FlowMatchingModel,
    conditioning_losses,
    drop_conditions,
    encode_x0,
    flow_matching_loss,
    flow_target,
    make_noisy_latents,
    repeat_per_scene,
    sample_scene_sigmas,
    shifted_within_scenes,
    training_step,
    validation_loss,
)


def ideal_velocity(x_sigma: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact velocity field of a single data point ``x0``, from the objective's own functions.

    Along the path, ``noise = (x_sigma - (1 - sigma) x0) / sigma``; the target is then
    ``flow_target(x0, noise)``. A sampler that follows it lands on ``x0``.
    """
    s = sigma.to(x_sigma.dtype).view(-1, *([1] * (x_sigma.ndim - 1)))
    # Recover the noise the interpolation must have used: invert make_noisy_latents for noise.
    noise = (x_sigma - make_noisy_latents(x0, torch.zeros_like(x0), sigma)) / s
    return flow_target(x0, noise)


def test_interpolation_endpoints_and_target_sign():
    x0, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    torch.testing.assert_close(make_noisy_latents(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(make_noisy_latents(x0, noise, torch.ones(2)), noise)
    torch.testing.assert_close(flow_target(x0, noise), x0 - noise)  # data minus noise, not diffusers' eps - x0
    # The scheduler's own forward process agrees with ours.
    sigma = torch.tensor([0.3, 0.8])
    scheduler = RectifiedFlowScheduler()
    torch.testing.assert_close(scheduler.scale_noise(x0, noise, sigma * NUM_TRAIN_TIMESTEPS),
                               make_noisy_latents(x0, noise, sigma))


class _IdealFlow:
    """Stand-in transformer: the exact velocity field of one scene ``x0`` (optionally sign-flipped)."""

    def __init__(self, x0: torch.Tensor, sign: float = 1.0) -> None:
        self.x0, self.sign, self.calls = x0, sign, []

    def __call__(self, hidden_states, timestep, encoder_hidden_states=None, encoder_hidden_states_2=None,
                 attention_kwargs=None, return_dict=True, **_):
        sigma = timestep.float() / NUM_TRAIN_TIMESTEPS
        self.calls.append(attention_kwargs)
        x0 = self.x0.repeat(hidden_states.shape[0] // self.x0.shape[0], 1, 1)
        return (self.sign * ideal_velocity(hidden_states.float(), x0, sigma),)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ideal_velocity_drives_the_midi_pipeline_onto_the_scene(tiny_pipe, monkeypatch, steps):
    from midi.tiny import TINY_MI_BLOCKS

    tiny_pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True)
    config = tiny_pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, config.width, config.in_channels, generator=g)  # one scene of 3 instances
    noise = torch.randn(x0.shape, generator=g)
    images = [np.full((32, 32, 3), 200, np.uint8)] * 3
    masks = [np.full((32, 32), 255, np.uint8)] * 3

    def sample(sign: float) -> torch.Tensor:
        stand_in = _IdealFlow(x0, sign)
        monkeypatch.setattr(tiny_pipe.transformer, "forward", stand_in)
        out = tiny_pipe(images, masks, images, num_inference_steps=steps, guidance_scale=1.0, latents=noise.clone(),
                        output_type="latent").samples
        assert stand_in.calls[0]["num_instances"] == 3
        return out

    torch.testing.assert_close(sample(+1.0), x0, atol=1e-4, rtol=1e-4)
    assert (sample(-1.0) - x0).abs().mean() > 1.0  # the flipped sign ends far from the scene


def test_ideal_velocity_gives_zero_training_loss(tiny_pipe):
    """training_step builds x_sigma and the target with the same convention the sampler integrates."""
    x0 = torch.randn(5, 64, 8)

    class Model(torch.nn.Module):
        def forward(self, x_sigma, timestep, batch, drop_rows):
            # Analytically, not via flow_target/ideal_velocity, so a flipped flow_target is caught here:
            # x = (1 - s) x0 + s eps  =>  x0 - eps = (x0 - x) / s.
            sigma = (timestep / NUM_TRAIN_TIMESTEPS).view(-1, 1, 1)
            return (x0 - x_sigma) / sigma

    batch = TrainBatch(["a", "b"], [2, 3], [2, 3], posterior=torch.cat([x0, torch.full_like(x0, -30.0)], -1))
    objective = type("O", (), dict(sample_posterior=False, timestep_sampling="logit_normal", logit_mean=0.0,
                                   logit_std=1.0, mode_scale=None, condition_drop_prob=0.0, loss_weighting="none"))
    out = training_step(Model(), None, tiny_pipe.scheduler, batch, objective, 64, torch.Generator().manual_seed(0))
    assert float(out.loss) < 1e-10

    class Flipped(Model):
        def forward(self, *args):
            return -super().forward(*args)

    out = training_step(Flipped(), None, tiny_pipe.scheduler, batch, objective, 64, torch.Generator().manual_seed(0))
    assert float(out.loss) > 1.0


def _objective(**kw):
    base = dict(sample_posterior=True, timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
                mode_scale=None, condition_drop_prob=0.0, loss_weighting="none")
    return type("O", (), {**base, **kw})


class _Recorder(torch.nn.Module):
    """Records what the transformer would see: timesteps and the (possibly dropped) conditions."""

    def __init__(self):
        super().__init__()
        self.seen = {}
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_sigma, timestep, batch, drop_rows):
        e1 = drop_conditions(batch.embeds_1, drop_rows)
        e2 = drop_conditions(batch.embeds_2, drop_rows)
        self.seen = {"timestep": timestep, "e1": e1, "e2": e2}
        return x_sigma * self.w


def _batch(rows=(2, 3, 1)) -> TrainBatch:
    total = sum(rows)
    return TrainBatch([f"s{i}" for i in range(len(rows))], list(rows), list(rows),
                      posterior=torch.randn(total, 64, 16), embeds_1=torch.randn(total, 1, 4) + 5,
                      embeds_2=torch.randn(total, 3, 4) + 5)


def test_one_sigma_per_scene_shared_by_its_instances():
    model, batch = _Recorder(), _batch()
    out = training_step(model, None, RectifiedFlowScheduler(), batch, _objective(), 64, torch.Generator().manual_seed(0))
    t = model.seen["timestep"]
    torch.testing.assert_close(t, repeat_per_scene(out.sigmas, batch.rows_per_scene) * NUM_TRAIN_TIMESTEPS)
    assert len(set(t.tolist())) == 3


def test_timesteps_follow_the_schedulers_num_train_timesteps():
    model, batch = _Recorder(), _batch()
    scheduler = RectifiedFlowScheduler(num_train_timesteps=500)
    out = training_step(model, None, scheduler, batch, _objective(), 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.seen["timestep"], repeat_per_scene(out.sigmas, batch.rows_per_scene) * 500)


def test_the_vae_encodes_outside_the_outer_autocast():
    class Vae(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.autocast = None

        def encode(self, x, num_tokens, seed):
            from midi.models.autoencoders.autoencoder_kl_triposg import DiagonalGaussianDistribution

            self.autocast = torch.is_autocast_enabled("cpu")
            return type("E", (), {"latent_dist": DiagonalGaussianDistribution(torch.zeros(x.shape[0], num_tokens, 4))})

    vae = Vae()
    batch = TrainBatch(["a"], [2], [2], surfaces=torch.randn(2, 16, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0 = encode_x0(vae, batch, 8, False, torch.Generator().manual_seed(0))
    assert vae.autocast is False and x0.dtype == torch.float32


def test_batches_pin_their_tensors_for_the_dataloader(monkeypatch):
    """DataLoader(pin_memory=True) pins a custom batch only through its pin_memory() method."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t)  # no CUDA here
    batch = _batch()
    out = pin_memory(batch)
    assert out is batch and len(pinned) == 3  # posterior, embeds_1, embeds_2


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_condition_dropout_is_per_scene_and_drops_both_encoders(prob):
    model, batch = _Recorder(), _batch((2, 3, 1, 2, 2, 3))
    out = training_step(model, None, RectifiedFlowScheduler(), batch, _objective(condition_drop_prob=prob), 64,
                        torch.Generator().manual_seed(1))
    dropped_rows = repeat_per_scene(out.dropped, batch.rows_per_scene)
    for key in ("e1", "e2"):
        seen = model.seen[key]
        assert torch.all(seen[dropped_rows] == 0)  # exactly the pipeline's zero negative embedding
        assert torch.all(seen[~dropped_rows] != 0)
    if prob in (0.0, 1.0):
        assert bool(out.dropped.all()) == (prob == 1.0) and bool(out.dropped.any()) == (prob == 1.0)
    else:
        assert 0 < int(out.dropped.sum()) < 6


def test_sigma_density_and_shift():
    g = torch.Generator().manual_seed(0)
    u = sample_scene_sigmas(20000, RectifiedFlowScheduler(), "logit_normal", generator=g)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    shifted = RectifiedFlowScheduler(shift=3.0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = sample_scene_sigmas(100, RectifiedFlowScheduler(), generator=g1)
    torch.testing.assert_close(sample_scene_sigmas(100, shifted, generator=g2), 3 * plain / (1 + 2 * plain))
    uniform = sample_scene_sigmas(20000, RectifiedFlowScheduler(), "uniform", generator=g)
    assert abs(float(uniform.std()) - (1 / 12) ** 0.5) < 0.01


def test_loss_weighting_is_per_row():
    pred, target = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    sigma = torch.tensor([0.5, 0.5, 0.25])
    w = compute_loss_weighting("sigma_sqrt", sigma)
    torch.testing.assert_close(flow_matching_loss(pred, target, w), torch.tensor((4 + 4 + 16) / 3))
    torch.testing.assert_close(flow_matching_loss(pred, target, compute_loss_weighting("none", sigma)),
                               torch.tensor(1.0))


def test_x0_is_seeded_and_fresh_per_draw(tiny_pipe):
    batch = TrainBatch(["a"], [2], [2], surfaces=torch.randn(2, 256, 6))
    a = encode_x0(tiny_pipe.vae, batch, 64, True, torch.Generator().manual_seed(0))
    b = encode_x0(tiny_pipe.vae, batch, 64, True, torch.Generator().manual_seed(0))
    c = encode_x0(tiny_pipe.vae, batch, 64, True, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    mean = encode_x0(tiny_pipe.vae, batch, 64, False, torch.Generator().manual_seed(0))
    assert a.shape == mean.shape == (2, 64, 8)


def test_shifted_conditions_stay_inside_their_scene():
    assert shifted_within_scenes([3, 1, 2]).tolist() == [1, 2, 0, 3, 5, 4]


def _cached_batch(pipe, rows) -> TrainBatch:
    """A batch as the feature cache gives it: posteriors and embeddings, a different condition per row."""
    total, t = sum(rows), pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    posterior = torch.cat([torch.randn(total, t.width, t.in_channels, generator=g),
                           torch.full((total, t.width, t.in_channels), -30.0)], -1)
    return TrainBatch([f"s{i}" for i in range(len(rows))], list(rows), list(rows), posterior=posterior,
                      embeds_1=torch.randn(total, 1, t.cross_attention_dim, generator=g),
                      embeds_2=torch.randn(total, 5, t.cross_attention_2_dim, generator=g))


def test_conditioning_losses_own_is_the_validation_loss_and_shuffling_changes_it(tiny_pipe):
    model, sigmas = FlowMatchingModel(tiny_pipe).eval(), [0.3, 0.9]
    width = tiny_pipe.transformer.config.width
    batch = _cached_batch(tiny_pipe, [2, 3])
    sums = conditioning_losses(model, tiny_pipe.vae, batch, sigmas, width, seed=7)
    total, count = validation_loss(model, tiny_pipe.vae, batch, sigmas, width, seed=7)
    assert sum(sums["own"]) == pytest.approx(total, rel=1e-6) and count == len(sigmas) * batch.num_rows
    assert all(abs(a - b) > 1e-6 for a, b in zip(sums["own"], sums["shuffled"]))
    assert all(abs(a - b) > 1e-6 for a, b in zip(sums["own"], sums["none"]))
    # One instance per scene: nothing to shuffle, so own and shuffled are the same numbers.
    single = conditioning_losses(model, tiny_pipe.vae, _cached_batch(tiny_pipe, [1, 1]), sigmas, width, seed=7)
    assert single["own"] == single["shuffled"]


# ----------------------------------------------------------------------------- slow: real overfit
def _chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """Order-free distance between two token sets ``(T, C)``: mean squared NN distance both ways."""
    d = torch.cdist(a, b).pow(2)
    return float(d.min(1).values.mean() + d.min(0).values.mean())


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_overfitting_one_scene_then_sampling_reaches_it(sign, monkeypatch, tmp_path):
    """Full finetune of the upstream tiny DiT on one synthetic scene; sampling must land near it.

    x0 = the VAE posterior means of the scene's objects, conditions = the pipeline's embeddings of
    its view. Reference (upstream tiny model, 1500 steps): token-set Chamfer 12.4 untrained -> ~3.2,
    flipped sign ~27. ``sign=-1`` trains towards ``noise - x0`` (diffusers' convention) and must fail.
    """
    from midi.data.dataset import load_scene_sample, open_dataset
    from midi.data.jobs import PrepareOptions
    from midi.data.prepare import prepare_synthetic
    from midi.pipelines.pipeline_midi import MIDIPipeline
    from midi.tiny import TINY_MI_BLOCKS
    from midi.training import objective as training
    from midi.training.batches import ConditionPreprocessor
    from training.conftest import UPSTREAM_PIPELINE

    torch.set_num_threads(1)
    pipe = MIDIPipeline.from_pretrained(UPSTREAM_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True)
    prepare_synthetic(tmp_path / "scene", 1, seed=3, options=PrepareOptions(image_size=64, num_samples=2048,
                                                                             val_fraction=0))
    sample = load_scene_sample(open_dataset(tmp_path / "scene")[0], 0, 2048, np.random.default_rng(0), image_size=64)
    pixels = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)(
        sample.instance_images, sample.masks, sample.scene_image)
    n = sample.num_instances
    with torch.no_grad():
        x0 = pipe.vae.encode(torch.from_numpy(sample.surfaces), num_tokens=64, seed=0).latent_dist.mean
        e1, _ = pipe.encode_image_1(pixels["pixels_1"], "cpu")
        e2, _ = pipe.encode_image_2(pixels["pixels_2_instance"], pixels["pixels_2_scene"], pixels["masks"], "cpu")
    kwargs = dict(encoder_hidden_states=e1, encoder_hidden_states_2=e2, attention_kwargs={"num_instances": n},
                  return_dict=False)
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def sample_distance() -> float:
        transformer.eval()
        pipe.scheduler.set_timesteps(50)
        x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(42))
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(transformer(x, t.expand(n), **kwargs)[0], t, x, return_dict=False)[0]
        transformer.train()
        return float(np.mean([_chamfer(x[i], x0[i]) for i in range(n)]))

    untrained = sample_distance()
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    if sign < 0:
        monkeypatch.setattr(training, "flow_target", lambda x0, noise: noise - x0)
    for _ in range(1500):
        noise = torch.randn(x0.shape, generator=g)
        sigma = training.repeat_per_scene(training.sample_scene_sigmas(1, pipe.scheduler, generator=g), [n])
        pred = transformer(make_noisy_latents(x0, noise, sigma), sigma * NUM_TRAIN_TIMESTEPS, **kwargs)[0]
        loss = flow_matching_loss(pred, training.flow_target(x0, noise), torch.ones(n))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    distance = sample_distance()
    print(f"\nsign {sign:+.0f}: token-set Chamfer untrained {untrained:.2f} -> after 1500 steps {distance:.2f}")
    if sign > 0:
        assert distance < 0.5 * untrained
    else:
        assert distance > untrained
