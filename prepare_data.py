"""Prepare, check or synthesise MIDI-3D training data (layout "midi-scenes" v1).

Prepare meshes (and optional scene images with instance id maps) into training data::

    python prepare_data.py --input_dir data/raw_scenes --output_dir data/scenes
    python prepare_data.py --input_dir data/raw_scenes --output_dir data/scenes --workers 8 --views 4
    python prepare_data.py --input_dir data/objects --output_dir data/objects_prepared --single_object
    python prepare_data.py --input_dir data/3d-front --output_dir data/front_prepared   # convert 3D-Front

Check a prepared dataset (or a 3D-Front root in place); writes check_report.json and
contact_sheet.png into the dataset (or --report_dir)::

    python prepare_data.py --check data/scenes

Make seeded synthetic scenes (primitives on a floor, rendered with id maps)::

    python prepare_data.py --synthetic 100 --output_dir data/synthetic --image_size 256
    python prepare_data.py --synthetic 100 --synthetic_domain target --output_dir data/furniture --image_size 256

Many machines: each array job prepares one shard into its own part folder (resumable), then one
merge joins the parts; manifest, splits and scene files equal those of one run on one machine::

    python prepare_data.py --input_dir data/raw_scenes --output_dir data/parts/part-3 --num_shards 8 --shard_index 3
    python prepare_data.py --merge data/parts/part-0 data/parts/part-1 --output_dir data/scenes

Export a prepared dataset in upstream MIDI-3D's 3D-Front layout (3D-FRONT-RENDER/<house>/<room>/
render_0000.webp + semantic_0000.png, 3D-FRONT-SURFACE/<house>/<room>/<object>.npy, the room and
furniture id lists, the data config for upstream's loader in midi_data_config.yaml); surfaces need
at least --num_samples points (20480, what upstream's loader samples)::

    python prepare_data.py --export_midi data/scenes --output_dir data/scenes-midi

Inputs (--input_dir): a folder per scene with one mesh file per object (OBJ, GLB/GLTF, PLY, STL,
OFF; scene-graph transforms applied, all objects in one frame), optionally with scene images and id
maps (X.png + X_ids.png or X_seg.png, X_rgb.png + X_seg.png) and an optional instances.json
naming the mesh of each id (a list of file names, id k+1 = entry k, or {"1": "chair.obj", ...});
textures (files a mesh or an .mtl refers to, e.g. material_0.png) are never taken for scene images;
mesh files at the top level are scene files whose nodes are the instances (--single_object: one
object each, normalised alone); a 3D-Front (MIDI) root is converted room by room.

Defaults: 20480 surface samples per object (area-weighted, face normals, seeded by --seed); scenes
normalised jointly into [-0.95, 0.95]^3 (--margin 0.05); 512 px square images (non-square inputs
padded with the background, id maps resized nearest-neighbour); scenes without images rendered
from elevation 30, azimuth 45, fov 40, distance fitted (--views N spreads azimuths evenly);
white background; splits by a seeded hash of the scene id with --val_fraction 0.1 (at least one
val scene when there are two or more) and --test_fraction 0.0; all cores.

Surfaces and renders (TRAINING_README.md, "Data"): --watertight samples each mesh's watertight shell
(seconds per object); --renderer blender renders textured Cycles views with re-lit twins through
bpy (embree, flat colours, stays the default and the fallback); --check DIR --vae MODEL round-trips
every object through MODEL's VAE and flags poor reconstructions.

Re-running skips finished scenes (and keeps their splits); bad scenes are skipped with a one-line
reason; objects left out (hidden in every view, in no id map) and meshes repaired (faces with NaN
vertices removed) are warnings in the summary and in --check; a full disk stops the run. A run holds
<output_dir>/.prepare.lock (its pid): a second run into the same folder is refused while it lives,
and its workers exit if it is killed. Names in manifests, instances.json and 3D-Front lists must
stay inside their folder.
Exit codes: 0 clean; 1 some scene was skipped (or --check found errors); 2 usage error, or
--strict and a scene failed (or --check --strict found warnings).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from midi.data.blender import ENV_PYTHON, RENDERERS, BlenderSettings, unavailable_note
from midi.data.camera import Camera
from midi.data.check import check_dataset
from midi.data.export_midi import export_midi
from midi.data.images import parse_background
from midi.data.jobs import PrepareOptions
from midi.data.prepare import prepare_dataset, prepare_synthetic
from midi.data.shards import merge_parts
from midi.errors import UsageError, run_cli

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input_dir", type=Path, help="scene folders / scene files / a 3D-Front root to prepare")
    mode.add_argument("--check", type=Path, metavar="DIR", help="validate a prepared dataset or a 3D-Front root")
    mode.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic scenes")
    mode.add_argument("--merge", type=Path, nargs="+", metavar="PART", help="join the part folders of a sharded run")
    mode.add_argument("--export_midi", type=Path, metavar="DIR",
                      help="export a prepared dataset in upstream MIDI's 3D-Front layout")
    p.add_argument("--synthetic_domain", choices=("base", "target"), default="base",
                   help="--synthetic: base = primitives, target = furniture (tables, chairs, shelves) (base)")
    p.add_argument("--output_dir", type=Path, help="dataset root to write (prepare, --synthetic, --merge, --export_midi)")
    p.add_argument("--num_samples", type=int, default=20480, help="surface samples per object (20480); "
                   "--export_midi: the count upstream's loader samples (num_surface_samples_per_object)")
    p.add_argument("--image_size", type=int, default=512, help="side of the square images (512)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (all cores)")
    p.add_argument("--surface_format", choices=("npy", "npz"), default="npy", help="surface file format (npy)")
    p.add_argument("--single_object", action="store_true", help="top-level mesh files are single objects")
    p.add_argument("--margin", type=float, default=0.05, help="normalise scenes into [-(1-m), 1-m]^3 (0.05)")
    p.add_argument("--views", type=int, default=1, help="rendered views per scene (1)")
    p.add_argument("--render", choices=("auto", "always", "never"), default="auto",
                   help="render scenes without images (auto), always, or never")
    p.add_argument("--elevation", type=float, default=30.0, help="camera elevation in degrees (30)")
    p.add_argument("--azimuth", type=float, default=45.0, help="azimuth of the first view in degrees (45)")
    p.add_argument("--distance", type=float, default=None, help="camera distance (fitted to the scene)")
    p.add_argument("--fov", type=float, default=40.0, help="vertical field of view in degrees (40)")
    p.add_argument("--background", default="white", help="white, black, gray, a grey level or r,g,b (white)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="fraction of val scenes (0.1)")
    p.add_argument("--test_fraction", type=float, default=0.0, help="fraction of test scenes (0.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, splits and synthetic scenes (0)")
    p.add_argument("--strict", action="store_true", help="stop with exit code 2 at the first skipped scene")
    p.add_argument("--report_dir", type=Path, help="--check: where to write the report and contact sheet")
    p.add_argument("--min_mask_fraction", type=float, default=0.001, help="--check: tiny-mask threshold (0.001)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--num_shards", type=int, help="prepare only one of this many shards (into its own --output_dir)")
    p.add_argument("--shard_index", type=int, help="the shard to prepare, 0..num_shards-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    # Surfaces, the VAE round trip (midi.data.watertight, midi.data.vae_check)
    p.add_argument("--watertight", action=argparse.BooleanOptionalAction, default=False,
                   help="sample each mesh's watertight shell instead of its raw faces (off: costs seconds per object)")
    p.add_argument("--watertight_resolution", type=int, default=256,
                   help="--watertight: grid cells along each object's longest side (256)")
    p.add_argument("--vae", metavar="MODEL", help="--check: round-trip every object through MODEL's VAE "
                   "(tiny or a pipeline folder) and flag poor reconstructions")
    p.add_argument("--vae_threshold", type=float, default=0.9, help="--vae: flag objects with an F-score below (0.9)")
    p.add_argument("--vae_tau", type=float, default=0.1, help="--vae: F-score distance threshold (0.1)")
    p.add_argument("--vae_octree_depth", type=int, help="--vae: extraction depth (6 for tiny, else 8)")
    p.add_argument("--vae_device", help="--vae: torch device (cuda when available)")
    # The Blender renderer (midi.data.blender)
    p.add_argument("--renderer", choices=RENDERERS, default="embree",
                   help="embree: flat colours, fast (default); blender: textured Cycles renders (needs bpy)")
    p.add_argument("--blender_samples", type=int, default=64, help="--renderer blender: samples per pixel (64)")
    p.add_argument("--blender_device", choices=("auto", "cpu", "cuda", "optix"), default="auto",
                   help="--renderer blender: auto = OptiX, else CUDA, else CPU")
    p.add_argument("--lighting", default="sun_sky", help="--renderer blender: sun_sky, or an HDRI file (sun_sky)")
    p.add_argument("--relight", action=argparse.BooleanOptionalAction, default=True,
                   help="--renderer blender: add a re-lit rendering of every view as an extra view (on)")
    p.add_argument("--transparent", action="store_true", help="--renderer blender: RGBA views, no background")
    p.add_argument("--blender_python", help=f"--renderer blender: interpreter with bpy (this one, else ${ENV_PYTHON})")
    return p


def make_options(args: argparse.Namespace) -> PrepareOptions:
    """Builds the prepare settings from parsed arguments.

    Raises:
        UsageError: Bad values.
    """
    try:
        background = parse_background(args.background)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 0.0 <= args.margin < 1.0:
        raise UsageError(f"--margin must be in [0, 1), got {args.margin}")
    if not (0.0 <= args.val_fraction and 0.0 <= args.test_fraction and args.val_fraction + args.test_fraction < 1.0):
        raise UsageError("--val_fraction and --test_fraction must be >= 0 and sum to less than 1")
    if args.watertight_resolution < 8:
        raise UsageError(f"--watertight_resolution must be >= 8, got {args.watertight_resolution}")
    if args.blender_samples < 1 or not (args.lighting == "sun_sky" or Path(args.lighting).is_file()):
        raise UsageError("--blender_samples must be >= 1 and --lighting sun_sky or an existing HDRI file")
    blender = BlenderSettings(samples=args.blender_samples, device=args.blender_device,
                              lighting=args.lighting if args.lighting == "sun_sky" else str(Path(args.lighting).resolve()),
                              relight=args.relight, transparent=args.transparent, python=args.blender_python)
    renderer = args.renderer
    if renderer == "blender" and (note := unavailable_note(blender)):
        print(note, file=sys.stderr)
        renderer = "embree"
    return PrepareOptions(
        num_samples=args.num_samples, image_size=args.image_size, surface_format=args.surface_format,
        bound=1.0 - args.margin, views=args.views, camera=Camera(args.elevation, args.azimuth, args.distance, args.fov),
        background=background, render=args.render, seed=args.seed, single_object=args.single_object,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        watertight=args.watertight, watertight_resolution=args.watertight_resolution, renderer=renderer,
        blender=blender,
    )


def run_check(args: argparse.Namespace) -> int:
    """``--check``: validate (``--vae``: and round-trip through a VAE), print the summary, return the exit code."""
    round_trip = None
    if args.vae is not None:
        if not 0.0 <= args.vae_threshold <= 1.0 or not args.vae_tau > 0:
            raise UsageError("--vae_threshold must be in [0, 1] and --vae_tau > 0")
        from midi.data import vae_check  # deferred: torch and the model code load only for --vae

        def round_trip(records):
            return vae_check.vae_round_trip(records, args.vae, tau=args.vae_tau, threshold=args.vae_threshold,
                                            octree_depth=args.vae_octree_depth, device=args.vae_device)
    report = check_dataset(args.check, args.report_dir, min_mask_fraction=args.min_mask_fraction,
                           round_trip=round_trip)
    print(report.summary())
    if report.errors:
        return EXIT_SKIPPED
    return EXIT_USAGE if args.strict and report.warnings else EXIT_OK


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare or ``--synthetic``: run, print the summary, return the exit code."""
    if args.output_dir is None:
        raise UsageError("--output_dir is required")
    options = make_options(args)
    common = {"workers": max(1, args.workers), "progress": not args.no_progress, "strict": args.strict,
              "shard": shard_of_args(args)}
    if args.synthetic is not None:
        if args.synthetic < 1:
            raise UsageError("--synthetic needs N >= 1")
        report = prepare_synthetic(args.output_dir, args.synthetic, seed=args.seed, options=options,
                                   domain=args.synthetic_domain, **common)
    else:
        report = prepare_dataset(args.input_dir, args.output_dir, options, **common)
    print(report.summary())
    if report.skipped:
        return EXIT_USAGE if args.strict else EXIT_SKIPPED
    return EXIT_OK


