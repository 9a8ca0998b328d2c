"""Loading meshes with trimesh, uniform surface sampling and joint scene normalisation.

Every loader applies the scene-graph transforms (nested glTF nodes, OBJ/STL bodies), so all
objects of a scene end up in one shared frame. Visual data (textures, materials) is dropped: the
tools only need geometry.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from midi.config import MESH_SUFFIXES
from midi.errors import DataError

DEFAULT_BOUND = 0.95  # half-extent after normalisation: a 5% margin inside [-1, 1]


@dataclass
class NamedMesh:
    """One object of a scene."""

    name: str  # object name (a safe file name once the scene is assembled)
    mesh: trimesh.Trimesh  # triangle mesh in the scene frame
    source: str  # where it came from (file name, optionally ``file#node``)
    warning: str = ""  # what loading had to repair (e.g. faces with NaN vertices removed), or ""


@dataclass(frozen=True)
class Normalization:
    """The similarity ``normalised = (original - center) * scale`` applied to a whole scene."""

    center: tuple[float, float, float]
    scale: float
    bound: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Maps original coordinates to the normalised frame."""
        return (points - np.asarray(self.center)) * self.scale

    def to_json(self) -> dict[str, object]:
        """Returns the record stored in ``scene.json``."""
        return {"center": [float(v) for v in self.center], "scale": float(self.scale), "bound": float(self.bound),
                "formula": "normalised = (original - center) * scale"}


def is_mesh_file(path: Path) -> bool:
    """True for the supported mesh suffixes (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in MESH_SUFFIXES


class _RecordingResolver(trimesh.resolvers.FilePathResolver):
    """trimesh's resolver (which keeps reads inside the mesh's folder), noting every file name asked for."""

    def __init__(self, path: Path, used: set[str]) -> None:
        super().__init__(str(path))
        self.used = used

    def get(self, name: str) -> bytes:
        # trimesh falls back to the base name, so that is what the folder's files are matched on.
        self.used.add(Path(name.replace("\\", "/")).name.lower())
        return super().get(name)


def load_scene_graph(path: Path, used: set[str] | None = None) -> trimesh.Scene:
    """Loads any supported mesh file as a trimesh scene.

    OBJ ``o`` objects become separate geometries (one file can hold several objects). Loading
    does not process the meshes, so faces with NaN vertices reach :func:`scene_instances`, which
    removes them and says so (trimesh would drop them silently). ``used``, when given, receives the
    lower-case names of the files the mesh refers to (``.mtl``, textures, buffers), so that they are
    not taken for scene images.

    Raises:
        DataError: Empty or unreadable file, or a file without any geometry.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: empty file")
    kwargs = {"split_objects": True, "group_material": False} if path.suffix.lower() == ".obj" else {}
    resolver = _RecordingResolver(path, set() if used is None else used)
    try:
        scene = trimesh.load_scene(str(path), resolver=resolver, process=False, **kwargs)
    except Exception as exc:
        raise DataError(f"{path.name}: cannot read mesh ({type(exc).__name__}: {exc})") from exc
    if not scene.geometry:
        raise DataError(f"{path.name}: no geometry in file (empty mesh)")
    return scene


def scene_instances(scene: trimesh.Scene, source: str) -> tuple[list[NamedMesh], list[tuple[str, str]]]:
    """Lists the triangle-mesh instances of a scene graph (of file ``source``) with their world transforms applied.

    Returns:
        ``(instances, skipped)``: one :class:`NamedMesh` per node holding a triangle mesh with
        faces, and ``(node, reason)`` for nodes holding anything else (points, lines, no faces).
    """
    instances, skipped = [], []
    for node in scene.graph.nodes_geometry:
        matrix, geom_name = scene.graph[node]
        geometry = scene.geometry[geom_name]
        reason = _non_surface_reason(geometry)
        if reason:
            skipped.append((str(node), reason))
            continue
        vertices = trimesh.transform_points(np.asarray(geometry.vertices, np.float64), matrix)
        faces = np.asarray(geometry.faces)
        if np.linalg.det(np.asarray(matrix, np.float64)[:3, :3]) < 0:
            # A mirroring transform reverses the orientation: flip the winding so normals
            # (taken from the winding) still point outward.
            faces = faces[:, ::-1]
        mesh = trimesh.Trimesh(vertices, np.ascontiguousarray(faces), process=False)
        count = len(mesh.faces)
        mesh.remove_infinite_values()  # faces touching a NaN/inf vertex, and those vertices
        if len(mesh.faces) == 0:
            skipped.append((str(node), "every face has a NaN/inf vertex"))
            continue
        lost = count - len(mesh.faces)
        warning = f"removed {lost} face(s) with NaN/inf vertices" if lost else ""
        instances.append(NamedMesh(str(node), mesh, f"{source}#{node}", warning))
    return instances, skipped


