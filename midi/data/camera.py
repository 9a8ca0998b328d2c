"""A perspective look-at camera (numpy only): pixel rays for rendering, projection for previews.

World up is +Y (the glTF and 3D-Front convention). Azimuth turns around +Y starting from +Z
(azimuth 0 looks at the target from the +Z side), elevation lifts the eye above the XZ plane.
The recorded camera uses the OpenCV convention: x right, y down, z forward, pixel centres at
integer + 0.5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Camera:
    """A camera orbiting a target."""

    elevation: float = 30.0  # degrees above the horizontal plane
    azimuth: float = 45.0  # degrees around the up axis, from +Z towards +X
    distance: float | None = None  # eye-target distance; None fits the scene's bounding sphere into the view
    fov: float = 40.0  # vertical field of view in degrees
    target: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the point looked at

    def with_azimuth(self, azimuth: float) -> Camera:
        """Returns a copy turned to another azimuth."""
        return Camera(self.elevation, azimuth, self.distance, self.fov, self.target)


def camera_record(camera: Camera, radius: float, width: int, height: int) -> dict[str, Any]:
    """Resolves a camera into the record stored in ``scene.json``: the orbit parameters, ``eye``, ``intrinsics``
    (3x3, OpenCV) and ``world_to_camera`` (4x4, OpenCV axes).

    ``distance=None`` fits the sphere of ``radius`` around the target into 90 % of the view height.
    """
    fitted = radius / (0.9 * math.sin(math.radians(camera.fov) / 2))
    distance = camera.distance if camera.distance is not None else fitted
    el, az = math.radians(camera.elevation), math.radians(camera.azimuth)
    offset = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    target = np.asarray(camera.target, np.float64)
    eye = target + distance * offset
    focal = (height / 2.0) / math.tan(math.radians(camera.fov) / 2.0)
    intrinsics = [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]]
    return asdict(camera) | {"distance": float(distance), "width": width, "height": height, "eye": eye.tolist(),
                             "intrinsics": intrinsics, "world_to_camera": _look_at(eye, target).tolist()}


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    forward = target - eye
    forward /= np.linalg.norm(forward)
    up = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:  # looking straight down/up: pick any horizontal right
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, -rotation @ eye
    return matrix


def pixel_rays(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One ray per pixel centre of a :func:`camera_record`, row-major: ``(origins, unit directions)``, (H*W, 3)."""
    width, height = record["width"], record["height"]
    k = np.asarray(record["intrinsics"])
    world_to_camera = np.asarray(record["world_to_camera"])
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x = (cols.ravel() - k[0, 2]) / k[0, 0]
    y = (rows.ravel() - k[1, 2]) / k[1, 1]
    rot = world_to_camera[:3, :3]
    # camera -> world is the rotation's transpose: a weighted sum of its rows. Written out instead of
    # a matmul, since BLAS threads spinning in worker processes cost more than they save here.
    dirs = x[:, None] * rot[0] + y[:, None] * rot[1] + rot[2]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(np.asarray(record["eye"], np.float64), dirs.shape)
    return np.ascontiguousarray(origins), dirs


def project_points(record: dict[str, Any], points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projects (N, 3) world points with a camera record: ``(uv, depth)``, (N, 2) pixel coordinates (x right,
    y down) and (N,) depths along the view axis (points behind the camera have depth <= 0)."""
    world_to_camera = np.asarray(record["world_to_camera"])
    rot = world_to_camera[:3, :3]
    cam = points[:, :1] * rot[:, 0] + points[:, 1:2] * rot[:, 1] + points[:, 2:3] * rot[:, 2] + world_to_camera[:3, 3]
    depth = cam[:, 2]
    k = np.asarray(record["intrinsics"])
    safe = np.where(np.abs(depth) < 1e-12, 1e-12, depth)
    uv = np.stack([k[0, 0] * cam[:, 0] / safe + k[0, 2], k[1, 1] * cam[:, 1] / safe + k[1, 2]], axis=1)
    return uv, depth
