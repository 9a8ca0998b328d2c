"""Surface extraction: dense (upstream) vs coarse-to-fine, on analytic fields and the tiny pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from midi.inference.extraction import (
    NO_SURFACE,
    ExtractionConfig,
    coarse_to_fine_values,
    extract_surfaces,
    marching_cubes_mesh,
    vae_field,
)
from midi.pipelines.pipeline_midi import DEFAULT_BBOX_MAX, DEFAULT_BBOX_MIN, generate_dense_grid_points
from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

BOX = float(DEFAULT_BBOX_MAX[0] - DEFAULT_BBOX_MIN[0])


def sphere_decode(radius: float = 0.5):
    """A stand-in for ``vae.decode``: the signed distance ``radius - |x|`` (positive inside)."""

    def decode(z, sampled_points, return_dict=True, num_chunks=50000, to_cpu=False):
        values = (radius - sampled_points.float().norm(dim=-1, keepdim=True)).to(z.dtype)
        return SimpleNamespace(sample=values) if return_dict else (values,)

    return decode


def rod_field(points: torch.Tensor) -> torch.Tensor:
    """A ball with a thin vertical rod (radius 0.012, off the coarse grid) away from it."""
    p = points.float()
    ball = 0.4 - (p - torch.tensor([0.0, 0.3, 0.0])).norm(dim=-1)
    rod = torch.minimum(0.012 - (p[:, [0, 2]] - torch.tensor([0.413, -0.52])).norm(dim=-1), 0.9 - p[:, 1].abs())
    return torch.maximum(ball, rod)


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff-style distance: the largest nearest-neighbour distance either way."""
    return float(max(cKDTree(a).query(b)[0].max(), cKDTree(b).query(a)[0].max()))


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(0)
    pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True)
    return pipe


@pytest.fixture
def sphere_pipe(pipe):
    pipe.vae.decode = sphere_decode()
    yield pipe
    del pipe.vae.decode


def test_coarse_to_fine_equals_dense_on_sphere_with_far_fewer_queries(sphere_pipe):
    latents = torch.zeros(2, 64, 8)
    dense = extract_surfaces(sphere_pipe, latents, ExtractionConfig(octree_depth=7))
    fine = extract_surfaces(sphere_pipe, latents, ExtractionConfig(method="coarse_to_fine", octree_depth=7))
    assert dense[0].queries == 129**3
    for d, c in zip(dense, fine):
        assert d.mesh is not None and c.mesh is not None
        assert c.queries * 8 < d.queries  # 2.15 M vs ~0.2 M
        # Every value near the surface is a decoded one, so the meshes are identical.
        assert len(c.mesh.vertices) == len(d.mesh.vertices)
        assert np.abs(c.mesh.vertices - d.mesh.vertices).max() < 1e-6


def test_dense_sphere_has_the_right_size(sphere_pipe):
    config = ExtractionConfig(octree_depth=6, smooth=False, vertex_mapping="exact")
    (surface,) = extract_surfaces(sphere_pipe, torch.zeros(1, 64, 8), config)
    radii = np.linalg.norm(surface.mesh.vertices, axis=1)
    assert np.abs(radii - 0.5).max() < BOX / 64


def test_no_surface_is_reported_not_raised(pipe):
    pipe.vae.decode = sphere_decode(radius=-1.0)  # negative everywhere
    try:
        for method in ("dense", "coarse_to_fine"):
            (surface,) = extract_surfaces(pipe, torch.zeros(1, 64, 8), ExtractionConfig(method=method, octree_depth=4))
            assert surface.mesh is None and surface.problem == NO_SURFACE
    finally:
        del pipe.vae.decode


