"""The ``--check --vae MODEL`` round trip: every object through the model's own VAE and back.

Training regresses the VAE latents of the surfaces, so an object the VAE cannot represent (thin
sheets it closes, inner faces it fills, a scale it was not trained on) teaches the model garbage
whatever the LoRA does. Each object's stored surface samples (points + normals, the encoder's
input as in training: ``num_tokens`` = the transformer's width, the posterior mean) are encoded,
decoded into a mesh with the pipeline's own extraction (:mod:`midi.inference.extraction`,
coarse-to-fine at the model's octree depth), and the mesh's surface samples are scored against
the stored ones with :func:`midi.evaluation.metrics.score_points` (no alignment: the round trip
must land in place). An object's score is the lower of its F-scores at ``tau`` in the scene frame
(placement and size) and normalised per object (shape; a small object's errors are not hidden by
the scene's scale); below ``threshold`` it is flagged (a ``poor_vae_reconstruction`` warning), and
the contact sheet shows the worst: stored samples next to the decoded ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import trimesh

from midi.config import is_tiny
from midi.data.check import Problem
from midi.data.contact_sheet import MAX_POINTS, render_points, tile_camera, titled_row
from midi.data.dataset import SceneRecord
from midi.data.images import instance_colours
from midi.data.surface_io import load_surface
from midi.errors import DataError
from midi.evaluation.metrics import score_points
from midi.inference.extraction import ExtractionConfig, extract_coarse_to_fine
from midi.tiny import load_pipeline

DEFAULT_TAU = 0.1  # the evaluation protocol's F-score threshold (midi.evaluation)
DEFAULT_THRESHOLD = 0.9  # a VAE that represents an object well scores > 0.95 at tau 0.1
TINY_OCTREE_DEPTH = 6  # the tiny model's fields are coarse (inference uses the same depth)
OCTREE_DEPTH = 8  # upstream's depth for real models
NUM_POINTS = 20480  # encoder input and scored samples per object (training's data.num_surface_points)
WORST_SHOWN = 6  # objects on the contact sheet
SEED = 0  # the encoder's query subset and the decoded mesh's samples


@dataclass
class VaeScore:
    """One object's round trip."""

    scene: str
    name: str
    fscore: float  # min(scene_fscore, object_fscore): what is compared with the threshold
    scene_fscore: float  # F at tau in the scene frame
    object_fscore: float  # F at tau after normalising both clouds per object (shape only)
    object_cd: float  # the normalised Chamfer distance (midi.evaluation.metrics)
    seconds: float  # encode + decode + scoring
    problem: str = ""  # why there is no score (unreadable surface, no decoded surface), else ""


@dataclass
class VaeCheck:
    """All round trips of a dataset, with the decoded samples of the worst objects kept for the sheet."""

    model: str
    tau: float
    threshold: float
    scores: list[VaeScore] = field(default_factory=list)
    decoded: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # worst objects' decoded points

    @property
    def flagged(self) -> list[VaeScore]:
        """Objects below the threshold, worst first."""
        return sorted((s for s in self.scores if s.fscore < self.threshold), key=lambda s: s.fscore)

    @property
    def summary(self) -> dict[str, Any]:
        """The ``vae`` entry of ``check_report.json`` (with every object's score)."""
        values = [s.fscore for s in self.scores]
        return {"model": self.model, "tau": self.tau, "threshold": self.threshold, "objects": len(self.scores),
                "flagged": len(self.flagged), "fscore_mean": float(np.mean(values)) if values else 0.0,
                "fscore_min": float(np.min(values)) if values else 0.0,
                "seconds_per_object": float(np.mean([s.seconds for s in self.scores])) if self.scores else 0.0,
                "objects_scored": [asdict(s) for s in self.scores]}

    @property
    def problems(self) -> list[Problem]:
        """One ``poor_vae_reconstruction`` warning per flagged object."""
        return [Problem(s.scene, "poor_vae_reconstruction",
                        f"{s.name}: F-score {s.fscore:.3f} < {self.threshold} (scene {s.scene_fscore:.3f}, "
                        f"object {s.object_fscore:.3f}){'; ' + s.problem if s.problem else ''}")
                for s in self.flagged]

    def sheet_rows(self, records: Sequence[SceneRecord]) -> list[np.ndarray]:
        """One row per shown object: its stored samples, then the decoded ones, from the scene's camera."""
        by_id = {r.scene_id: r for r in records}
        rows = []
        for score in self.flagged[:WORST_SHOWN]:
            record = by_id.get(score.scene)
            if record is None or score.name not in record.object_names:
                continue
            points, normals = load_surface(record.surface_paths[record.object_names.index(score.name)])
            keep = np.random.default_rng(SEED).permutation(len(points))[:MAX_POINTS]
            stored = [points[keep].astype(np.float64)]
            decoded = self.decoded.get((score.scene, score.name), np.zeros((0, 3)))
            camera = tile_camera(record, stored)
            colour = instance_colours(record.object_names.index(score.name) + 1)[-1:]
            # Decoded samples carry no normals: shaded as if they faced the camera.
            facing = np.asarray(camera["eye"]) - decoded
            facing /= np.maximum(np.linalg.norm(facing, axis=1, keepdims=True), 1e-12)
            tiles = [render_points(camera, stored, [normals[keep].astype(np.float64)], colour),
                     render_points(camera, [decoded], [facing], colour)]
            rows.append(titled_row(f"vae round trip {score.scene}/{score.name}: F {score.fscore:.3f} "
                                   f"(stored | decoded){' - ' + score.problem if score.problem else ''}", tiles))
        return rows


