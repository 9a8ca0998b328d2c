#!/usr/bin/env python
"""Dense vs coarse-to-fine surface extraction: decoder queries, seconds, and mesh agreement.

Two cases, both run in one process so the ratios compare like with like:

- stub decoders: the VAE decoder replaced by an analytic distance-like field (a sphere; a table
  on legs 0.05 thick, thinner than a coarse cell (0.063)); the decoder itself costs nothing here, so
  the seconds are the extraction overhead (grid, masks, smoothing, marching cubes) and the query
  ratio is what a real decoder would save.
- ``scene``: one shared test scene through a real pipeline (``tiny`` by default: random weights,
  whose fields are far rougher than a trained model's, so its ratio is a pessimistic one).

Usage::

    PYTHONPATH=. python bench/bench_extraction.py                       # depth 7 scene, depth 8 stubs
    PYTHONPATH=. python bench/bench_extraction.py --depth 8 --scene kitchen
    PYTHONPATH=. python bench/bench_extraction.py --model pretrained_weights/MIDI-3D --device cuda --steps 50
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo is the package root
import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy.spatial import cKDTree

from midi.inference.extraction import ExtractionConfig, Surface, extract_surfaces
from midi.inference.generation import ModelOptions, build_pipeline, generate_latents
from midi.inference.scene import InputOptions, prepare_scene

SCENES = Path(__file__).resolve().parents[1] / "tests" / "data" / "scenes"


def sphere_decode(z, sampled_points, return_dict=True, num_chunks=50000, to_cpu=False):
    """Signed distance of the sphere of radius 0.5 (positive inside), shaped like ``vae.decode``."""
    values = (0.5 - sampled_points.float().norm(dim=-1, keepdim=True)).to(z.dtype)
    return SimpleNamespace(sample=values)


def _box(p: torch.Tensor, centre: list[float], half: list[float]) -> torch.Tensor:
    q = (p - torch.tensor(centre)).abs() - torch.tensor(half)
    return -(q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0))


def table_decode(z, sampled_points, return_dict=True, num_chunks=50000, to_cpu=False):
    """A table (top 1.2 x 0.06 x 0.8) on four thin legs (radius 0.025) with a ball on it; distance-like."""
    p = sampled_points.float().reshape(-1, 3)
    parts = [_box(p, [0.0, 0.3, 0.0], [0.6, 0.03, 0.4]), 0.1 - (p - torch.tensor([0.2, 0.43, 0.0])).norm(dim=-1)]
    for x in (-0.53, 0.53):
        for zc in (-0.33, 0.33):
            leg = 0.025 - (p[:, [0, 2]] - torch.tensor([x, zc])).norm(dim=-1)
            parts.append(torch.minimum(leg, 0.5 - (p[:, 1] + 0.2).abs()))
    values = torch.stack(parts).max(dim=0).values.reshape(*sampled_points.shape[:2], 1)
    return SimpleNamespace(sample=values.to(z.dtype))


def distance(a: Surface, b: Surface) -> float:
    """Largest nearest-vertex distance between two meshes, both ways (inf when one is missing).

    ``max dist`` in the table is this against the dense mesh, over the instances.
    """
    if a.mesh is None or b.mesh is None:
        return 0.0 if a.mesh is None and b.mesh is None else float("inf")
    va, vb = np.asarray(a.mesh.vertices), np.asarray(b.mesh.vertices)
    return float(max(cKDTree(va).query(vb)[0].max(), cKDTree(vb).query(va)[0].max()))


def compare(label: str, pipe, latents: torch.Tensor, configs: dict[str, ExtractionConfig], extra_seconds: float = 0.0) -> None:
    """Runs every config on the same latents; prints totals, ratios to dense and mesh agreement."""
    results = {}
    for name, config in configs.items():
        start = time.perf_counter()
        surfaces = extract_surfaces(pipe, latents, config)
        results[name] = (surfaces, time.perf_counter() - start)
    dense, dense_s = results["dense"]
    dense_q = sum(s.queries for s in dense)
    depth = configs["dense"].octree_depth
    cell = float(configs["dense"].bbox_max[0] - configs["dense"].bbox_min[0]) / 2**depth
    print(f"\n[{label}] {len(latents)} instance(s), octree depth {depth} ({2**depth + 1}^3 grid); "
          f"grid cell {cell:.2e}; scene s = extraction + {extra_seconds:.2f} s denoising")
    print(f"  {'method':<24}{'decoder queries':>16}{'extract s':>10}{'scene s':>9}{'queries x':>11}"
          f"{'extract x':>11}{'scene x':>9}{'max dist':>10}")
    for name, (surfaces, seconds) in results.items():
        queries = sum(s.queries for s in surfaces)
        worst = max(distance(a, b) for a, b in zip(dense, surfaces))
        print(f"  {name:<24}{queries:>16,}{seconds:>10.2f}{seconds + extra_seconds:>9.2f}{dense_q / queries:>10.1f}x"
              f"{dense_s / seconds:>10.1f}x{(dense_s + extra_seconds) / (seconds + extra_seconds):>8.1f}x{worst:>10.2e}")


def configs_for(depth: int, coarse_depth: int, band: float) -> dict[str, ExtractionConfig]:
    """Dense, coarse-to-fine with the band, and coarse-to-fine on sign changes only."""
    fine = {"method": "coarse_to_fine", "octree_depth": depth, "coarse_depth": coarse_depth}
    return {"dense": ExtractionConfig(octree_depth=depth),
            f"coarse_to_fine band {band:g}": ExtractionConfig(**fine, band_cells=band),
            "coarse_to_fine band 0": ExtractionConfig(**fine, band_cells=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=7, help="octree depth for the scene case")
    parser.add_argument("--sphere_depth", type=int, default=8, help="octree depth for the stub decoders")
    parser.add_argument("--coarse_depth", type=int, default=5)
    parser.add_argument("--band", type=float, default=1.0, help="coarse_to_fine band in cells (0 = sign changes only)")
    parser.add_argument("--scene", default="kitchen", help="a pair name in tests/data/scenes")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    loaded = build_pipeline(ModelOptions(args.model, device=args.device))
    pipe = loaded.pipe
    print(f"{loaded.description}; torch threads {torch.get_num_threads()}")

    scene = prepare_scene(SCENES / f"{args.scene}_rgb.png", SCENES / f"{args.scene}_seg.png", InputOptions())
    start = time.perf_counter()
    latents = generate_latents(loaded.pipe, *scene.conditions(), num_inference_steps=args.steps, guidance_scale=7.0,
                               seed=42)
    denoise = time.perf_counter() - start
    print(f"denoising {args.scene} ({len(latents)} instances, {args.steps} steps): {denoise:.2f} s "
          "(included in 'scene s')")
    compare(f"{args.model} pipeline, scene {args.scene}", pipe, latents,
            configs_for(args.depth, args.coarse_depth, args.band), denoise)

    for name, stub in (("sphere (r = 0.5)", sphere_decode), ("table with thin legs", table_decode)):
        pipe.vae.decode = stub
        compare(f"stub decoder: {name}", pipe, latents[:1], configs_for(args.sphere_depth, args.coarse_depth, args.band))


if __name__ == "__main__":
    main()
