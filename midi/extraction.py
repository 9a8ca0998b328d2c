"""Surface extraction from decoded shape latents: dense (upstream) and coarse-to-fine.

Both methods evaluate the VAE decoder (positive inside, surface at 0) on points of the same
``(2^depth + 1)^3`` grid over ``bbox`` (:func:`midi.mesh.generate_dense_grid_points`) and run
:func:`midi.mesh.marching_cubes_mesh` on the full grid, so smoothing and vertex mapping are the
upstream ones in both cases.

- ``dense`` decodes every grid point with ``pipe.decode_latents`` (optionally upstream's
  progressive re-decode on per-instance boxes).
- ``coarse_to_fine`` decodes the grid at ``coarse_depth`` (every ``2^(depth - coarse_depth)``-th
  point per axis), marks the cells whose corner values straddle 0, dilates them by ``dilation``
  cells, and refines only those cells one level at a time until ``depth``. Points that are never
  decoded get the trilinear interpolation of the coarser level: a cell with no sign change at its
  corners keeps one sign everywhere inside, so marching cubes finds no surface there, and near
  the surface every value is a decoded one. The result equals the dense mesh wherever the
  surface passes through a cell with a sign change at ``coarse_depth``. A part that fits between
  coarse grid points without touching them (thinner than about ``bbox_size / 2^coarse_depth``,
  e.g. a chair leg) would be missed by sign changes alone, so cells with a corner within
  ``band_cells`` cells of the surface are refined too, "distance" being the corner value divided
  by the field's median slope across sign changes. For a distance-like field (an SDF; a smooth
  field is close to linear near its surface) this catches every part within ``band_cells``
  coarse cells of a coarse grid point; a part farther than that from every coarse grid point and
  from the rest of the surface is still missed. Measured agreement with dense extraction, verified
  only on analytic fields and on the tiny random model, not on the released MIDI-3D weights:
  analytic fields (sphere at depth 7: same vertex count, vertices within 1e-6; thin rod with the
  default band: largest nearest-vertex distance < 1e-6; table legs in ``bench/bench_extraction.py``)
  give the same mesh; the tiny model's rough random field (depth 5, coarse depth 3) only agrees
  within one fine cell (largest nearest-vertex distance either way <= ``bbox_size / 2^depth``),
  see ``tests/test_extraction.py``. Trained weights are expected to behave like the smooth fields,
  but no equality is claimed for them; use ``dense`` to reproduce upstream exactly.

Decoder queries are counted by wrapping ``vae.decode`` (:func:`count_decoder_queries`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy import ndimage

from midi.mesh import DEFAULT_BBOX_MAX, DEFAULT_BBOX_MIN, marching_cubes_mesh

logger = logging.getLogger(__name__)

METHODS = ("dense", "coarse_to_fine")
NO_SURFACE = "no surface (field never crosses 0)"

FieldFn = Callable[[torch.Tensor], torch.Tensor]
"""Field evaluator: ``(Q, 3)`` float32 points -> ``(Q,)`` float32 values (positive inside)."""


@dataclass
class ExtractionConfig:
    """How to turn a latent into a mesh.

    Attributes:
        method: ``"dense"`` or ``"coarse_to_fine"``.
        octree_depth: final grid of ``2^depth + 1`` points per axis (upstream: 8).
        coarse_depth: first grid of the coarse-to-fine method (clamped to ``octree_depth``).
        dilation: coarse-to-fine margin, in cells of each level, around cells with a sign change.
        band_cells: coarse-to-fine: also refine cells with a corner closer to 0 than this many
            cells, judged by the field's slope across sign changes (0 = sign changes only).
        num_chunks: points per decoder call (bounds memory; upstream's name and default).
        smooth: upstream's 3x3x3 box smoothing before marching cubes.
        vertex_mapping: ``"upstream"`` (index / points per axis) or ``"exact"`` (index / cells).
        decode_progressive: dense only: upstream's second decode on per-instance boxes.
        bbox_min: grid box corner.
        bbox_max: grid box corner.
    """

    method: str = "dense"
    octree_depth: int = 8
    coarse_depth: int = 5
    dilation: int = 1
    band_cells: float = 1.0
    num_chunks: int = 50000
    smooth: bool = True
    vertex_mapping: str = "upstream"
    decode_progressive: bool = False
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
    """One instance's extraction result.

    Attributes:
        mesh: the mesh, or None when the field has no surface.
        queries: decoder query points spent on this instance.
        seconds: decoding + marching cubes time.
        problem: why there is no mesh (None when there is one).
    """

    mesh: trimesh.Trimesh | None
    queries: int
    seconds: float
    problem: str | None = None


@contextmanager
def count_decoder_queries(vae) -> Iterator[list[int]]:
    """Counts the query points passed to ``vae.decode`` while the context is open.

    Yields:
        A one-element list holding the running count (read it after the block).
    """
    counter = [0]
    original = vae.decode
    shadowed = "decode" in vars(vae)  # an instance attribute (e.g. a stub) to put back

    def counting_decode(z, sampled_points, *args, **kwargs):
        counter[0] += int(sampled_points.shape[0] * sampled_points.shape[1])
        return original(z, sampled_points, *args, **kwargs)

    vae.decode = counting_decode
    try:
        yield counter
    finally:
        if shadowed:
            vae.decode = original
        else:
            del vae.decode  # back to the class method


def vae_field(vae, latent: torch.Tensor, num_chunks: int) -> FieldFn:
    """The decoded field of one latent ``(T, C)`` or ``(1, T, C)`` as a :data:`FieldFn`."""
    z = latent if latent.ndim == 3 else latent[None]

    def evaluate(points: torch.Tensor) -> torch.Tensor:
        pts = points.to(device=z.device, dtype=z.dtype)[None]
        with torch.no_grad():
            return vae.decode(z, sampled_points=pts, num_chunks=num_chunks).sample[0, :, 0].float().cpu()

    return evaluate


def grid_axes(bbox_min: Sequence[float], bbox_max: Sequence[float], depth: int) -> list[np.ndarray]:
    """The per-axis coordinates of the dense grid (exactly those of ``generate_dense_grid_points``)."""
    n = 2**depth + 1
    return [np.linspace(bbox_min[i], bbox_max[i], n, dtype=np.float32) for i in range(3)]


def _points(axes: list[np.ndarray], index: tuple[np.ndarray, ...], stride: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([axes[a][index[a] * stride] for a in range(3)], axis=1))


def _straddling_cells(values: np.ndarray, level: float) -> np.ndarray:
    """Cells (one fewer per axis than points) whose 8 corners include values on both sides of ``level``."""
    corners = [values[i : values.shape[0] - 1 + i, j : values.shape[1] - 1 + j, k : values.shape[2] - 1 + k]
               for i in (0, 1) for j in (0, 1) for k in (0, 1)]  # fmt: skip
    low = np.minimum.reduce(corners)
    high = np.maximum.reduce(corners)
    return (low <= level) & (high >= level)


def _cell_corners(cells: np.ndarray) -> np.ndarray:
    """Grid points that are a corner of at least one marked cell."""
    points = np.zeros(tuple(s + 1 for s in cells.shape), dtype=bool)
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                points[i : i + cells.shape[0], j : j + cells.shape[1], k : k + cells.shape[2]] |= cells
    return points


def _upsample(values: np.ndarray) -> np.ndarray:
    """Trilinear upsampling from ``m`` to ``2m - 1`` points per axis (old points kept exactly)."""
    size = [2 * s - 1 for s in values.shape]
    volume = torch.from_numpy(values)[None, None]
    return F.interpolate(volume, size=size, mode="trilinear", align_corners=True)[0, 0].numpy()


def _near_cells(values: np.ndarray, level: float, band_cells: float) -> np.ndarray:
    """Cells with a corner within ``band_cells`` cells of ``level``, judging distance by the field's
    median slope across sign changes (exact for a distance-like field; catches thin parts)."""
    slopes = [np.abs(np.diff(values, axis=a))[np.diff(np.sign(values - level), axis=a) != 0] for a in range(3)]
    slopes = np.concatenate(slopes)
    if slopes.size == 0:
        return np.zeros(tuple(s - 1 for s in values.shape), bool)
    near = np.abs(values - level) <= band_cells * float(np.median(slopes))
    corners = [near[i : near.shape[0] - 1 + i, j : near.shape[1] - 1 + j, k : near.shape[2] - 1 + k]
               for i in (0, 1) for j in (0, 1) for k in (0, 1)]  # fmt: skip
    return np.logical_or.reduce(corners)


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


def coarse_to_fine_values(
    field_fn: FieldFn,
    bbox_min: Sequence[float],
    bbox_max: Sequence[float],
    depth: int,
    coarse_depth: int = 5,
    dilation: int = 1,
    level: float = 0.0,
    band_cells: float = 0.0,
) -> tuple[np.ndarray, int]:
    """Field values on the full ``(2^depth + 1)^3`` grid, decoding only near the surface.

    Args:
        field_fn: evaluates the field at ``(Q, 3)`` points.
        bbox_min: grid box corner.
        bbox_max: grid box corner.
        depth: final grid depth.
        coarse_depth: depth of the first, fully decoded grid (clamped to ``depth``).
        dilation: margin in cells (of each level) added around cells with a sign change.
        level: iso level.
        band_cells: also refine cells with a corner within this many cells of ``level``
            (judged by the median slope across sign changes); 0 = sign changes only.

    Returns:
        ``(values (n, n, n) float32, number of points evaluated)``; see the module docstring
        for which values are decoded and which are interpolated.
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


def mesh_from_values(values: np.ndarray | torch.Tensor, grid_size: Sequence[int], bbox_min: np.ndarray,
                     bbox_size: np.ndarray, config: ExtractionConfig) -> trimesh.Trimesh | None:
    """Marching cubes with the configured smoothing and vertex mapping (None: no surface)."""
    return marching_cubes_mesh(values, list(grid_size), bbox_min, bbox_size, level=0.0, smooth=config.smooth,
                               vertex_mapping=config.vertex_mapping)


def _finish(mesh: trimesh.Trimesh | None, queries: int, start: float) -> Surface:
    problem = None
    if mesh is None or len(mesh.faces) == 0:
        mesh, problem = None, NO_SURFACE
    return Surface(mesh, queries, time.perf_counter() - start, problem)


def extract_coarse_to_fine(vae, latent: torch.Tensor, config: ExtractionConfig) -> Surface:
    """One instance's mesh with the coarse-to-fine method."""
    start = time.perf_counter()
    bbox_min, bbox_max = np.asarray(config.bbox_min), np.asarray(config.bbox_max)
    values, queries = coarse_to_fine_values(vae_field(vae, latent, config.num_chunks), bbox_min, bbox_max,
                                            config.octree_depth, config.coarse_depth, config.dilation,
                                            band_cells=config.band_cells)
    mesh = mesh_from_values(values, values.shape, bbox_min, bbox_max - bbox_min, config)
    return _finish(mesh, queries, start)


def extract_dense(pipe, latent: torch.Tensor, config: ExtractionConfig) -> Surface:
    """One instance's mesh from ``pipe.decode_latents`` on the full grid (upstream's way)."""
    start = time.perf_counter()
    with count_decoder_queries(pipe.vae) as counter:
        values, grid_sizes, bbox_sizes, bbox_mins, _ = pipe.decode_latents(
            latent[None] if latent.ndim == 2 else latent, octree_depth=config.octree_depth,
            num_chunks=config.num_chunks, bbox_min=config.bbox_min, bbox_max=config.bbox_max)
    mesh = mesh_from_values(values[0], grid_sizes[0], bbox_mins[0], bbox_sizes[0], config)
    return _finish(mesh, counter[0], start)


def extract_dense_progressive(pipe, latents: torch.Tensor, config: ExtractionConfig) -> list[Surface]:
    """All instances at once with upstream's progressive decode (its bbox carry-over needs the batch)."""
    start = time.perf_counter()
    with count_decoder_queries(pipe.vae) as counter:
        values, grid_sizes, bbox_sizes, bbox_mins, _ = pipe.decode_latents(
            latents, decode_progressive=True, octree_depth=config.octree_depth, num_chunks=config.num_chunks,
            bbox_min=config.bbox_min, bbox_max=config.bbox_max)
    decode_share = (time.perf_counter() - start) / len(latents)
    surfaces = []
    for i in range(len(latents)):
        t = time.perf_counter()
        mesh = mesh_from_values(values[i], grid_sizes[i], bbox_mins[i], bbox_sizes[i], config)
        surface = _finish(mesh, counter[0] // len(latents), t)
        surface.seconds += decode_share
        surfaces.append(surface)
    return surfaces


def extract_surfaces(pipe, latents: torch.Tensor, config: ExtractionConfig,
                     progress: Callable[[Iterator], Iterator] | None = None) -> list[Surface]:
    """Meshes for every instance latent ``(N, T, C)``, in order.

    Args:
        pipe: the pipeline (its ``vae`` and ``decode_latents`` are used).
        latents: the denoised latents.
        config: extraction settings.
        progress: wraps the per-instance loop (e.g. ``tqdm``).

    Returns:
        One :class:`Surface` per instance; an instance without surface has ``mesh=None``.
    """
    config.validate()
    if config.decode_progressive:
        return extract_dense_progressive(pipe, latents, config)
    extract = extract_dense if config.method == "dense" else (lambda p, z, c: extract_coarse_to_fine(p.vae, z, c))
    indices = range(len(latents))
    return [extract(pipe, latents[i], config) for i in (progress(indices) if progress else indices)]
