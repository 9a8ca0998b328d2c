"""Surface extraction from decoded shape latents: dense (upstream) and coarse-to-fine.

Both methods evaluate the VAE decoder (positive inside, surface at 0) on points of the same
``(2^depth + 1)^3`` grid over ``bbox`` (:func:`midi.pipelines.pipeline_midi.generate_dense_grid_points`) and run
:func:`marching_cubes_mesh` on the full grid, so smoothing and vertex mapping are upstream's in both.

- ``dense`` decodes every grid point with ``pipe.decode_latents`` (optionally upstream's
  progressive re-decode on per-instance boxes).
- ``coarse_to_fine`` decodes the grid at ``coarse_depth``, marks the cells whose corners straddle 0
  (dilated by ``dilation`` cells) and refines only those, one level at a time, until ``depth``.
  Points never decoded get the trilinear interpolation of the coarser level: a cell without a sign
  change keeps one sign inside, so marching cubes finds no surface there, and near the surface every
  value is decoded. A part thinner than about ``bbox_size / 2^coarse_depth`` (a chair leg) can miss
  every coarse point, so cells with a corner within ``band_cells`` cells of 0 are refined too
  ("distance" = corner value / the field's median slope across sign changes); for a distance-like
  field that catches every part within ``band_cells`` coarse cells of a coarse point or the rest of
  the surface. Verified only on analytic fields and the tiny random model, not on the released
  weights: analytic fields (sphere, thin rod, table legs in ``bench/bench_extraction.py``) give the
  dense mesh (vertices within 1e-6); the tiny model's rough field agrees within one fine cell
  (``tests/inference/test_extraction.py``). Use ``dense`` to reproduce upstream exactly.

Marching cubes follows upstream's scripts: an optional 3x3x3 box smoothing (upstream calls it
"gaussian"), level 0, and the vertex mapping ``index / grid_size * bbox_size + bbox_min`` with
``grid_size`` = number of points (257), which shrinks meshes by 256/257 towards ``bbox_min``;
``vertex_mapping="exact"`` divides by the number of cells instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy import ndimage
from skimage import measure

from midi.pipelines.pipeline_midi import DEFAULT_BBOX_MAX, DEFAULT_BBOX_MIN, grid_axes

METHODS = ("dense", "coarse_to_fine")
NO_SURFACE = "no surface (field never crosses 0)"

FieldFn = Callable[[torch.Tensor], torch.Tensor]
"""Field evaluator: ``(Q, 3)`` float32 points -> ``(Q,)`` float32 values (positive inside)."""


@dataclass
class ExtractionConfig:
    """How to turn a latent into a mesh."""

    method: str = "dense"  # or "coarse_to_fine"
    octree_depth: int = 8  # final grid of 2^depth + 1 points per axis (upstream: 8)
    coarse_depth: int = 5  # coarse-to-fine: the first grid (clamped to octree_depth)
    dilation: int = 1  # coarse-to-fine: margin, in cells of each level, around cells with a sign change
    band_cells: float = 1.0  # coarse-to-fine: also refine cells this close to 0 (in cells, by slope); 0 = off
    num_chunks: int = 50000  # points per decoder call (bounds memory; upstream's name and default)
    smooth: bool = True  # upstream's 3x3x3 box smoothing before marching cubes
    vertex_mapping: str = "upstream"  # "upstream" (index / points per axis) or "exact" (index / cells)
    decode_progressive: bool = False  # dense only: upstream's second decode on per-instance boxes
    bbox_min: np.ndarray = field(default_factory=lambda: DEFAULT_BBOX_MIN.copy())
    bbox_max: np.ndarray = field(default_factory=lambda: DEFAULT_BBOX_MAX.copy())

    def validate(self) -> None:
        """Raises ValueError for settings that cannot work."""
        if self.method not in METHODS:
            raise ValueError(f"extraction method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.octree_depth <= 11:
            raise ValueError(f"octree depth must be in 1..11, got {self.octree_depth}")
        if self.coarse_depth < 1:
            raise ValueError(f"coarse depth must be >= 1, got {self.coarse_depth}")
        if self.dilation < 0 or self.band_cells < 0 or self.num_chunks < 1:
            raise ValueError("dilation and band_cells must be >= 0 and num_chunks >= 1")
        if self.vertex_mapping not in ("upstream", "exact"):
            raise ValueError(f"vertex mapping must be 'upstream' or 'exact', got {self.vertex_mapping!r}")
        if self.decode_progressive and self.method != "dense":
            raise ValueError("progressive decoding (upstream's per-instance box) needs the dense method")


@dataclass
class Surface:
    """One instance's extraction result."""

    mesh: trimesh.Trimesh | None  # None when the field has no surface
    queries: int  # decoder query points spent on this instance
    seconds: float  # decoding + marching cubes
    problem: str | None = None  # why there is no mesh


