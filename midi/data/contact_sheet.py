"""A contact sheet for eyeballing a dataset: one row per scene.

Columns: the scene image, the id map in instance colours, the sampled surface points of all
instances rendered from the view's camera (when recorded, else a default orbit), then the points
of the first instances one by one. Colours match between the id map and the point renders.

A scene prepared with ``--watertight`` gets a second row, "before": the same tiles for the raw
source meshes (re-read from the input files scene.json names, normalised the same way), so the
shell can be compared with what it replaced; the title gives the seconds the conversion took.
Extra rows (the ``--vae`` check's worst reconstructions) are appended by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from midi.data import layout
from midi.data.camera import Camera, camera_record, project_points
from midi.data.images import colourise_labels, instance_colours, open_image, read_label_map, save_png
from midi.data.meshes import Normalization, load_instances, load_object
from midi.data.surface_io import load_surface
from midi.errors import DataError

TILE = 160
HEADER = 16
MAX_INSTANCE_TILES = 4
MAX_POINTS = 4000


def _blank(text: str = "") -> np.ndarray:
    tile = np.full((TILE, TILE, 3), 40, np.uint8)
    if text:
        image = Image.fromarray(tile)
        ImageDraw.Draw(image).text((6, TILE // 2 - 6), text[:24], fill=(255, 120, 120))
        tile = np.asarray(image)
    return tile


def _fit(array: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(array).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST))


def _recorded_camera(record: Any) -> dict[str, Any] | None:
    if record.layout != layout.FORMAT or not record.views:
        return None
    try:
        scene = layout.read_json(record.views[0][0].parent.parent / layout.SCENE_JSON)
        return scene["views"][0].get("camera")
    except (OSError, ValueError, KeyError, IndexError):
        return None


def tile_camera(record: Any, points: list[np.ndarray]) -> dict[str, Any]:
    """The camera of a scene's tiles: its first view's recorded camera (scaled to a tile), else a default orbit."""
    camera = _recorded_camera(record)
    if camera is None:
        radius = max((float(np.linalg.norm(p, axis=1).max()) for p in points if len(p)), default=1.0)
        return camera_record(Camera(), radius, TILE, TILE)
    scale = TILE / float(camera["width"])
    k = np.asarray(camera["intrinsics"], np.float64)
    k[:2] *= scale
    return camera | {"intrinsics": k.tolist(), "width": TILE, "height": TILE}


def render_points(camera: dict[str, Any], points: Sequence[np.ndarray], normals: Sequence[np.ndarray],
                  colours: np.ndarray) -> np.ndarray:
    """Splats points (far to near, one pixel each) shaded by how much their normal faces the camera.

    Returns a (TILE, TILE, 3) uint8 tile on a dark background.
    """
    tile = np.full((TILE * TILE, 3), 30, np.float32)
    if not points:
        return tile.reshape(TILE, TILE, 3).astype(np.uint8)
    xyz, nrm = np.concatenate(points), np.concatenate(normals)
    col = np.concatenate([np.repeat(colours[i][None], len(p), 0) for i, p in enumerate(points)])
    uv, depth = project_points(camera, xyz)
    view = xyz - np.asarray(camera["eye"])
    view /= np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-12)
    shade = 0.35 + 0.65 * np.abs(np.einsum("ij,ij->i", nrm, view))
    px = np.floor(uv).astype(np.int64)
    ok = (depth > 0) & np.all((px >= 0) & (px < TILE), axis=1) & np.isfinite(depth)
    order = np.argsort(-depth[ok], kind="stable")  # far first, so near points overwrite
    idx = (px[ok][order, 1] * TILE + px[ok][order, 0]).astype(np.int64)
    tile[idx] = col[ok][order] * 255.0 * shade[ok][order, None]
    return np.clip(tile, 0, 255).reshape(TILE, TILE, 3).astype(np.uint8)


def _load_points(record: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    points, normals, rng = [], [], np.random.default_rng(0)
    for path in record.surface_paths:
        try:
            p, n = load_surface(path)
        except DataError:
            p, n = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
        keep = np.isfinite(p).all(1) & np.isfinite(n).all(1)
        p, n = p[keep], n[keep]
        if len(p) > MAX_POINTS:
            rows = rng.choice(len(p), MAX_POINTS, replace=False)
            p, n = p[rows], n[rows]
        points.append(p.astype(np.float64))
        normals.append(n.astype(np.float64))
    return points, normals


def _view_tiles(record: Any) -> list[np.ndarray]:
    if not record.views:
        return [_blank("no view"), _blank("no id map")]
    image_path, ids_path = record.views[0]
    try:
        image = _fit(np.asarray(open_image(image_path).convert("RGB")))
    except DataError:
        image = _blank("unreadable image")
    try:
        ids = _fit(colourise_labels(read_label_map(ids_path)))
    except DataError:
        ids = _blank("unreadable id map")
    return [image, ids]


def scene_row(record: Any, title: str) -> np.ndarray:
    """Builds one row of the sheet (with a title bar) for a scene record; two rows (after, before) for a
    scene prepared with ``--watertight``."""
    points, normals = _load_points(record)
    colours = instance_colours(len(points))
    camera = tile_camera(record, points)
    rows = [titled_row(title, _view_tiles(record) + point_tiles(camera, points, normals, colours))]
    scene = _scene_json(record)
    timed = [o["watertight"] for o in scene.get("objects", []) if isinstance(o.get("watertight"), dict)]
    if timed:
        raw = _raw_source_points(scene, len(points))
        seconds = [float(t.get("seconds", 0.0)) for t in timed if not t.get("failed")]
        failed = len(timed) - len(seconds)
        note = f"before --watertight (raw source meshes); shell: {np.mean(seconds) if seconds else 0:.2f} s per object"
        if failed:
            note += f", {failed} failed (raw kept)"
        raw_points = [p for p, _ in raw]
        rows.append(titled_row(note, [_blank("raw sources"), _blank()]
                               + point_tiles(camera, raw_points, [n for _, n in raw], colours)))
    return np.concatenate(rows, axis=0)


def point_tiles(camera: dict[str, Any], points: Sequence[np.ndarray], normals: Sequence[np.ndarray],
                colours: np.ndarray) -> list[np.ndarray]:
    """All instances' points together, then the first :data:`MAX_INSTANCE_TILES` one by one."""
    tiles = [render_points(camera, points, normals, colours)]
    for k in range(min(MAX_INSTANCE_TILES, len(points))):
        tiles.append(render_points(camera, [points[k]], [normals[k]], colours[k : k + 1]))
    return tiles


