"""midi-mini's starting point: the pretrained shape VAE plus a fresh DiT and fresh image encoders.

    python -m midi.mini.build models/midi-mini/init --vae models/midi-mini/vae [--seed 0]

writes a pipeline folder in the released layout (``model_index.json``, ``transformer/``,
``image_encoder_1/``, ``image_encoder_2/``, ``vae/``, ``scheduler/``, ``feature_extractor_1/``,
``feature_extractor_2/``), loadable by ``MIDIPipeline.from_pretrained`` (and by diffusers' own
``DiffusionPipeline.from_pretrained``, as upstream's pipeline loads), whose DiT and encoders are
then trained by ``train_lora.py --config configs/train/mini_pretrain.yaml`` (full finetuning).

The models are the released classes at small sizes (about 10 MB in float32 in all):

- DiT (:class:`TripoSGDiTModel`): width 128 = the VAE's 128 latent tokens (the pipeline samples
  ``num_tokens = transformer.config.width`` tokens, as upstream), 4 heads, 7 blocks (long skips into
  blocks 4-6), in_channels = the VAE's latent channels; cross-attention dims = the encoders' widths.
- CLIP (``CLIPVisionModelWithProjection``) and 7-channel DINOv2 (``Dinov2Model``): width 64, 2
  layers, 4 heads, 8 px patches at 64 px (64 patches + 1 class token), each with its processor at
  64 px (CLIP's and ImageNet's normalisation, as the release).
- The release's scheduler: ``RectifiedFlowScheduler`` (1000 steps, shift 1, no dynamic shifting).

Multi-instance attention sits in the middle blocks 2-4 of 7 (the release: 8-12 of 21). They are
recorded in ``transformer/config.json`` as ``"_mi_blocks"`` (:data:`midi.tiny.MI_BLOCKS_KEY`: a
private key, which diffusers passes over without a warning and writes back on ``save_pretrained``),
so training (``model.mi_blocks: null``) and inference find them. Weights are each model's own
initialisation, seeded per component from ``--seed``.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

from midi.data.atomic import commit_dir, make_tmp_dir
from midi.errors import ModelError, run_cli
from midi.mini.pretrain_vae import VAERecipe
from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel
from midi.models.transformers.triposg_transformer import TripoSGDiTModel
from midi.pipelines.loading import check_weights
from midi.pipelines.pipeline_midi import MIDIPipeline
from midi.tiny import assemble_pipeline, record_mi_blocks

NUM_TOKENS = VAERecipe().num_tokens  # latent tokens the VAE was pretrained with (128)
IMAGE_SIZE = 64
ENCODER_WIDTH = 64
MINI_TRANSFORMER = dict(num_attention_heads=4, width=NUM_TOKENS, num_layers=7, cross_attention_dim=ENCODER_WIDTH,
                        cross_attention_2_dim=ENCODER_WIDTH)
MINI_MI_BLOCKS: tuple[str, ...] = ("blocks.2", "blocks.3", "blocks.4")
MINI_CLIP = dict(hidden_size=ENCODER_WIDTH, intermediate_size=4 * ENCODER_WIDTH, num_hidden_layers=2,
                 num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8, projection_dim=ENCODER_WIDTH)
MINI_DINO = dict(hidden_size=ENCODER_WIDTH, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                 image_size=IMAGE_SIZE, patch_size=8, num_channels=7)


def load_vae(folder: Path) -> TripoSGVAEModel:
    """The pretrained VAE of a ``save_pretrained`` folder, float32, its keys and shapes checked.

    Raises:
        ModelError: not a TripoSGVAEModel folder (in words).
    """
    if not (folder / "config.json").is_file():
        raise ModelError("no config.json: not a VAE folder (midi.mini.pretrain_vae writes models/midi-mini/vae)",
                         path=folder)
    check_weights("vae", TripoSGVAEModel, folder)
    return TripoSGVAEModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def mini_pipeline(vae: TripoSGVAEModel, seed: int = 0) -> MIDIPipeline:
    """midi-mini with ``vae`` and freshly initialised DiT and encoders (each seeded from ``seed``)."""
    builders = [
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**MINI_CLIP)),
        lambda: Dinov2Model(Dinov2Config(**MINI_DINO)),
        lambda: TripoSGDiTModel(**MINI_TRANSFORMER, in_channels=vae.config.latent_channels),
    ]
    models = []
    for k, build in enumerate(builders):
        torch.manual_seed(seed + k)
        models.append(build().eval())
    clip, dino, transformer = models
    record_mi_blocks(transformer, MINI_MI_BLOCKS)
    return assemble_pipeline(vae, transformer, clip, dino, IMAGE_SIZE)


def build_mini(folder: str | Path, vae_folder: str | Path, seed: int = 0) -> Path:
    """Writes the initial midi-mini pipeline to ``folder`` (renamed into place when complete).

    Raises:
        FileExistsError: ``folder`` exists and is not empty (it is never overwritten).
        ModelError: ``vae_folder`` is not a TripoSGVAEModel folder.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(errno.EEXIST, "exists and is not empty; choose a new folder", str(folder))
    pipe = mini_pipeline(load_vae(Path(vae_folder)), seed)
    tmp = make_tmp_dir(folder.parent, folder.name)
    try:
        pipe.save_pretrained(tmp)
        for file in (tmp / "vae").iterdir():  # the pretrained VAE's own files, byte for byte (no local path in them)
            shutil.copyfile(Path(vae_folder) / file.name, file)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp and the writers make them private; a model is shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        commit_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def folder_size(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m midi.mini.build OUT --vae DIR [--seed S]``: midi-mini's initial pipeline folder."""
    parser = argparse.ArgumentParser(prog="python -m midi.mini.build", description=main.__doc__)
    parser.add_argument("folder", type=Path, metavar="OUT", help="new pipeline folder (must not exist or be empty)")
    parser.add_argument("--vae", type=Path, required=True, help="the pretrained VAE (save_pretrained folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DiT's and encoders' initial weights")
    args = parser.parse_args(argv)
    folder = build_mini(args.folder, args.vae, args.seed)
    print(f"{folder} ({folder_size(folder) / 2**20:.1f} MB; multi-instance blocks {', '.join(MINI_MI_BLOCKS)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
