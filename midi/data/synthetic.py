"""Seeded procedural scenes: primitives standing on a floor without overlap, rendered with id maps.

The floor only serves placement; it is not an instance and not rendered. World up is +Y. Each
scene is retried with a new draw (up to :data:`MAX_ATTEMPTS`) until every object covers at least
0.1% of every rendered view, so the id maps always show all objects.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import trimesh

from midi.data.jobs import (
    PrepareOptions,
    SceneContent,
    SceneJob,
    label_counts,
    normalise_objects,
    render_views,
    sample_objects,
)
from midi.data.meshes import NamedMesh
from midi.data.shapes import DOMAINS, Part, object_mesh, standing_object, transform_parts, union_mesh
from midi.errors import DataError

MAX_ATTEMPTS = 20
FOOTPRINT_GAP = 0.05


def footprint_radius(mesh: trimesh.Trimesh) -> float:
    """Radius of the smallest circle around the x/z origin that holds the mesh's floor footprint."""
    return float(np.linalg.norm(np.asarray(mesh.vertices)[:, [0, 2]], axis=1).max())


def place_on_floor(radii: list[float], rng: np.random.Generator, gap: float = FOOTPRINT_GAP) -> np.ndarray:
    """Finds x/z positions whose footprint circles do not overlap (rejection sampling).

    The placement square grows whenever 200 draws fail, so this always terminates. Returns (N, 2) positions.
    """
    half = max(1.0, 0.8 * math.sqrt(sum(r * r for r in radii)) + max(radii))
    while True:
        positions: list[np.ndarray] = []
        for r in radii:
            spot = _draw_spot(positions, radii, r, half, gap, rng)
            if spot is None:
                break
            positions.append(spot)
        if len(positions) == len(radii):
            return np.asarray(positions)
        half *= 1.25


def _draw_spot(placed: list[np.ndarray], radii: list[float], r: float, half: float, gap: float,
               rng: np.random.Generator) -> np.ndarray | None:
    for _ in range(200):
        spot = rng.uniform(-half + r, half - r, size=2) if half > r else np.zeros(2)
        if all(np.linalg.norm(spot - p) >= r + radii[i] + gap for i, p in enumerate(placed)):
            return spot
    return None


def scene_parts(seed: int, domain: str = "base", min_objects: int = 2, max_objects: int = 5
                ) -> list[tuple[str, list[Part]]]:
    """One seeded scene of ``domain`` objects (:data:`midi.data.shapes.DOMAINS`) standing on the floor
    (y = 0) without overlap, as analytic parts: ``[(name, parts), ...]`` with names like ``box_0``,
    in the world frame (not normalised)."""
    if domain not in DOMAINS:
        raise DataError(f"unknown synthetic domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    rng = np.random.default_rng(seed)
    count = int(rng.integers(min_objects, max_objects + 1))
    chosen = [str(k) for k in rng.choice(DOMAINS[domain], size=count)]
    objects = [standing_object(kind, rng) for kind in chosen]
    positions = place_on_floor([footprint_radius(union_mesh(parts)) for parts in objects], rng)
    placed = [transform_parts(parts, np.array([x, 0.0, z]), 1.0) for parts, (x, z) in zip(objects, positions)]
    return [(f"{kind}_{i}", parts) for i, (kind, parts) in enumerate(zip(chosen, placed))]


def make_synthetic_scene(seed: int, domain: str = "base", min_objects: int = 2, max_objects: int = 5
                         ) -> list[tuple[str, trimesh.Trimesh]]:
    """:func:`scene_parts` as watertight meshes: ``[(name, mesh), ...]`` in the world frame."""
    return [(name, object_mesh(parts)) for name, parts in scene_parts(seed, domain, min_objects, max_objects)]


def scene_seed(seed: int, index: int) -> int:
    """Seed of synthetic scene ``index`` of a run with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def build_synthetic_content(job: SceneJob, options: PrepareOptions) -> SceneContent:
    """Makes, normalises, renders and samples one synthetic scene (worker side).

    Raises:
        DataError: No draw had every object visible in every view.
    """
    need = options.min_visible_pixels()
    for attempt in range(MAX_ATTEMPTS):
        seed = job.seed if attempt == 0 else zlib.crc32(f"{job.seed}:{attempt}".encode())
        pieces = make_synthetic_scene(seed, job.domain)
        objects, norm = normalise_objects([NamedMesh(n, m, f"synthetic:{n}") for n, m in pieces], options.bound)
        views = render_views(objects, options)
        if label_counts(views, len(objects))[:, 1:].min() >= need:
            source = {"kind": "synthetic", "domain": job.domain, "seed": seed, "attempt": attempt}
            return SceneContent(sample_objects(objects, options, job.scene_id), views, norm.to_json(), source)
    raise DataError(f"{job.scene_id}: no draw with every object visible after {MAX_ATTEMPTS} attempts")


def synthetic_jobs(num_scenes: int, seed: int = 0, start: int = 0, domain: str = "base") -> list[SceneJob]:
    """Jobs for synthetic scenes ``start .. start+num_scenes-1`` of ``domain`` (ids ``synthetic_00000``...
    for the base domain, ``synthetic_target_00000``... for the target: the two never share an id)."""
    if domain not in DOMAINS:
        raise DataError(f"unknown synthetic domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    prefix = "synthetic" if domain == "base" else f"synthetic_{domain}"
    return [SceneJob(f"{prefix}_{i:05d}", "synthetic", seed=scene_seed(seed, i), domain=domain)
            for i in range(start, start + num_scenes)]
