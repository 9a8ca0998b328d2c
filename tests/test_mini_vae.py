"""midi-mini VAE pretraining: analytic shapes, the decoder's sign, and a bit-exact resume of the recipe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

try:  # the package is being reorganised: extraction moved under midi.inference
    from midi.inference.extraction import ExtractionConfig, extract_coarse_to_fine
except ImportError:  # pragma: no cover - the layout before the move
    from midi.extraction import ExtractionConfig, extract_coarse_to_fine
from midi.data.shapes import KINDS, Part, random_shape, sample_surface, shape_bounds, shape_field
from midi.mini.pretrain_vae import (
    VAERecipe,
    build_vae,
    f_score,
    kl_weight_at,
    losses,
    make_batch,
    recon_terms,
    train,
)

PARAMS = {"box": [0.3, 0.15, 0.25], "sphere": [0.3], "cylinder": [0.2, 0.3], "cone": [0.3, 0.25],
          "capsule": [0.12, 0.2], "torus": [0.3, 0.1]}
TINY = VAERecipe(width_encoder=16, width_decoder=16, num_attention_heads=2, latent_channels=4, num_tokens=8,
                 batch_size=2, surface_points=64, near_points=32, uniform_points=32, steps=6, warmup_steps=2,
                 eval_every=1000, eval_shapes=1, eval_depth=4, log_every=2)


def _posed(kind: str, rng: np.random.Generator) -> Part:
    rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    return Part(kind, np.array(PARAMS[kind]), rot, rng.uniform(-0.3, 0.3, 3), scale=1.3)


@pytest.mark.parametrize("kind", KINDS)
def test_analytic_field_matches_mesh_and_surface(kind: str) -> None:
    rng = np.random.default_rng(0)
    part = _posed(kind, rng)
    pts, nrm = sample_surface([part], 500, rng)
    assert np.abs(part.field(pts)).max() < 1e-5  # samples lie on the exact surface
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1.0, atol=1e-6)
    assert (part.field(pts + 0.01 * nrm) < 0).all() and (part.field(pts - 0.01 * nrm) > 0).mean() > 0.95  # thin tips
    # Positive inside = trimesh's inside test, away from the tessellation's sag.
    q = rng.uniform(-1.0, 1.0, (3000, 3))
    f = part.field(q)
    far = np.abs(f) > 0.02
    assert ((f > 0) == part.mesh().contains(q))[far].all()


def test_known_distances() -> None:
    eye, zero = np.eye(3), np.zeros(3)
    box = Part("box", np.array([0.5, 0.2, 0.1]), eye, zero)
    np.testing.assert_allclose(box.field(np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.8, 0.6, 0.0]])),
                               [0.1, -1.0, -0.5])  # 3-4-5 triangle to the corner
    cone = Part("cone", np.array([0.5, 0.5]), eye, zero)  # apex (0, 0, 0.5), base radius 0.5 at z = -0.5
    np.testing.assert_allclose(cone.field(np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -0.6]])), [-0.5, -0.1])
    torus = Part("torus", np.array([0.4, 0.1]), eye, np.array([0.1, 0.0, 0.0]), scale=2.0)
    np.testing.assert_allclose(torus.field(np.array([[0.9, 0.0, 0.0], [0.1, 0.0, 0.0]])), [0.2, -0.6])


def test_random_shapes_sit_in_the_scene_frame() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        parts = random_shape(rng)
        lo, hi = shape_bounds(parts)
        assert lo.min() >= -0.951 and hi.max() <= 0.951 and 0.39 < (hi - lo).max() < 1.21
        pts, _ = sample_surface(parts, 256, rng)
        assert np.abs(shape_field(parts, pts)).max() < 1e-4  # on the union's surface, not inside it


def test_target_sign_is_extractions() -> None:
    """A latent-free stand-in that decodes the training target must extract the right surface."""
    sphere = [Part("sphere", np.array([0.4]), np.eye(3), np.array([0.2, 0.0, 0.0]))]

    class TargetVAE:  # decode() -> the recipe's target field, shaped like TripoSGVAEModel's output
        def decode(self, z, sampled_points, num_chunks=50000):
            values = shape_field(sphere, sampled_points[0].double().numpy())
            return type("Out", (), {"sample": torch.from_numpy(values).float()[None, :, None]})()

    config = ExtractionConfig(method="coarse_to_fine", octree_depth=6, smooth=False, vertex_mapping="exact")
    mesh = extract_coarse_to_fine(TargetVAE(), torch.zeros(1, 4), config).mesh
    radius = np.linalg.norm(mesh.vertices - [0.2, 0.0, 0.0], axis=1)
    np.testing.assert_allclose(radius, 0.4, atol=0.01)
    # The surface is the target's 0 level and what extraction treats as inside is the ball.
    assert TargetVAE().decode(None, torch.tensor([[[0.2, 0.0, 0.0]]])).sample.item() > 0


def test_batch_targets_are_positive_inside() -> None:
    batch = make_batch(TINY, 0)
    assert batch["surface"].shape == (2, 64, 6) and batch["queries"].shape == (2, 64, 3)
    assert (batch["target"] > 0).any() and (batch["target"] < 0).any()
    np.testing.assert_array_equal(make_batch(TINY, 0)["queries"], batch["queries"])  # seeded by step


def test_recon_terms_sign_and_weights() -> None:
    """Both terms reward the target's sign (positive inside): the exact truncated distance beats the
    sign-flipped and the all-outside fields; the weights, the output's distance unit and the BCE's
    logit scale act as documented."""
    r = dataclasses.replace(TINY, near_points=512, uniform_points=512)
    sdf = make_batch(r, 0)["target"]
    exact = sdf.clamp(-r.truncation, r.truncation) / r.sdf_scale  # the output is distance / sdf_scale
    best = recon_terms(exact, sdf, r)
    torch.testing.assert_close(best["sdf_l1"], torch.tensor(0.0))  # the SDF term's optimum: the truncated distance
    assert recon_terms(exact * r.sdf_scale, sdf, r)["sdf_l1"] > 0.1  # in scene units it is not the optimum
    for wrong in (-exact, torch.full_like(sdf, -r.truncation / r.sdf_scale)):  # flipped sign; the empty field
        terms = recon_terms(wrong, sdf, r)
        assert terms["bce"] > best["bce"] and terms["sdf_l1"] > 0.1 and terms["recon"] > best["recon"]
    sharp = recon_terms(exact, sdf, dataclasses.replace(r, bce_scale=r.bce_scale / 10))
    assert sharp["bce"] < best["bce"]  # logit = output / bce_scale
    only_sdf = recon_terms(-exact, sdf, dataclasses.replace(r, bce_weight=0.0))
    torch.testing.assert_close(only_sdf["recon"], only_sdf["sdf_l1"])


def test_kl_warmup() -> None:
    r = dataclasses.replace(TINY, kl_weight=1e-3, kl_warmup_steps=100)
    assert kl_weight_at(r, 0) == pytest.approx(1e-5) and kl_weight_at(r, 49) == pytest.approx(5e-4)
    assert kl_weight_at(r, 99) == kl_weight_at(r, 5000) == pytest.approx(1e-3)
    assert kl_weight_at(dataclasses.replace(r, kl_warmup_steps=0), 0) == 1e-3


def test_posterior_starts_narrow() -> None:
    """The untrained posterior's std is exp(init_logvar / 2), not the prior's 1 (noise would drown the latent)."""
    torch.manual_seed(0)
    surface = make_batch(TINY, 0)["surface"]
    for init_logvar in (-6.0, 0.0):
        vae = build_vae(dataclasses.replace(TINY, init_logvar=init_logvar))
        std = vae.encode(surface, num_tokens=TINY.num_tokens, seed=0).latent_dist.std
        assert abs(std.log().mul(2).mean().item() - init_logvar) < 1.0


def test_f_score() -> None:
    a = np.random.default_rng(0).uniform(size=(200, 3))
    assert f_score(a, a, 0.01) == 1.0 and f_score(a, a + 1.0, 0.1) == 0.0


def test_recipe_runs_and_resumes_bit_exactly(tmp_path) -> None:
    torch.set_num_threads(1)
    whole = train(TINY, tmp_path / "whole", final_dir=tmp_path / "vae")
    train(TINY, tmp_path / "split", stop_after=3)
    resumed = train(TINY, tmp_path / "split", resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    curves = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["curve"] for run in ("whole", "split")]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in curves[0]] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in curves[1]]  # the logged means too
    assert (tmp_path / "whole" / "curve.csv").read_text().count("\n") == 4  # header + steps 2, 4, 6
    out = losses(whole, TINY, make_batch(TINY, 0), 0)
    assert torch.isfinite(out["loss"]) and out["kl"] >= 0
    torch.testing.assert_close(out["loss"], out["recon"] + TINY.kl_weight * out["kl"])
    torch.testing.assert_close(out["recon"], TINY.bce_weight * out["bce"] + TINY.sdf_weight * out["sdf_l1"])
    warm = losses(whole, TINY, make_batch(TINY, 0), 0, step=0)  # first step: the KL barely counts
    torch.testing.assert_close(warm["loss"], warm["recon"] + kl_weight_at(TINY, 0) * warm["kl"])
    with pytest.raises(FileExistsError):
        train(TINY, tmp_path / "whole")
