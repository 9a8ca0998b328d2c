"""The app's bundled examples: ``X_rgb.png`` / ``X_seg.png`` pairs in a folder, and how they are made.

``examples/`` holds small synthetic scenes (primitives on a floor, :mod:`midi.data.synthetic`)
that no shipped config trains on: the tiny config trains on synthetic scenes 0-7 of seed 0, the
examples are scenes 100, 101, ... of seed 0. The ``synthetic_target_*`` pairs are midi-mini's
held-out target-domain scenes (furniture; the first scenes of ``data/mini-target-test``'s seed 300,
which its LoRA never trained on). Other pairs dropped into the folder are listed too. Regenerate with::

    python -m midi.app.examples examples --count 3 --size 256
    python -m midi.app.examples examples --count 2 --size 256 --domain target --seed 300 --start 0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from midi.data import images, layout
from midi.data.jobs import PrepareOptions
from midi.data.prepare import run_jobs
from midi.data.synthetic import synthetic_jobs
from midi.errors import InputError, run_cli
from midi.inference.scene import find_pairs

FIRST_SCENE = 100  # past the tiny config's 8 training scenes (and any small synthetic set of seed 0)
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def list_examples(folder: str | Path | None) -> list[tuple[str, Path, Path]]:
    """``(name, rgb, seg)`` for every pair in ``folder``; empty when there is no folder or no pair
    (the app then starts without examples rather than refusing to start)."""
    if folder is None or not Path(folder).is_dir():
        return []
    try:
        return find_pairs(folder)
    except InputError:
        return []


def write_examples(folder: str | Path, count: int = 3, size: int = 256, seed: int = 0, domain: str = "base",
                   start: int = FIRST_SCENE) -> list[Path]:
    """Renders ``count`` synthetic scenes of ``domain`` (``start`` on, of ``seed``) as ``<id>_rgb.png``
    and ``<id>_seg.png`` into ``folder``. The maps are palette PNGs (index 0 = background,
    k = object k): the same labels as the data tools' grey maps, but visible in a file browser, in
    the colours the app gives the instances' meshes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = synthetic_jobs(count, seed, start=start, domain=domain)
    written = []
    with tempfile.TemporaryDirectory(prefix="midi-examples-") as tmp:
        # Surfaces are not needed here, but the data tools write them with every scene: keep them few.
        run_jobs(Path(tmp), jobs, PrepareOptions(image_size=size, num_samples=16, seed=seed))
        for job in jobs:
            rgb, ids = layout.view_paths(layout.scene_dir(Path(tmp), job.scene_id), layout.view_name(0))
            written.append(folder / f"{job.scene_id}_rgb.png")
            shutil.copyfile(rgb, written[-1])
            written.append(folder / f"{job.scene_id}_seg.png")
            images.save_png(written[-1], palette_map(np.asarray(Image.open(ids))))
    return written


def palette_map(labels: np.ndarray) -> Image.Image:
    """A label map (values < 256) as a palette image: black background, label k in instance colour k-1."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    colours = images.to_uint8(images.instance_colours(255))
    image.putpalette([0, 0, 0, *colours.reshape(-1).tolist()])
    return image


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the app's synthetic example pairs.")
    p.add_argument("folder", type=Path)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", default="base", help="synthetic domain: base (primitives) or target (furniture)")
    p.add_argument("--start", type=int, default=FIRST_SCENE, help="index of the first scene")
    args = p.parse_args(argv)
    for path in write_examples(args.folder, args.count, args.size, args.seed, args.domain, args.start):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
