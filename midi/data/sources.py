"""Input kinds of ``prepare_data.py``: finding scenes and turning each into a :class:`SceneContent`.

Kinds (see :data:`midi.data.jobs.JOB_KINDS`):

- ``folder``: a folder per scene with one mesh file per object. Optional scene images with
  instance id maps (``X.png`` + ``X_ids.png``/``X_seg.png``, ``X_rgb.png`` + ``X_seg.png``,
  ``render_N`` + ``semantic_N``) and an optional ``instances.json`` naming the mesh of each id:
  either a list of mesh file names (id k+1 = entry k) or ``{"1": "chair.obj", ...}``. Without it
  the ids follow the sorted mesh file names.
- ``scene_file``: one mesh file whose nodes (glTF nodes, OBJ objects, STL bodies) are the instances.
- ``single_object``: one mesh file that is one object, normalised alone (``--single_object``).
- ``3d-front``: a room of the 3D-Front (MIDI) layout, converted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from midi.config import IMAGE_SUFFIXES, MESH_SUFFIXES
from midi.data import front3d, layout, meshes
from midi.data.dataset import read_view
from midi.data.images import to_uint8
from midi.data.jobs import (
    ObjectData,
    PrepareOptions,
    SceneContent,
    SceneJob,
    ViewData,
    check_extra_labels,
    drop_unseen,
    label_counts,
    normalise_objects,
    render_views,
    sample_objects,
)
from midi.data.layout import detect_layout, safe_name, unique_names
from midi.data.meshes import NamedMesh, Normalization, is_mesh_file, load_instances, load_object
from midi.data.surface_io import load_surface
from midi.data.synthetic import build_synthetic_content
from midi.errors import DataError

ID_SUFFIXES = ("_ids", "_seg", "_id", "_instances")
INSTANCES_JSON = "instances.json"
MTL_MAPS = ("bump", "disp", "decal", "norm", "refl")  # .mtl texture statements besides map_*


def discover_jobs(input_path: Path, single_object: bool = False) -> list[SceneJob]:
    """Finds the scenes of an input folder (or a single scene file).

    Every sub-folder is a ``folder`` scene; every mesh file at the top level is a ``scene_file``
    (or a ``single_object`` scene with ``single_object=True``); a 3D-Front root yields one job per
    room. Hidden entries are ignored.

    Raises:
        DataError: The input does not exist or is already a prepared dataset.
    """
    input_path = Path(input_path)
    file_kind = "single_object" if single_object else "scene_file"
    if input_path.is_file():
        return [SceneJob(safe_name(input_path.stem, "scene"), file_kind, str(input_path))]
    if not input_path.is_dir():
        raise DataError(f"{input_path}: input not found")
    kind = detect_layout(input_path)
    if kind == layout.FORMAT:
        raise DataError(f"{input_path}: already a prepared dataset (use --check)")
    return _front_jobs(input_path) if kind == layout.FRONT3D else _folder_jobs(input_path, file_kind)


def _folder_jobs(root: Path, file_kind: str) -> list[SceneJob]:
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    picked = [(e, "folder") for e in entries if e.is_dir()] + [(e, file_kind) for e in entries if is_mesh_file(e)]
    ids = unique_names(safe_name(e.name if e.is_dir() else e.stem, "scene") for e, _ in picked)
    return [SceneJob(sid, kind, str(e)) for sid, (e, kind) in zip(ids, picked)]


def _front_jobs(root: Path) -> list[SceneJob]:
    rooms = front3d.read_rooms(root)
    ids = unique_names(front3d.room_scene_id(room) for room, _ in rooms)
    return [SceneJob(sid, layout.FRONT3D, str(root), room, tuple(names)) for sid, (room, names) in zip(ids, rooms)]


def build_content(job: SceneJob, options: PrepareOptions) -> SceneContent:
    """Turns one job into its content (worker side).

    Raises:
        DataError: Any problem with the scene's inputs, as one line.
    """
    if job.kind == layout.FRONT3D:
        return build_front_content(job, options)
    if job.kind == "synthetic":
        return build_synthetic_content(job, options)
    dropped, user_views = [], []
    if job.kind == "folder":
        objects, user_views = _load_folder(Path(job.path), options)
    elif job.kind == "scene_file":
        objects, skipped = load_instances(Path(job.path))
        objects, dropped = _name_instances(objects), [{"name": node, "reason": why} for node, why in skipped]
    elif job.kind == "single_object":
        objects = [load_object(Path(job.path))]
    else:
        raise DataError(f"{job.scene_id}: unknown job kind {job.kind!r}")
    content = build_mesh_content(job, objects, user_views, options)
    content.dropped = dropped + content.dropped
    return content


def _name_instances(objects: list[NamedMesh]) -> list[NamedMesh]:
    names = unique_names(safe_name(o.name, "object") for o in objects)
    return [NamedMesh(n, o.mesh, o.source, o.warning) for n, o in zip(names, objects)]


def build_mesh_content(job: SceneJob, objects: list[NamedMesh], user_views: list[ViewData], options: PrepareOptions
                       ) -> SceneContent:
    """Normalises, takes or renders the views, and samples the surfaces of mesh objects.

    Raises:
        DataError: Bad meshes, or user id maps that do not match the meshes.
    """
    objects, norm = normalise_objects(objects, options.bound)
    dropped: list[dict[str, str]] = []
    if user_views and options.render != "always":
        check_label_coverage(user_views, [o.name for o in objects])
        views = user_views
    elif options.render == "never":
        raise DataError(f"{job.path}: no scene images and --render never")
    else:
        views = render_views(objects, options, (job.kind, job.path), norm.to_json())
        objects, views, dropped = drop_unseen(objects, [o.name for o in objects], views, 1,
                                              "not visible in any rendered view")
    return SceneContent(sample_objects(objects, options, job.scene_id), views, norm.to_json(),
                        {"kind": job.kind, "path": str(job.path)}, dropped)


def check_label_coverage(views: list[ViewData], names: list[str]) -> None:
    """Checks user id maps against the objects (no unknown label, every object in some view), else a DataError."""
    check_extra_labels(views, names)
    seen = label_counts(views, len(names)).sum(axis=0)[1:]
    missing = [names[k] for k in np.flatnonzero(seen == 0)]
    if missing:
        used = [int(k) + 1 for k in np.flatnonzero(seen > 0)]
        files = ", ".join(Path(v.source.get("id_map", "?")).name for v in views)
        raise DataError(f"{files}: labels {used} but the scene has {len(names)} meshes; "
                        f"in no id map: {', '.join(missing)}")


def _load_folder(folder: Path, options: PrepareOptions) -> tuple[list[NamedMesh], list[ViewData]]:
    mesh_files = _ordered_mesh_files(folder)
    names = unique_names(safe_name(p.stem, "object") for p in mesh_files)
    used = _mtl_textures(folder)  # files the meshes refer to are textures, never scene images
    objects = [load_object(p, n, used) for p, n in zip(mesh_files, names)]
    views = [] if options.render == "always" else [load_view(i, m, options) for i, m in find_view_pairs(folder, used)]
    return objects, views


def _mtl_textures(folder: Path) -> set[str]:
    """Lower-case names of the texture files named by the folder's ``.mtl`` files (map_Kd, bump...)."""
    names = set()
    for mtl in folder.glob("*.[mM][tT][lL]"):
        for line in mtl.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split()
            if len(words) > 1 and (words[0].lower().startswith("map_") or words[0].lower() in MTL_MAPS):
                names.add(Path(words[-1].replace("\\", "/")).name.lower())
    return names


