#!/usr/bin/env python
"""Does the model read its image conditions? The validation loss with each instance's own conditions,
with another instance's of the same scene, and with none, per sigma.

A model that generates from its images has a clearly lower loss with its own conditions (``own``) than
with none (zeros, the classifier-free-guidance negative), and lower than ``shuffled`` (every instance
given the next one's image and mask: the layout of the scene is in the masks). Ratios near 1 say the
model draws shapes from its prior and places them with little regard for the input, whatever its loss.
Posterior means, fixed noise per sigma, view 0 of scenes with at least two visible instances
(:func:`midi.training.objective.conditioning_losses`).

Usage::

    PYTHONPATH=. python bench/bench_conditioning.py --config configs/train/mini_lora.yaml --data data/mini-base
    PYTHONPATH=. python bench/bench_conditioning.py --config configs/train/mini_lora.yaml --data data/mini-target \\
        --lora_path models/midi-mini-target-lora --scenes 16

Other ``--section.key value`` arguments override the config (e.g. ``--data.image_size 64``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo is the package root
import argparse

import torch

from midi.config_load import load_config
from midi.errors import run_cli
from midi.inference.generation import ModelOptions, build_pipeline
from midi.training.batches import (
    Collator,
    ConditionPreprocessor,
    SampleSettings,
    SceneDataset,
    item_seed,
    open_split,
)
from midi.training.objective import CONDITION_VARIANTS, FlowMatchingModel, conditioning_losses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="a training config: its data settings and model (default: the schema's)")
    parser.add_argument("--data", help="dataset root (default: the config's data.root)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", help="pipeline folder (default: the config's model)")
    parser.add_argument("--lora_path")
    parser.add_argument("--scenes", type=int, default=32, help="scenes with >= 2 visible instances")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args, args.overrides = parser.parse_known_args(argv)  # the rest: config overrides, --data.image_size 64
    return args


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(argv)
    cfg = load_config(args.config, ([f"--data.root={args.data}"] if args.data else []) + args.overrides)
    model_path = args.model or cfg.model.pretrained_model_name_or_path
    pipe = build_pipeline(ModelOptions(model=model_path, lora_path=Path(args.lora_path) if args.lora_path else None,
                                       device=args.device)).pipe
    records = open_split(cfg.data.root, args.split)
    dataset = SceneDataset(records, SampleSettings.from_config(cfg.data, train=False),
                           ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2), None)
    model = FlowMatchingModel(pipe).eval()
    # Scenes with one visible instance have nothing to shuffle: they are skipped, not counted.
    items = []
    for i in range(len(dataset)):
        item = dataset[(i, item_seed(args.seed, i))]
        if item["num_rows"] >= 2:
            items.append(item)
        if len(items) == args.scenes:
            break
    sums = {name: [0.0] * len(args.sigmas) for name in CONDITION_VARIANTS}
    rows = 0
    for start in range(0, len(items), args.batch_size):
        batch = Collator(None)(items[start:start + args.batch_size]).to(args.device)
        part = conditioning_losses(model, pipe.vae, batch, args.sigmas, pipe.transformer.config.width,
                                   seed=item_seed(args.seed, 1, start))
        for name in CONDITION_VARIANTS:
            sums[name] = [a + b for a, b in zip(sums[name], part[name])]
        rows += batch.num_rows
    means = {name: [s / rows for s in values] for name, values in sums.items()}
    lora = f" + {args.lora_path}" if args.lora_path else ""
    print(f"{model_path}{lora} on {len(items)} scenes ({rows} instances) of {cfg.data.root} [{args.split}]")
    print(f"{'sigma':>6} {'own':>8} {'shuffled':>9} {'none':>8} {'shuffled/own':>13} {'none/own':>9}")
    for k, sigma in enumerate(args.sigmas + ["mean"]):
        own, shuf, none = ((means[n][k] if k < len(args.sigmas) else sum(means[n]) / len(args.sigmas))
                           for n in CONDITION_VARIANTS)
        label = f"{sigma:.2f}" if isinstance(sigma, float) else sigma
        print(f"{label:>6} {own:8.4f} {shuf:9.4f} {none:8.4f} {shuf / own:13.3f} {none / own:9.3f}")
    return means


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    # One-line errors (a missing metrics.json, a bad config key), never a traceback.
    sys.exit(run_cli(lambda argv: (main(argv), 0)[1]))
