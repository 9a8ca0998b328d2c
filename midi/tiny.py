"""The tiny MIDI pipeline (built in-process, no downloads) and the one loader of every pipeline.

The tiny pipeline is the released architecture at toy sizes (DiT 5 layers x width 64: 64 latent
tokens of 8 channels; VAE widths 32/48; CLIP and 7-channel DINOv2 of width 32 at 32 px), weights
its own init plus seeded Gaussian noise (so norms and biases are not trivially 1/0).
:func:`load_pipeline` is how training, inference and evaluation get a pipeline, tiny or released.
``python -m midi.tiny save DIR [--seed S]`` writes it in the released folder layout.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from midi.config import DEFAULT_MI_BLOCKS, is_tiny
from midi.data.atomic import commit_dir, make_tmp_dir
from midi.errors import ModelError, run_cli
from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel
from midi.models.transformers.triposg_transformer import TripoSGDiTModel
from midi.pipelines.loading import CUSTOM_CLASSES, build_on_meta, resolve_pipeline_folder
from midi.pipelines.pipeline_midi import MIDIPipeline
from midi.schedulers.scheduling_rectified_flow import RectifiedFlowScheduler

TINY_TRANSFORMER = dict(num_attention_heads=4, width=64, in_channels=8, num_layers=5, cross_attention_dim=16,
                        cross_attention_2_dim=32)
TINY_VAE = dict(in_channels=3, latent_channels=8, num_attention_heads=4, width_encoder=32, width_decoder=48,
                num_layers_encoder=1, num_layers_decoder=1, embedding_type="frequency", embed_frequency=8,
                embed_include_pi=False)
TINY_MI_BLOCKS: tuple[str, ...] = ("blocks.3", "blocks.4")
TINY_IMAGE_SIZE = 32
RELEASE_NUM_LAYERS = 21  # the released transformer; its multi-instance blocks are DEFAULT_MI_BLOCKS
# transformer/config.json key naming the multi-instance blocks of a model that is neither the release nor tiny.
# Private (leading "_"): diffusers' from_config drops it from the constructor arguments without a warning and
# keeps it in model.config, so save_pretrained writes it back and upstream's loader is unaffected.
MI_BLOCKS_KEY = "_mi_blocks"
ENCODER_CLASSES = {"image_encoder_1": CLIPVisionModelWithProjection, "image_encoder_2": Dinov2Model}


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
    pipe = assemble_pipeline(vae, transformer, clip, dino, TINY_IMAGE_SIZE)
    pipe.tiny_seed = seed  # recorded by midi.lora.export_lora, so inference rebuilds the same weights
    return pipe


def assemble_pipeline(vae: TripoSGVAEModel, transformer: TripoSGDiTModel, clip: CLIPVisionModelWithProjection,
                      dino: Dinov2Model, image_size: int) -> MIDIPipeline:
    """A MIDIPipeline of these models with the release's scheduler and ``image_size`` px processors
    (ImageNet statistics for DINOv2, as released); the progress bar is off."""
    sizes = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    clip_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    bit_processor = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    pipe = MIDIPipeline(
        vae=vae, transformer=transformer, image_encoder_1=clip, image_encoder_2=dino,
        scheduler=RectifiedFlowScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
        feature_extractor_1=clip_processor(**sizes),
        feature_extractor_2=bit_processor(**sizes, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, *, tiny_seed: int = 0,
                  device: torch.device | str | None = None) -> MIDIPipeline:
    """The pipeline without adapters: ``tiny`` (built from ``tiny_seed``) or a folder / cached Hub id.

    Frozen models are in ``dtype``; the VAE stays float32 (it is small, and its latents are the
    regression target). The progress bar is off.

    Raises:
        ModelError: the folder is not a loadable MIDI-3D pipeline (in words).
    """
    if is_tiny(model):
        pipe = tiny_pipeline(tiny_seed)
        if dtype != torch.float32:
            for name in ("transformer", "image_encoder_1", "image_encoder_2"):
                torch.nn.Module.to(getattr(pipe, name), dtype)  # plain cast (ModelMixin.to warns for no reason)
    else:
        try:
            pipe = MIDIPipeline.from_pretrained(model, torch_dtype={"vae": torch.float32, "default": dtype})
        except OSError as exc:
            raise ModelError(f"cannot load the model ({type(exc).__name__}: {exc})", path=model) from None
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def meta_models(model: str, names: Sequence[str], *, tiny_seed: int = 0) -> dict[str, torch.nn.Module]:
    """The named models (``transformer``, ``vae``, ``image_encoder_1/2``) built on the meta device from
    their config files (no weight read); ModelError when a folder or config cannot be read."""
    if is_tiny(model):
        with torch.device("meta"):
            pipe = tiny_pipeline(tiny_seed)
        return {name: getattr(pipe, name) for name in names}
    folder = resolve_pipeline_folder(model)
    classes = CUSTOM_CLASSES | ENCODER_CLASSES
    return {name: build_on_meta(name, classes[name], folder / name) for name in names}


def mi_blocks_for(model: str) -> tuple[str, ...]:
    """The multi-instance blocks of a base model: those its ``transformer/config.json`` records under
    :data:`MI_BLOCKS_KEY` (midi-mini, full-finetune exports), else the release's 8-12 (of 21) or the tiny
    model's; ModelError for any other transformer (its blocks cannot be guessed: name them with mi_blocks)."""
    if is_tiny(model):
        return TINY_MI_BLOCKS
    config_file = resolve_pipeline_folder(model) / "transformer" / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable transformer config ({exc})", path=config_file) from None
    if MI_BLOCKS_KEY in config:
        return _recorded_blocks(config, config_file)
    if config.get("num_layers") == RELEASE_NUM_LAYERS:
        return DEFAULT_MI_BLOCKS
    if all(config.get(k) == v for k, v in TINY_TRANSFORMER.items()):
        return TINY_MI_BLOCKS
    raise ModelError(f"the transformer has {config.get('num_layers')} layers; multi-instance blocks are known only "
                     f"for the release ({RELEASE_NUM_LAYERS} layers: blocks 8-12), the tiny model and transformers "
                     f"whose config.json records them ({MI_BLOCKS_KEY}): name them (--mi_blocks / model.mi_blocks)",
                     path=config_file)


