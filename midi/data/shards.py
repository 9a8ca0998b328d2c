"""Preparing one dataset on many machines: shard parts, and the merge that joins them.

A sharded run (``prepare_data.py ... --num_shards N --shard_index I --output_dir parts/part-I``)
prepares only the scenes whose id hashes to ``I`` (:func:`midi.data.layout.shard_of`) into its
own part folder: a complete "midi-scenes" dataset whose manifest also records ``shard``, resumable
like any prepare run (finished scenes are skipped). :func:`merge_parts` joins the parts into one
dataset: every listed scene folder is hard-linked (copied where the parts sit on another file
system) into ``<output>/scenes/<id>.tmp-*`` and renamed into place, and the manifest is written
by the same code as a one-machine run. Every scene is prepared from its own seed, and the splits
are a seeded hash of each id with the "at least one val scene" rule applied once over all
scenes (which is why the parts' own splits are not reused), so the merged manifest and scene
files are byte-equal to those of one run on the same inputs and seed.

A merge is resumable too: scenes already in the output are kept when their ``scene.json`` is
byte-equal to the part's (a different one is an error, never overwritten); scenes the output held
before keep their split.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from midi.data import layout
from midi.data.atomic import commit_dir, make_tmp_dir, remove_stale_tmp
from midi.data.dataset import manifest_entries, read_manifest
from midi.data.manifest import check_resume_settings, options_from_manifest, write_manifest
from midi.data.prepare import REPORT_NAME, output_lock
from midi.errors import DataError, UsageError

# What every part of one dataset must share (the manifest keys of midi.data.manifest.settings + splits).
SHARED_KEYS = ("num_surface_points", "image_size", "surface_format", "background", "bound", "views", "seed",
               "split_settings")


@dataclass
class MergeReport:
    """Summary of a merge."""

    output_dir: str  # the merged dataset
    parts: list[str]  # part folders, as given
    merged: list[str] = field(default_factory=list)  # scenes linked in by this merge
    already_merged: list[str] = field(default_factory=list)  # scenes found in the output, identical (resume)
    # ``{"part", "scene", "reason"}``: scenes a part's run skipped (in its prepare_report.json); rerun that shard
    part_skipped: list[dict[str, str]] = field(default_factory=list)
    num_scenes_total: int = 0  # scenes listed in the merged manifest

    def to_json(self) -> dict[str, Any]:  # as returned to scripts
        return asdict(self)

    def summary(self) -> str:
        """A human-readable multi-line summary (one line per scene a part skipped)."""
        lines = [f"merged {len(self.parts)} part(s): {len(self.merged)} scene(s) added, {len(self.already_merged)} "
                 f"already there; {self.num_scenes_total} scene(s) in {self.output_dir}/{layout.MANIFEST}"]
        lines += [f"  skipped by {s['part']}: {s['scene']}: {s['reason']} (fix it, rerun that shard and merge again)"
                  for s in self.part_skipped]
        return "\n".join(lines)


def merge_parts(parts: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str],
                progress: bool = False) -> MergeReport:
    """Joins prepared part folders (the shards of one run, or any datasets of equal settings) into ``output_dir``.

    Raises:
        UsageError: No parts, a part named twice or being the output, parts with different
            settings, shards missing or of different counts, a part (or the output) being
            written by a live run, or an output prepared with other settings.
        DataError: A part without a manifest (its run has not finished), a scene in two parts or
            in the wrong shard, a listed scene that is not finished, or an output scene that
            differs from the part's.
    """
    parts, output_dir = [Path(p) for p in parts], Path(output_dir)
    if not parts:
        raise UsageError("--merge needs at least one part folder")
    resolved = [p.resolve() for p in parts]
    if len(set(resolved)) != len(resolved):
        raise UsageError("--merge names a part folder twice")
    if output_dir.resolve() in resolved:
        raise UsageError(f"{output_dir}: the merge output must not be one of the parts")
    manifests = [_read_part(p) for p in parts]
    options = options_from_manifest(manifests[0], parts[0] / layout.MANIFEST)
    _check_same_settings(parts, manifests)
    _check_shards(parts, manifests)
    owners = _scene_owners(parts, manifests)
    report = MergeReport(str(output_dir), [str(p) for p in parts])
    (output_dir / layout.SCENES_DIR).mkdir(parents=True, exist_ok=True)
    with ExitStack() as locks:
        # The parts' locks too: a shard still (or again) running must not change under the merge.
        for folder in (*parts, output_dir):
            locks.enter_context(output_lock(folder))
        check_resume_settings(output_dir, options)
        remove_stale_tmp(output_dir / layout.SCENES_DIR)
        for scene_id, part in tqdm(sorted(owners.items()), disable=not progress, unit="scene"):
            source, dest = layout.scene_dir(part, scene_id), layout.scene_dir(output_dir, scene_id)
            if layout.is_finished(dest):
                if (dest / layout.SCENE_JSON).read_bytes() != (source / layout.SCENE_JSON).read_bytes():
                    raise DataError(f"{dest}: differs from {source} (prepared with other inputs?); "
                                    "merge into a new folder, or delete that scene to take the part's")
                report.already_merged.append(scene_id)
                continue
            link_scene(source, output_dir / layout.SCENES_DIR, scene_id)
            report.merged.append(scene_id)
        report.num_scenes_total = len(write_manifest(output_dir, options)["scenes"])
    report.part_skipped = [s for p in parts for s in _part_skipped(p)]
    return report


def link_scene(source: Path, scenes_root: Path, scene_id: str) -> Path:
    """Hard-links (or copies) a finished scene folder into ``scenes_root/<scene_id>``, all or nothing."""
    tmp = make_tmp_dir(scenes_root, scene_id)
    try:
        files = sorted(p for p in source.rglob("*") if p.is_file())
        # scene.json last, as prepare writes it: the folder is finished only with everything in it.
        for path in sorted(files, key=lambda p: p.name == layout.SCENE_JSON):
            target = tmp / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)  # the same bytes without a copy; prepare never edits a file in place
            except OSError:
                shutil.copy2(path, target)  # another file system (or no hard links): copy, keeping the mtime
        return commit_dir(tmp, layout.scene_dir(scenes_root.parent, scene_id))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_part(part: Path) -> dict[str, Any]:
    if not (part / layout.MANIFEST).is_file():
        if not part.is_dir():
            raise DataError(f"{part}: part folder not found")
        raise DataError(f"{part}: no {layout.MANIFEST} (its prepare run has not finished); run that shard again")
    return read_manifest(part)


def _check_same_settings(parts: list[Path], manifests: list[dict[str, Any]]) -> None:
    first = {k: manifests[0].get(k) for k in SHARED_KEYS}
    for part, manifest in zip(parts[1:], manifests[1:]):
        for key in SHARED_KEYS:
            if manifest.get(key) != first[key]:
                raise UsageError(f"{part} was prepared with {key}={manifest.get(key)}, but {parts[0]} with "
                                 f"{first[key]}; prepare every part with the same options")


def _check_shards(parts: list[Path], manifests: list[dict[str, Any]]) -> None:
    shards = [m.get("shard") for m in manifests]
    if all(s is None for s in shards):
        return  # plain datasets of equal settings: any number of them
    if any(not isinstance(s, dict) for s in shards):
        named = next(p for p, s in zip(parts, shards) if not isinstance(s, dict))
        raise UsageError(f"{named}: not a shard part, but other parts are; merge the parts of one sharded run")
    counts = {int(s["count"]) for s in shards}
    if len(counts) != 1:
        raise UsageError(f"the parts come from runs with different --num_shards ({sorted(counts)})")
    count, seen = counts.pop(), {}
    for part, shard in zip(parts, shards):
        index = int(shard["index"])
        if index in seen:
            raise UsageError(f"{part} and {seen[index]} are both shard {index}")
        seen[index] = part
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise UsageError(f"shard(s) {', '.join(map(str, missing))} of {count} missing; run them with "
                         "--shard_index and merge all parts")


def _scene_owners(parts: list[Path], manifests: list[dict[str, Any]]) -> dict[str, Path]:
    owners: dict[str, Path] = {}
    for part, manifest in zip(parts, manifests):
        listing, shard = part / layout.MANIFEST, manifest.get("shard")
        for entry in manifest_entries(manifest, listing):
            scene_id = entry["id"]
            folder = layout.inside(part / layout.SCENES_DIR, scene_id, listing)
            if scene_id in owners:
                raise DataError(f"{listing}: scene {scene_id} is also in {owners[scene_id]}; scene ids must be unique")
            if shard and layout.shard_of(scene_id, int(shard["count"])) != int(shard["index"]):
                raise DataError(f"{listing}: scene {scene_id} does not belong to shard {shard['index']} "
                                f"of {shard['count']} (a part of another run?)")
            if not layout.is_finished(folder):
                raise DataError(f"{folder}: listed in {listing} but not finished; run that shard again")
            owners[scene_id] = part
    return owners


def _part_skipped(part: Path) -> list[dict[str, str]]:
    try:
        skipped = layout.read_json(part / REPORT_NAME).get("skipped", [])  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError):
        return []  # no report (a plain dataset): nothing known to be missing
    return [{"part": str(part), "scene": str(s.get("scene")), "reason": str(s.get("reason"))}
            for s in skipped if isinstance(s, dict)]