def octree_depth_for(model: str) -> int:
    """The extraction depth for a model: 6 for the tiny model, upstream's 8 otherwise."""
    return TINY_OCTREE_DEPTH if is_tiny(model) else OCTREE_DEPTH


def vae_round_trip(records: Sequence[SceneRecord], model: str, *, tau: float = DEFAULT_TAU,
                   threshold: float = DEFAULT_THRESHOLD, octree_depth: int | None = None,
                   num_points: int = NUM_POINTS, device: str | None = None, tiny_seed: int = 0,
                   progress: Callable[[Iterable], Iterable] | None = None) -> VaeCheck:
    """Round-trips every object of ``records`` through ``model``'s VAE (module docstring).

    ``model``: the tiny model or a pipeline folder (:func:`midi.tiny.load_pipeline`); ``device``:
    None = CUDA when available; ``progress`` wraps the loop over scenes (e.g. ``tqdm``).

    Raises:
        ModelError: The model cannot be loaded.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, device=device, tiny_seed=tiny_seed)
    vae = pipe.vae.eval()
    num_tokens = int(pipe.transformer.config.width)  # what training encodes with
    config = ExtractionConfig(method="coarse_to_fine", octree_depth=octree_depth or octree_depth_for(model))
    result = VaeCheck(str(model), tau, threshold)
    for record in progress(records) if progress else records:
        for name, path in zip(record.object_names, record.surface_paths):
            start = time.perf_counter()
            try:
                points, normals = load_surface(path)
            except DataError as exc:
                result.scores.append(VaeScore(record.scene_id, name, 0.0, 0.0, 0.0, float("nan"), 0.0, str(exc)))
                continue
            decoded = reconstruct(vae, points, normals, num_tokens, config, num_points)
            score = _score(record.scene_id, name, points, decoded, tau, time.perf_counter() - start)
            result.scores.append(score)
            _keep_worst(result, score, decoded)
    return result


def reconstruct(vae: Any, points: np.ndarray, normals: np.ndarray, num_tokens: int, config: ExtractionConfig,
                num_points: int) -> np.ndarray | None:
    """Surface samples ``(num_points, 3)`` of the decoded mesh of one object, None when it decodes to no surface."""
    rows = np.random.default_rng(SEED).permutation(len(points))[:num_points]
    surface = torch.from_numpy(np.concatenate([points[rows], normals[rows]], axis=1)).float()[None]
    with torch.no_grad():
        posterior = vae.encode(surface.to(next(vae.parameters()).device), num_tokens=num_tokens, seed=SEED).latent_dist
        mesh = extract_coarse_to_fine(vae, posterior.mode()[0], config).mesh
    if mesh is None or len(mesh.faces) == 0 or not mesh.area > 0:
        return None
    return np.asarray(trimesh.sample.sample_surface(mesh, num_points, seed=SEED)[0], np.float64)


def _score(scene: str, name: str, points: np.ndarray, decoded: np.ndarray | None, tau: float,
           seconds: float) -> VaeScore:
    if decoded is None:
        return VaeScore(scene, name, 0.0, 0.0, 0.0, float("nan"), seconds, "decodes to no surface")
    scores = score_points([decoded], [np.asarray(points, np.float64)], align="none", tau=tau)
    scene_f, object_f = float(scores["scene_fscore"]), float(scores["object_fscore"])
    return VaeScore(scene, name, min(scene_f, object_f), scene_f, object_f, float(scores["object_cd"]), seconds)


def _keep_worst(result: VaeCheck, score: VaeScore, decoded: np.ndarray | None) -> None:
    """Keeps the decoded samples of the :data:`WORST_SHOWN` worst objects only (memory stays flat)."""
    if score.fscore >= result.threshold:
        return
    cloud = np.zeros((0, 3)) if decoded is None else decoded[:MAX_POINTS]
    result.decoded[(score.scene, score.name)] = cloud
    if len(result.decoded) > WORST_SHOWN:
        worst = {(s.scene, s.name) for s in result.flagged[:WORST_SHOWN]}
        result.decoded = {k: v for k, v in result.decoded.items() if k in worst}
