"""Procedural shapes with analytic signed distances: the synthetic scenes' objects and the mini VAE's data.

A shape is a union of primitive parts (box, sphere, cylinder, cone, capsule, torus), each a
similarity transform of a canonical primitive, so every part's signed distance is exact and the
union's (the max of the parts') is exact outside and a lower bound inside.

Two families of objects standing on the floor (+Y up), the two synthetic domains of
``prepare_data.py --synthetic_domain`` (:data:`DOMAINS`): ``base``, single primitives of
:data:`PRIMITIVE_KINDS`, and ``target``, furniture built from boxes and cylinders
(:data:`FURNITURE_KINDS`: tables, chairs, round tables, shelves), shapes the base never shows.
:func:`random_shape` draws freer objects (arbitrary unions and orientations) in the scene frame.

Sign: every ``field`` here is positive inside, negative outside, 0 on the surface: the value the
TripoSG decoder outputs and :mod:`midi.extraction` extracts at level 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation
from skimage import measure

KINDS = ("box", "sphere", "cylinder", "cone", "capsule", "torus")
PRIMITIVE_KINDS = ("box", "sphere", "cylinder", "cone", "torus", "capsule")  # the base domain
FURNITURE_KINDS = ("table", "chair", "round_table", "shelf")  # the target domain
DOMAINS: dict[str, tuple[str, ...]] = {"base": PRIMITIVE_KINDS, "target": FURNITURE_KINDS}
MESH_CELLS = 64  # marching-cubes cells along a composite object's largest side (legs 4-7 cells wide)
BOUND = 0.95  # objects stay inside [-BOUND, BOUND]^3, as the data pipeline's normalisation
FD_STEP = 1e-4  # central-difference step for normals (the fields are exact SDFs, |grad| = 1)


@dataclass
class Part:
    """One primitive: world point ``p`` maps to canonical ``q = rot.T (p - trans) / scale``.

    ``params``: box half extents (3); sphere (r); cylinder, cone and capsule (r, half height)
    along local z (the cone's apex at +z); torus (major R, minor r) about local z.
    """

    kind: str
    params: np.ndarray
    rot: np.ndarray
    trans: np.ndarray
    scale: float = 1.0

    def field(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` world points -> ``(N,)`` signed distance, positive inside."""
        q = (points - self.trans) @ self.rot / self.scale  # (N, 3) canonical
        return self.scale * _canonical_field(self.kind, self.params, q)

    def mesh(self) -> trimesh.Trimesh:
        """A tessellation in the world frame (sampling proposals and inside tests only)."""
        v, f = _canonical_mesh(self.kind, tuple(float(x) for x in self.params))
        return trimesh.Trimesh(self.trans + self.scale * v @ self.rot.T, f, process=False)

    def outward_normals(self, points: np.ndarray) -> np.ndarray:
        """Unit outward normals ``(N, 3)``: minus the field's gradient (central differences)."""
        grad = np.stack([self.field(points + d) - self.field(points - d) for d in np.eye(3) * FD_STEP], axis=1)
        return -grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)


