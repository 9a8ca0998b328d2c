"""Shared builders of the training tests: a tiny synthetic dataset and tiny-run arguments."""

from __future__ import annotations

from pathlib import Path

from midi.config import TrainingConfig
from midi.config_load import load_config
from midi.data.jobs import PrepareOptions
from midi.data.prepare import prepare_synthetic
from midi.training import objective

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_PIPELINE = REPO / "tests" / "fixtures" / "upstream" / "tiny_pipeline"
TINY_YAML = REPO / "configs" / "train" / "tiny.yaml"
NUM_SCENES = 6
IMAGE_SIZE = 64
NUM_POINTS = 512


def tiny_dataset(base: Path) -> Path:
    """A seeded synthetic dataset shared by the tests of one session (written once)."""
    root = Path(base) / "train-data"
    if not (root / "manifest.json").is_file():
        prepare_synthetic(root, NUM_SCENES, seed=0, options=PrepareOptions(image_size=IMAGE_SIZE, num_samples=NUM_POINTS,
                                                                           val_fraction=0.3))
    return root


def tiny_args(data_root: Path, output_dir: Path, *extra: str, max_steps: int = 4) -> list[str]:
    """``train_lora.main`` arguments for a fast tiny run (no previews or scene metrics, no progress bar)."""
    return [
        "--config", str(TINY_YAML),
        "--data.root", str(data_root), "--data.synthetic_if_missing", "0",
        "--data.image_size", str(IMAGE_SIZE), "--data.num_surface_points", str(NUM_POINTS),
        "--train.output_dir", str(output_dir), "--train.max_steps", str(max_steps),
        "--checkpointing.every_n_steps", "2", "--validation.every_n_steps", "2",
        "--validation.preview_every_n_steps", "0", "--validation.metrics_every_n_steps", "0",  # tiny.yaml's are on
        "--logging.progress_bar", "false",
        "--logging.report_to", "none", "--cache.dir", str(Path(output_dir).parent / "cache"),
        *extra,
    ]


def tiny_config(data_root: Path, output_dir: Path, *extra: str, max_steps: int = 4) -> TrainingConfig:
    """The :func:`tiny_args` run as a config object."""
    args = tiny_args(data_root, output_dir, *extra, max_steps=max_steps)
    return load_config(args[1], args[2:])


def nan_steps(steps: set[int]):
    """A stand-in for objective.training_step whose loss is NaN at the given (1-based) call numbers."""
    real, calls = objective.training_step, {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in steps:
            return objective.StepOutput(out.loss * float("nan"), out.sigmas, out.dropped, out.num_rows, out.num_tokens)
        return out

    return poisoned