def titled_row(title: str, tiles: list[np.ndarray]) -> np.ndarray:
    """Tiles side by side (padded to the sheet's width) under a title bar."""
    tiles = tiles + [_blank()] * (3 + MAX_INSTANCE_TILES - len(tiles))
    row = np.concatenate(tiles, axis=1)
    bar = Image.new("RGB", (row.shape[1], HEADER), (15, 15, 15))
    ImageDraw.Draw(bar).text((4, 2), title[:120], fill=(230, 230, 230))
    return np.concatenate([np.asarray(bar), row], axis=0)


def _scene_json(record: Any) -> dict[str, Any]:
    if record.layout != layout.FORMAT or not record.surface_paths:
        return {}
    try:
        data = layout.read_json(Path(record.surface_paths[0]).parent.parent / layout.SCENE_JSON)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _raw_source_points(scene: dict[str, Any], count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Surface samples of the raw source meshes of a scene's objects, in the scene's normalised frame
    (empty clouds for sources that are gone or unreadable: the sheet then shows nothing there)."""
    empty = (np.zeros((0, 3)), np.zeros((0, 3)))
    try:
        norm = Normalization(tuple(scene["normalization"]["center"]), float(scene["normalization"]["scale"]),
                             float(scene["normalization"].get("bound", 1.0)))
        kind, path = scene["source"]["kind"], Path(scene["source"]["path"])
    except (KeyError, TypeError, ValueError):
        return [empty] * count
    out = []
    for obj in scene.get("objects", [])[:count]:
        try:
            mesh = _source_mesh(kind, path, str(obj.get("source", "")))
        except DataError:
            out.append(empty)
            continue
        points, faces = mesh.sample(MAX_POINTS, return_index=True, seed=0)
        out.append((norm.apply(points), mesh.face_normals[faces]))
    return out + [empty] * (count - len(out))


def _source_mesh(kind: str, path: Path, source: str) -> Any:
    if kind == "folder":
        return load_object(path / source.split("#")[0]).mesh
    if kind == "single_object":
        return load_object(path).mesh
    if kind == "scene_file":
        match = [i.mesh for i in load_instances(path)[0] if i.source == source]
        if match:
            return match[0]
    raise DataError(f"{source}: no such source mesh")


def write_contact_sheet(path: Path, records: Sequence[Any], checks: Sequence[Any],
                        extra_rows: Sequence[np.ndarray] = ()) -> None:
    """Writes the sheet for ``records`` with titles from their :class:`SceneCheck` results, then ``extra_rows``
    (made with :func:`titled_row`)."""
    rows = []
    for record, check in zip(records, checks):
        kinds = ", ".join(sorted({p.kind for p in check.problems}))
        status = f"{len(check.problems)} problem(s): {kinds}" if kinds else "ok"
        rows.append(scene_row(record, f"{record.scene_id} - {len(record.object_names)} objects - {status}"))
    save_png(path, Image.fromarray(np.concatenate(rows + list(extra_rows), axis=0)))