def _segment_distance_2d(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of 2-D points ``(N, 2)`` to the segment ``a-b``."""
    ab = b - a
    t = np.clip((q - a) @ ab / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(q - (a + t[:, None] * ab), axis=1)


def _canonical_field(kind: str, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact signed distance (positive inside) of a canonical primitive at points ``q (N, 3)``."""
    rho = np.linalg.norm(q[:, :2], axis=1)
    z = q[:, 2]
    if kind == "box":
        d = np.abs(q) - p
        return -(np.linalg.norm(np.maximum(d, 0.0), axis=1) + np.minimum(d.max(axis=1), 0.0))
    if kind == "sphere":
        return p[0] - np.linalg.norm(q, axis=1)
    if kind == "cylinder":
        d = np.stack([rho - p[0], np.abs(z) - p[1]], axis=1)
        return -(np.linalg.norm(np.maximum(d, 0.0), axis=1) + np.minimum(d.max(axis=1), 0.0))
    if kind == "capsule":
        return p[0] - np.linalg.norm(q - np.stack([0 * z, 0 * z, np.clip(z, -p[1], p[1])], axis=1), axis=1)
    if kind == "torus":
        return p[1] - np.hypot(rho - p[0], z)
    if kind == "cone":
        # A solid of revolution: the distance is the 2-D one in the (rho, z) half plane to the
        # triangle axis-base-apex; only the base and the slant are surface (the axis is not).
        r, h = p
        rz = np.stack([rho, z], axis=1)
        dist = np.minimum(_segment_distance_2d(rz, np.array([0.0, -h]), np.array([r, -h])),
                          _segment_distance_2d(rz, np.array([r, -h]), np.array([0.0, h])))
        inside = (z >= -h) & (rho <= r * (h - z) / (2 * h))
        return np.where(inside, dist, -dist)
    raise ValueError(f"unknown primitive {kind!r}; expected one of {KINDS}")


@cache
def _unit_mesh(kind: str) -> trimesh.Trimesh:
    """Canonical unit meshes whose family is closed under per-axis scaling."""
    if kind == "box":
        return trimesh.creation.box(extents=[2.0, 2.0, 2.0])
    if kind == "sphere":
        return trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    if kind == "cylinder":
        return trimesh.creation.cylinder(radius=1.0, height=2.0, sections=48)
    cone = trimesh.creation.cone(radius=1.0, height=2.0, sections=48)
    cone.apply_translation([0.0, 0.0, -1.0])  # base at z = -1, apex at +1
    return cone


@lru_cache(maxsize=64)  # a shape's parts are meshed several times while it is built and sampled
def _canonical_mesh(kind: str, params: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    if kind == "capsule":
        m = trimesh.creation.capsule(height=2 * params[1], radius=params[0], count=[24, 24])
        return np.asarray(m.vertices), np.asarray(m.faces)
    if kind == "torus":
        m = trimesh.creation.torus(params[0], params[1], major_sections=48, minor_sections=24)
        return np.asarray(m.vertices), np.asarray(m.faces)
    unit = _unit_mesh(kind)
    if kind == "box":
        axis_scale = params
    elif kind == "sphere":
        axis_scale = (params[0],) * 3
    else:
        axis_scale = (params[0], params[0], params[1])
    return np.asarray(unit.vertices) * np.asarray(axis_scale), np.asarray(unit.faces)


def shape_field(parts: list[Part], points: np.ndarray) -> np.ndarray:
    """Signed distance of the union ``(N,)``, positive inside (max of the parts' fields)."""
    return np.max([part.field(points) for part in parts], axis=0)


def shape_bounds(parts: list[Part]) -> np.ndarray:
    """``(2, 3)`` axis-aligned bounds of the union (from the tessellations)."""
    verts = np.concatenate([part.mesh().vertices for part in parts])
    return np.stack([verts.min(axis=0), verts.max(axis=0)])


def _random_params(kind: str, rng: np.random.Generator) -> np.ndarray:
    # Log-uniform sizes give thin plates and legs (aspect up to ~12) as often as chunky parts.
    def lu(lo: float, hi: float, n: int = 1) -> np.ndarray:
        return np.exp(rng.uniform(np.log(lo), np.log(hi), n))

    if kind == "box":
        return lu(0.04, 0.5, 3)
    if kind == "sphere":
        return lu(0.12, 0.5)
    if kind == "cylinder":
        return np.concatenate([lu(0.03, 0.4), lu(0.05, 0.5)])
    if kind == "cone":
        return np.concatenate([lu(0.1, 0.45), lu(0.1, 0.5)])
    if kind == "capsule":
        return np.concatenate([lu(0.04, 0.3), lu(0.05, 0.4)])
    major = float(lu(0.2, 0.45)[0])
    return np.array([major, major * rng.uniform(0.15, 0.45)])


def _random_rotation(rng: np.random.Generator, upright: bool) -> np.ndarray:
    if upright:
        return Rotation.from_euler("y", rng.uniform(0, 2 * np.pi)).as_matrix()
    return Rotation.random(random_state=rng).as_matrix()


def _axis_rotation(rng: np.random.Generator) -> np.ndarray:
    """One of the 24 axis-aligned rotations (furniture-like parts)."""
    return Rotation.from_euler("xyz", rng.integers(0, 4, 3) * np.pi / 2).as_matrix()


def random_shape(rng: np.random.Generator, max_parts: int = 4) -> list[Part]:
    """One object in the scene frame: half single primitives, half unions of 2-``max_parts``.

    Each further part is centred on the surface of the parts before it, so unions are attached
    (like furniture parts), axis-aligned half of the time.
    """
    count = 1 if rng.random() < 0.5 else int(rng.integers(2, max_parts + 1))
    parts: list[Part] = []
    for _ in range(count):
        kind = str(rng.choice(KINDS))
        rot = _axis_rotation(rng) if rng.random() < 0.5 else _random_rotation(rng, upright=False)
        trans = np.zeros(3) if not parts else sample_surface(parts, 1, rng)[0][0]
        parts.append(Part(kind, _random_params(kind, rng), rot, trans))
    # Object pose: turn about the union's centre, scale its largest extent to 0.4-1.2 (0.2-0.6 of the
    # cube side), then move it anywhere that keeps it inside the cube.
    obj_rot = _random_rotation(rng, upright=rng.random() < 0.5)
    lo, hi = shape_bounds(parts)
    centre = (lo + hi) / 2
    parts = [Part(p.kind, p.params, obj_rot @ p.rot, obj_rot @ (p.trans - centre)) for p in parts]
    lo, hi = shape_bounds(parts)
    scale = rng.uniform(0.4, 1.2) / (hi - lo).max()
    half = scale * (hi - lo) / 2
    offset = rng.uniform(-BOUND + half, BOUND - half) - scale * (lo + hi) / 2
    return [Part(p.kind, p.params, p.rot, offset + scale * p.trans, scale) for p in parts]


def sample_surface(parts: list[Part], count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform points on the union's surface with outward normals: ``(count, 3)`` each.

    Proposals are drawn on the tessellations by area, projected onto their part's exact surface
    (one step along the normal), and those inside another part are dropped.
    """
    meshes = [part.mesh() for part in parts]
    areas = np.concatenate([m.area_faces for m in meshes])
    owner = np.concatenate([np.full(len(m.faces), i) for i, m in enumerate(meshes)])
    tris = np.concatenate([m.triangles for m in meshes])  # (F, 3, 3)
    kept_pts, kept_nrm, have = [], [], 0
    while have < count:
        n = count if len(parts) == 1 else 2 * count + 16  # unions lose the points inside other parts
        face = rng.choice(len(areas), n, p=areas / areas.sum())
        u, v = rng.random((2, n))
        flip = u + v > 1  # fold the unit square onto the triangle: uniform barycentrics
        u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
        t = tris[face]
        pts = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
        nrm = np.empty_like(pts)
        keep = np.ones(n, dtype=bool)
        for i, part in enumerate(parts):
            sel = owner[face] == i
            # One Newton step lands on the exact surface up to the tessellation's sag squared.
            pts[sel] += part.field(pts[sel])[:, None] * part.outward_normals(pts[sel])
            nrm[sel] = part.outward_normals(pts[sel])
            others = [q for j, q in enumerate(parts) if j != i]
            if others and sel.any():
                keep[sel] = shape_field(others, pts[sel]) < 1e-6
        kept_pts.append(pts[keep])
        kept_nrm.append(nrm[keep])
        have += int(keep.sum())
    pts, nrm = np.concatenate(kept_pts), np.concatenate(kept_nrm)
    pick = rng.permutation(len(pts))[:count]
    return pts[pick], nrm[pick]


def union_mesh(parts: list[Part]) -> trimesh.Trimesh:
    """The parts' tessellations concatenated (overlapping, not a boolean union): for previews."""
    return trimesh.util.concatenate([part.mesh() for part in parts])


def object_mesh(parts: list[Part], cells: int = MESH_CELLS) -> trimesh.Trimesh:
    """A watertight mesh of the union: a single part's own tessellation, else marching cubes of the
    exact field (so the surface has no inner faces where legs meet a table top, as sampled data must not)."""
    if len(parts) == 1:
        return parts[0].mesh()
    lo, hi = shape_bounds(parts)
    step = float((hi - lo).max()) / cells
    # The grid is shifted off the parts' faces (which are often axis-aligned at round numbers):
    # a field exactly 0 at grid points makes marching cubes emit degenerate, non-manifold triangles.
    lo = lo - (2 + 1 / np.pi) * step
    shape = np.ceil((hi - lo) / step).astype(int) + 3
    field = np.full(tuple(shape), -2.0 * step)  # outside every part's band: clearly outside
    for part in parts:
        # Each part is evaluated only in its own box padded by two cells: the union (max) elsewhere
        # is decided by the other parts, and the surface never lies outside the part's box.
        p_lo, p_hi = shape_bounds([part])
        i0 = np.maximum(np.floor((p_lo - lo) / step).astype(int) - 2, 0)
        i1 = np.minimum(np.ceil((p_hi - lo) / step).astype(int) + 3, shape)
        axes = [lo[k] + step * np.arange(i0[k], i1[k]) for k in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (x, y, z, 3)
        box = tuple(slice(a, b) for a, b in zip(i0, i1))
        field[box] = np.maximum(field[box], part.field(grid.reshape(-1, 3)).reshape(grid.shape[:3]))
    verts, faces, _, _ = measure.marching_cubes(field, level=0.0, spacing=(step,) * 3)
    return trimesh.Trimesh(verts + lo, faces[:, ::-1], process=True)  # field > 0 inside: flip to outward


def _stand(parts: list[Part], rng: np.random.Generator) -> list[Part]:
    """Turns an object about +Y at random and stands it on y = 0, centred in x/z."""
    yaw = Rotation.from_euler("y", rng.uniform(0, 2 * np.pi)).as_matrix()
    parts = [Part(p.kind, p.params, yaw @ p.rot, yaw @ p.trans, p.scale) for p in parts]
    lo, hi = shape_bounds(parts)
    shift = np.array([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    return [Part(p.kind, p.params, p.rot, p.trans + shift, p.scale) for p in parts]


_EYE = np.eye(3)
_Z_TO_Y = Rotation.from_euler("x", -90, degrees=True).as_matrix()  # canonical +z axis -> world +y


def _box(half: np.ndarray, centre: np.ndarray) -> Part:
    return Part("box", np.asarray(half, float), _EYE, np.asarray(centre, float))


def _post(radius: float, y0: float, y1: float, x: float = 0.0, z: float = 0.0) -> Part:
    """A vertical cylinder from height y0 to y1."""
    return Part("cylinder", np.array([radius, (y1 - y0) / 2]), _Z_TO_Y, np.array([x, (y0 + y1) / 2, z]))


def _legs(width: float, depth: float, height: float, thick: float, rng: np.random.Generator) -> list[Part]:
    """Four legs under a top of ``width`` x ``depth`` at ``height``, square or round, reaching into the top."""
    inset = thick / 2 + rng.uniform(0.0, 0.04)
    round_legs = rng.random() < 0.5
    legs = []
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * (width / 2 - inset), sz * (depth / 2 - inset)
            legs.append(_post(thick / 2, 0.0, height, x, z) if round_legs
                        else _box([thick / 2, height / 2, thick / 2], [x, height / 2, z]))
    return legs


def _furniture(kind: str, rng: np.random.Generator) -> list[Part]:
    """One piece in its own frame (+Y up, front towards +Z); sizes in metres-like units."""
    if kind == "table":
        w, h, t = rng.uniform(0.7, 1.2), rng.uniform(0.5, 0.8), rng.uniform(0.06, 0.1)
        d = w * rng.uniform(0.55, 0.9)
        return [_box([w / 2, t / 2, d / 2], [0, h - t / 2, 0]), *_legs(w, d, h - t / 2, rng.uniform(0.07, 0.11), rng)]
    if kind == "chair":
        s, h, t = rng.uniform(0.42, 0.55), rng.uniform(0.4, 0.5), rng.uniform(0.06, 0.08)
        back, bt = rng.uniform(0.35, 0.55), rng.uniform(0.06, 0.08)
        return [_box([s / 2, t / 2, s / 2], [0, h - t / 2, 0]), *_legs(s, s, h - t / 2, rng.uniform(0.06, 0.08), rng),
                _box([s / 2, back / 2, bt / 2], [0, h + back / 2 - t / 2, -s / 2 + bt / 2])]
    if kind == "round_table":
        r, h, t = rng.uniform(0.35, 0.55), rng.uniform(0.5, 0.75), rng.uniform(0.06, 0.1)
        base_r, base_t = r * rng.uniform(0.45, 0.65), rng.uniform(0.05, 0.08)
        return [_post(r, h - t, h), _post(rng.uniform(0.05, 0.08), base_t / 2, h - t / 2), _post(base_r, 0.0, base_t)]
    if kind == "shelf":
        w, d, h, t = rng.uniform(0.6, 1.0), rng.uniform(0.28, 0.4), rng.uniform(0.8, 1.4), rng.uniform(0.05, 0.07)
        boards = int(rng.integers(3, 5))  # bottom, top and 1-2 between
        sides = [_box([t / 2, h / 2, d / 2], [sx * (w / 2 - t / 2), h / 2, 0]) for sx in (-1, 1)]
        return sides + [_box([w / 2 - t, t / 2, d / 2], [0, t / 2 + k * (h - t) / (boards - 1), 0]) for k in range(boards)]
    raise ValueError(f"unknown furniture {kind!r}; expected one of {FURNITURE_KINDS}")


def _primitive(kind: str, rng: np.random.Generator) -> list[Part]:
    """One primitive in its own frame, axis along +Y (sizes as the synthetic scenes have always drawn them)."""
    if kind == "box":
        return [Part("box", rng.uniform([0.3, 0.3, 0.2], [1.0, 1.0, 1.0]) / 2, _Z_TO_Y, np.zeros(3))]
    if kind == "sphere":
        return [Part("sphere", np.array([rng.uniform(0.2, 0.5)]), _EYE, np.zeros(3))]
    if kind == "cylinder":
        return [Part("cylinder", np.array([rng.uniform(0.15, 0.45), rng.uniform(0.3, 1.2) / 2]), _Z_TO_Y, np.zeros(3))]
    if kind == "cone":
        return [Part("cone", np.array([rng.uniform(0.2, 0.5), rng.uniform(0.4, 1.2) / 2]), _Z_TO_Y, np.zeros(3))]
    if kind == "torus":
        major = rng.uniform(0.25, 0.45)
        return [Part("torus", np.array([major, major * rng.uniform(0.25, 0.45)]), _Z_TO_Y, np.zeros(3))]
    if kind == "capsule":
        return [Part("capsule", np.array([rng.uniform(0.12, 0.3), rng.uniform(0.2, 0.8) / 2]), _Z_TO_Y, np.zeros(3))]
    raise ValueError(f"unknown primitive {kind!r}; expected one of {PRIMITIVE_KINDS}")


def standing_object(kind: str, rng: np.random.Generator) -> list[Part]:
    """One object of a domain kind (:data:`DOMAINS`), turned about +Y, standing on y = 0, centred in x/z."""
    make = _furniture if kind in FURNITURE_KINDS else _primitive
    return _stand(make(kind, rng), rng)


def transform_parts(parts: list[Part], offset: np.ndarray, scale: float) -> list[Part]:
    """The parts under ``p -> scale * p + offset`` (a similarity: the fields scale with it)."""
    return [Part(p.kind, p.params, p.rot, scale * p.trans + offset, scale * p.scale) for p in parts]
