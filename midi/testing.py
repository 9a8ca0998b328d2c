"""A complete tiny MIDI pipeline built in-process (no downloads), for tests, demos and dry runs.

Same architecture as the released model, at toy sizes: DiT 5 layers x width 64 (so 64 latent
tokens of 8 channels, long skips in blocks 3 and 4), VAE widths 32/48, CLIP and 7-channel DINOv2
of width 32 at 32 px. Weights are the modules' own init plus seeded Gaussian noise, so that
norms and biases are not trivially 1/0. ``python -m midi.testing save DIR [--seed S]`` writes it
as a pipeline folder in the released layout (for interop tests and users).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel
from midi.models.transformers.triposg_transformer import TripoSGDiTModel
from midi.pipelines.pipeline_midi import MIDIPipeline
from midi.schedulers.scheduling_rectified_flow import RectifiedFlowScheduler

TINY_TRANSFORMER = dict(num_attention_heads=4, width=64, in_channels=8, num_layers=5, cross_attention_dim=16,
                        cross_attention_2_dim=32)
TINY_VAE = dict(in_channels=3, latent_channels=8, num_attention_heads=4, width_encoder=32, width_decoder=48,
                num_layers_encoder=1, num_layers_decoder=1, embedding_type="frequency", embed_frequency=8,
                embed_include_pi=False)
TINY_MI_BLOCKS = ["blocks.3", "blocks.4"]
TINY_IMAGE_SIZE = 32


def _perturb(model: torch.nn.Module, std: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def tiny_pipeline(seed: int = 0, noise_std: float = 0.05) -> MIDIPipeline:
    """Builds the tiny MIDIPipeline deterministically from ``seed`` (float32, CPU, eval mode).

    Multi-instance attention is not installed; call
    ``pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS)`` as with real weights.
    """
    builders = [
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=16)),
        lambda: Dinov2Model(Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
            image_size=TINY_IMAGE_SIZE, patch_size=8, num_channels=7)),
        lambda: TripoSGDiTModel(**TINY_TRANSFORMER),
        lambda: TripoSGVAEModel(**TINY_VAE),
    ]
    models = []
    for k, build in enumerate(builders):
        torch.manual_seed(seed + k)
        models.append(_perturb(build(), noise_std))
    clip, dino, transformer, vae = models
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    crop = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    clip_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    bit_processor = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    pipe = MIDIPipeline(
        vae=vae,
        transformer=transformer,
        scheduler=RectifiedFlowScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
        image_encoder_1=clip,
        image_encoder_2=dino,
        feature_extractor_1=clip_processor(size=size, crop_size=crop),
        feature_extractor_2=bit_processor(size=size, crop_size=crop, image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225]),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.tiny_seed = seed  # recorded by midi.lora.export_lora, so inference rebuilds the same weights
    return pipe


def save_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny pipeline in the released folder layout (``MIDIPipeline.from_pretrained`` loads it).

    Raises:
        FileExistsError: ``folder`` exists and is not empty (it is never overwritten).
    """
    from midi.data.atomic import commit_dir, make_tmp_dir

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists and is not empty; choose a new folder", str(folder))
    tmp = make_tmp_dir(folder.parent, folder.name)  # renamed when complete: never a half-written pipeline
    try:
        tiny_pipeline(seed).save_pretrained(tmp)
        commit_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m midi.testing save DIR [--seed S]``: the tiny pipeline as a pipeline folder."""
    parser = argparse.ArgumentParser(prog="python -m midi.testing", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="write the tiny pipeline to DIR in the released layout")
    save.add_argument("folder", type=Path, metavar="DIR")
    save.add_argument("--seed", type=int, default=0, help="seed of its random weights (as model.tiny_seed)")
    args = parser.parse_args(argv)
    try:
        print(save_tiny_pipeline(args.folder, args.seed))
    except OSError as exc:
        print(f"error: {exc.filename or args.folder}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
