"""Training throughput with and without the feature cache, and memory with and without gradient checkpointing.

Runs the real training step (``train_lora.optimizer_step``) of the tiny model on a synthetic
dataset written at realistic input sizes (512 px images, 20480 surface points per object), so the
measured difference is what the cache saves per step: image decoding and resizing, the image
processors, both image encoders, surface loading and the VAE encoder. On the real model the
encoders are much larger, so the GPU-side saving grows too; this CPU bench measures the tiny one.

    python bench/bench_training.py                 # steps/s without and with cache, and the ratio
    python bench/bench_training.py --memory        # peak memory, gradient checkpointing off vs on

``--memory`` defaults to small inputs (64 px, 1024 points) and a large batch (32 scenes), so that
the transformer's activations, which checkpointing trades for recomputation, dominate the step.

Memory is the peak resident set size (CPU) or the CUDA allocator peak (GPU) of a fresh process,
minus its resident size before the first step: the extra memory the training steps take.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEMORY_DEFAULTS = {"image_size": 64, "num_points": 1024, "scenes": 40, "batch_size": 32, "steps": 3}
sys.path.insert(0, str(REPO))


def _args(data: Path, out: Path, opts: argparse.Namespace, *extra: str) -> list[str]:
    return ["--data.root", str(data), "--data.synthetic_if_missing", "0", "--data.image_size", str(opts.image_size),
            "--data.num_surface_points", str(opts.num_points), "--data.num_workers", "0",
            "--train.output_dir", str(out), "--train.batch_size", str(opts.batch_size),
            "--train.max_steps", "1000", "--logging.report_to", "none", "--logging.progress_bar", "false",
            "--cache.dir", str(out.parent / "cache"), *extra]


def _build(data: Path, out: Path, opts: argparse.Namespace, *extra: str):
    from accelerate.state import AcceleratorState, GradientState

    import train_lora
    from midi.config_load import load_config
    from midi.training import build, metrics, objective

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # The modules train_lora.main imports after its config check (the bench calls the loop without main).
    train_lora.metrics, train_lora.objective = metrics, objective
    cfg = load_config(REPO / "configs" / "train" / "tiny.yaml", _args(data, out, opts, *extra))
    return build.build(cfg, dry_run=False)


def _steps_per_second(run, steps: int, warmup: int = 2) -> float:
    import train_lora
    from midi.training.checkpoints import TrainerState
    from midi.training.metrics import ThroughputMeter

    batches, state, meter = iter(run.loader()), TrainerState(), ThroughputMeter()
    run.model.train()
    for _ in range(warmup):
        train_lora.optimizer_step(run, state, batches, meter)
    start = time.perf_counter()
    for _ in range(steps):
        train_lora.optimizer_step(run, state, batches, meter)
    return steps / (time.perf_counter() - start)


def bench_cache(opts: argparse.Namespace, work: Path) -> None:
    """Prints steps/s without and with the cache, and their ratio."""
    data = _dataset(opts, work)
    plain = _steps_per_second(_build(data, work / "plain", opts), opts.steps)
    start = time.perf_counter()
    cached_run = _build(data, work / "cached", opts, "--cache.enabled", "true")
    build_seconds = time.perf_counter() - start
    cached = _steps_per_second(cached_run, opts.steps)
    print(f"tiny model, {opts.scenes} scenes, batch {opts.batch_size}, {opts.image_size} px, {opts.num_points} points,"
          f" {opts.steps} timed steps")
    print(f"  without cache: {plain:.2f} steps/s")
    print(f"  with cache:    {cached:.2f} steps/s (one-off cache build incl. model setup: {build_seconds:.1f} s)")
    print(f"  speedup:       {cached / plain:.2f}x")


def bench_memory(opts: argparse.Namespace, work: Path) -> None:
    """Prints the training memory with gradient checkpointing off and on (one fresh process each)."""
    data = _dataset(opts, work)
    results = {}
    for checkpointing in ("false", "true"):
        cmd = [sys.executable, __file__, "--_child", checkpointing, "--work", str(work), *_common(opts)]
        results[checkpointing] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"tiny model, batch {opts.batch_size} scenes ({results['true']['rows']} instance rows), {opts.steps} steps; "
          f"{results['true']['what']}")
    for key, label in (("false", "gradient checkpointing off"), ("true", "gradient checkpointing on")):
        print(f"  {label}: +{results[key]['extra_mib']:.0f} MiB peak during training, "
              f"{results[key]['steps_per_s']:.2f} steps/s")
    del data


def _child(opts: argparse.Namespace, work: Path) -> None:
    import torch

    run = _build(work / "data", work / f"mem-{opts._child}", opts, "--model.gradient_checkpointing", opts._child)
    device = run.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before, what = torch.cuda.memory_allocated(device), "CUDA allocator peak minus allocated before the steps"
    else:
        before = _rss_bytes()
        what = "process peak RSS minus RSS before the steps (CPU)"
    rate = _steps_per_second(run, opts.steps, warmup=1)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()
    batch = next(iter(run.loader()))
    print(json.dumps({"extra_mib": max(0, peak - before) / 2**20, "steps_per_s": rate, "what": what,
                      "rows": batch.num_rows}))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dataset(opts: argparse.Namespace, work: Path) -> Path:
    from midi.data.jobs import PrepareOptions
    from midi.data.prepare import prepare_synthetic

    root = work / "data"
    if not (root / "manifest.json").is_file():
        prepare_synthetic(root, opts.scenes, seed=0, options=PrepareOptions(image_size=opts.image_size,
                                                                           num_samples=opts.num_points, val_fraction=0.2))
    return root


def _common(opts: argparse.Namespace) -> list[str]:
    return ["--steps", str(opts.steps), "--scenes", str(opts.scenes), "--batch_size", str(opts.batch_size),
            "--image_size", str(opts.image_size), "--num_points", str(opts.num_points)]


def main() -> None:
    """Parses the flags and runs one benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="gradient checkpointing off vs on instead of the cache")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant (20)")
    parser.add_argument("--scenes", type=int, default=10, help="synthetic scenes (10)")
    parser.add_argument("--batch_size", type=int, default=4, help="scenes per step (4)")
    parser.add_argument("--image_size", type=int, default=512, help="image side in pixels (512)")
    parser.add_argument("--num_points", type=int, default=20480, help="surface points per object (20480)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.memory and not opts._child:
        for key, value in MEMORY_DEFAULTS.items():
            if getattr(opts, key) == parser.get_default(key):
                setattr(opts, key, value)
    import torch

    torch.set_num_threads(1)  # stable numbers on shared CPUs
    with tempfile.TemporaryDirectory() as tmp:
        work = opts.work or Path(tmp)
        if opts._child:
            _child(opts, work)
        elif opts.memory:
            bench_memory(opts, work)
        else:
            bench_cache(opts, work)


if __name__ == "__main__":
    main()