def vae_field(vae, latent: torch.Tensor, num_chunks: int) -> FieldFn:
    """The decoded field of one latent ``(T, C)`` or ``(1, T, C)`` as a :data:`FieldFn`."""
    z = latent if latent.ndim == 3 else latent[None]

    def evaluate(points: torch.Tensor) -> torch.Tensor:
        pts = points.to(device=z.device, dtype=z.dtype)[None]
        with torch.no_grad():
            return vae.decode(z, sampled_points=pts, num_chunks=num_chunks).sample[0, :, 0].float().cpu()

    return evaluate


def _points(axes: list[np.ndarray], index: tuple[np.ndarray, ...], stride: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([axes[a][index[a] * stride] for a in range(3)], axis=1))


# A grid of n points per axis has n - 1 cells; cell i has the corners i and i + 1 on each axis. A size-2 filter
# with origin -1 reads the window [i, i + 1], so its first n - 1 values are per-cell reductions over the corners.
def _cell_min(points: np.ndarray) -> np.ndarray:
    return ndimage.minimum_filter(points, size=2, origin=-1)[:-1, :-1, :-1]


def _cell_max(points: np.ndarray) -> np.ndarray:
    return ndimage.maximum_filter(points, size=2, origin=-1)[:-1, :-1, :-1]


def _straddling_cells(values: np.ndarray, level: float) -> np.ndarray:
    """Cells whose 8 corners include values on both sides of ``level``."""
    return (_cell_min(values) <= level) & (_cell_max(values) >= level)


def _cell_corners(cells: np.ndarray) -> np.ndarray:
    """Grid points that are a corner of at least one marked cell."""
    # Point p is a corner of the cells p - 1 and p on each axis: the default window, zero beyond the grid.
    return ndimage.maximum_filter(np.pad(cells, ((0, 1),) * 3), size=2, mode="constant")


def _upsample(values: np.ndarray) -> np.ndarray:
    """Trilinear upsampling from ``m`` to ``2m - 1`` points per axis (old points kept exactly)."""
    return F.interpolate(torch.from_numpy(values)[None, None], size=[2 * s - 1 for s in values.shape],
                         mode="trilinear", align_corners=True)[0, 0].numpy()


def _near_cells(values: np.ndarray, level: float, band_cells: float) -> np.ndarray:
    """Cells with a corner within ``band_cells`` cells of ``level``, judging distance by the field's
    median slope across sign changes (exact for a distance-like field; catches thin parts)."""
    slopes = np.concatenate([np.abs(np.diff(values, axis=a))[np.diff(np.sign(values - level), axis=a) != 0]
                             for a in range(3)])
    if slopes.size == 0:
        return np.zeros(tuple(s - 1 for s in values.shape), bool)
    near = np.abs(values - level) <= band_cells * float(np.median(slopes))
    return _cell_max(near)