def _recorded_blocks(config: dict, config_file: Path) -> tuple[str, ...]:
    blocks, layers = config[MI_BLOCKS_KEY], config.get("num_layers")
    names = [f"blocks.{i}" for i in range(layers)] if isinstance(layers, int) else []
    if not (isinstance(blocks, list) and blocks and all(b in names for b in blocks) and len(set(blocks)) == len(blocks)):
        raise ModelError(f"{MI_BLOCKS_KEY} must list distinct blocks of the transformer (blocks.0 ... "
                         f"blocks.{(layers or 1) - 1}), got {blocks!r}", path=config_file)
    return tuple(blocks)


def record_mi_blocks(transformer, blocks: Sequence[str]) -> None:
    """Writes ``blocks`` into the transformer's config (:data:`MI_BLOCKS_KEY`), so that its saved folder names
    them and :func:`mi_blocks_for` finds them."""
    transformer.register_to_config(**{MI_BLOCKS_KEY: list(blocks)})


def save_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny pipeline in the released folder layout (``MIDIPipeline.from_pretrained`` loads it);
    FileExistsError when ``folder`` exists and is not empty (it is never overwritten)."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m midi.tiny save DIR [--seed S]``: the tiny pipeline as a pipeline folder."""
    parser = argparse.ArgumentParser(prog="python -m midi.tiny", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="write the tiny pipeline to DIR in the released layout")
    save.add_argument("folder", type=Path, metavar="DIR")
    save.add_argument("--seed", type=int, default=0, help="seed of its random weights (as model.tiny_seed)")
    args = parser.parse_args(argv)
    print(save_tiny_pipeline(args.folder, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
