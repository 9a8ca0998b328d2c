"""The shipped midi-mini pipeline: it loads from the repo like the released weights and generates
base-domain scenes that score above a measured floor (a regression guard on the committed weights)."""

from __future__ import annotations

import json
from pathlib import Path

import evaluate
from midi.data.jobs import PrepareOptions
from midi.data.prepare import prepare_synthetic
from midi.pipelines.pipeline_midi import MIDIPipeline
from midi.tiny import load_pipeline, mi_blocks_for

MINI = Path(__file__).resolve().parents[2] / "models" / "midi-mini"
# Set on the provisional step-1500 weights (these 2 held-out scenes scored scene F@0.1 0.104 and 0.162)
# and kept for the final step-5000 ones (32 held-out base scenes: mean 0.434, models/midi-mini/README.md); the untrained starting
# pipeline (python -m midi.mini.build) decodes no surface for any instance (F = 0). The floor leaves
# room for platform differences in the sampler's arithmetic, not for a broken model. Raise it with
# the weights.
FLOOR = 0.08


def test_midi_mini_loads_like_the_release():
    pipe = MIDIPipeline.from_pretrained(MINI)
    assert pipe.transformer.config.width == 128  # = the VAE's latent tokens: the pipeline samples width tokens
    assert mi_blocks_for(str(MINI)) == ("blocks.2", "blocks.3", "blocks.4")  # recorded in the folder
    assert sum(p.numel() for p in pipe.transformer.parameters()) > 1_000_000
    assert load_pipeline(str(MINI)).vae.dtype.is_floating_point


def test_midi_mini_generates_base_scenes_above_the_floor(tmp_path):
    data = tmp_path / "base"
    prepare_synthetic(data, 2, seed=100, domain="base", options=PrepareOptions(image_size=64, num_samples=2048))  # the first scenes of data/mini-base-test's seed
    out = tmp_path / "eval"
    code = evaluate.main(["--gt", str(data), "--split", "all", "--generate", "--pretrained_model_name_or_path",
                          str(MINI), "--num_inference_steps", "25", "--guidance_scale", "4", "--octree_depth", "6",
                          "--num_points", "2048", "--output_dir", str(out), "--no_progress"])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["metrics"]["scene_fscore"]["mean"] > FLOOR, summary