def _refine_masks(values: np.ndarray, known: np.ndarray, dilation: int, level: float,
                  band_cells: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Next level's ``(known, to_decode)`` masks from this level's values and known mask."""
    cells = _straddling_cells(values, level)
    if band_cells > 0:
        cells |= _near_cells(values, level, band_cells)
    if dilation and cells.any():
        cells = ndimage.binary_dilation(cells, structure=np.ones((3, 3, 3), bool), iterations=dilation)
    fine_cells = cells.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_known = np.zeros(tuple(2 * s - 1 for s in known.shape), dtype=bool)
    fine_known[::2, ::2, ::2] = known
    return fine_known, _cell_corners(fine_cells) & ~fine_known


def coarse_to_fine_values(field_fn: FieldFn, bbox_min: Sequence[float], bbox_max: Sequence[float], depth: int,
                          coarse_depth: int = 5, dilation: int = 1, level: float = 0.0,
                          band_cells: float = 0.0) -> tuple[np.ndarray, int]:
    """Field values on the full ``(2^depth + 1)^3`` grid over the box, decoding only near the surface.

    The grid at ``coarse_depth`` (clamped to ``depth``) is decoded fully; the other arguments are
    :class:`ExtractionConfig`'s. Returns ``(values (n, n, n) float32, points evaluated)``; the
    module docstring says which values are decoded and which are interpolated.
    """
    coarse_depth = min(coarse_depth, depth)
    axes = grid_axes(bbox_min, bbox_max, depth)
    m = 2**coarse_depth + 1
    index = tuple(g.ravel() for g in np.meshgrid(*[np.arange(m)] * 3, indexing="ij"))
    values = field_fn(_points(axes, index, 2 ** (depth - coarse_depth))).numpy().reshape(m, m, m)
    known = np.ones_like(values, dtype=bool)
    queries = values.size
    for d in range(coarse_depth + 1, depth + 1):
        known, todo = _refine_masks(values, known, dilation, level, band_cells)
        values = _upsample(values)
        index = np.nonzero(todo)
        if index[0].size:
            values[index] = field_fn(_points(axes, index, 2 ** (depth - d))).numpy()
            queries += int(index[0].size)
        known |= todo
    return values.astype(np.float32, copy=False), queries


def box_smooth(volume: torch.Tensor) -> torch.Tensor:
    """Upstream's "gaussian" smoothing (sigma 1): a 3x3x3 mean filter with zero padding."""
    kernel = torch.full((1, 1, 3, 3, 3), 1.0 / 27, dtype=volume.dtype, device=volume.device)
    return F.conv3d(volume[None, None], kernel, padding=1)[0, 0]


def marching_cubes_mesh(values: np.ndarray | torch.Tensor, grid_size: Sequence[int], bbox_min: np.ndarray,
                        bbox_size: np.ndarray, level: float = 0.0, smooth: bool = False,
                        vertex_mapping: str = "upstream") -> trimesh.Trimesh | None:
    """Marching cubes on ``prod(grid_size)`` field values (positive inside) in the grid's flattening order.

    ``smooth`` applies :func:`box_smooth` first (upstream's script does); ``vertex_mapping`` is
    ``"upstream"`` (divide by points per axis) or ``"exact"`` (by cells). Returns None when the
    field never crosses ``level`` (an instance with no surface).
    """
    volume = torch.as_tensor(values).float().reshape(*grid_size)
    volume = (box_smooth(volume) if smooth else volume).cpu().numpy()
    if not (volume.min() < level < volume.max()):
        return None  # marching cubes raises on a field without a crossing
    verts, faces, _, _ = measure.marching_cubes(volume, level, method="lewiner")
    divisor = np.asarray(grid_size, dtype=np.float64) - (1 if vertex_mapping == "exact" else 0)
    verts = verts / divisor * np.asarray(bbox_size) + np.asarray(bbox_min)
    return trimesh.Trimesh(verts.astype(np.float32), np.ascontiguousarray(faces))


def _surface(config: ExtractionConfig, values, grid_size, bbox_min, bbox_size, queries: int, start: float) -> Surface:
    """:func:`marching_cubes_mesh` at level 0 with the configured smoothing and mapping, timed from ``start``."""
    mesh = marching_cubes_mesh(values, grid_size, bbox_min, bbox_size, smooth=config.smooth,
                               vertex_mapping=config.vertex_mapping)
    if mesh is None or len(mesh.faces) == 0:
        return Surface(None, queries, time.perf_counter() - start, NO_SURFACE)
    return Surface(mesh, queries, time.perf_counter() - start)


def extract_coarse_to_fine(vae, latent: torch.Tensor, config: ExtractionConfig) -> Surface:
    """One instance's mesh with the coarse-to-fine method."""
    start = time.perf_counter()
    bbox_min, bbox_max = np.asarray(config.bbox_min), np.asarray(config.bbox_max)
    values, queries = coarse_to_fine_values(vae_field(vae, latent, config.num_chunks), bbox_min, bbox_max,
                                            config.octree_depth, config.coarse_depth, config.dilation,
                                            band_cells=config.band_cells)
    return _surface(config, values, values.shape, bbox_min, bbox_max - bbox_min, queries, start)


def extract_dense(pipe, latents: torch.Tensor, config: ExtractionConfig) -> list[Surface]:
    """Meshes of latents ``(N, T, C)`` from one ``pipe.decode_latents`` on the full grid (upstream's way). With
    ``decode_progressive`` (upstream's second decode on per-instance boxes) the batch is the scene, as its bbox
    carry-over needs; each instance is timed with its marching cubes and a share of the decoding."""
    start = time.perf_counter()
    values, grid_sizes, bbox_sizes, bbox_mins, _ = pipe.decode_latents(
        latents, decode_progressive=config.decode_progressive, octree_depth=config.octree_depth,
        num_chunks=config.num_chunks, bbox_min=config.bbox_min, bbox_max=config.bbox_max)
    n = len(latents)
    share = (time.perf_counter() - start) / n
    queries = values.shape[1] * (2 if config.decode_progressive else 1)  # the progressive decode is a second pass
    return [_surface(config, values[i], grid_sizes[i], bbox_mins[i], bbox_sizes[i], queries,
                     time.perf_counter() - share) for i in range(n)]


def extract_surfaces(pipe, latents: torch.Tensor, config: ExtractionConfig,
                     progress: Callable[[Iterator], Iterator] | None = None) -> list[Surface]:
    """One :class:`Surface` per instance latent ``(N, T, C)``, in order (``mesh=None``: no surface).

    ``pipe.vae`` and ``pipe.decode_latents`` are used; ``progress`` wraps the per-instance loop
    (e.g. ``tqdm``).
    """
    config.validate()
    if config.decode_progressive:
        return extract_dense(pipe, latents, config)
    indices = range(len(latents))
    return [extract_dense(pipe, latents[i : i + 1], config)[0] if config.method == "dense"
            else extract_coarse_to_fine(pipe.vae, latents[i], config) for i in (progress(indices) if progress else indices)]
