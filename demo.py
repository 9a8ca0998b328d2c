#!/usr/bin/env python
"""End-to-end demo on midi-mini, CPU only, about 10 minutes on 2 cores (`make demo`).

    target-domain scenes -> prepare_data.py -> train_lora.py on models/midi-mini -> stop, resume once
    -> evaluate.py --generate on held-out target scenes, base and base + LoRA -> evaluate.py --compare

midi-mini (models/midi-mini, trained here on scenes of single primitives) has never seen furniture;
the demo trains a short LoRA on furniture scenes and measures the change on held-out ones, with the
paired interval. With today's midi-mini the LoRA does not help (models/midi-mini/README.md, stage 3):
the demo shows the whole loop and an honest measurement, not a gain.
Every step is the real command a user runs (printed before it runs). Outputs go to demo_output/
(override with --output_dir); ``comparison.png`` there shows input | ground truth | base | LoRA.
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
MODEL = "models/midi-mini"
# evaluate.py --generate settings of the demo; models/midi-mini/README.md's proof uses the same ones
GENERATION = ["--num_inference_steps", "25", "--guidance_scale", "4", "--octree_depth", "6", "--num_points", "2048"]


def run(cmd: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> str:
    """Runs one step, echoing the command; its output goes to the terminal (tail) and to ``log``.
    Exit codes outside ``ok`` stop the demo."""
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
    if proc.returncode not in ok:
        sys.exit(f"demo: step failed with exit code {proc.returncode}; full output in {log}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "demo_output")
    parser.add_argument("--steps", type=int, default=300, help="LoRA training steps (stopped at half, then resumed)")
    parser.add_argument("--train_scenes", type=int, default=48, help="target-domain training scenes")
    parser.add_argument("--test_scenes", type=int, default=8, help="held-out target scenes")
    args = parser.parse_args()
    out = args.output_dir.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.log").is_file():  # only ever delete a folder an earlier demo made
            sys.exit(f"demo: {out} is not empty and was not made by the demo; choose another --output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    py = sys.executable
    data, test, run_dir, evals = out / "data", out / "heldout", out / "lora-run", out / "eval"
    started = time.perf_counter()
    prepare = [py, "prepare_data.py", "--synthetic_domain", "target", "--image_size", "64", "--num_samples", "2048",
               "--no_progress"]

    print("1/5 target-domain scenes (furniture midi-mini never saw) -> training data and held-out scenes")
    run(prepare + ["--synthetic", str(args.train_scenes), "--output_dir", str(data), "--seed", "200"], log)
    run(prepare + ["--synthetic", str(args.test_scenes), "--output_dir", str(test), "--seed", "300",
                   "--val_fraction", "0", "--test_fraction", "0.99"], log)

    half = max(args.steps // 2, 1)
    train = [py, "train_lora.py", "--config", "configs/train/mini_lora.yaml", "--data.root", str(data),
             "--train.output_dir", str(run_dir), "--cache.dir", str(out / "cache"),
             "--checkpointing.every_n_steps", str(half), "--validation.every_n_steps", str(half),
             "--validation.num_scenes", "4", "--optimizer.lr_warmup_steps", str(min(50, half))]
    print(f"2/5 train a LoRA on {MODEL}, stopping at step {half}")
    run(train + ["--train.max_steps", str(half)], log)
    print(f"3/5 resume from the last checkpoint and finish {args.steps} steps")
    run(train + ["--train.max_steps", str(args.steps), "--resume_from_checkpoint", "latest"], log)

    evaluate = [py, "evaluate.py", "--gt", str(test), "--split", "test", "--generate",
                "--pretrained_model_name_or_path", MODEL, *GENERATION, "--no_progress"]
    print("4/5 generate and score the held-out scenes with the base model, then with the LoRA")
    # exit code 1: a scene failed (e.g. no instance decoded a surface); it is scored as failed, so go on
    run(evaluate + ["--output_dir", str(evals / "base")], log, ok=(0, 1))
    run(evaluate + ["--lora_path", str(run_dir), "--output_dir", str(evals / "lora")], log, ok=(0, 1))
    print("5/5 paired comparison: LoRA (B) against the base (A)")
    table = run([py, "evaluate.py", "--compare", str(evals / "base" / "metrics.json"),
                 str(evals / "lora" / "metrics.json"), "--output_dir", str(evals / "base-vs-lora")], log)
    shutil.copyfile(evals / "base-vs-lora" / "comparison.png", out / "comparison.png")

    result = json.loads((evals / "base-vs-lora" / "comparison.json").read_text())
    f = result["metrics"]["scene_fscore"]
    print(f"\nDone in {time.perf_counter() - started:.0f} s. On {result['paired_scenes']} held-out target scenes:")
    print("\n".join(f"  {line}" for line in table.splitlines() if line.strip() and not line.startswith("wrote")))
    print(f"  scene F-score (tau 0.1, icp): base {f['mean_a']:.3f} -> LoRA {f['mean_b']:.3f} "
          f"({f['mean_diff']:+.3f}, 95% interval [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}])")
    print(f"Everything is under {out}:")
    rows = [("input | gt | base | LoRA", out / "comparison.png"),
            ("training data", f"{data}  (check it: python prepare_data.py --check {data})"),
            ("LoRA (final)", run_dir / "lora-final"), ("checkpoints", f"{run_dir}/checkpoint-*"),
            ("TensorBoard logs", f"tensorboard --logdir {run_dir}"),
            ("generated scenes", f"{evals}/base/predictions, {evals}/lora/predictions (.glb)"),
            ("full log", log)]
    print("\n".join(f"  {what:<26} {where}" for what, where in rows))
    print("Next: python app.py --model models/midi-mini shows it in 3D; TRAINING_README.md explains real "
          "training on the MIDI-3D weights.")


if __name__ == "__main__":
    main()
