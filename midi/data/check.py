"""Validating a prepared dataset (or a 3D-Front root) and writing a report and a contact sheet.

Problems carry a severity. Errors make the data wrong for training: unreadable files, NaNs,
points outside [-1, 1], normals that are not unit length, too few points, a surface without area,
image/id map size mismatch, an id map label with no object, a manifest that lists missing scenes,
no scene at all or an empty train split. Warnings are legitimate but worth a look: an object absent
from one view (empty mask) or from every view (the reader and the converter drop it), a tiny mask,
a finished scene the manifest does not list, an object prepare dropped or a mesh it repaired (as
recorded in ``scene.json``), an object whose ``--watertight`` conversion failed (its raw surface was
kept), an object the ``--vae`` round trip reconstructs poorly (:mod:`midi.data.vae_check`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from midi.data import layout
from midi.data.atomic import write_json
from midi.data.contact_sheet import write_contact_sheet
from midi.data.dataset import (
    DEFAULT_MIN_MASK_FRACTION,
    SceneRecord,
    check_labels,
    manifest_entries,
    open_dataset,
    read_manifest,
)
from midi.data.images import open_image, read_label_map
from midi.data.surface_io import load_surface
from midi.data.watertight import WATERTIGHT_FAILED
from midi.errors import DataError

REPORT_NAME = "check_report.json"
SHEET_NAME = "contact_sheet.png"
BOUND_TOLERANCE = 1e-4
NORMAL_TOLERANCE = 1e-3
WARNING_KINDS = frozenset(
    {"empty_mask", "tiny_mask", "unlisted_scene", "missing_object", "dropped_object", "repaired_mesh",
     "not_watertight", "poor_vae_reconstruction"}
)


@dataclass
class Problem:
    """One finding: ``kind`` is a short key (e.g. ``out_of_bounds``), ``detail`` one line."""

    scene: str
    kind: str
    detail: str

    severity = property(lambda self: "warning" if self.kind in WARNING_KINDS else "error", doc="warning or error")

    def to_json(self) -> dict[str, str]:
        """The problem as stored in the report."""
        return asdict(self) | {"severity": self.severity}


class RoundTrip(Protocol):
    """What an extra per-object check returns (see :mod:`midi.data.vae_check`)."""

    summary: dict[str, Any]  # stored as the report's ``vae`` entry
    problems: list[Problem]  # added to their scenes
    sheet_rows: Callable[[list[SceneRecord]], list[np.ndarray]]  # rows appended to the contact sheet


@dataclass
class SceneCheck:
    """The findings of one scene."""

    scene_id: str  # scene id
    num_objects: int  # objects listed for the scene
    instances_per_view: list[int] = field(default_factory=list)  # distinct non-zero labels in each view's id map
    point_range: list[float] | None = None  # ``[min, max]`` over all coordinates of all objects (None if unreadable)
    problems: list[Problem] = field(default_factory=list)  # what was found


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`."""

    root: str
    layout: str
    scenes: list[SceneCheck]
    dataset_problems: list[Problem]
    files: dict[str, str] = field(default_factory=dict)
    watertight: dict[str, Any] | None = None  # :func:`watertight_summary` (None: prepared without --watertight)
    vae: dict[str, Any] | None = None  # the ``--vae`` round trip's summary (None: not run)

    @property
    def problems(self) -> list[Problem]:
        """All problems, dataset-level first."""
        return self.dataset_problems + [p for s in self.scenes for p in s.problems]

    errors = property(lambda self: [p for p in self.problems if p.severity == "error"], doc="Severity error.")
    warnings = property(lambda self: [p for p in self.problems if p.severity == "warning"], doc="Severity warning.")

    def to_json(self) -> dict[str, Any]:
        """The report as stored in ``check_report.json``."""
        return {
            "root": self.root,
            "layout": self.layout,
            "num_scenes": len(self.scenes),
            "num_scenes_ok": sum(1 for s in self.scenes if not s.problems),
            "num_errors": len(self.errors),
            "num_warnings": len(self.warnings),
            "counts": dict(Counter(p.kind for p in self.problems)),
            "problems": [p.to_json() for p in self.problems],
            "scenes": [asdict(s) | {"problems": [p.to_json() for p in s.problems]} for s in self.scenes],
            "files": self.files,
            "watertight": self.watertight,
            "vae": self.vae,
        }

    def summary(self, max_lines: int = 30) -> str:
        """A human-readable summary: totals, counts per kind, the first problems."""
        ok = sum(1 for s in self.scenes if not s.problems)
        lines = [
            f"checked {len(self.scenes)} scene(s) in {self.root} ({self.layout}): {ok} clean, "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        ]
        if self.watertight:
            w = self.watertight
            lines.append(f"  watertight: {w['objects']} object(s) at resolution {'/'.join(w['resolution'])}, "
                         f"{w['failed']} failed, {w['seconds_mean']} s per object (max {w['seconds_max']})")
        if self.vae:
            v = self.vae
            lines.append(f"  vae round trip ({v['model']}): {v['objects']} object(s), F-score@{v['tau']} mean "
                         f"{v['fscore_mean']:.3f}, min {v['fscore_min']:.3f}; {v['flagged']} below {v['threshold']}")
        lines += [f"  {kind}: {n}" for kind, n in sorted(Counter(p.kind for p in self.problems).items())]
        lines += [f"  [{p.severity}] {p.scene}: {p.kind}: {p.detail}" for p in self.problems[:max_lines]]
        if len(self.problems) > max_lines:
            lines.append(f"  ... {len(self.problems) - max_lines} more in the report")
        lines += [f"  wrote {path}" for path in self.files.values()]
        return "\n".join(lines)


