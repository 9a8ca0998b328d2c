"""Ground truth and predictions of one scene, as point clouds matched per instance.

Ground truth is view ``view`` of a dataset scene (:func:`midi.data.dataset.load_scene_sample`):
the instances whose mask in that view is larger than 0.1 % of the image (MIDI's test rule; the
others cannot be predicted from the image and are listed as ``not_visible``), ``num_points``
surface points each, drawn without replacement by a generator seeded from ``(seed, scene id)``.

Predictions are either a scene file ``<pred>/<scene id>.glb`` (``.gltf``/``.obj`` too) as
``inference_with_lora.py`` writes it, one node per instance, or the same scene of another dataset.
A node matches gt object k when it is named like the object or ``instance_<k+1>`` (inference's
default name for id-map label k+1). Mesh points are sampled on the surface (area-weighted,
seeded, nodes in name order); dataset points are drawn like the gt's, so a dataset scored against itself gives CD 0.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh

from midi.data.dataset import SceneRecord, load_scene_sample, subsample_surface
from midi.errors import DataError

SCENE_SUFFIXES = (".glb", ".gltf", ".obj")
ERROR_SUFFIX = ".error.txt"  # written by --generate when a scene could not be generated


class EvalError(Exception):
    """One scene (or file) that cannot be scored; the message is one line naming it and the problem."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


def scene_rng(seed: int, scene_id: str) -> np.random.Generator:
    """The sampling generator of one scene: independent of the scene order and of sharding."""
    return np.random.default_rng([seed, zlib.crc32(scene_id.encode())])


@dataclass
class SceneTruth:
    """The gt instances of one scene that are scored.

    Attributes:
        scene_id: Scene id.
        names: Object names of the scored instances (visible in the view).
        indices: Their indices in the record's object list (id-map label = index + 1).
        points: ``(num_points, 3)`` float32 per scored instance, scene frame.
        not_visible: ``"name (reason)"`` of the objects left out.
    """

    scene_id: str
    names: list[str]
    indices: list[int]
    points: list[np.ndarray]
    not_visible: list[str] = field(default_factory=list)


@dataclass
class ScenePrediction:
    """A prediction matched to a :class:`SceneTruth`.

    Attributes:
        points: ``(N, 3)`` per gt instance, or None where the prediction has no such instance.
        extra: ``name -> (N, 3)`` for predicted instances that match no gt object.
        ignored: predicted instances of objects that are not visible in the gt view.
    """

    points: list[np.ndarray | None]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def missing(self, truth: SceneTruth) -> list[str]:
        """Names of the gt instances without a prediction."""
        return [n for n, p in zip(truth.names, self.points) if p is None]


def load_truth(record: SceneRecord, num_points: int, seed: int, view: int = 0) -> SceneTruth:
    """Reads the scored gt instances of one scene.

    Raises:
        EvalError: unreadable files, too few surface points, no view or no visible instance.
    """
    if view >= len(record.views):
        raise EvalError(f"{record.scene_id}: no view {view} ({len(record.views)} views)")
    try:
        sample = load_scene_sample(record, view, num_points, scene_rng(seed, record.scene_id))
    except DataError as exc:
        raise EvalError(f"{record.scene_id}: ground truth: {exc}") from None
    points = [s[:, :3] for s in sample.surfaces]  # (N, P, 6) -> N x (P, 3)
    not_visible = [f"{name} ({reason})" for name, reason in sample.dropped]
    return SceneTruth(record.scene_id, sample.object_names, sample.object_indices, points, not_visible)


def find_scene_file(pred_dir: Path, scene_id: str) -> Path:
    """The prediction file of a scene.

    Raises:
        EvalError: none there (with the reason ``--generate`` recorded, if any).
    """
    for suffix in SCENE_SUFFIXES:
        if (pred_dir / f"{scene_id}{suffix}").is_file():
            return pred_dir / f"{scene_id}{suffix}"
    error = pred_dir / f"{scene_id}{ERROR_SUFFIX}"
    if error.is_file():
        raise EvalError(f"{scene_id}: generation failed: {error.read_text().strip()}")
    raise EvalError(f"{pred_dir / scene_id}.glb: scene missing from the predictions")


