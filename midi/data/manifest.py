"""Rewriting the manifest of a "midi-scenes" dataset at the end of a prepare run, and resuming.

``manifest.json`` is rewritten last by every prepare run, atomically. It lists every finished
scene of the folder (``id``, ``objects``, ``views``), the splits, the split settings, and the
settings all its scenes share; scenes of earlier runs keep their split. The part folder of a sharded
run also records ``shard`` (``index``, ``count``; see :mod:`midi.data.shards`). The reading side
(format and entry checks) is :func:`midi.data.dataset.read_manifest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from midi.data import layout
from midi.data.atomic import write_json
from midi.data.jobs import PrepareOptions
from midi.errors import DataError, UsageError

# Settings all scenes of a dataset share: in the manifest (this order) and compared on resume. A
# scene record holds all but bound (inside its normalization) and views (there: its list of views).
SCENE_SETTINGS = ("num_surface_points", "image_size", "surface_format", "background", "seed")


def settings(options: PrepareOptions) -> dict[str, Any]:
    """The shared settings of a run, as the manifest records them (a resume must match them).

    Watertight surfaces and the Blender renderer are recorded only when used, so the manifests of
    earlier runs (raw surfaces, embree) still match their own settings."""
    out = {"num_surface_points": options.num_samples, "image_size": options.image_size,
           "surface_format": options.surface_format, "background": list(options.background),
           "bound": options.bound, "views": options.views, "seed": options.seed}
    if options.watertight:
        out |= {"watertight": True, "watertight_resolution": options.watertight_resolution}
    if options.renderer != "embree":
        out["renderer"] = options.renderer
    return out


def finished_scenes(output_dir: Path) -> dict[str, dict[str, Any]]:
    """Reads the ``scene.json`` of every finished scene (sorted by id); unreadable ones are left to the check."""
    scenes = Path(output_dir) / layout.SCENES_DIR
    out: dict[str, dict[str, Any]] = {}
    for folder in sorted(scenes.iterdir()) if scenes.is_dir() else ():
        if layout.is_tmp_name(folder.name) or not layout.is_finished(folder):
            continue
        try:
            out[folder.name] = layout.read_json(folder / layout.SCENE_JSON)
        except (OSError, ValueError):
            continue
    return out


def read_old_manifest(output_dir: Path) -> dict[str, Any] | None:
    """Reads the manifest of an earlier run, of any format (None when there is none; DataError when corrupt)."""
    path = Path(output_dir) / layout.MANIFEST
    if not path.is_file():
        return None
    try:
        data = layout.read_json(path)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise DataError(f"{path}: corrupt manifest ({exc}); delete it to rebuild it from the scenes") from exc
    return data


def options_from_manifest(manifest: dict[str, Any], path: object) -> PrepareOptions:
    """The settings a manifest records, as prepare options (what :func:`write_manifest` needs to
    rewrite it: a merge of sharded parts has no command line of its own).

    Raises:
        DataError: ``"<path>: ..."`` when a setting is missing or malformed.
    """
    split = manifest.get("split_settings", {})
    try:
        return PrepareOptions(
            num_samples=int(manifest["num_surface_points"]), image_size=int(manifest["image_size"]),
            surface_format=str(manifest["surface_format"]), background=tuple(float(c) for c in manifest["background"]),
            bound=float(manifest["bound"]), views=int(manifest["views"]), seed=int(manifest["seed"]),
            val_fraction=float(split["val_fraction"]), test_fraction=float(split["test_fraction"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: manifest lacks the settings of its run ({type(exc).__name__}: {exc}); "
                        "prepare it again with this version") from exc


def check_resume_settings(output_dir: Path, options: PrepareOptions, shard: dict[str, int] | None = None) -> None:
    """Refuses to mix scenes prepared with other settings.

    Compared: sample count, image size, surface format, background, normalisation bound (margin),
    and, where recorded, rendered views and seed. Without a manifest, a finished scene's record
    stands in for it. ``shard`` (``{"index", "count"}`` or None) must equal the recorded one, so
    a part folder never mixes scenes of two shard assignments.

    Raises:
        UsageError: Naming the setting, the old and the new value.
        DataError: The existing manifest is corrupt.
    """
    old = read_old_manifest(output_dir)
    if old is None:
        record = next(iter(finished_scenes(output_dir).values()), {})
        old = {k: record[k] for k in SCENE_SETTINGS if k in record}
        norm = record.get("normalization")
        if isinstance(norm, dict) and "bound" in norm:
            old["bound"] = norm["bound"]
    for key, value in settings(options).items():
        if key in old and not (_close(old[key], value) if key == "bound" else old[key] == value):
            raise UsageError(f"{output_dir} was prepared with {key}={old[key]}, not {value}; "
                             "use the same or a new folder")
    if "scenes" in old and old.get("shard") != shard:  # a manifest (not a scene record) stands for the folder
        raise UsageError(f"{output_dir} was prepared as {_shard_text(old.get('shard'))}, not {_shard_text(shard)}; "
                         "use the same --num_shards/--shard_index or a new folder")


def _shard_text(shard: object) -> str:
    if isinstance(shard, dict):
        return f"shard {shard.get('index')} of --num_shards {shard.get('count')}"
    return "one unsharded run"


def _close(a: object, b: float) -> bool:
    try:
        return abs(float(a) - b) < 1e-9  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def write_manifest(output_dir: Path, options: PrepareOptions, shard: dict[str, int] | None = None) -> dict[str, Any]:
    """Writes ``manifest.json`` listing every finished scene and the splits (atomically) and returns it.

    ``shard`` (a part folder of a sharded run) is recorded last; its splits are those of its own
    scenes only (the merge assigns them again over all parts, see :mod:`midi.data.shards`).
    """
    old = read_old_manifest(output_dir) or {}
    records = finished_scenes(output_dir)
    split_settings = {"val_fraction": options.val_fraction, "test_fraction": options.test_fraction,
                      "seed": options.seed}
    # Scenes of earlier runs keep their split; only new scenes are assigned.
    existing = old.get("splits") if old.get("split_settings") == split_settings else None
    scenes = [{"id": sid, "objects": [o["name"] for o in rec.get("objects", [])],
               "views": [v["name"] for v in rec.get("views", [])]} for sid, rec in records.items()]
    splits = layout.assign_splits(list(records), options.val_fraction, options.test_fraction, options.seed,
                                  existing=existing)
    manifest = {"format": layout.FORMAT, "version": layout.VERSION, **settings(options), "scenes": scenes,
                "splits": splits, "split_settings": split_settings}
    if shard is not None:
        manifest["shard"] = dict(shard)
    write_json(Path(output_dir) / layout.MANIFEST, manifest)
    return manifest