def check_surface(path: Path, scene: str, name: str, min_points: int) -> tuple[list[Problem], np.ndarray | None]:
    """Checks one surface file: ``(problems, points or None when unreadable)``."""
    try:
        points, normals = load_surface(path)
    except DataError as exc:
        return [Problem(scene, "unreadable_surface", str(exc))], None
    finite = points[np.isfinite(points).all(1)]
    bad = int(np.sum(~np.isfinite(points).all(1) | ~np.isfinite(normals).all(1)))
    off = int(np.sum(np.abs(np.linalg.norm(normals, axis=1) - 1.0) > NORMAL_TOLERANCE))  # NaN normals: counted above
    peak = float(np.abs(finite).max()) if len(finite) else 0.0
    flat = len(finite) > 0 and float(np.max(np.ptp(finite, axis=0))) < 1e-6
    found = {  # kind: (found, detail)
        "nan": (bad > 0, f"{bad} point(s) with NaN/inf"),
        "out_of_bounds": (peak > 1.0 + BOUND_TOLERANCE, f"|coordinate| up to {peak:.4f} > 1"),
        "non_unit_normals": (off > 0, f"{off} normal(s) not unit length"),
        "too_few_points": (len(points) < min_points, f"{len(points)} points < {min_points}"),
        "no_area": (flat, "all points coincide (mesh without area)"),
    }
    return [Problem(scene, kind, f"{name}: {detail}") for kind, (hit, detail) in found.items() if hit], points


def check_view(image: Path, ids: Path, scene: str, names: tuple[str, ...], min_mask_fraction: float
               ) -> tuple[list[Problem], np.ndarray | None]:
    """Checks one view (readable files, same size, labels vs objects, empty and tiny masks).

    Returns ``(problems, per-object pixel counts or None when unreadable)``.
    """
    try:
        size = open_image(image).size
        labels = read_label_map(ids)
    except DataError as exc:
        return [Problem(scene, "unreadable_view", str(exc))], None
    problems = []
    if labels.shape != (size[1], size[0]):
        problems.append(Problem(scene, "size_mismatch", f"{ids.name} is {labels.shape[::-1]}, {image.name} is {size}"))
    try:
        check_labels(labels, len(names), ids)
    except DataError as exc:
        problems.append(Problem(scene, "extra_label", str(exc)))
    counts = np.bincount(labels.ravel().clip(0), minlength=len(names) + 1)[1 : len(names) + 1]
    limit = min_mask_fraction * labels.size
    for name, pixels in zip(names, counts):
        if pixels == 0:
            problems.append(Problem(scene, "empty_mask", f"{ids.name}: {name} has an empty mask"))
        elif pixels <= limit:
            problems.append(Problem(scene, "tiny_mask", f"{ids.name}: {name} covers only {int(pixels)} px"))
    return problems, counts


