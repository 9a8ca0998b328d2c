"""Grids, marching cubes and mesh export for decoded occupancy fields.

Upstream conventions (MIDI-3D scripts): a ``(2^depth + 1)^3`` grid over ``[-1.005, 1.005]^3``
flattened with x slowest, an optional 3x3x3 box smoothing (upstream calls it "gaussian"),
marching cubes at level 0 and the vertex mapping ``index / grid_size * bbox_size + bbox_min``
with ``grid_size`` = number of points (257), which shrinks meshes by 256/257 towards ``bbox_min``.
``vertex_mapping="exact"`` divides by the number of cells instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

DEFAULT_BBOX_MIN = np.array([-1.005, -1.005, -1.005])
DEFAULT_BBOX_MAX = np.array([1.005, 1.005, 1.005])


def generate_dense_grid_points(
    bbox_min: np.ndarray, bbox_max: np.ndarray, octree_depth: int, indexing: str = "ij"
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Grid points ``((2^d + 1)^3, 3)`` float32, the grid size per axis and the bbox extent."""
    bbox_min = np.asarray(bbox_min)
    bbox_max = np.asarray(bbox_max)
    n = int(2**octree_depth) + 1
    axes = [np.linspace(bbox_min[i], bbox_max[i], n, dtype=np.float32) for i in range(3)]
    xyz = np.stack(np.meshgrid(*axes, indexing=indexing), axis=-1).reshape(-1, 3)
    return xyz, [n, n, n], bbox_max - bbox_min


def box_smooth(volume: torch.Tensor) -> torch.Tensor:
    """Upstream's "gaussian" smoothing (sigma 1): a 3x3x3 mean filter with zero padding."""
    kernel = torch.full((1, 1, 3, 3, 3), 1.0 / 27, dtype=volume.dtype, device=volume.device)
    return F.conv3d(volume[None, None], kernel, padding=1)[0, 0]


def marching_cubes_mesh(
    values: np.ndarray | torch.Tensor,
    grid_size: list[int] | tuple[int, int, int],
    bbox_min: np.ndarray,
    bbox_size: np.ndarray,
    level: float = 0.0,
    smooth: bool = False,
    vertex_mapping: str = "upstream",
) -> trimesh.Trimesh | None:
    """Runs marching cubes on a flattened grid of field values (positive inside).

    Args:
        values: ``prod(grid_size)`` values in the grid's flattening order.
        grid_size: points per axis.
        bbox_min, bbox_size: grid placement.
        level: iso level.
        smooth: apply :func:`box_smooth` first (upstream's inference script does).
        vertex_mapping: ``"upstream"`` (divide by points per axis) or ``"exact"`` (by cells).

    Returns:
        The mesh, or None when the field never crosses ``level`` (an instance with no surface).
    """
    volume = torch.as_tensor(values).float().reshape(*grid_size)
    if smooth:
        volume = box_smooth(volume)
    volume = volume.cpu().numpy()
    if not (volume.min() < level < volume.max()):
        return None
    from skimage import measure

    verts, faces, _, _ = measure.marching_cubes(volume, level, method="lewiner")
    divisor = np.asarray(grid_size, dtype=np.float64) - (1 if vertex_mapping == "exact" else 0)
    verts = verts / divisor * np.asarray(bbox_size) + np.asarray(bbox_min)
    return trimesh.Trimesh(verts.astype(np.float32), np.ascontiguousarray(faces))
