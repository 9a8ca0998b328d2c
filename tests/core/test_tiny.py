"""midi.tiny: the tiny pipeline, the one pipeline loader, meta-device models and `python -m midi.tiny save`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from midi.config import DEFAULT_MI_BLOCKS
from midi.errors import ModelError
from midi.tiny import (
    TINY_MI_BLOCKS,
    load_pipeline,
    meta_models,
    mi_blocks_for,
    save_tiny_pipeline,
    tiny_pipeline,
)

REPO = Path(__file__).resolve().parents[2]


def test_tiny_pipeline_is_deterministic_per_seed():
    a, b, c = tiny_pipeline(0), tiny_pipeline(0), tiny_pipeline(1)
    wa, wb, wc = (next(p.transformer.parameters()) for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and a.tiny_seed == 0


def test_load_pipeline_keeps_the_vae_float32():
    pipe = load_pipeline("tiny", torch.bfloat16, tiny_seed=2)
    assert pipe.tiny_seed == 2
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16
    assert next(pipe.image_encoder_1.parameters()).dtype == torch.bfloat16
    assert next(pipe.vae.parameters()).dtype == torch.float32


def test_saved_folder_loads_back_the_same_weights(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "tiny", seed=3)
    loaded, built = load_pipeline(str(folder)), tiny_pipeline(3)
    for name in ("transformer", "vae", "image_encoder_1", "image_encoder_2"):
        ours = getattr(built, name).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in getattr(loaded, name).state_dict().items())
    assert mi_blocks_for(str(folder)) == TINY_MI_BLOCKS == mi_blocks_for("tiny")
    metas = meta_models(str(folder), ["transformer", "image_encoder_2"])
    assert all(p.is_meta for m in metas.values() for p in m.parameters())
    assert set(metas["transformer"].state_dict()) == set(built.transformer.state_dict())
    with pytest.raises(FileExistsError):
        save_tiny_pipeline(folder)


def test_not_a_pipeline_is_a_model_error(tmp_path):
    with pytest.raises(ModelError):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelError):
        meta_models(str(tmp_path / "missing"), ["transformer"])
    assert len(DEFAULT_MI_BLOCKS) == 5


def test_save_command_line(tmp_path):
    run = [sys.executable, "-m", "midi.tiny", "save", str(tmp_path / "p"), "--seed", "1"]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "p" / "model_index.json").is_file()
    again = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith(f"error: {tmp_path / 'p'}: ") and "not empty" in again.stderr