def check_scene(record: SceneRecord, min_points: int, min_mask_fraction: float) -> SceneCheck:
    """Runs every per-scene check on one record."""
    result = SceneCheck(record.scene_id, len(record.object_names))
    lo, hi = np.inf, -np.inf
    for name, path in zip(record.object_names, record.surface_paths):
        problems, points = check_surface(path, record.scene_id, name, min_points)
        result.problems += problems
        if points is not None and np.isfinite(points).any():
            lo, hi = min(lo, float(np.nanmin(points))), max(hi, float(np.nanmax(points)))
    result.point_range = [lo, hi] if np.isfinite(lo) else None
    if not record.views:
        result.problems.append(Problem(record.scene_id, "no_views", "scene has no view with an id map"))
    seen = np.zeros(len(record.object_names), np.int64)
    for image, ids in record.views:
        problems, counts = check_view(image, ids, record.scene_id, record.object_names, min_mask_fraction)
        result.problems += problems
        if counts is not None:
            seen += counts
            result.instances_per_view.append(int(np.count_nonzero(counts)))
    if record.views:
        for name in np.asarray(record.object_names)[seen == 0]:
            result.problems.append(Problem(record.scene_id, "missing_object", f"{name} is in no id map"))
    return result


def recorded_warnings(root: Path, scene: str) -> list[Problem]:
    """What prepare recorded in a scene's ``scene.json``: objects it dropped, meshes it repaired."""
    try:
        record = layout.read_json(layout.scene_dir(root, scene) / layout.SCENE_JSON)
    except (OSError, ValueError):
        return []  # an unfinished scene is reported by check_manifest
    if not isinstance(record, dict):
        return []
    dropped = [d for d in record.get("dropped", []) if isinstance(d, dict)]
    problems = [Problem(scene, "dropped_object", f"{d.get('name')}: dropped ({d.get('reason')})") for d in dropped]
    for obj in (o for o in record.get("objects", []) if isinstance(o, dict) and o.get("warning")):
        # A failed watertight conversion is its own kind; what loading repaired stays repaired_mesh.
        parts = str(obj["warning"]).split("; ")
        failed = [p for p in parts if p.startswith(WATERTIGHT_FAILED)]
        repaired = "; ".join(p for p in parts if not p.startswith(WATERTIGHT_FAILED) and p != "raw surface kept")
        problems += [Problem(scene, "not_watertight", f"{obj.get('name')}: {f}; raw surface kept") for f in failed]
        if repaired:
            problems.append(Problem(scene, "repaired_mesh", f"{obj.get('name')}: {repaired}"))
    return problems


def watertight_summary(root: Path, scenes: list[str]) -> dict[str, Any] | None:
    """What prepare's ``--watertight`` recorded: objects converted, failed, seconds per object (None: not used)."""
    seconds, failed, resolutions = [], 0, set()
    for scene in scenes:
        try:
            record = layout.read_json(layout.scene_dir(root, scene) / layout.SCENE_JSON)
        except (OSError, ValueError):
            continue
        for obj in record.get("objects", []) if isinstance(record, dict) else []:
            info = obj.get("watertight") if isinstance(obj, dict) else None
            if not isinstance(info, dict):
                continue
            resolutions.add(info.get("resolution"))
            if info.get("failed"):
                failed += 1
            else:
                seconds.append(float(info.get("seconds", 0.0)))
    if not seconds and not failed:
        return None
    return {"objects": len(seconds) + failed, "failed": failed, "resolution": sorted(map(str, resolutions)),
            "seconds_mean": round(float(np.mean(seconds)), 3) if seconds else None,
            "seconds_max": round(float(np.max(seconds)), 3) if seconds else None}


