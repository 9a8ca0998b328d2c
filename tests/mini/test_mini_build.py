"""python -m midi.mini.build: midi-mini's initial pipeline folder loads (ours and diffusers' loader), its
multi-instance blocks are found, it generates, it is small, and train_lora.py full-finetunes it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from midi.mini.build import MINI_MI_BLOCKS, NUM_TOKENS, build_mini, folder_size
from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel
from midi.pipelines.pipeline_midi import MIDIPipeline
from midi.tiny import MI_BLOCKS_KEY, mi_blocks_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    """A seeded VAE of midi-mini's shape (widths 64/96, 8 latent channels), as pretrain_vae saves it."""
    folder = tmp_path_factory.mktemp("vae") / "vae"
    torch.manual_seed(0)
    TripoSGVAEModel(latent_channels=8, num_attention_heads=4, width_encoder=64, width_decoder=96, num_layers_encoder=1,
                    num_layers_decoder=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mini(vae_folder, tmp_path_factory) -> Path:
    return build_mini(tmp_path_factory.mktemp("mini") / "init", vae_folder, seed=0)


def test_the_folder_loads_generates_and_names_its_blocks(mini, vae_folder, caplog):
    from diffusers import DiffusionPipeline

    assert sorted(p.name for p in mini.iterdir()) == [
        "feature_extractor_1", "feature_extractor_2", "image_encoder_1", "image_encoder_2", "model_index.json",
        "scheduler", "transformer", "vae"]
    assert folder_size(mini) < 25 * 2**20
    assert (mini / "vae" / "config.json").read_bytes() == (vae_folder / "config.json").read_bytes()
    config = json.loads((mini / "transformer" / "config.json").read_text())
    assert config[MI_BLOCKS_KEY] == list(MINI_MI_BLOCKS) and config["width"] == NUM_TOKENS == 128
    assert mi_blocks_for(str(mini)) == MINI_MI_BLOCKS
    with caplog.at_level(logging.WARNING):  # diffusers' own loader (upstream's from_pretrained) takes the extra key
        generic = DiffusionPipeline.from_pretrained.__func__(MIDIPipeline, str(mini))
    assert "not expected" not in caplog.text and generic.transformer.config[MI_BLOCKS_KEY] == list(MINI_MI_BLOCKS)

    pipe = MIDIPipeline.from_pretrained(mini)
    assert pipe.image_encoder_2.config.num_channels == 7 and pipe.transformer.config.in_channels == 8
    pipe.set_progress_bar_config(disable=True)
    pipe.init_custom_adapter(set_self_attn_module_names=list(mi_blocks_for(str(mini))), exact_module_names=True)
    scene = Image.new("RGB", (64, 64), "white")
    latents = pipe(image=[scene, scene], mask=[Image.new("L", (64, 64), 255)] * 2, image_scene=[scene] * 2,
                   num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).samples
    assert latents.shape == (2, 128, 8) and torch.isfinite(latents).all()


def test_seeds_give_different_weights_and_the_same_seed_the_same(vae_folder, tmp_path):
    from midi.mini.build import load_vae, mini_pipeline

    vae = load_vae(vae_folder)
    a, b, c = (mini_pipeline(vae, s).transformer.proj_in.weight for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_command_line(vae_folder, tmp_path, capsys):
    from midi.errors import run_cli
    from midi.mini.build import main

    run = [sys.executable, "-m", "midi.mini.build", str(tmp_path / "p"), "--vae", str(vae_folder), "--seed", "1"]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)  # the -m entry point
    assert proc.returncode == 0 and "MB; multi-instance blocks blocks.2, blocks.3, blocks.4" in proc.stdout
    assert run_cli(main, run[3:]) == 2  # in-process from here: each interpreter start imports torch again
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'p'}: ") and "not empty" in err
    assert run_cli(main, [str(tmp_path / "q"), "--vae", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a VAE folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_the_mini_recipe_full_finetunes_the_folder(mini, data_root, tmp_path):
    """configs/train/mini_pretrain.yaml on the built folder for one step: blocks from the folder, export verified."""
    from accelerate.state import AcceleratorState, GradientState

    import train_lora

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "train" / "mini_pretrain.yaml"),
            "--model.pretrained_model_name_or_path", str(mini), "--data.root", str(data_root),
            "--data.num_surface_points", "512", "--train.output_dir", str(out), "--train.max_steps", "1",
            "--train.batch_size", "2", "--cache.enabled", "false", "--validation.every_n_steps", "0",
            "--validation.preview_every_n_steps", "0", "--validation.metrics_every_n_steps", "0",
            "--logging.report_to", "none", "--logging.progress_bar", "false"]
    assert train_lora.main(args) == 0
    record = json.loads((out / "pipeline-final" / "midi_training.json").read_text())
    assert record["export_check"]["ok"] and record["mi_blocks"] == list(MINI_MI_BLOCKS)
    assert record["trained"] == ["transformer", "image_encoder_1", "image_encoder_2"]
    assert mi_blocks_for(str(out / "pipeline-final")) == MINI_MI_BLOCKS