def _ordered_mesh_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if is_mesh_file(p) and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder.name}: no mesh files ({', '.join(MESH_SUFFIXES)})")
    mapping = folder / INSTANCES_JSON
    if not mapping.is_file():
        return files
    order = _read_instances_json(mapping)
    for name in order:
        layout.inside(folder, name, mapping)
    by_name = {p.name: p for p in files}
    if unknown := [n for n in order if n not in by_name]:
        raise DataError(f"{mapping}: names files that are not in the folder: {unknown}")
    if unnamed := sorted(set(by_name) - set(order)):
        raise DataError(f"{mapping}: mesh files without an id: {unnamed}")
    return [by_name[n] for n in order]


def _read_instances_json(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if isinstance(data, list):
        return [str(v) for v in data]
    if isinstance(data, dict):
        try:
            ids = sorted((int(k), str(v)) for k, v in data.items())
        except ValueError:
            raise DataError(f"{path}: keys must be integer ids") from None
        if [k for k, _ in ids] != list(range(1, len(ids) + 1)):
            raise DataError(f"{path}: ids must be 1..{len(ids)} without gaps, got {[k for k, _ in ids]}")
        return [v for _, v in ids]
    raise DataError(f"{path}: expected a list of mesh files or an {{id: mesh file}} object")


def find_view_pairs(folder: Path, textures: set[str] = frozenset()) -> list[tuple[Path, Path]]:
    """Pairs every scene image in a folder with its id map; ``textures`` (lower-case names) are left out.

    Raises:
        DataError: An image without id map, or an id map without image.
    """
    images = sorted(p for p in folder.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.name.lower() not in textures)
    maps = {p.stem.lower(): p for p in images if _is_id_map(p.stem)}
    pairs, used = [], set()
    for image in (p for p in images if not _is_id_map(p.stem)):
        match = next((maps[c] for c in _id_map_candidates(image.stem) if c in maps), None)
        if match is None:
            raise DataError(f"{image}: scene image without id map (expected e.g. {image.stem}_ids.png)")
        pairs.append((image, match))
        used.add(match.stem.lower())
    if orphans := sorted(set(maps) - used):
        raise DataError(f"{maps[orphans[0]]}: id map without scene image")
    return pairs


def _is_id_map(stem: str) -> bool:
    low = stem.lower()
    return low.endswith(ID_SUFFIXES) or low.startswith("semantic_")


def _id_map_candidates(stem: str) -> list[str]:
    low = stem.lower()
    bases = [low, low[:-4]] if low.endswith("_rgb") else [low]
    names = [f"{b}{s}" for b in bases for s in ID_SUFFIXES]
    for prefix in ("render_", "rerender_"):
        if low.startswith(prefix):
            names.append("semantic_" + low[len(prefix) :])
    return names


def load_view(image: Path, idmap: Path, options: PrepareOptions) -> ViewData:
    """Reads one user view with :func:`midi.data.dataset.read_view` (padded to square, resized; DataError: unreadable
    image or id map, or different sizes)."""
    rgb, labels = read_view(image, idmap, None, options.image_size, options.background)
    return ViewData(to_uint8(rgb), labels.astype(np.int32), None,
                    {"rendered": False, "image": str(image), "id_map": str(idmap)})


def build_front_content(job: SceneJob, options: PrepareOptions) -> SceneContent:
    """Converts one 3D-Front room: surfaces read safely, views resized, labels checked.

    Surfaces already inside [-1, 1]^3 are kept as they are; otherwise the room is normalised
    jointly (recorded in ``scene.json``). Objects in no id map are dropped with the reason.

    Raises:
        DataError: Missing/unreadable surfaces, too few points, no views, bad labels.
    """
    root, names = Path(job.path), list(job.names)
    views = [load_view(img, idm, options) for img, idm, _ in front3d.room_views(root, job.room)]
    if not views:
        raise DataError(f"{layout.RENDER_DIR}/{job.room}: no render with a semantic id map")
    check_extra_labels(views, names)
    surfaces = [load_surface(p) for p in front3d.surface_paths(root, job.room, names)]
    for name, (points, _) in zip(names, surfaces):
        if len(points) < options.num_samples:
            raise DataError(f"{job.room}/{name}.npy: {len(points)} points < --num_samples {options.num_samples}")
    norm, note = _front_normalization([p for p, _ in surfaces], options.bound)
    safe = unique_names(safe_name(n, "object") for n in names)
    # In float32, the surfaces' own precision (float64 would round differently from earlier runs).
    center = np.asarray(norm.center, np.float32)
    objects = [ObjectData(s, f"{layout.SURFACE_DIR}/{job.room}/{n}.npy", ((p - center) * norm.scale).astype(np.float32),
                          nrm.copy()) for s, n, (p, nrm) in zip(safe, names, surfaces)]
    objects, views, dropped = drop_unseen(objects, safe, views, 1, "in no id map")
    source = {"kind": layout.FRONT3D, "path": str(root), "room": job.room}
    return SceneContent(objects, views, norm.to_json() | {"note": note}, source, dropped)


def _front_normalization(points: list[np.ndarray], bound: float) -> tuple[Normalization, str]:
    """Identity for rooms already inside [-1, 1]^3 (as published), else a joint bounding-box normalisation."""
    if not all(np.all(np.isfinite(p)) for p in points):
        raise DataError("non-finite surface points")
    lo = np.min([p.min(axis=0) for p in points], axis=0)
    hi = np.max([p.max(axis=0) for p in points], axis=0)
    if np.all(lo >= -1.0) and np.all(hi <= 1.0) and float(np.max(hi - lo)) > 0:
        extent = float(np.max(np.abs(np.concatenate([lo, hi]))))
        return Normalization((0.0, 0.0, 0.0), 1.0, extent), "kept as published (inside [-1, 1])"
    return meshes.joint_normalization(points, bound), "renormalised jointly"
