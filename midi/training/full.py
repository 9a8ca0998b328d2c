"""Full finetuning's weight files: the trained models inside a checkpoint, and the exported pipeline.

With ``model.finetune: full`` a checkpoint holds the state dict of each trained model (the
transformer, and both image encoders with ``model.train_image_encoders``) as it is in memory
(float32, the keys of ``model.state_dict()``: transformers' ``save_pretrained`` renames some on
disk, e.g. DINOv2's ``q_proj`` to the legacy ``attention.query``)::

    checkpoint-N/transformer.safetensors
    checkpoint-N/image_encoder_1.safetensors   (when the encoders train)
    checkpoint-N/image_encoder_2.safetensors

and an export (``pipeline-final/``, ``best/``) is the base pipeline folder in the released layout
with those components replaced: ``model_index.json``, ``transformer/``, ``image_encoder_1/``,
``image_encoder_2/``, ``vae/``, ``scheduler/``, ``feature_extractor_1/``, ``feature_extractor_2/``.
The frozen components are copied byte for byte from the base folder (or saved from the tiny
pipeline as built), so a bf16 run does not round them. The transformer's ``config.json`` records
the multi-instance blocks it was trained with (:data:`midi.tiny.MI_BLOCKS_KEY`), so inference
and a later LoRA run on the folder find them without ``mi_blocks``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch

from midi.config import TrainingConfig, is_tiny
from midi.errors import InputError
from midi.lora import save_tensors
from midi.pipelines.loading import COMPONENTS, resolve_pipeline_folder
from midi.tiny import record_mi_blocks, tiny_pipeline

# Parameters no forward of MIDI uses: DINOv2's mask token only replaces masked patches (pre-training).
# They stay frozen, so every trainable parameter gets a gradient (DDP would otherwise wait for theirs).
UNUSED_PARAMETERS = {"image_encoder_2": ("embeddings.mask_token",)}


def make_trainable(model: torch.nn.Module, name: str) -> None:
    """Every weight of ``model`` trains (float32 master weights), except :data:`UNUSED_PARAMETERS`."""
    model.requires_grad_(True)
    for param_name, param in model.named_parameters():
        if param_name in UNUSED_PARAMETERS.get(name, ()):
            param.requires_grad_(False)


def save_models(pipe, folder: Path, names: Sequence[str]) -> None:
    """Writes the state dicts of the named models of ``pipe`` to ``folder/<name>.safetensors`` (atomically)."""
    for name in names:
        state = {k: v.detach().cpu() for k, v in getattr(pipe, name).state_dict().items()}
        save_tensors(folder / f"{name}.safetensors", state, {"format": "pt"})


def load_models(pipe, folder: Path, names: Sequence[str]) -> None:
    """Loads ``folder/<name>.safetensors`` into the named models of ``pipe`` in place (the optimizer keeps
    its parameters), strictly: every key, every shape.

    Raises:
        InputError: a file is missing, unreadable or does not fit the model, naming it.
    """
    for name in names:
        file = folder / f"{name}.safetensors"
        if not file.is_file():
            raise InputError(f"{file}: no trained {name} weights (a model.finetune: lora checkpoint?); resume from "
                             "a checkpoint of this run")
        try:
            state = safetensors.torch.load_file(str(file), device="cpu")
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt files surface as several types
            raise InputError(f"{file}: unreadable weights ({type(exc).__name__}); resume from another "
                             "checkpoint") from None
        model = getattr(pipe, name)
        own = model.state_dict()
        wrong = sorted(set(own) ^ set(state)) or sorted(k for k in own if own[k].shape != state[k].shape)
        if wrong:
            raise InputError(f"{file}: {name} weights do not fit the model (e.g. {wrong[0]!r}: different base "
                             "model?); resume with the checkpoint's config.yaml")
        model.load_state_dict(state, strict=True)


def write_pipeline(pipe, folder: Path, cfg: TrainingConfig, names: Sequence[str], mi_blocks: Sequence[str]) -> None:
    """Writes the base pipeline with the trained models ``names`` of ``pipe`` into the empty ``folder``."""
    base = cfg.model.pretrained_model_name_or_path
    if is_tiny(base):
        tiny_pipeline(cfg.model.tiny_seed).save_pretrained(folder)  # the frozen parts as built (float32)
    else:
        source = resolve_pipeline_folder(base)
        shutil.copy2(source / "model_index.json", folder / "model_index.json")
        for name in COMPONENTS:
            if name not in names:
                shutil.copytree(source / name, folder / name)  # follows a Hub snapshot's links: real files
    record_mi_blocks(pipe.transformer, mi_blocks)
    for name in names:
        shutil.rmtree(folder / name, ignore_errors=True)
        getattr(pipe, name).save_pretrained(folder / name, safe_serialization=True)  # the released files
