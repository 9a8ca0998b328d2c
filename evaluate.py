#!/usr/bin/env python
"""Scores generated scenes against ground truth (CD, F-score, bbox IoU) under a declared protocol.

Examples::

    python evaluate.py --gt data/my_scenes --split val --pred results/ --output_dir eval/base
    python evaluate.py --gt data/my_scenes --generate --lora_path outputs/midi-lora --output_dir eval/lora
    accelerate launch evaluate.py --gt data/my_scenes --generate --output_dir eval/base   # scenes sharded
    python evaluate.py --compare eval/base/metrics.json eval/lora/metrics.json --output_dir eval/base-vs-lora

``--pred`` is a folder of ``<scene id>.glb`` as ``inference_with_lora.py`` writes them (one node per
instance, ``instance_<label>`` or the object's name), or another prepared dataset (gt vs itself:
F = 1, CD = 0). ``--generate`` makes them first (``<output_dir>/predictions`` unless ``--pred``),
resumably. Writes ``metrics.json`` (protocol, run, summary, per scene), ``metrics.csv`` and
``comparison.png`` (input | gt | prediction of a few scenes); ``--compare`` writes ``comparison.json``,
``differences.png`` (per-scene differences) and ``comparison.png`` (input | gt | A | B). Definitions: :mod:`midi.evaluation.metrics`.

Exit status: 0 done; 1 some scene failed (one line each, the scene counts as failed, never
skipped); 2 unusable arguments (``error: ...``, nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

import midi
from midi.data.atomic import write_json, write_text
from midi.data.dataset import open_dataset
from midi.data.images import save_png
from midi.data.layout import detect_layout
from midi.errors import DataError
from midi.evaluation import ALIGNMENTS, MAX_OBJECT_CD, score_points
from midi.evaluation.metrics import ICP_ITERATIONS, ICP_POINTS, ICP_TOLERANCE
from midi.evaluation.predictions import (
    EvalError,
    find_scene_file,
    load_truth,
    predict_from_dataset,
    predict_from_file,
)
from midi.evaluation.report import (
    compare,
    comparison_image,
    csv_text,
    difference_image,
    format_comparison,
    format_table,
    input_image,
    side_by_side,
    summarise,
)

logger = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (argparse exits with status 2 on malformed options)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--gt", type=Path, help="ground truth: a prepared dataset or a 3D-Front (MIDI) root")
    io.add_argument("--split", default="val", choices=("train", "val", "test", "all"))
    io.add_argument("--pred", type=Path, help="folder of <scene id>.glb, or another prepared dataset")
    io.add_argument("--output_dir", type=Path, help="where metrics.json, metrics.csv and comparison.png go")
    io.add_argument(
        "--compare", type=Path, nargs=2, metavar=("A", "B"), help="paired comparison of two metrics.json"
    )
    io.add_argument("--max_scenes", type=int, help="only the first N scenes of the split")
    io.add_argument("--num_renders", type=int, default=4, help="scenes drawn in comparison.png")
    io.add_argument("--no_progress", action="store_true")

    proto = p.add_argument_group("protocol")
    proto.add_argument(
        "--align",
        default="icp",
        choices=ALIGNMENTS,
        help="icp: correct rigid ICP; icp_upstream: upstream's buggy ICP (only to compare with "
        "published MIDI numbers); none; similarity: translation + uniform scale",
    )
    proto.add_argument(
        "--tau", type=float, nargs="+", default=[0.1], help="F-score thresholds (first = *_fscore)"
    )
    proto.add_argument("--num_points", type=int, default=20480, help="points per instance, pred and gt")
    proto.add_argument("--sampling_seed", type=int, default=0, help="seed of the gt subsets and pred samples")
    proto.add_argument("--view", type=int, default=0, help="gt view: its visible instances are scored")
    proto.add_argument(
        "--missing_cd",
        type=float,
        default=MAX_OBJECT_CD,
        help="object CD charged to a missing instance (default: the normalised upper bound)",
    )
    proto.add_argument(
        "--icp_points", type=int, default=ICP_POINTS, help="align icp: points the fit uses (0 = all)"
    )
    proto.add_argument("--workers", type=int, default=1, help="KD-tree query threads (-1 = all cores)")

    gen = p.add_argument_group("--generate (inference_with_lora.py's settings)")
    gen.add_argument("--generate", action="store_true", help="generate the split's scenes first (resumable)")
    gen.add_argument(
        "--pretrained_model_name_or_path", default="pretrained_weights/MIDI-3D", help="or 'tiny'"
    )
    gen.add_argument("--lora_path", type=Path)
    gen.add_argument("--lora_scale", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=42, help="generation seed, the same for every scene")
    gen.add_argument("--num_inference_steps", type=int, default=50)
    gen.add_argument("--guidance_scale", type=float, default=7.0)
    gen.add_argument("--octree_depth", type=int, default=8)
    gen.add_argument(
        "--extraction",
        choices=("dense", "coarse_to_fine"),
        default="dense",
        help="coarse_to_fine decodes only near the surface (inference_with_lora.py's flag)",
    )
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    return p.parse_args(argv)


def fail(message: str) -> NoReturn:
    """Prints ``error: <message>`` and exits with status 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args: argparse.Namespace) -> None:
    """Refuses unusable argument combinations (status 2) before any work."""
    if args.gt is None or args.output_dir is None or (args.pred is None and not args.generate):
        fail("give --gt, --output_dir and --pred or --generate (or --compare A B)")
    limits = {
        "--num_points": (args.num_points, 1),
        "--num_renders": (args.num_renders, 0),
        "--view": (args.view, 0),
        "--icp_points": (args.icp_points, 0),
        "--max_scenes": (args.max_scenes or 1, 1),
        "--octree_depth": (args.octree_depth, 1),
        "--num_inference_steps": (args.num_inference_steps, 1),
    }
    for flag, (value, low) in limits.items():
        if value < low:
            fail(f"{flag} must be >= {low}, got {value}")
    if min(args.tau) <= 0:
        fail(f"--tau must be > 0, got {args.tau}")
    if not args.generate and not args.pred.is_dir():
        fail(f"{args.pred}: --pred folder not found")
    if args.lora_path is not None and not args.generate:
        fail("--lora_path needs --generate (for --pred, the LoRA is read from its generation.json)")


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides the numbers; two runs are comparable only when these are equal."""
    return {
        "gt": str(args.gt.resolve()),
        "split": args.split,
        "view": args.view,
        "points_per_instance": args.num_points,
        "sampling_seed": args.sampling_seed,
        "align": args.align,
        "tau": args.tau,
        "icp": {
            "iterations": ICP_ITERATIONS,
            "tolerance": ICP_TOLERANCE,
            "fit_points": None if args.align == "icp_upstream" else (args.icp_points or None),
        },
        "cd": "squared nearest distances: mean pred->gt + mean gt->pred",
        "fscore": "plain nearest distances < tau; F = 2PR/(P+R+1e-8)",
        "object_metrics": "per-instance per-axis min-max normalisation to [-0.95, 0.95], then aligned",
        "iou_bbox": "axis-aligned bbox IoU of the raw clouds, mean over instances",
        "instances": "visible in the view (mask > 0.1% of the image), matched by id/name",
        "missing_instance": {"fscore": 0.0, "cd": args.missing_cd, "iou_bbox": 0.0},
    }


def score_scene(
    record: Any, args: argparse.Namespace, pred_dir: Path, pred_records: dict | None
) -> tuple[dict, Any]:
    """Scores one scene; returns its ``metrics.json`` entry and ``(gt, pred)`` clouds for the renders."""
    entry: dict[str, Any] = {"scene_id": record.scene_id, "status": "failed", "metrics": None, "error": None}
    try:
        truth = load_truth(record, args.num_points, args.sampling_seed, args.view)
        if pred_records is None:
            pred = predict_from_file(
                find_scene_file(pred_dir, record.scene_id), record, truth, args.num_points, args.sampling_seed
            )
        elif record.scene_id in pred_records:
            pred = predict_from_dataset(
                pred_records[record.scene_id], truth, args.num_points, args.sampling_seed
            )
        else:
            raise EvalError(f"{pred_dir}: scene {record.scene_id} missing from the predicted dataset")
        entry["instances"] = {
            "matched": [n for n, p in zip(truth.names, pred.points) if p is not None],
            "missing": pred.missing(truth),
            "extra": sorted(pred.extra),
            "ignored": pred.ignored,
            "not_visible": truth.not_visible,
        }
        if len(entry["instances"]["missing"]) == len(truth.names):
            raise EvalError(
                f"{record.scene_id}: no predicted instance matches the ground truth "
                f"(predicted: {', '.join(sorted(pred.extra)) or 'none'})"
            )
        entry["metrics"] = score_points(
            pred.points,
            truth.points,
            args.align,
            args.tau,
            extra=list(pred.extra.values()),
            missing_cd=args.missing_cd,
            icp_points=args.icp_points or None,
            seed=args.sampling_seed,
            workers=args.workers,
        )
        entry["status"] = "ok"
        return entry, (truth.points, [*pred.points, *pred.extra.values()])
    except (EvalError, ValueError) as exc:
        entry["error"] = " ".join(str(exc).split())
        return entry, None


def problems(scenes: list[dict], missing_cd: float) -> list[str]:
    """One line per failed scene and per scene with missing or extra instances."""
    lines = []
    for s in scenes:
        inst = s.get("instances", {})
        if s["status"] != "ok":
            lines.append(f"{s['scene_id']}: failed: {s['error']}")
        if inst.get("missing") and s["status"] == "ok":
            lines.append(
                f"{s['scene_id']}: missing instances {', '.join(inst['missing'])} "
                f"(scored F = 0, CD = {missing_cd:g}, IoU = 0)"
            )
        if inst.get("extra"):
            lines.append(f"{s['scene_id']}: extra instances {', '.join(inst['extra'])} (scene level only)")
    return lines


def run_compare(args: argparse.Namespace) -> int:
    """``--compare A B``: prints the paired comparison; writes it when ``--output_dir`` is given."""
    runs = []
    for path in args.compare:
        try:
            runs.append(json.loads(path.read_text()))
            runs[-1]["scenes"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            fail(f"{path}: not a metrics.json ({type(exc).__name__}: {exc})")
    try:
        result = compare(*runs)
    except EvalError as exc:
        fail(f"{args.compare[0]} vs {args.compare[1]}: {exc}")
    result["files"] = [str(p) for p in args.compare]
    print(format_comparison(result))
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(args.output_dir / "comparison.json", result)
        save_png(args.output_dir / "differences.png", difference_image(result))
        written = ["comparison.json", "differences.png"]
        sheet = side_by_side(runs, result, args.num_renders)
        if sheet is not None:
            save_png(args.output_dir / "comparison.png", sheet)
            written.append("comparison.png")
        print(f"wrote {', '.join(written)} in {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns 0, or 1 when a scene failed (exits 2 on unusable arguments)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.compare is not None:
        return run_compare(args)
    check_args(args)
    try:
        records = open_dataset(args.gt, args.split)[: args.max_scenes]
        if not records:
            raise DataError(f"{args.gt}: split {args.split!r} has no scenes")
        pred_dir = args.pred or args.output_dir / "predictions"
        pred_records = None
        if not args.generate and detect_layout(pred_dir) is not None:
            pred_records = {r.scene_id: r for r in open_dataset(pred_dir, "all")}
    except DataError as exc:
        fail(str(exc))
    generation = None
    if args.generate:
        # Imported here: scoring alone needs neither torch nor the model code.
        from midi.evaluation import generation as gen

        settings = gen.GenerationSettings(
            args.pretrained_model_name_or_path,
            args.lora_path,
            args.lora_scale,
            args.seed,
            args.num_inference_steps,
            args.guidance_scale,
            args.octree_depth,
            args.view,
            args.dtype,
            args.device,
            args.extraction,
        )
        try:
            generation = gen.prepare_output(pred_dir, settings)
            gen.generate(records, pred_dir, settings, progress=not args.no_progress)
        except EvalError as exc:
            fail(str(exc))
        if not gen.is_main_process():
            return 0
    elif (pred_dir / "generation.json").is_file():
        generation = json.loads((pred_dir / "generation.json").read_text())

    scenes, renders = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("once")  # icp_upstream's warning: once per run, not per scene
        for record in tqdm(records, desc="scoring", unit="scene", disable=args.no_progress):
            entry, clouds = score_scene(record, args, pred_dir, pred_records)
            scenes.append(entry)
            if clouds is not None and len(renders) < args.num_renders:
                renders.append((record.scene_id, input_image(record, args.view), list(clouds)))
    report = {
        "protocol": protocol(args),
        "run": {
            "pred": str(pred_dir.resolve()),
            "pred_kind": "dataset" if pred_records is not None else "scene files",
            "generation": generation,
            "toolkit": {"name": "midi-lora", "version": midi.__version__},
            "command": sys.argv[1:] if argv is None else argv,
        },
        "summary": summarise(scenes),
        "problems": problems(scenes, args.missing_cd),
        "scenes": scenes,
    }
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(args.output_dir / "metrics.json", report)
        write_text(args.output_dir / "metrics.csv", csv_text(scenes))
        if renders:
            save_png(args.output_dir / "comparison.png", comparison_image(renders))
    except OSError as exc:
        fail(f"{exc.filename or args.output_dir}: {exc.strerror or exc}")
    for line in report["problems"]:
        print(f"{'error' if ': failed: ' in line else 'warning'}: {line}", file=sys.stderr)
    print(format_table(report["summary"]))
    print(
        f"protocol: align {args.align}, tau {args.tau}, {args.num_points} points per instance, seed "
        f"{args.sampling_seed}; wrote {args.output_dir / 'metrics.json'}"
    )
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