def shard_of_args(args: argparse.Namespace) -> tuple[int, int] | None:
    """``(index, count)`` from ``--shard_index``/``--num_shards`` (None when neither is given)."""
    if (args.num_shards is None) != (args.shard_index is None):
        raise UsageError("--num_shards and --shard_index go together")
    if args.num_shards is not None and (args.input_dir is None and args.synthetic is None):
        raise UsageError("--num_shards/--shard_index shard a prepare run (--input_dir or --synthetic)")
    return None if args.num_shards is None else (args.shard_index, args.num_shards)


def run_merge(args: argparse.Namespace) -> int:
    """``--merge``: join the parts, print the summary; 1 when a part had skipped scenes."""
    if args.output_dir is None:
        raise UsageError("--output_dir is required")
    report = merge_parts(args.merge, args.output_dir, progress=not args.no_progress)
    print(report.summary())
    return EXIT_SKIPPED if report.part_skipped else EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    """``--export_midi``: export, print the summary; 1 when a room was skipped."""
    if args.output_dir is None:
        raise UsageError("--output_dir is required")
    report = export_midi(args.export_midi, args.output_dir, min_points=args.num_samples, workers=max(1, args.workers))
    print(report.summary())
    return EXIT_SKIPPED if report.skipped else EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    shard_of_args(args)  # refuses shard flags outside a prepare run
    if args.merge is not None:
        return run_merge(args)
    if args.export_midi is not None:
        return run_export(args)
    return run_check(args) if args.check is not None else run_prepare(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (a usage or data error, or a full disk: one ``error:`` line, 2)."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