def _non_surface_reason(geometry: object) -> str | None:
    if isinstance(geometry, trimesh.PointCloud):
        return "points only, no faces (cannot sample a surface)"
    if not isinstance(geometry, trimesh.Trimesh):
        return f"{type(geometry).__name__} geometry has no faces"
    if len(geometry.faces) == 0:
        return "mesh has no faces" if len(geometry.vertices) == 0 else "vertices only, no faces"
    return None


def load_instances(path: Path, used: set[str] | None = None) -> tuple[list[NamedMesh], list[tuple[str, str]]]:
    """Loads a scene file whose nodes/meshes are the instances: ``(instances, skipped)`` of :func:`scene_instances`.

    Raises:
        DataError: Unreadable file, or no node holds a triangle mesh.
    """
    path = Path(path)
    instances, skipped = scene_instances(load_scene_graph(path, used), path.name)
    if not instances:
        raise DataError(f"{path.name}: {skipped[0][1] if skipped else 'no triangle mesh'}")
    return instances, skipped


def load_object(path: Path, name: str | None = None, used: set[str] | None = None) -> NamedMesh:
    """Loads a mesh file as ONE object named ``name`` (default: the file stem): all its geometry, transforms
    applied, concatenated. ``used`` is that of :func:`load_scene_graph`.

    Raises:
        DataError: Unreadable/empty file, or no triangle faces at all (e.g. a points-only PLY).
    """
    path = Path(path)
    instances, skipped = load_instances(path, used)
    mesh = trimesh.util.concatenate([inst.mesh for inst in instances])  # geometry only, no vertex merge
    warning = "; ".join(w for w in [i.warning for i in instances] + [f"{n}: {r}" for n, r in skipped] if w)
    return NamedMesh(name or path.stem, mesh, path.name, warning)


def validate_mesh(obj: NamedMesh) -> None:
    """Checks a mesh can be sampled (faces, finite coordinates, positive area), else a DataError naming its source."""
    mesh = obj.mesh
    if len(mesh.faces) == 0:
        raise DataError(f"{obj.source}: mesh has no faces")
    if not np.all(np.isfinite(mesh.vertices)):
        raise DataError(f"{obj.source}: non-finite vertex coordinates")
    if not mesh.area > 0:
        raise DataError(f"{obj.source}: mesh has zero surface area")


def joint_normalization(meshes: Sequence[trimesh.Trimesh | np.ndarray], bound: float = DEFAULT_BOUND) -> Normalization:
    """Computes one similarity for all meshes (or (P, 3) point arrays): bounding-box centre to 0, largest extent
    to 2*bound.

    The same transform is applied to every object, so the relative layout is kept. Pass a single
    mesh for single-object data. ``bound``: half-extent of the largest side after it (0.95 = 5% margin).

    Raises:
        DataError: The scene has no extent (all vertices coincide).
    """
    points = [np.asarray(getattr(m, "vertices", m)) for m in meshes]
    lo = np.min([p.min(axis=0) for p in points], axis=0)
    hi = np.max([p.max(axis=0) for p in points], axis=0)
    extent = float(np.max(hi - lo))
    if not extent > 0:
        raise DataError("scene has zero extent (all vertices coincide)")
    center = (lo + hi) / 2.0
    return Normalization((float(center[0]), float(center[1]), float(center[2])), 2.0 * bound / extent, bound)


def apply_normalization(obj: NamedMesh, norm: Normalization) -> NamedMesh:
    """Returns a copy of the object with the normalisation applied to its vertices."""
    mesh = trimesh.Trimesh(norm.apply(np.asarray(obj.mesh.vertices)), np.asarray(obj.mesh.faces), process=False)
    return NamedMesh(obj.name, mesh, obj.source, obj.warning)


def sample_surface(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``count`` area-weighted uniform samples on the surface with the normal of the hit face.

    ``rng`` is the only source of randomness (reproducible). Returns ``(points, normals)``, (count, 3)
    float32; normals are unit length.
    """
    vertices = np.asarray(mesh.vertices, np.float64)
    tri = vertices[np.asarray(mesh.faces)]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    cdf = np.cumsum(double_area)
    if not cdf[-1] > 0:
        raise DataError("mesh has zero surface area")
    # side="right" never lands on a zero-area face (its cdf step is empty).
    face = np.minimum(np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right"), len(cdf) - 1)
    u, v = rng.random((2, count))
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    t = tri[face]
    points = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    normals = cross[face] / double_area[face, None]
    return points.astype(np.float32), normals.astype(np.float32)


def object_rng(seed: int, scene_id: str, index: int) -> np.random.Generator:
    """The random generator of one object: depends on the run seed, the scene id and the index only."""
    return np.random.default_rng([seed, zlib.crc32(scene_id.encode()), index])
