#!/usr/bin/env python
"""One image and its instance map -> a 3D scene (one mesh per instance), with or without a LoRA.

Examples::

    python inference_with_lora.py --rgb_image room_rgb.png --seg_image room_seg.png --output room.glb
    python inference_with_lora.py --rgb_image room_rgb.png --seg_image room_seg.png --output room.glb \\
        --lora_path outputs/my-run --lora_scale 0.8 --extraction coarse_to_fine
    python inference_with_lora.py --input_dir scenes/ --output_dir results/ --format glb
    python inference_with_lora.py ... --pretrained_model_name_or_path tiny   # small random demo model

Writes ``room.glb`` (one node per instance, named ``instance_<label>``), ``room.png`` (a preview)
and, with ``--save_instances``, ``room_<name>.glb`` per instance. See :mod:`midi.inference.scene`
for the accepted instance maps and the instance order.

Exit status: 0 done; 2 bad input (one line ``error: <file>: <problem>`` on stderr, nothing
written); 1 an output that cannot be written (``error: <file>: <reason>``, e.g. disk full or no
permission; none of that scene's files is left, and batch mode stops there since the next scenes
would fail the same way; scenes already done are kept), a scene that produced no surface at all,
or one that ran out of memory (``error: <scene>: out of memory during <stage>; ...``; batch mode
goes on with the next scene after these two). For upstream's results on RGBA images add ``--rgba upstream``
to ``--instance_order upstream`` (see :mod:`midi.inference.scene`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from midi.config import DEFAULT_MODEL_DIR, check_model_path, is_tiny
from midi.errors import InputError, OutOfMemory, one_line, run_cli
from midi.inference.export import MESH_FORMATS, output_format, save_outputs, summary_line
from midi.inference.scene import InputOptions, find_pairs, prepare_scene, read_label_names

logger = logging.getLogger("inference_with_lora")
TINY_OCTREE_DEPTH = 6  # the tiny model's surfaces are coarse: depth 8 takes minutes and writes ~100 MB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line (argparse exits with status 2 on malformed options)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and outputs (one scene, or a folder of X_rgb.png / X_seg.png pairs)")
    io.add_argument("--rgb_image", type=Path, help="scene image (RGBA: see --rgba)")
    io.add_argument("--seg_image", type=Path, help="instance map: palette/grey label map or RGB colour-coded")
    io.add_argument("--output", type=Path, help=f"scene file; format from the extension ({', '.join(MESH_FORMATS)})")
    io.add_argument("--input_dir", type=Path, help="batch mode: folder of X_rgb.png / X_seg.png pairs")
    io.add_argument("--output_dir", type=Path, help="batch mode: writes X.<format> (and X.png) here")
    io.add_argument("--format", default="glb", choices=MESH_FORMATS, help="batch mode: output format")
    io.add_argument("--save_instances", action="store_true", help="also write <stem>_<name>.<ext> per instance")
    io.add_argument("--no_preview", action="store_true", help="do not write the <stem>.png preview")
    io.add_argument("--preview_size", type=int, default=384, help="preview side in pixels")

    seg = p.add_argument_group("instance map")
    seg.add_argument("--instance_order", choices=("default", "upstream"), default="default",
                     help="default: ascending label value (RGB maps: palette index, else luminance); upstream: "
                          "grey level of the map converted to 'L', upstream's instance order (for upstream "
                          "results on RGBA images add --rgba upstream)")
    seg.add_argument("--rgba", choices=("white", "upstream"), default="white",
                     help="transparent scene images: white = composite on white; upstream = drop the alpha "
                          "channel as upstream's convert('RGB') does (hidden pixels keep their stored colour)")
    seg.add_argument("--min_instance_pixels", type=int, default=None,
                     help="RGB maps: colours with fewer pixels are anti-aliased fringe and ignored; "
                          "None = 0.1%% of the image area")
    seg.add_argument("--max_instances", type=int, default=InputOptions.max_instances, help="refuse maps with more instances")
    seg.add_argument("--label_names", type=Path, help='JSON {"<label>": "name"} for the node names')
    seg.add_argument("--do_image_padding", action="store_true", help="upstream's padding around the instances")

    model = p.add_argument_group("model and LoRA")
    model.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL_DIR,
                       help="MIDI-3D pipeline folder, or 'tiny' (small random model for demos/tests)")
    model.add_argument("--lora_path", type=Path, help="training output folder, its lora-final/, a PEFT adapter "
                                                       "folder or an upstream custom-adapter .safetensors")
    model.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength (0 = base model)")
    model.add_argument("--lora_alpha", type=float, default=None,
                       help="the LoRA's alpha, for adapters that do not record it (upstream custom-adapter files "
                            "without midi_adapter.json); None = the recorded one, else rank (with a warning)")
    model.add_argument("--mi_blocks", nargs="+", default=None, metavar="BLOCK",
                       help="multi-instance attention blocks, e.g. blocks.8 blocks.9; None = the LoRA's recorded "
                            "blocks, else the model's (release: blocks.8-12, tiny: blocks.3-4)")
    model.add_argument("--merge_lora", action="store_true", help="fold the scaled LoRA into the weights (faster)")
    model.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                       help="auto: bfloat16 on CUDA, float32 on CPU")

    gen = p.add_argument_group("generation")
    gen.add_argument("--num_inference_steps", type=int, default=50)
    gen.add_argument("--guidance_scale", type=float, default=7.0)
    gen.add_argument("--seed", type=int, default=42, help="-1: unseeded")
    gen.add_argument("--no_progress", action="store_true", help="no progress bars")

    ext = p.add_argument_group("surface extraction")
    ext.add_argument("--octree_depth", type=int, default=None,
                     help=f"resolution: (2^depth + 1)^3 grid; None = 8 (upstream), {TINY_OCTREE_DEPTH} for the tiny model")
    ext.add_argument("--extraction", choices=("dense", "coarse_to_fine"), default="dense",
                     help="dense: every grid point (upstream); coarse_to_fine: only cells near the surface")
    ext.add_argument("--coarse_depth", type=int, default=5, help="coarse_to_fine: first grid depth")
    ext.add_argument("--c2f_dilation", type=int, default=1, help="coarse_to_fine: margin in cells around the surface")
    ext.add_argument("--c2f_band", type=float, default=1.0,
                     help="coarse_to_fine: also refine cells within this many cells of 0 (slope estimate); 0 = off")
    ext.add_argument("--num_chunks", type=int, default=50000, help="points per decoder call (memory bound)")
    ext.add_argument("--decode_progressive", action="store_true",
                     help="dense: upstream's second decode on each instance's box (what upstream's script does; "
                          "twice the decoding)")
    ext.add_argument("--no_smooth", action="store_true", help="skip upstream's 3x3x3 box smoothing")
    ext.add_argument("--vertex_mapping", choices=("upstream", "exact"), default="upstream",
                     help="upstream: index/points (shrinks by 256/257); exact: index/cells")
    args = p.parse_args(argv)
    if args.octree_depth is None:
        args.octree_depth = TINY_OCTREE_DEPTH if is_tiny(args.pretrained_model_name_or_path) else 8
    return args


def check_args(args: argparse.Namespace) -> list[tuple[str, Path, Path, Path]]:
    """Validates options and files without the model; returns ``(name, rgb, seg, output)`` jobs.
    Raises InputError for the first problem found."""
    single = args.rgb_image is not None or args.seg_image is not None or args.output is not None
    if single == (args.input_dir is not None):
        raise InputError("give either --rgb_image/--seg_image/--output or --input_dir/--output_dir")
    numbers = {"--octree_depth": (args.octree_depth, 1, 11), "--coarse_depth": (args.coarse_depth, 1, 11),
               "--num_inference_steps": (args.num_inference_steps, 1, 10000), "--max_instances": (args.max_instances, 1, 1024),
               "--num_chunks": (args.num_chunks, 1, 10**9), "--c2f_dilation": (args.c2f_dilation, 0, 16),
               "--preview_size": (args.preview_size, 16, 4096)}
    for flag, (value, low, high) in numbers.items():
        if not low <= value <= high:
            raise InputError(f"{flag} must be in {low}..{high}, got {value}")
    if args.c2f_band < 0:
        raise InputError(f"--c2f_band must be >= 0, got {args.c2f_band}")
    if args.decode_progressive and args.extraction != "dense":
        raise InputError("--decode_progressive needs --extraction dense")
    if not math.isfinite(args.lora_scale):
        raise InputError(f"--lora_scale must be a finite number, got {args.lora_scale}")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise InputError(f"--lora_alpha must be a finite number > 0, got {args.lora_alpha}")
    if args.lora_path is None and (args.merge_lora or args.lora_scale != 1.0 or args.lora_alpha is not None):
        raise InputError("--merge_lora, --lora_scale and --lora_alpha need --lora_path")
    if single:
        if None in (args.rgb_image, args.seg_image, args.output):
            raise InputError("single-scene mode needs --rgb_image, --seg_image and --output")
        output_format(args.output)
        jobs = [(args.output.stem, args.rgb_image, args.seg_image, args.output)]
    else:
        if args.output_dir is None:
            raise InputError("batch mode needs --output_dir")
        jobs = [(n, rgb, seg, args.output_dir / f"{n}.{args.format}") for n, rgb, seg in find_pairs(args.input_dir)]
    if args.label_names is not None:
        read_label_names(args.label_names)
    for _, rgb, seg, _ in jobs:
        prepare_scene(rgb, seg, input_options(args), log_notes=False)
    if args.lora_path is not None and not args.lora_path.exists():
        raise InputError("LoRA path does not exist", path=args.lora_path)
    check_model_path(args.pretrained_model_name_or_path)
    return jobs


def input_options(args: argparse.Namespace) -> InputOptions:
    return InputOptions(args.instance_order, args.do_image_padding, args.max_instances, args.min_instance_pixels,
                        args.label_names, args.rgba)


def extraction_settings(args: argparse.Namespace) -> dict:
    """The :class:`midi.inference.extraction.ExtractionConfig` fields of the command line."""
    return dict(method=args.extraction, octree_depth=args.octree_depth, coarse_depth=args.coarse_depth,
                dilation=args.c2f_dilation, band_cells=args.c2f_band, num_chunks=args.num_chunks,
                smooth=not args.no_smooth, vertex_mapping=args.vertex_mapping,
                decode_progressive=args.decode_progressive)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns 0, or 1 when some scene had no surface or ran out of memory.

    Raises (``run_cli(main)`` turns them into ``error:`` lines and exit codes): InputError for bad
    options or input files (before the model loads) or a model/LoRA that cannot be loaded; OutputError
    when a scene's files could not be written (batch mode stops there).
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # a no-op under a configured root
    logging.getLogger("midi").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)
    jobs = check_args(args)
    from midi.inference import generation  # deferred: the checks above fail fast without importing torch

    loaded = generation.build_pipeline(generation.ModelOptions(
        args.pretrained_model_name_or_path, args.lora_path, args.lora_scale, args.merge_lora, args.device, args.dtype,
        args.lora_alpha, args.mi_blocks))
    logger.info("%s", loaded.description)
    options = generation.GenerationOptions(args.num_inference_steps, args.guidance_scale, args.seed,
                                           generation.ExtractionConfig(**extraction_settings(args)),
                                           not args.no_progress)
    status = 0
    for name, rgb, seg, output in jobs:
        try:
            scene = prepare_scene(rgb, seg, input_options(args))
            logger.info("%s: %d instances (%s)", name, len(scene.names), ", ".join(scene.names))
            result = generation.run_scene(loaded, scene, options)
            save_outputs(result, output, args.save_instances, not args.no_preview, args.preview_size)
        except (InputError, OutOfMemory) as exc:  # e.g. no surface, or out of memory (the next may be smaller)
            message = str(exc)  # this scene is lost; the other scenes go on
            if isinstance(exc, OutOfMemory):
                generation.free_device_memory()
                message = (f"{name}: out of memory during {exc.stage}; try --num_chunks {max(1, args.num_chunks // 2)} "
                           "or smaller, --extraction coarse_to_fine or a lower --octree_depth")
            print(f"error: {one_line(message)}", file=sys.stderr)
            status = 1
        else:
            logger.info("%s", summary_line(result, output))
    return status


if __name__ == "__main__":
    sys.exit(run_cli(main))
