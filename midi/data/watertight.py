"""Watertight surfaces: a closed outer shell of any triangle soup (open, multi-body, inner faces).

Real meshes are rarely solids: holes, separate overlapping bodies, faces inside the object,
single-sided sheets. Sampled as they are, they give surface points inside the object and normals
that point anywhere, which is not what a shape VAE trained on watertight meshes encodes. This
module turns a mesh into the outer boundary of a thin dilation of it, the way the 3D generation
data pipelines do (an unsigned distance on a grid, a flood fill from outside, marching cubes at a
small offset):

1. a grid over the object's bounding box with ``resolution`` cells along its longest side (the
   object's own box, so small objects of a scene keep their detail);
2. the unsigned distance to the surface at the grid points of a narrow band around it
   (a KD-tree over dense surface samples finds each point's nearby face, then the exact
   point-triangle distance to it; points outside the band never matter for the result);
3. a flood fill from the grid's border through the points farther than ``offset`` voxels from the
   surface (closed morphologically, so it does not pass holes narrower than ~4 voxels): what it
   reaches is outside; everything else (the band and any enclosed space: the interior of a solid,
   the space between inner faces) is inside;
4. marching cubes at ``offset`` voxels on the distance, negated at the enclosed points, so only
   the outer side of the band yields a surface. Inner faces vanish; a sheet or a part thinner than
   the offset becomes a closed shell of thickness ~2 offsets (thin parts are kept); holes narrower
   than ~4 voxels are capped, wider ones give a shell around the open edge (and gaps between parts
   narrower than that fill up).

The result lies ``offset`` voxels outside the input (one voxel at 256 is 0.4% of the object's
size) and is checked with trimesh's ``is_watertight``; anything else is a :class:`WatertightError`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import measure

from midi.errors import DataError

DEFAULT_RESOLUTION = 256
DEFAULT_OFFSET = 1.0  # in voxels: small enough to keep the shape, large enough to close sheets and seams
SAMPLES_PER_VOXEL_AREA = 1.5  # surface samples per voxel face of area: each band point has one a fraction of a voxel away
MAX_SAMPLES = 4_000_000  # bounds memory for meshes with a huge area (crumpled or duplicated sheets)
CLOSE_VOXELS = 1  # the closing's radius: holes under ~2 * (offset + 1) voxels are capped (4 at 256: 1.6%)
TIE_NUDGE = np.float32(1e-4)  # voxels: moves a vertex by a ten-thousandth of a voxel
MAX_BUBBLE_FACES = 200  # a closed part spanning under MIN_PART_VOXELS voxels has at most this many faces
MIN_PART_VOXELS = 2.0  # closed parts smaller than this are marching-cubes bubbles: a real part is >= 2 offsets wide
WATERTIGHT_FAILED = "not watertight"  # how a failed conversion starts in an object's warning (read by --check)
SAMPLE_SEED = 0  # the samples only locate faces; a fixed seed makes the result reproducible


class WatertightError(DataError):
    """An object could not be made watertight (the message says why)."""


@dataclass
class WatertightResult:
    """A watertight mesh and what it cost."""

    mesh: trimesh.Trimesh  # closed, consistently oriented outward
    seconds: float  # wall time of the conversion
    resolution: int  # cells along the object's longest side
    voxel: float  # cell size, in the mesh's units

    def info(self) -> dict[str, float | int]:
        """The record stored with the object in ``scene.json``."""
        return {"resolution": self.resolution, "seconds": round(self.seconds, 3), "voxel": self.voxel,
                "num_faces": int(len(self.mesh.faces))}


def make_watertight(mesh: trimesh.Trimesh, resolution: int = DEFAULT_RESOLUTION,
                    offset: float = DEFAULT_OFFSET) -> WatertightResult:
    """The outer shell of ``mesh`` at ``offset`` voxels (module docstring), watertight and outward-oriented.

    Raises:
        WatertightError: No surface came out, or the result is not watertight.
        ValueError: ``resolution < 8`` or ``offset <= 0``.
    """
    if resolution < 8 or not offset > 0:
        raise ValueError(f"watertight resolution must be >= 8 and offset > 0, got {resolution} and {offset}")
    start = time.perf_counter()
    vertices = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.faces, np.int64)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    voxel = float(np.max(hi - lo)) / resolution
    if not voxel > 0 or len(faces) == 0:
        raise WatertightError("mesh has no extent or no faces")
    # Marching cubes reads the distance at the corners of cells the level crosses: up to
    # offset + sqrt(3) voxels from the surface. The grid keeps one more voxel of empty border.
    reach = offset + math.sqrt(3.0)
    margin = int(math.ceil(reach)) + 1
    # Half a voxel off the bounding box: faces on the box (and CAD faces on a whole-voxel lattice)
    # then sit half-way between grid points, never a whole number of voxels (the level) from one.
    origin = lo - (margin + 0.5) * voxel
    dims = tuple(int(d) for d in np.ceil((hi - lo) / voxel).astype(np.int64) + 2 * margin + 2)
    distance = _band_distance(mesh, vertices[faces], origin, voxel, dims, reach, margin)
    field = _signed_by_flood_fill(distance, offset)
    try:
        # On the whole grid, not masked to the band: a masked cell is skipped even where the level
        # crosses it (a hole), while on a complete field marching cubes always closes the surface.
        verts, tris, _, _ = measure.marching_cubes(field, offset, method="lewiner")
    except (ValueError, RuntimeError) as exc:  # no crossing at all (a degenerate mesh)
        raise WatertightError(f"no surface at the offset ({exc})") from None
    shell = _clean(trimesh.Trimesh(verts * voxel + origin, tris, process=True), voxel)
    if len(shell.faces) == 0 or not shell.is_watertight:
        raise WatertightError(f"the shell at resolution {resolution} is not watertight "
                              f"({len(shell.faces)} faces)")
    return WatertightResult(shell, time.perf_counter() - start, resolution, voxel)


def _band_distance(mesh: trimesh.Trimesh, triangles: np.ndarray, origin: np.ndarray, voxel: float,
                   dims: tuple[int, ...], reach: float, margin: int) -> np.ndarray:
    """Unsigned distance in voxels on the grid: within ``reach`` of the surface that of the nearest
    sample's face (exact but where the random samples leave a gap), ``margin`` elsewhere."""
    count = int(min(MAX_SAMPLES, max(10_000, mesh.area * SAMPLES_PER_VOXEL_AREA / voxel**2)))
    samples, sample_face = trimesh.sample.sample_surface(mesh, count, seed=SAMPLE_SEED)
    # Grid points nearest to a sample, grown by the reach (the rounding adds up to half a diagonal).
    near = np.zeros(dims, bool)
    index = np.clip(np.rint((samples - origin) / voxel).astype(np.int64), 0, np.asarray(dims) - 1)
    near[index[:, 0], index[:, 1], index[:, 2]] = True
    band = _grow(near, reach + math.sqrt(3.0) / 2.0)
    points_index = np.argwhere(band)
    points = origin + points_index * voxel
    tree = cKDTree(samples, balanced_tree=False, compact_nodes=False)
    # The bound prunes most of the search; a point beyond it is farther than the reach from the
    # surface too (the samples' spacing is below half a voxel's excess), and never matters.
    dist, nearest = tree.query(points, distance_upper_bound=(reach + 0.5) * voxel)
    found = nearest < len(samples)
    # The nearest sample's face gives the exact distance to that face: at most the sample distance,
    # and (the samples being a fraction of a voxel apart) the distance to the surface near the band.
    closest = trimesh.triangles.closest_point(triangles[sample_face[nearest[found]]], points[found])
    dist[found] = np.minimum(dist[found], np.linalg.norm(closest - points[found], axis=1))
    distance = np.full(dims, np.float32(margin), np.float32)
    distance[tuple(points_index.T)] = np.minimum(dist / voxel, margin).astype(np.float32)
    return distance


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` dilated by a Euclidean ball of ``radius`` voxels (as shifted copies: one pass per offset
    of the ball on the few marked points is much cheaper than a full-grid dilation)."""
    marked = np.argwhere(mask)
    r = np.arange(-math.floor(radius), math.floor(radius) + 1)
    offsets = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    offsets = offsets[(offsets**2).sum(axis=1) <= radius * radius]
    out = np.zeros_like(mask)
    upper = np.asarray(mask.shape) - 1
    for offset in offsets:
        shifted = np.clip(marked + offset, 0, upper)
        out[shifted[:, 0], shifted[:, 1], shifted[:, 2]] = True
    return out


def _signed_by_flood_fill(distance: np.ndarray, offset: float) -> np.ndarray:
    """The distance, negated at the points farther than ``offset`` that the outside cannot reach.

    The fill runs through the points farther than ``offset + CLOSE_VOXELS`` (so it cannot pass a
    hole narrower than about twice that: an open mesh's gaps are capped, not lined with a second,
    inner shell), and what it reaches is then grown back by ``CLOSE_VOXELS`` (a morphological
    closing), so the surface itself stays at ``offset``.
    """
    free = distance > offset
    labels, _ = ndimage.label(distance > offset + CLOSE_VOXELS)  # 6-connected: no leak through a band corner
    border = np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel(),
                             labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    outside = np.isin(labels, np.unique(border[border > 0]))
    # Grown back by CLOSE_VOXELS + 1 (the grid's step: a point just beyond the offset may have its
    # nearest fill point a whole step farther): two steps of the 18-neighbour ball reach >= 2 voxels
    # in every direction.
    ball = ndimage.generate_binary_structure(3, 2)
    outside = ndimage.binary_dilation(outside, ball, iterations=int(CLOSE_VOXELS) + 1) & free
    field = np.where(free & ~outside, -distance, distance)
    # A grid point exactly at the level (an axis-aligned CAD face a whole number of voxels away)
    # makes marching cubes emit coincident vertices and non-manifold edges: nudge it off the level,
    # downwards like the rest of the band (upwards, the band's inner side would cross the negated
    # enclosed points and grow an inner shell).
    field[field == np.float32(offset)] -= TIE_NUDGE
    return field


def _clean(shell: trimesh.Trimesh, voxel: float) -> trimesh.Trimesh:
    """Drops the faces marching cubes collapses (their vertices merged) and the sub-voxel closed bubbles
    it leaves around single grid points (at a spike's tip or a one-voxel pocket), and orients the shell
    outward (a positive volume)."""
    faces = shell.faces
    # Only faces with a repeated vertex: a sliver with three distinct vertices is part of the closed
    # surface (removing it, as trimesh's area test would, opens a hole).
    shell.update_faces((faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2]))
    labels = trimesh.graph.connected_component_labels(shell.face_adjacency, node_count=len(shell.faces))
    sizes = np.bincount(labels)
    # Only a part of few faces can be that small (marching cubes makes a few faces per cell): the
    # bounding boxes of the others are never computed.
    for part in np.flatnonzero(sizes <= MAX_BUBBLE_FACES):
        corners = shell.vertices[shell.faces[labels == part]].reshape(-1, 3)
        if np.ptp(corners, axis=0).max() < MIN_PART_VOXELS * voxel:
            sizes[part] = 0
    shell.update_faces(sizes[labels] > 0)
    shell.remove_unreferenced_vertices()
    tri = shell.vertices[shell.faces]
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    if volume < 0:
        shell.invert()
    return shell
