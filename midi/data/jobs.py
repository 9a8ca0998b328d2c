"""What one scene job is, what it produces, and the steps every input kind shares.

A job (:class:`SceneJob`) is small and picklable so it can be sent to a worker process; the
worker turns it into a :class:`SceneContent` (objects with surface samples, views with id maps)
that :mod:`midi.data.prepare` writes atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trimesh

from midi.data.blender import BlenderSettings, render_blender, scene_objects
from midi.data.camera import Camera
from midi.data.dataset import check_labels
from midi.data.images import WHITE, Colour
from midi.data.layout import view_name
from midi.data.meshes import (
    DEFAULT_BOUND,
    NamedMesh,
    Normalization,
    apply_normalization,
    joint_normalization,
    object_rng,
    sample_surface,
    validate_mesh,
)
from midi.data.render import render_scene
from midi.data.watertight import DEFAULT_RESOLUTION, WATERTIGHT_FAILED, WatertightError, make_watertight
from midi.errors import DataError

T = TypeVar("T")

JOB_KINDS = ("folder", "scene_file", "single_object", "synthetic", "3d-front")


@dataclass(frozen=True)
class PrepareOptions:
    """Settings of a prepare run (all have the command line's defaults)."""

    num_samples: int = 20480  # surface samples stored per object
    image_size: int = 512  # side of the square output images
    surface_format: str = "npy"  # ``"npy"`` (MIDI dict) or ``"npz"``
    bound: float = DEFAULT_BOUND  # half-extent of the normalised scene (1 - margin)
    views: int = 1  # number of rendered views (azimuths spread evenly from ``camera.azimuth``)
    camera: Camera = field(default_factory=Camera)  # camera of the first rendered view
    background: Colour = WHITE  # background colour for rendering and for compositing RGBA images
    render: str = "auto"  # ``"auto"`` (render scenes without images), ``"always"`` or ``"never"``
    seed: int = 0  # seed of all sampling and of the synthetic scenes
    single_object: bool = False  # top-level mesh files are one-object scenes normalised alone
    val_fraction: float = 0.1  # fraction of scenes in the val split
    test_fraction: float = 0.0  # fraction of scenes in the test split
    watertight: bool = False  # sample a watertight shell of each mesh (midi.data.watertight), not the raw faces
    watertight_resolution: int = DEFAULT_RESOLUTION  # grid cells along each object's longest side
    renderer: str = "embree"  # "embree" (flat colours, exact) or "blender" (textured Cycles, midi.data.blender)
    blender: BlenderSettings = field(default_factory=BlenderSettings)  # used with renderer="blender"

    def min_visible_pixels(self) -> int:
        """Pixels an object needs in a rendered view to count as visible (0.1% of the image, >= 1)."""
        return max(1, int(np.ceil(0.001 * self.image_size**2)))


@dataclass(frozen=True)
class SceneJob:
    """One scene to prepare."""

    scene_id: str  # output scene id (a safe file name)
    kind: str  # one of :data:`JOB_KINDS`
    path: str = ""  # input file or folder (for 3D-Front: the dataset root)
    room: str = ""  # 3D-Front room path ``<house>/<room>``
    names: tuple[str, ...] = ()  # 3D-Front object names of the room
    seed: int = 0  # seed of a synthetic scene
    domain: str = "base"  # synthetic domain (midi.data.shapes.DOMAINS)


@dataclass
class ObjectData:
    """One object ready to be written."""

    name: str
    source: str
    points: np.ndarray
    normals: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ViewData:
    """One view ready to be written: ``ids`` value k+1 is object k."""

    rgb: np.ndarray
    ids: np.ndarray
    camera: dict[str, Any] | None
    source: dict[str, Any]


@dataclass
class SceneContent:
    """Everything written for one scene."""

    objects: list[ObjectData]
    views: list[ViewData]
    normalization: dict[str, Any]
    source: dict[str, Any]
    dropped: list[dict[str, str]] = field(default_factory=list)


def normalise_objects(objects: Sequence[NamedMesh], bound: float) -> tuple[list[NamedMesh], Normalization]:
    """Validates the meshes and normalises them jointly into [-bound, bound]^3 (DataError: no faces, area or extent)."""
    for obj in objects:
        validate_mesh(obj)
    norm = joint_normalization([o.mesh for o in objects], bound)
    return [apply_normalization(o, norm) for o in objects], norm


def sample_objects(objects: Sequence[NamedMesh], options: PrepareOptions, scene_id: str) -> list[ObjectData]:
    """Samples every object's surface with its own seeded generator (see :func:`object_rng`).

    With ``options.watertight`` the samples come from the object's watertight shell; an object
    that cannot be made watertight keeps its raw surface, with a warning saying so (never silently).
    """
    out = []
    for index, obj in enumerate(objects):
        info: dict[str, Any] = {"num_faces": int(len(obj.mesh.faces)), "area": float(obj.mesh.area)}
        warnings = [obj.warning] if obj.warning else []
        mesh = obj.mesh
        if options.watertight:
            mesh, info["watertight"], failure = watertight_or_raw(obj.mesh, options.watertight_resolution)
            warnings += [failure] if failure else []
        points, normals = sample_surface(mesh, options.num_samples, object_rng(options.seed, scene_id, index))
        if warnings:
            info["warning"] = "; ".join(warnings)  # kept in scene.json, where --check finds it
        out.append(ObjectData(obj.name, obj.source, points, normals, info))
    return out


def watertight_or_raw(mesh: trimesh.Trimesh, resolution: int) -> tuple[trimesh.Trimesh, dict[str, Any], str]:
    """``(mesh to sample, record for scene.json, warning or "")``: the watertight shell, or the raw mesh
    and a warning naming the reason when the conversion fails."""
    try:
        result = make_watertight(mesh, resolution)
    except WatertightError as exc:
        return mesh, {"resolution": resolution, "failed": str(exc)}, f"{WATERTIGHT_FAILED} ({exc}); raw surface kept"
    return result.mesh, result.info(), ""


def render_views(objects: Sequence[NamedMesh], options: PrepareOptions, source: tuple[str, str] | None = None,
                 normalization: dict[str, Any] | None = None) -> list[ViewData]:
    """Renders ``options.views`` views at evenly spread azimuths.

    With ``options.renderer == "blender"`` and the job's ``(kind, path)`` as ``source`` (the files
    Blender imports) and the scene's ``normalization`` record, Blender renders them (textured),
    each view followed by its re-lit twin when ``options.blender.relight``; else embree (flat colours).
    """
    cameras = [options.camera.with_azimuth(options.camera.azimuth + 360.0 * k / options.views)
               for k in range(options.views)]
    if options.renderer == "blender" and source is not None and normalization is not None:
        return _blender_views(objects, options, source, normalization, cameras)
    renderings = [render_scene([o.mesh for o in objects], c, options.image_size, options.background) for c in cameras]
    return [ViewData(r.rgb, r.ids, r.camera, {"rendered": True}) for r in renderings]


def _blender_views(objects: Sequence[NamedMesh], options: PrepareOptions, source: tuple[str, str],
                   normalization: dict[str, Any], cameras: Sequence[Camera]) -> list[ViewData]:
    settings = options.blender
    sources = scene_objects(source[0], source[1], [o.source for o in objects], [o.mesh.bounds for o in objects])
    target = np.asarray(options.camera.target, np.float64)
    radius = float(max(np.linalg.norm(o.mesh.vertices - target, axis=1).max() for o in objects))  # as embree
    rendered = render_blender(sources, normalization, cameras, radius, options.image_size, options.background,
                              settings)
    lighting = "sun_sky" if settings.lighting == "sun_sky" else Path(settings.lighting).name
    views = []
    for view in rendered:
        record = {"rendered": True, "renderer": "blender", "lighting": lighting, "samples": settings.samples,
                  "seconds": round(view.seconds, 3)}
        views.append(ViewData(view.rgb, view.ids, view.camera, record))
        if view.relit is not None:  # the re-lit twin: same camera and ids (3D-Front's rerender_)
            relit_of = view_name(len(views) - 1)
            views.append(ViewData(view.relit, view.ids.copy(), view.camera, record | {"relit_of": relit_of}))
    return views


def label_counts(views: Sequence[ViewData], num_objects: int) -> np.ndarray:
    """Pixel count of every label 0..num_objects in every view, (V, num_objects + 1)."""
    return np.stack([np.bincount(v.ids.ravel(), minlength=num_objects + 1)[: num_objects + 1] for v in views])


def check_extra_labels(views: Sequence[ViewData], names: Sequence[str]) -> None:
    """Fails (a DataError naming the id map file, the labels and the object count) on a label with no object."""
    for view in views:
        check_labels(view.ids, len(names), Path(view.source.get("id_map", "id map")).name)


def drop_unseen(items: list[T], names: Sequence[str], views: list[ViewData], min_pixels: int, reason: str
                ) -> tuple[list[T], list[ViewData], list[dict[str, str]]]:
    """Drops the items (meshes or sampled objects, id k+1 = ``items[k]``) with fewer than ``min_pixels``
    in every view, for ``reason`` (stored with the pixel count), and renumbers the id maps.

    Used for rendered views and converted 3D-Front rooms; folder scenes with user id maps are
    checked with :func:`midi.data.sources.check_label_coverage` instead and never edited.

    Returns:
        ``(items kept, views with renumbered ids, dropped records)``.

    Raises:
        DataError: No object is left.
    """
    counts = label_counts(views, len(items))[:, 1:].max(axis=0)
    keep = np.flatnonzero(counts >= min_pixels)
    if len(keep) == 0:
        raise DataError(f"no object left: every object is {reason}")
    dropped = [{"name": names[k], "reason": f"{reason} (max {int(counts[k])} px in a view)"}
               for k in range(len(items)) if counts[k] < min_pixels]
    lut = np.zeros(len(items) + 1, np.int32)
    lut[keep + 1] = np.arange(1, len(keep) + 1)
    # Pixels of a dropped object become background in the id map (they are below min_pixels).
    views = [ViewData(v.rgb, lut[v.ids], v.camera, v.source) for v in views]
    return [items[k] for k in keep], views, dropped
