"""Seeded procedural scenes: primitives standing on a floor without overlap, rendered with id maps.

The floor only serves placement; it is not an instance and not rendered. World up is +Y. Each
scene is retried with a new draw (up to :data:`MAX_ATTEMPTS`) until every object covers at least
0.1% of every rendered view, so the id maps always show all objects.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

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
from midi.errors import DataError

PRIMITIVES = ("box", "sphere", "cylinder", "cone", "torus", "capsule")
MAX_ATTEMPTS = 20
FOOTPRINT_GAP = 0.05

# trimesh.creation builds along +Z; this turns +Z into +Y (our up axis).
_Z_TO_Y = trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0])


# One maker per kind, drawing its size from the generator.
_MAKERS: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    "box": lambda rng: trimesh.creation.box(extents=rng.uniform([0.3, 0.3, 0.2], [1.0, 1.0, 1.0])),
    "sphere": lambda rng: trimesh.creation.icosphere(subdivisions=2, radius=rng.uniform(0.2, 0.5)),
    "cylinder": lambda rng: trimesh.creation.cylinder(radius=rng.uniform(0.15, 0.45), height=rng.uniform(0.3, 1.2),
                                                      sections=32),
    "cone": lambda rng: trimesh.creation.cone(radius=rng.uniform(0.2, 0.5), height=rng.uniform(0.4, 1.2), sections=32),
    "torus": lambda rng: _torus(rng.uniform(0.25, 0.45), rng),
    "capsule": lambda rng: trimesh.creation.capsule(height=rng.uniform(0.2, 0.8), radius=rng.uniform(0.12, 0.3),
                                                    count=[16, 16]),
}


def _torus(major: float, rng: np.random.Generator) -> trimesh.Trimesh:
    # The minor radius is drawn after the major one (a fixed draw order keeps scenes reproducible).
    return trimesh.creation.torus(major, major * rng.uniform(0.25, 0.45), major_sections=32, minor_sections=16)


def make_primitive(kind: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """One primitive of :data:`PRIMITIVES` of random size and turn about +Y, standing on y = 0, centred in x/z."""
    mesh = _MAKERS[kind](rng)
    mesh.apply_transform(_Z_TO_Y)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * math.pi), [0, 1, 0]))
    lo, hi = mesh.bounds
    mesh.apply_translation([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    return mesh


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


def make_synthetic_scene(seed: int, min_objects: int = 2, max_objects: int = 5,
                         kinds: tuple[str, ...] = PRIMITIVES) -> list[tuple[str, trimesh.Trimesh]]:
    """Makes one seeded scene of primitives (of ``kinds``) standing on the floor (y = 0) without overlap.

    Returns:
        ``[(name, mesh), ...]`` with names like ``box_0``, in the world frame (not normalised).
    """
    rng = np.random.default_rng(seed)
    count = int(rng.integers(min_objects, max_objects + 1))
    chosen = [str(k) for k in rng.choice(kinds, size=count)]
    meshes = [make_primitive(kind, rng) for kind in chosen]
    positions = place_on_floor([footprint_radius(m) for m in meshes], rng)
    for mesh, (x, z) in zip(meshes, positions):
        mesh.apply_translation([x, 0.0, z])
    return [(f"{kind}_{i}", mesh) for i, (kind, mesh) in enumerate(zip(chosen, meshes))]


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
        pieces = make_synthetic_scene(seed)
        objects, norm = normalise_objects([NamedMesh(n, m, f"synthetic:{n}") for n, m in pieces], options.bound)
        views = render_views(objects, options)
        if label_counts(views, len(objects))[:, 1:].min() >= need:
            source = {"kind": "synthetic", "seed": seed, "attempt": attempt}
            return SceneContent(sample_objects(objects, options, job.scene_id), views, norm.to_json(), source)
    raise DataError(f"{job.scene_id}: no draw with every object visible after {MAX_ATTEMPTS} attempts")


def synthetic_jobs(num_scenes: int, seed: int = 0, start: int = 0) -> list[SceneJob]:
    """Jobs for synthetic scenes ``start .. start+num_scenes-1`` (ids ``synthetic_00000``...)."""
    return [SceneJob(f"synthetic_{i:05d}", "synthetic", seed=scene_seed(seed, i))
            for i in range(start, start + num_scenes)]
