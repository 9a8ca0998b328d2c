"""Writing a generated scene: one scene file with one node per instance, per-instance files, a preview.

The format follows the output's extension. The set is all-or-nothing: everything is encoded
first, then written by :func:`midi.data.atomic.write_all` (temporary names, then renames); on any
failure the files of this call are removed and :class:`midi.errors.OutputError` is raised.
Temporary files that a killed run left behind are removed by the next write into the same folder.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import trimesh
from PIL import Image
from trimesh.exchange.gltf import export_gltf

from midi.data.atomic import write_all
from midi.data.camera import Camera
from midi.data.images import instance_colours
from midi.data.render import render_scene
from midi.errors import InputError, OutputError

if TYPE_CHECKING:  # only the type: the command line imports this module before torch
    from midi.inference.generation import SceneResult

logger = logging.getLogger(__name__)

MESH_FORMATS = ("glb", "gltf", "obj", "ply", "stl")
SINGLE_MESH_FORMATS = ("ply", "stl")


def output_format(path: str | os.PathLike) -> str:
    """The mesh format named by ``path``'s extension (InputError: not one of :data:`MESH_FORMATS`)."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in MESH_FORMATS:
        raise InputError(f"unsupported output format {('.' + ext) if ext else '(no extension)'}; "
                         f"use one of {', '.join('.' + f for f in MESH_FORMATS)}", path=path)
    return ext


def build_trimesh_scene(result: SceneResult) -> trimesh.Scene:
    """A ``trimesh.Scene`` with one node (and geometry) per meshed instance, named after it."""
    colours = np.rint(instance_colours(len(result.surfaces)) * 255).astype(np.uint8)  # (N, 3): instance k -> colour k
    scene = trimesh.Scene()
    for colour, name, mesh in zip(colours, result.scene.names, result.meshes):
        if mesh is not None:
            mesh = mesh.copy()
            mesh.visual.vertex_colors = np.append(colour, 255)
            scene.add_geometry(mesh, geom_name=name, node_name=name)
    return scene


def export_bytes(scene: trimesh.Scene | trimesh.Trimesh, fmt: str) -> bytes:
    """Encodes a scene (or mesh) as ``fmt``; glTF gets its buffers embedded (one file)."""
    if fmt == "gltf":
        return export_gltf(scene, embed_buffers=True)["model.gltf"]
    data = scene.export(file_type=fmt)
    return data.encode() if isinstance(data, str) else data


def render_preview(meshes: Sequence[trimesh.Trimesh | None], size: int) -> np.ndarray:
    """``(S, S, 3)`` uint8: the meshes ray-cast with Lambert shading, mesh k in instance colour k
    (None entries are skipped but keep their colour), seen from above the front-right of their
    centre; white when no mesh has a face."""
    present = [(k, m) for k, m in enumerate(meshes) if m is not None and len(m.faces)]
    if not present:
        return np.full((size, size, 3), 255, np.uint8)
    bounds = np.array([m.bounds for _, m in present])  # (M, 2, 3)
    centre = (bounds[:, 0].min(axis=0) + bounds[:, 1].max(axis=0)) / 2
    colours = instance_colours(len(meshes))[[k for k, _ in present]]
    camera = Camera(elevation=20.0, azimuth=30.0, target=tuple(float(c) for c in centre))
    return render_scene([m for _, m in present], camera, size, colours=colours).rgb


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def safe_file_name(name: str) -> str:
    """A file-name-safe version of a node name."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "instance"


def save_outputs(result: SceneResult, output: Path, save_instances: bool = False, preview: bool = True,
                 preview_size: int = 384) -> list[Path]:
    """Writes the scene file, optionally ``<stem>_<name>.<ext>`` per instance, and ``<stem>.png``.

    All-or-nothing: a failure leaves none of the files (a preview that cannot be *rendered* is only a
    warning). Raises InputError when no instance has a surface (nothing is written), OutputError when a
    file could not be encoded or written (``"<file>: <reason>"``; nothing is left).
    """
    fmt = output_format(output)
    if not any(m is not None for m in result.meshes):
        raise InputError(f"no instance produced a surface ({len(result.surfaces)} tried); nothing written",
                         path=result.scene.seg_path)
    scene = build_trimesh_scene(result)
    files: list[tuple[Path, bytes]] = []
    path = output  # the file being encoded, for the error
    try:
        if save_instances:
            for name, geometry in scene.geometry.items():
                path = output.with_name(f"{output.stem}_{safe_file_name(name)}{output.suffix}")
                files.append((path, export_bytes(geometry, fmt)))
        path = output
        files.append((output, export_bytes(scene, fmt)))
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc), path=path) from exc
    except Exception as exc:
        raise OutputError(f"cannot encode {fmt.upper()} ({type(exc).__name__}: {exc})", path=path) from exc
    if fmt in SINGLE_MESH_FORMATS and len(scene.geometry) > 1:
        logger.info("%s: %s holds a single mesh; the %d instances are concatenated (use --save_instances or .glb "
                    "for separate nodes)", output.name, fmt.upper(), len(scene.geometry))
    if preview:
        try:
            files.append((output.with_suffix(".png"), png_bytes(render_preview(result.meshes, preview_size))))
        except Exception as exc:  # a preview must never cost the user the scene
            logger.warning("%s: preview not written (%s: %s)", output.name, type(exc).__name__, exc)
    try:
        write_all(files)
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc), path=exc.filename or output) from exc
    return [path for path, _ in files]


def summary_line(result: SceneResult, output: Path) -> str:
    """One line: instances meshed, seconds, decoder queries."""
    meshed = sum(m is not None for m in result.meshes)
    return (f"{output}: {meshed}/{len(result.surfaces)} instances meshed; denoising "
            f"{result.denoise_seconds:.1f} s, extraction {result.extract_seconds:.1f} s, "
            f"{result.queries:,} decoder queries")
