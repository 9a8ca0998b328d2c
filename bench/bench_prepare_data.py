"""Throughput of prepare_data (meshes/s) with 1 and 2 worker processes, from one run.

Makes seeded synthetic scenes, writes them as mesh folders (OBJ/PLY/STL/GLB, one file per object),
then prepares the same input twice (1 worker, then 2) at the default settings (20480 samples per
object, one 512 px rendered view) and prints meshes/s of each and their ratio::

    python bench/bench_prepare_data.py
    python bench/bench_prepare_data.py --scenes 32 --image_size 256 --num_samples 20480
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from midi.data.jobs import PrepareOptions  # noqa: E402
from midi.data.prepare import prepare_dataset  # noqa: E402
from midi.data.synthetic import make_synthetic_scene, scene_seed  # noqa: E402

SUFFIXES = (".obj", ".ply", ".stl", ".glb")


def write_inputs(root: Path, scenes: int, seed: int) -> int:
    """Writes ``scenes`` folders of mesh files; returns the number of meshes."""
    count = 0
    for i in range(scenes):
        folder = root / f"scene_{i:04d}"
        folder.mkdir(parents=True)
        for k, (name, mesh) in enumerate(make_synthetic_scene(scene_seed(seed, i))):
            mesh.export(folder / f"{name}{SUFFIXES[k % len(SUFFIXES)]}")
            count += 1
    return count


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_speedup(tasks: int = 8, size: int = 1_500_000) -> float:
    """Speed-up of 2 vs 1 processes on pure-Python work: what the machine itself can give."""
    times = []
    for workers in (1, 2):
        start = time.perf_counter()
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_burn, [size] * tasks))
        times.append(time.perf_counter() - start)
    return times[0] / times[1]


def main() -> None:
    """Runs the benchmark and prints one line per worker count plus the ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--num_samples", type=int, default=20480)
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = PrepareOptions(num_samples=args.num_samples, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        meshes = write_inputs(Path(tmp) / "in", args.scenes, args.seed)
        rates = {}
        for workers in (1, 2):
            report = prepare_dataset(Path(tmp) / "in", Path(tmp) / f"out{workers}", options, workers=workers)
            assert not report.skipped and report.num_meshes == meshes, report.summary()
            rates[workers] = report.meshes_per_second
            print(
                f"workers={workers}: {report.num_meshes} meshes in {report.seconds:.2f} s = {rates[workers]:.2f} meshes/s"
            )
    print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x ({args.scenes} scenes, {args.num_samples} samples, "
          f"{args.image_size} px)")  # fmt: skip
    print(f"for reference, this machine's 2-process speed-up on pure-Python work: {machine_speedup():.2f}x")


if __name__ == "__main__":
    main()
