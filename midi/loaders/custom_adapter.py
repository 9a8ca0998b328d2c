"""MIDI's custom adapter: multi-instance processors, the 7-channel DINOv2 and LoRA, saved as one file.

File format (upstream-compatible): one state dict whose keys are the model state-dict names
prefixed with ``transformer.``, ``image_encoder_1.`` or ``image_encoder_2.``; PEFT LoRA keys carry
the adapter name, e.g. ``transformer.blocks.0.attn1.to_q.lora_A.default.weight``. Safetensors
(metadata ``{"format": "pt"}``) by default; a pickle file is read only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig
from transformers import Dinov2Model

from midi.data.atomic import atomic_write
from midi.errors import AdapterError
from midi.lora import load_weights, read_adapter_file, save_tensors
from midi.models.attention_processor import MIAttnProcessor2_0

logger = logging.getLogger(__name__)

ADAPTER_PREFIXES = ("transformer.", "image_encoder_1.", "image_encoder_2.")
PATCH_PROJECTION_KEY = "embeddings.patch_embeddings.projection.weight"


def expand_patch_projection(weight: torch.Tensor, num_channels: int, method: str = "clone") -> torch.Tensor:
    """Widens a ViT patch projection ``(O, C, k, k)`` to ``num_channels`` inputs.

    The original channels come first; the rest are filled in chunks of at most ``C`` channels
    that copy channels ``0, 1, ...`` (``"clone"``: for C=3 -> 7 this gives ``[0,1,2,0,1,2,0]``)
    or are zero (``"zero"``). No rescaling, as upstream.
    """
    if method not in ("clone", "zero"):
        raise ValueError(f"image_encoder_2_init_projection_method must be 'clone' or 'zero', got {method!r}")
    original = weight.shape[1]
    parts = [weight]
    left = num_channels - original
    while left > 0:
        chunk = weight[:, : min(original, left)]
        parts.append(chunk.clone() if method == "clone" else torch.zeros_like(chunk))
        left -= original
    return torch.cat(parts, dim=1)


def set_mi_attention(transformer: torch.nn.Module, self_attn_module_names: Sequence[str] | None,
                     exact: bool = False) -> list[str]:
    """Installs multi-instance self-attention in the named blocks (``"blocks.8"``; None: every block),
    plain processors elsewhere; returns the processor names that got it. ``exact`` matches block names
    exactly; the default is upstream's prefix match, under which ``"blocks.1"`` also selects
    ``blocks.10``-``blocks.19`` (a warning says so). ValueError for a name that selects no block.
    """
    names = list(transformer.attn_processors)
    self_names = [n for n in names if n.endswith("attn1.processor")]
    picked = set(self_names if self_attn_module_names is None else ())
    for wanted in self_attn_module_names or ():
        hits = [n for n in self_names if (n.rsplit(".attn", 1)[0] == wanted if exact else n.startswith(wanted))]
        if not hits:
            raise ValueError(f"set_self_attn_module_names: {wanted!r} selects no transformer block "
                             f"(valid: blocks.0..blocks.{len(self_names) - 1})")
        if len(hits) > 1:
            logger.warning("set_self_attn_module_names: %r prefix-matches %s (upstream behaviour); "
                           "pass exact block names to select one block", wanted, [n.rsplit(".attn", 1)[0] for n in hits])
        picked.update(hits)
    chosen = [n for n in self_names if n in picked]
    transformer.set_attn_processor({n: MIAttnProcessor2_0(use_mi=n in chosen) for n in names})
    return chosen


class CustomAdapterMixin:
    """``init_custom_adapter`` / ``load_custom_adapter`` / ``save_custom_adapter`` for MIDIPipeline."""

    def init_custom_adapter(self, set_self_attn_module_names: Sequence[str] | None = None,
                            pretrained_image_encoder_2_processor_config: dict[str, Any] | None = None,
                            image_encoder_2_input_channels: int = 7, image_encoder_2_init_projection_method: str = "clone",
                            transformer_lora_config: dict[str, Any] | None = None,
                            image_encoder_1_lora_config: dict[str, Any] | None = None,
                            image_encoder_2_lora_config: dict[str, Any] | None = None,
                            exact_module_names: bool = False) -> None:
        """Prepares the pipeline for MIDI, in upstream order: (1) rebuild ``feature_extractor_2`` with the
        overrides; (2) widen DINOv2's patch projection to ``image_encoder_2_input_channels`` (the released
        weights already have 7); (3) :func:`set_mi_attention`; (4) for each of transformer /
        image_encoder_1 / image_encoder_2 a PEFT LoRA adapter "default" from its ``LoraConfig`` kwargs,
        or the model frozen when none is given.
        """
        if pretrained_image_encoder_2_processor_config is not None:
            processor_cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
            self.feature_extractor_2 = processor_cls.from_dict(self.feature_extractor_2.to_dict(),
                                                               **pretrained_image_encoder_2_processor_config)
        encoder = self.image_encoder_2
        if encoder.config.num_channels < image_encoder_2_input_channels:
            state = encoder.state_dict()
            state[PATCH_PROJECTION_KEY] = expand_patch_projection(state[PATCH_PROJECTION_KEY],
                                                                  image_encoder_2_input_channels,
                                                                  image_encoder_2_init_projection_method)
            encoder.config.num_channels = image_encoder_2_input_channels
            widened = Dinov2Model(encoder.config)
            widened.load_state_dict(state, strict=True)
            self.register_modules(image_encoder_2=widened.to(device=self.device, dtype=self.dtype).eval())

        set_mi_attention(self.transformer, set_self_attn_module_names, exact=exact_module_names)

        for name, config in (("transformer", transformer_lora_config), ("image_encoder_1", image_encoder_1_lora_config),
                             ("image_encoder_2", image_encoder_2_lora_config)):
            model = getattr(self, name)
            if config is not None:
                model.add_adapter(config if isinstance(config, LoraConfig) else LoraConfig(**config))
            else:
                model.requires_grad_(False)

    def save_custom_adapter(self, save_directory: str | os.PathLike, weight_name: str, safe_serialization: bool = True,
                            include_keys: Sequence[str] | None = None, exclude_keys: Sequence[str] | None = None) -> Path:
        """Writes the weights of the three trainable models whose keys contain any of ``include_keys`` and
        none of ``exclude_keys`` to ``save_directory / weight_name`` (atomically; safetensors, or a torch
        pickle) and returns the file. Upstream saves nothing when ``include_keys`` is None; here None
        means ``["lora"]``.
        """
        include = list(include_keys) if include_keys is not None else ["lora"]
        exclude = list(exclude_keys or [])
        state = {prefix + k: v.detach().contiguous() for prefix in ADAPTER_PREFIXES
                 if (model := getattr(self, prefix[:-1], None)) is not None for k, v in model.state_dict().items()
                 if any(s in k for s in include) and not any(s in k for s in exclude)}
        if not state:
            raise AdapterError(f"save_custom_adapter: no weights match include_keys={include} (was a LoRA added?)")
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise AdapterError(f"{save_directory} is a file; save_custom_adapter needs a directory")
        save_directory.mkdir(parents=True, exist_ok=True)
        target = save_directory / weight_name
        if safe_serialization:
            save_tensors(target, state, {"format": "pt"})
        else:
            with atomic_write(target, "wb") as f:
                torch.save(state, f)
        return target

    def load_custom_adapter(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
                            weight_name: str | None = None, subfolder: str | None = None, strict: bool = True) -> None:
        """Loads a custom-adapter file (or dict) written by :meth:`save_custom_adapter`.

        ``init_custom_adapter`` must have been called with the same LoRA configs first, so that
        the LoRA modules exist. Unlike upstream (``strict=False``, mismatches ignored), a key that
        matches no parameter, or a shape that differs, raises :class:`AdapterError` naming it.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            state, source = pretrained_model_name_or_path_or_dict, "<dict>"
        else:
            path = Path(pretrained_model_name_or_path_or_dict, subfolder or "", weight_name or "")
            state, source = read_adapter_file(path), str(path)
        unknown = [k for k in state if not k.startswith(ADAPTER_PREFIXES)]
        if unknown:
            raise AdapterError(f"{source}: keys without a transformer./image_encoder_1./image_encoder_2. prefix: {unknown[:3]}")
        for prefix in ADAPTER_PREFIXES:
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                load_weights(getattr(self, prefix[:-1]), part, name=prefix[:-1], source=source, peft=False,
                             strict=strict)