def test_band_catches_a_thin_part_that_sign_changes_alone_miss():
    points, grid_size, bbox_size = generate_dense_grid_points(DEFAULT_BBOX_MIN, DEFAULT_BBOX_MAX, 7)
    dense = marching_cubes_mesh(rod_field(torch.from_numpy(points)).numpy(), grid_size, DEFAULT_BBOX_MIN, bbox_size)
    meshes = {}
    for band in (0.0, 1.0):
        values, queries = coarse_to_fine_values(rod_field, DEFAULT_BBOX_MIN, DEFAULT_BBOX_MAX, 7, 5, 1, band_cells=band)
        meshes[band] = marching_cubes_mesh(values.ravel(), grid_size, DEFAULT_BBOX_MIN, bbox_size)
        assert queries * 3 < len(points)
    assert chamfer(meshes[0.0].vertices, dense.vertices) > 0.5  # the rod is lost without the band
    assert chamfer(meshes[1.0].vertices, dense.vertices) < 1e-6


def test_coarse_to_fine_matches_dense_on_the_tiny_model(pipe):
    """The tiny model's random field is far rougher than a trained one; it still agrees within a cell."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 64, 8, generator=generator)
    dense = extract_surfaces(pipe, latents, ExtractionConfig(octree_depth=5))
    fine = extract_surfaces(pipe, latents, ExtractionConfig(method="coarse_to_fine", octree_depth=5, coarse_depth=3))
    for d, c in zip(dense, fine):
        assert d.mesh is not None and c.mesh is not None
        assert c.queries <= d.queries
        assert chamfer(c.mesh.vertices, d.mesh.vertices) <= BOX / 32


def test_chunked_decoding_is_exact(pipe):
    latent = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    points = torch.rand(1000, 3) * 2 - 1
    whole = vae_field(pipe.vae, latent, num_chunks=10**6)(points)
    chunked = vae_field(pipe.vae, latent, num_chunks=37)(points)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-6)


def test_reported_queries_are_the_points_decoded(sphere_pipe):
    """Surface.queries is computed from the grids, not counted: it must equal what vae.decode was asked for."""
    asked, decode = [], sphere_pipe.vae.decode

    def counting_decode(z, sampled_points, *args, **kwargs):
        asked.append(sampled_points.shape[0] * sampled_points.shape[1])
        return decode(z, sampled_points, *args, **kwargs)

    sphere_pipe.vae.decode = counting_decode
    for progressive in (False, True):
        asked.clear()
        config = ExtractionConfig(octree_depth=4, decode_progressive=progressive)
        surfaces = extract_surfaces(sphere_pipe, torch.zeros(3, 64, 8), config)
        assert sum(s.queries for s in surfaces) == sum(asked) == (6 if progressive else 3) * 17**3


def test_progressive_dense_decodes_twice(sphere_pipe):
    config = ExtractionConfig(octree_depth=4, decode_progressive=True)
    surfaces = extract_surfaces(sphere_pipe, torch.zeros(3, 64, 8), config)
    assert len(surfaces) == 3 and all(s.mesh is not None for s in surfaces)
    assert all(s.queries == 2 * 17**3 for s in surfaces)


@pytest.mark.parametrize(
    "changes",
    [dict(method="octree"), dict(octree_depth=0), dict(dilation=-1), dict(vertex_mapping="x"),
     dict(method="coarse_to_fine", decode_progressive=True)],
)
def test_config_validation(changes):
    with pytest.raises(ValueError):
        ExtractionConfig(**changes).validate()


def test_dense_per_instance_equals_upstream_batched_decode(pipe):
    """Upstream's script: one batched decode_latents, then box smoothing + marching cubes per instance."""
    latents = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(2))
    values, grid_sizes, bbox_sizes, bbox_mins, _ = pipe.decode_latents(latents, octree_depth=4)
    surfaces = extract_surfaces(pipe, latents, ExtractionConfig(octree_depth=4))
    for i, surface in enumerate(surfaces):
        expected = marching_cubes_mesh(values[i], grid_sizes[0], bbox_mins[0], bbox_sizes[0], smooth=True)
        np.testing.assert_allclose(surface.mesh.vertices, expected.vertices, atol=1e-5)
        np.testing.assert_array_equal(surface.mesh.faces, expected.faces)
