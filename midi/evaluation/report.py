"""What an evaluation run reports: summary with bootstrap intervals, table, CSV, renders, comparison.

A run's ``metrics.json`` holds ``protocol`` (everything that decides the numbers: a run is only
comparable with another of the same protocol), ``run`` (what was evaluated: gt, predictions,
model and LoRA), ``summary``, ``scenes`` (one entry per scene, failed ones included) and
``problems`` (one line per failed scene or missing/extra instance).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import stats

from midi.data.camera import Camera, camera_record, project_points
from midi.data.dataset import SceneRecord, open_dataset
from midi.data.images import instance_colours
from midi.errors import DataError
from midi.evaluation.metrics import higher_is_better
from midi.evaluation.predictions import EvalError, find_scene_file, load_truth, predict_from_file

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
VIEW = Camera(elevation=25.0, azimuth=35.0)


def bootstrap_ci(values: Sequence[float], seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean (a single or constant value: that value)."""
    data = np.asarray(values, np.float64)
    if len(data) < 2 or np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    result = stats.bootstrap(
        (data,),
        np.mean,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def metric_keys(scenes: Sequence[dict]) -> list[str]:
    """The metric names of the scored scenes, in first-seen order."""
    keys: dict[str, None] = {}
    for scene in scenes:
        keys.update(dict.fromkeys(scene.get("metrics") or {}))
    return list(keys)


def summarise(scenes: Sequence[dict]) -> dict[str, Any]:
    """Means and intervals over the scored scenes; failed scenes are counted, not averaged."""
    ok = [s for s in scenes if s["status"] == "ok"]
    metrics = {}
    for key in metric_keys(ok):
        values = [s["metrics"][key] for s in ok]
        metrics[key] = {"mean": float(np.mean(values)), "ci95": list(bootstrap_ci(values))}
    return {"scenes": len(scenes), "scored": len(ok), "failed": len(scenes) - len(ok), "metrics": metrics}


def format_table(summary: dict[str, Any]) -> str:
    """The printed summary: one metric per line, mean and 95 % bootstrap interval."""
    lines = [
        f"{'metric':<22}{'mean':>12}   95% bootstrap interval",
    ]
    for key, m in summary["metrics"].items():
        lines.append(f"{key:<22}{m['mean']:>12.6f}   [{m['ci95'][0]:.6f}, {m['ci95'][1]:.6f}]")
    lines.append(f"{summary['scored']} of {summary['scenes']} scenes scored, {summary['failed']} failed")
    return "\n".join(lines)


def csv_text(scenes: Sequence[dict]) -> str:
    """One row per scene: id, status, the metrics, missing/extra instances, error."""
    keys = metric_keys(scenes)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["scene_id", "status", *keys, "missing", "extra", "error"])
    for s in scenes:
        inst = s.get("instances", {})
        writer.writerow(
            [
                s["scene_id"],
                s["status"],
                *[(s.get("metrics") or {}).get(k, "") for k in keys],
                ";".join(inst.get("missing", [])),
                ";".join(inst.get("extra", [])),
                s.get("error") or "",
            ]
        )
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- comparison
def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired comparison of two runs (``b - a``) on the scenes both scored.

    Raises:
        EvalError: the protocols differ, or no scene was scored by both.
    """
    if a.get("protocol") != b.get("protocol"):
        pa, pb = a.get("protocol") or {}, b.get("protocol") or {}
        differ = sorted(k for k in pa.keys() | pb.keys() if pa.get(k) != pb.get(k))
        raise EvalError(
            f"the two runs used different protocols ({', '.join(differ)} differ); their numbers are "
            "not comparable"
        )
    scores_a = {s["scene_id"]: s["metrics"] for s in a["scenes"] if s["status"] == "ok"}
    scores_b = {s["scene_id"]: s["metrics"] for s in b["scenes"] if s["status"] == "ok"}
    common = [sid for sid in scores_a if sid in scores_b]
    if not common:
        raise EvalError("no scene was scored by both runs")
    metrics = {}
    for key in [k for k in metric_keys(a["scenes"]) if k in metric_keys(b["scenes"])]:
        diff = np.array([scores_b[sid][key] - scores_a[sid][key] for sid in common])
        better = diff > 0 if higher_is_better(key) else diff < 0
        metrics[key] = {
            "mean_a": float(np.mean([scores_a[s][key] for s in common])),
            "mean_b": float(np.mean([scores_b[s][key] for s in common])),
            "mean_diff": float(np.mean(diff)),
            "ci95": list(bootstrap_ci(diff)),
            "improved": int(better.sum()),
            "worse": int(((diff != 0) & ~better).sum()),
            "per_scene": dict(zip(common, diff.tolist())),
        }
    only = sorted(scores_a.keys() ^ scores_b.keys())
    return {
        "protocol": a["protocol"],
        "a": a.get("run"),
        "b": b.get("run"),
        "paired_scenes": len(common),
        "unpaired_scenes": only,
        "metrics": metrics,
    }


def format_comparison(result: dict[str, Any]) -> str:
    """The printed comparison: per metric, both means, the paired difference and its interval."""
    lines = [
        f"{'metric':<22}{'A':>11}{'B':>11}{'B - A':>12}   95% interval        improved/worse",
    ]
    for key, m in result["metrics"].items():
        lines.append(
            f"{key:<22}{m['mean_a']:>11.5f}{m['mean_b']:>11.5f}{m['mean_diff']:>+12.5f}   "
            f"[{m['ci95'][0]:+.5f}, {m['ci95'][1]:+.5f}]  {m['improved']}/{m['worse']}"
        )
    lines.append(
        f"{result['paired_scenes']} paired scenes"
        + (
            f"; scored by only one run: {', '.join(result['unpaired_scenes'])}"
            if result["unpaired_scenes"]
            else ""
        )
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- images
def splat(clouds: Sequence[np.ndarray | None], camera: dict[str, Any], size: int) -> np.ndarray:
    """Renders point clouds (one colour each, darker with depth) as ``(size, size, 3)`` uint8."""
    colours = instance_colours(len(clouds))
    present = [(c, k) for k, c in enumerate(clouds) if c is not None and len(c)]
    image = np.full((size * size, 3), 255, np.uint8)
    if not present:
        return image.reshape(size, size, 3)
    points = np.concatenate([c for c, _ in present])  # (N, 3)
    owner = np.concatenate([np.full(len(c), k) for c, k in present])
    uv, depth = project_points(camera, points)
    px = np.floor(uv).astype(np.int64)
    inside = (depth > 0) & (px >= 0).all(1) & (px < size).all(1)
    pixel, depth, owner = px[inside, 1] * size + px[inside, 0], depth[inside], owner[inside]
    order = np.lexsort((depth, pixel))  # per pixel, nearest first
    first = order[np.unique(pixel[order], return_index=True)[1]]
    near, far = depth.min(), depth.max()
    shade = 1.0 - 0.5 * (depth[first] - near) / max(far - near, 1e-9)
    image[pixel[first]] = np.clip(colours[owner[first]] * shade[:, None] * 255, 0, 255).astype(np.uint8)
    return image.reshape(size, size, 3)


def comparison_image(
    rows: Sequence[tuple[str, Image.Image | None, list[list[np.ndarray | None]]]],
    labels: Sequence[str] = ("ground truth", "prediction"),
    size: int = 256,
) -> Image.Image:
    """One row per scene: its input image (when given), then one point render per column.

    ``rows`` holds ``(scene id, input image or None, clouds per column)``, the first column being
    the ground truth (it frames the camera); ``labels`` names the columns.
    """
    with_input = any(image is not None for _, image, _ in rows)
    columns = [*(["input"] if with_input else []), *labels]
    sheet = Image.new("RGB", (len(columns) * size, len(rows) * (size + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (scene_id, image, clouds) in enumerate(rows):
        cloud = np.concatenate([c for c in clouds[0] if c is not None])
        lo, hi = cloud.min(0), cloud.max(0)
        centre = (lo + hi) / 2
        camera = camera_record(
            Camera(VIEW.elevation, VIEW.azimuth, target=tuple(centre.tolist())),
            float(np.linalg.norm(hi - lo) / 2) or 1.0,
            size,
            size,
        )
        top = r * (size + 16)
        tiles = [Image.fromarray(splat(col, camera, size)) for col in clouds]
        if with_input:
            tiles.insert(0, image.convert("RGB").resize((size, size)) if image is not None else None)
        for c, tile in enumerate(tiles):
            if tile is not None:
                sheet.paste(tile, (c * size, top + 16))
        for c, label in enumerate(columns):
            draw.text((c * size + 4, top + 2), f"{scene_id}: {label}" if c == 0 else label, fill="black")
    return sheet


def input_image(record: SceneRecord, view: int) -> Image.Image | None:
    """The scene image a prediction was generated from (None when it cannot be read)."""
    try:
        with Image.open(record.views[view][0]) as image:
            return image.convert("RGB")
    except (OSError, IndexError):
        return None


def side_by_side(runs: list[dict[str, Any]], result: dict[str, Any], count: int) -> Image.Image | None:
    """input | ground truth | A | B for the first ``count`` paired scenes, when both runs' predictions
    and the ground truth are still where their metrics.json says (None otherwise)."""
    proto = result["protocol"]
    try:
        records = {r.scene_id: r for r in open_dataset(Path(proto["gt"]), proto["split"])}
    except DataError:
        return None
    rows = []
    for scene_id in [sid for sid in result["metrics"]["scene_fscore"]["per_scene"]][:count]:
        try:
            record = records[scene_id]
            truth = load_truth(record, proto["points_per_instance"], proto["sampling_seed"], proto["view"])
            preds = []
            for run in runs:
                pred = predict_from_file(
                    find_scene_file(Path(run["run"]["pred"]), scene_id),
                    record,
                    truth,
                    proto["points_per_instance"],
                    proto["sampling_seed"],
                )
                preds.append([*pred.points, *pred.extra.values()])
        except (KeyError, TypeError, EvalError, DataError, ValueError):
            continue
        rows.append((scene_id, input_image(record, proto["view"]), [truth.points, *preds]))
    return comparison_image(rows, ("ground truth", "A", "B")) if rows else None


def difference_image(
    result: dict[str, Any], key: str = "scene_fscore", width: int = 640, height: int = 260
) -> Image.Image:
    """Bar chart of the per-scene paired differences ``B - A`` of ``key``, sorted (green = better)."""
    m = result["metrics"][key]
    values = np.array(sorted(m["per_scene"].values()))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (8, 4),
        f"{key}: B - A per scene (mean {m['mean_diff']:+.4f}, 95% [{m['ci95'][0]:+.4f}, "
        f"{m['ci95'][1]:+.4f}], {m['improved']} improved, {m['worse']} worse)",
        fill="black",
    )
    top, bottom = 24, height - 8
    scale = max(float(np.abs(values).max()), 1e-12)
    zero = (top + bottom) / 2
    bar = (width - 16) / len(values)
    for i, v in enumerate(values):
        better = v > 0 if higher_is_better(key) else v < 0
        y = zero - v / scale * (bottom - top) / 2
        x0 = 8 + i * bar
        draw.rectangle(
            [x0, min(y, zero), x0 + max(bar - 1, 1), max(y, zero)],
            fill=(40, 160, 60) if better else (200, 60, 50),
        )
    draw.line([8, zero, width - 8, zero], fill="black")
    return image