def check_manifest(root: Path) -> list[Problem]:
    """Dataset-level checks of a midi-scenes root: listed scenes exist and are finished, splits."""
    try:
        manifest = read_manifest(root)
        listed = [entry["id"] for entry in manifest_entries(manifest, root / layout.MANIFEST)]
    except DataError as exc:
        return [Problem("(dataset)", "bad_manifest", str(exc))]
    problems = []
    if not listed:
        problems.append(Problem("(dataset)", "no_scenes", f"{layout.MANIFEST} lists no scene"))
    elif not manifest.get("splits", {}).get("train"):
        problems.append(Problem("(dataset)", "empty_split", "the train split is empty"))
    problems += [Problem(sid, "missing_scene", f"listed in {layout.MANIFEST} but no finished scene folder")
                 for sid in listed if not layout.is_finished(layout.scene_dir(root, sid))]
    problems += _check_splits(manifest.get("splits", {}), set(listed))
    on_disk = {p.name for p in (root / layout.SCENES_DIR).glob("*") if layout.is_finished(p)}
    return problems + [Problem(sid, "unlisted_scene", f"finished scene not listed in {layout.MANIFEST}")
                       for sid in sorted(on_disk - set(listed))]


def _check_splits(splits: dict[str, list[str]], listed: set[str]) -> list[Problem]:
    problems, owner = [], {}
    for split, ids in splits.items():
        for sid in ids:
            if sid not in listed:
                problems.append(Problem(sid, "bad_split", f"in split {split} but not in the scene list"))
            elif sid in owner:
                problems.append(Problem(sid, "bad_split", f"in both {owner[sid]} and {split}"))
            owner.setdefault(sid, split)
    return problems


def check_dataset(root: str | Path, report_dir: str | Path | None = None,
                  min_mask_fraction: float = DEFAULT_MIN_MASK_FRACTION, min_points: int | None = None,
                  sheet_scenes: int = 12, write: bool = True,
                  round_trip: Callable[[list[SceneRecord]], RoundTrip] | None = None) -> CheckReport:
    """Validates a midi-scenes or 3D-Front root and writes ``check_report.json`` and ``contact_sheet.png``.

    Args:
        report_dir: Where to write the report and the sheet (``root`` when None).
        min_mask_fraction: Masks at or below this fraction of the image are reported as tiny.
        min_points: Fewest surface points expected; the manifest's ``num_surface_points``
            (20480 for 3D-Front) when None.
        sheet_scenes: Scenes on the contact sheet (scenes with problems first).
        write: Write the files (False for a dry check).
        round_trip: Runs an extra per-object check on the records (the ``--vae`` round trip,
            :func:`midi.data.vae_check.vae_round_trip`); its summary, problems and sheet rows join
            the report.

    Raises:
        DataError: ``root`` is in no known layout.
    """
    root = Path(root)
    kind = layout.detect_layout(root)
    records = open_dataset(root, "all")
    dataset_problems = check_manifest(root) if kind == layout.FORMAT else []
    if not records and not dataset_problems:
        dataset_problems.append(Problem("(dataset)", "no_scenes", "the dataset has no scene"))
    if min_points is None:
        min_points = int(read_manifest(root).get("num_surface_points", 1)) if kind == layout.FORMAT else 20480
    scenes = [check_scene(r, min_points, min_mask_fraction) for r in records]
    if kind == layout.FORMAT:
        for scene in scenes:
            scene.problems += recorded_warnings(root, scene.scene_id)
    report = CheckReport(str(root), str(kind), scenes, dataset_problems)
    if kind == layout.FORMAT:
        report.watertight = watertight_summary(root, [s.scene_id for s in scenes])
    extra_rows: list[np.ndarray] = []
    if round_trip is not None:
        result = round_trip(records)
        report.vae = result.summary
        by_id = {s.scene_id: s for s in scenes}
        for problem in result.problems:
            by_id[problem.scene].problems.append(problem)
        extra_rows = result.sheet_rows(records) if write else []
    if write:
        out = Path(report_dir) if report_dir is not None else root
        out.mkdir(parents=True, exist_ok=True)
        _write_outputs(report, records, out, sheet_scenes, extra_rows)
    return report


def _write_outputs(report: CheckReport, records: list[SceneRecord], out: Path, sheet_scenes: int,
                   extra_rows: list[np.ndarray]) -> None:
    by_id = {s.scene_id: s for s in report.scenes}
    ordered = sorted(records, key=lambda r: (not by_id[r.scene_id].problems,))[:sheet_scenes]
    if ordered:
        write_contact_sheet(out / SHEET_NAME, ordered, [by_id[r.scene_id] for r in ordered], extra_rows)
        report.files["contact_sheet"] = str(out / SHEET_NAME)
    report.files["report"] = str(out / REPORT_NAME)
    write_json(out / REPORT_NAME, report.to_json())