def read_scene_meshes(path: Path) -> dict[str, trimesh.Trimesh]:
    """Node name -> mesh in the scene frame (node transforms applied).

    Raises:
        EvalError: not a mesh file, no mesh, an empty mesh or non-finite vertices.
    """
    try:
        scene = trimesh.load(path, force="scene")
    except Exception as exc:  # trimesh raises many types for a corrupt or foreign file
        raise EvalError(f"{path}: not a readable mesh file ({type(exc).__name__}: {exc})") from None
    meshes = {}
    for node in scene.graph.nodes_geometry:
        transform, geometry = scene.graph[node]
        mesh = scene.geometry[geometry]
        if not isinstance(mesh, trimesh.Trimesh):
            continue  # point clouds, paths: not a surface
        if len(mesh.faces) == 0 or mesh.area <= 0:
            raise EvalError(f"{path}: node {node!r} is an empty mesh")
        if not np.isfinite(mesh.vertices).all():
            raise EvalError(f"{path}: node {node!r} has NaN/inf vertices")
        meshes[node] = mesh.copy().apply_transform(transform)
    if not meshes:
        raise EvalError(f"{path}: no mesh in the file")
    return meshes


def _gt_index(name: str, record: SceneRecord) -> int | None:
    """The record object index a predicted instance name refers to (None: no object)."""
    if name in record.object_names:
        return record.object_names.index(name)
    label = name.removeprefix("instance_")
    if label != name and label.isdigit() and 1 <= int(label) <= len(record.object_names):
        return int(label) - 1
    return None


def predict_from_file(
    path: Path, record: SceneRecord, truth: SceneTruth, num_points: int, seed: int
) -> ScenePrediction:
    """Samples ``num_points`` per node of a scene file and matches nodes to the gt instances.

    Raises:
        EvalError: see :func:`read_scene_meshes`, or two nodes for one object.
    """
    return predict_from_meshes(read_scene_meshes(path), record, truth, num_points, seed, where=path)


def predict_from_meshes(
    meshes: dict[str, trimesh.Trimesh],
    record: SceneRecord,
    truth: SceneTruth,
    num_points: int,
    seed: int,
    where: object = None,
) -> ScenePrediction:
    """:func:`predict_from_file` on meshes already in memory (name -> mesh, scene frame), e.g. the
    training-time metrics' generations; ``where`` names their source in errors.

    Raises:
        EvalError: two meshes for one object.
    """
    rng = scene_rng(seed + 1, truth.scene_id)  # not the gt's stream: pred and gt samples independent
    prediction = ScenePrediction([None] * len(truth.names))
    # Sampled in name order: the numbers must not depend on the order a file (or its writer) lists nodes in.
    for name, mesh in sorted(meshes.items()):
        points = trimesh.sample.sample_surface(mesh, num_points, seed=int(rng.integers(2**31)))[0]
        index = _gt_index(name, record)
        if index is None:
            prediction.extra[name] = points
        elif index not in truth.indices:
            prediction.ignored.append(name)
        elif prediction.points[truth.indices.index(index)] is not None:
            raise EvalError(f"{where or truth.scene_id}: two nodes for object {record.object_names[index]!r}")
        else:
            prediction.points[truth.indices.index(index)] = points
    return prediction


def predict_from_dataset(
    record: SceneRecord, truth: SceneTruth, num_points: int, seed: int
) -> ScenePrediction:
    """The same scene of another dataset, matched by object name, sampled like the gt.

    Raises:
        EvalError: unreadable surface files or too few points.
    """
    rng = scene_rng(seed, truth.scene_id)
    prediction = ScenePrediction([None] * len(truth.names))
    visible_or_not = set(truth.names) | {n.split(" (")[0] for n in truth.not_visible}
    try:
        for k, name in enumerate(truth.names):
            if name in record.object_names:
                path = record.surface_paths[record.object_names.index(name)]
                prediction.points[k] = subsample_surface(path, num_points, rng)[:, :3]
        for name, path in zip(record.object_names, record.surface_paths):
            if name not in visible_or_not:
                prediction.extra[name] = subsample_surface(path, num_points, rng)[:, :3]
            elif name not in truth.names:
                prediction.ignored.append(name)
    except DataError as exc:
        raise EvalError(f"{truth.scene_id}: prediction: {exc}") from None
    return prediction
