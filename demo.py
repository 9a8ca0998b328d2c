#!/usr/bin/env python
"""End-to-end demo on the embedded tiny model, CPU only, a few minutes (`make demo`).

    synthetic scenes -> prepare_data.py -> train_lora.py (tiny pipeline) -> stop, resume once
    -> inference_with_lora.py with the LoRA on a held-out synthetic scene and on a real image pair

Every step is the real command a user runs (printed before it runs); only the model is a tiny,
randomly initialised MIDI pipeline built in-process, so the shapes it makes are not meaningful.
Outputs go to demo_output/ (override with --output_dir); a summary says where everything is.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REAL_PAIR = ("tests/data/scenes/cartoon-00_rgb.png", "tests/data/scenes/cartoon-00_seg.png")


def run(cmd: list[str], log: Path) -> None:
    """Runs one step, echoing the command; its output goes to the terminal and to ``log``."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(proc.stdout)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-6:]
    print("\n".join(f"  {line}" for line in tail))
    print(f"  ({time.perf_counter() - start:.0f} s)")
    if proc.returncode != 0:
        sys.exit(f"demo: step failed with exit code {proc.returncode}; full output in {log}")


def held_out_scene(data: Path) -> tuple[Path, Path, str]:
    """The first scene outside the training split: its rendered view and id map."""
    manifest = json.loads((data / "manifest.json").read_text())
    splits = manifest["splits"]
    scene_id = (splits.get("test") or splits.get("val") or [manifest["scenes"][-1]["id"]])[0]
    views = data / "scenes" / scene_id / "views"
    return views / "view_00.png", views / "view_00_ids.png", scene_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "demo_output")
    parser.add_argument("--steps", type=int, default=40, help="training steps (stopped at half, then resumed)")
    args = parser.parse_args()
    out = args.output_dir.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.log").is_file():  # only ever delete a folder an earlier demo made
            sys.exit(f"demo: {out} is not empty and was not made by the demo; choose another --output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    py = sys.executable
    data, run_dir, scenes = out / "data", out / "lora-run", out / "scenes"
    scenes.mkdir()
    started = time.perf_counter()

    print("1/5 synthetic scenes -> training data")
    run([py, "prepare_data.py", "--synthetic", "10", "--output_dir", str(data), "--num_samples", "2048",
         "--image_size", "128", "--val_fraction", "0.2", "--no_progress"], log)

    train = [py, "train_lora.py", "--config", "configs/train/tiny.yaml", "--data.root", str(data),
             "--data.synthetic_if_missing", "0", "--train.output_dir", str(run_dir),
             "--checkpointing.every_n_steps", str(args.steps // 2), "--validation.every_n_steps", str(args.steps // 2),
             "--validation.preview_every_n_steps", str(args.steps)]
    print(f"2/5 train a LoRA on the tiny pipeline, stopping at step {args.steps // 2}")
    run(train + ["--train.max_steps", str(args.steps // 2)], log)
    print(f"3/5 resume from the last checkpoint and finish {args.steps} steps")
    run(train + ["--train.max_steps", str(args.steps), "--resume_from_checkpoint", "latest"], log)

    infer = [py, "inference_with_lora.py", "--pretrained_model_name_or_path", "tiny", "--lora_path", str(run_dir),
             "--num_inference_steps", "8", "--guidance_scale", "3.0", "--octree_depth", "6", "--no_progress"]
    rgb, seg, scene_id = held_out_scene(data)
    print(f"4/5 inference with the LoRA on held-out synthetic scene {scene_id}")
    run(infer + ["--rgb_image", str(rgb), "--seg_image", str(seg), "--output", str(scenes / f"{scene_id}.glb")], log)
    print("5/5 inference with the LoRA on a real image pair (MIDI-3D example)")
    run(infer + ["--rgb_image", REAL_PAIR[0], "--seg_image", REAL_PAIR[1], "--output", str(scenes / "cartoon-00.glb")], log)

    print(f"\nDone in {time.perf_counter() - started:.0f} s. Everything is under {out}:")
    rows = [("training data", f"{data}  (check it: python prepare_data.py --check {data})"),
            ("LoRA (final)", run_dir / "lora-final"), ("checkpoints", f"{run_dir}/checkpoint-*"),
            ("TensorBoard logs", f"tensorboard --logdir {run_dir}"),
            *(("scene", f"{glb}  (preview {glb.with_suffix('.png')})") for glb in sorted(scenes.glob("*.glb"))),
            ("full log", log)]
    print("\n".join(f"  {what:<18} {where}" for what, where in rows))
    print("Next: TRAINING_README.md explains real training on the MIDI-3D weights.")


if __name__ == "__main__":
    main()
