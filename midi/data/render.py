"""CPU rendering of a scene's objects with trimesh ray casting (embree through embreex).

One ray per pixel centre gives both images from the same hits: an RGB image with Lambert shading
and one flat colour per instance, and the exact instance id map (id of the first triangle hit,
+1; 0 = background). No anti-aliasing, so the two images agree pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import trimesh
from trimesh.ray import ray_triangle

from midi.data.camera import Camera, camera_record, pixel_rays
from midi.data.images import Colour, instance_colours, to_uint8

AMBIENT = 0.35


@dataclass
class Rendering:
    """One rendered view."""

    rgb: np.ndarray  # (H, W, 3) uint8 image
    ids: np.ndarray  # (H, W) int32 instance ids, 0 = background, k+1 = meshes[k]
    camera: dict[str, Any]  # the camera record (see :func:`midi.data.camera.camera_record`)


def _intersector(mesh: trimesh.Trimesh) -> Any:
    try:
        from trimesh.ray.ray_pyembree import RayMeshIntersector  # optional: embreex

        return RayMeshIntersector(mesh, scale_to_box=False)
    except Exception:  # embreex missing or failing: the pure-numpy intersector is slower but exact
        return ray_triangle.RayMeshIntersector(mesh)


def render_scene(meshes: Sequence[trimesh.Trimesh], camera: Camera, image_size: int,
                 background: Colour = (1.0, 1.0, 1.0), colours: np.ndarray | None = None) -> Rendering:
    """Renders the objects of a scene (mesh k gets id k+1) from one camera into a square image.

    ``camera.distance=None`` fits the scene (its farthest vertex from the target); ``background`` is
    where no object is hit; ``colours``: (N, 3) per-instance colours, :func:`instance_colours` when None.
    """
    target = np.asarray(camera.target, np.float64)
    radius = float(max(np.linalg.norm(m.vertices - target, axis=1).max() for m in meshes))
    record = camera_record(camera, radius, image_size, image_size)
    merged = trimesh.util.concatenate(list(meshes))  # (sum of faces) in id order, no vertex merge
    face_instance = np.repeat(np.arange(len(meshes)), [len(m.faces) for m in meshes])
    origins, dirs = pixel_rays(record)
    hit = np.asarray(_intersector(merged).intersects_first(origins, dirs), np.int64)
    ids = np.where(hit >= 0, face_instance[np.maximum(hit, 0)] + 1, 0).astype(np.int32)
    palette = instance_colours(len(meshes)) if colours is None else np.asarray(colours, np.float32)
    rgb = np.full((len(hit), 3), background, np.float32)
    found = hit >= 0
    shade = _lambert(merged.face_normals[hit[found]], dirs[found], record)
    rgb[found] = palette[ids[found] - 1] * shade[:, None]
    shape = (image_size, image_size)
    return Rendering(to_uint8(rgb.reshape(*shape, 3)), ids.reshape(shape), record)


def _lambert(normals: np.ndarray, dirs: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    # Two-sided: flip normals facing away from the ray, so open meshes and bad winding still shade.
    facing = np.where(np.einsum("ij,ij->i", normals, dirs)[:, None] > 0, -normals, normals)
    rotation = np.asarray(record["world_to_camera"])[:3, :3]
    # A light over the viewer's left shoulder: towards the camera, up and to the left (camera axes).
    light = rotation.T @ np.array([-0.4, -0.6, -1.0])
    light /= np.linalg.norm(light)
    return AMBIENT + (1.0 - AMBIENT) * np.clip((facing * light).sum(axis=1), 0.0, 1.0)
