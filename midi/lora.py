"""LoRA helpers: configs, export in two formats, format detection and loading into a pipeline.

An exported adapter folder (``lora-final/`` or ``checkpoint-N/lora/``) holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the transformer's PEFT adapter, as
  ``PeftModel.save_pretrained`` writes it (keys ``base_model.model.<module>.lora_A.weight``), so
  ``PeftModel.from_pretrained(transformer, folder)`` loads it, and so does diffusers'
  ``transformer.load_lora_adapter(folder, weight_name="adapter_model.safetensors",
  prefix="base_model.model")`` (its LoraConfig is in the file's ``lora_adapter_metadata``);
  image-encoder adapters, when trained, in ``image_encoder_1/`` and ``image_encoder_2/``
  sub-folders of the same layout. Older files without the prefix are read too;
- ``custom_adapter.safetensors``: everything in upstream MIDI's ``save_custom_adapter`` format;
- ``midi_adapter.json``: what inference needs to rebuild the model (multi-instance blocks, the
  LoRA configs, the base transformer's config, the tiny model's seed) and the export check's result.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from midi.config import CUSTOM_ADAPTER_FILE, DEFAULT_TARGET_MODULES, METADATA_FILE
from midi.data.atomic import commit_dir, make_tmp_dir, write_bytes, write_json
from midi.errors import AdapterError

ADAPTER_MODELS = ("transformer", "image_encoder_1", "image_encoder_2")
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix for the wrapped model's modules


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file atomically (tensors are made contiguous, as safetensors requires)."""
    write_bytes(path, safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def read_adapter_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a safetensors file, or a pickle with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files surface as many exception types
        raise AdapterError(f"{path}: cannot read adapter weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path}: expected a dict of tensors")
    return state


def lora_config_dict(rank: int = 16, alpha: float = 16, dropout: float = 0.0,
                     target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES, init_lora_weights: bool | str = True,
                     use_dora: bool = False, use_rslora: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``peft.LoraConfig`` (what ``init_custom_adapter`` takes).
    ``init_lora_weights=True`` zero-initialises B, so the adapted model starts as the base model."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                init_lora_weights=init_lora_weights, use_dora=use_dora, use_rslora=use_rslora)


def matched_lora_targets(model: torch.nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Names of the modules PEFT would wrap (suffix match on ``.``-boundaries, or a full regex)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]


def lora_state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT state dicts (adapter name stripped) of every model that carries a LoRA adapter."""
    return {name: {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(getattr(pipe, name)).items()}
            for name in ADAPTER_MODELS if getattr(getattr(pipe, name), "peft_config", None)}


def export_lora(pipe, out_dir: str | os.PathLike, mi_blocks: Sequence[str] | None,
                extra_metadata: dict[str, Any] | None = None) -> Path:
    """Writes the adapters of ``pipe`` to ``out_dir`` (layout: the module docstring) and returns it.
    Assembled under a temporary name and renamed, so a crash never leaves a half-written adapter."""
    out_dir = Path(out_dir)
    states = lora_state_dicts(pipe)
    if not states:
        raise AdapterError("export_lora: the pipeline has no LoRA adapter")
    tmp_dir = make_tmp_dir(out_dir.parent, out_dir.name)
    configs = {}
    for name, state in states.items():
        target = tmp_dir if name == "transformer" else tmp_dir / name
        target.mkdir(exist_ok=True)
        config = getattr(pipe, name).peft_config["default"]
        config.save_pretrained(str(target))
        configs[name] = _config_to_dict(config)
        # diffusers filters both the keys and this metadata by its ``prefix`` argument; without the
        # metadata it would assume lora_alpha = rank.
        diffusers_config = json.dumps({PEFT_PREFIX + k: v for k, v in configs[name].items()})
        save_tensors(target / "adapter_model.safetensors", {PEFT_PREFIX + k: v for k, v in state.items()},
                         {"format": "pt", "lora_adapter_metadata": diffusers_config})
    pipe.save_custom_adapter(tmp_dir, CUSTOM_ADAPTER_FILE, safe_serialization=True, include_keys=["lora"])
    metadata = {
        "format": "midi-lora", "version": 1, "mi_blocks": list(mi_blocks) if mi_blocks is not None else None,
        "lora_configs": configs,
        "base_transformer_config": {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")},
        "tiny_seed": getattr(pipe, "tiny_seed", None),  # set by midi.tiny.tiny_pipeline only
        **(extra_metadata or {}),
    }
    write_json(tmp_dir / METADATA_FILE, json.loads(json.dumps(metadata, default=str)))
    return commit_dir(tmp_dir, out_dir)


def _config_to_dict(config: LoraConfig) -> dict[str, Any]:
    keep = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "init_lora_weights")
    data = {k: getattr(config, k) for k in keep}
    targets = data["target_modules"]  # PEFT turns a list into a set
    return data | {"target_modules": sorted(targets) if isinstance(targets, set) else targets}


def _read_metadata(path: Path) -> dict[str, Any] | None:
    """``midi_adapter.json`` if present; a corrupt file is an AdapterError naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: unreadable adapter metadata ({exc})") from None
    if not isinstance(data, dict) or ("lora_configs" in data and not isinstance(data["lora_configs"], dict)):
        raise AdapterError(f"{path}: adapter metadata must be a JSON object with 'lora_configs'")
    return data


@dataclass
class LoadedAdapter:
    """What was found at a LoRA path: per-model LoRA configs and weights, in one of three formats."""

    source: Path
    format: str  # "midi-lora" | "peft" | "custom-adapter"
    lora_configs: dict[str, dict[str, Any]]
    weights: dict[str, dict[str, torch.Tensor]]  # per model, PEFT keys without adapter name
    mi_blocks: list[str] | None = None
    base_transformer_config: dict[str, Any] | None = None
    alpha_known: bool = True  # False: no metadata, lora_alpha was set = rank (see _infer_config_from_keys)
    tiny_seed: int | None = None  # the seed of the tiny model it was trained on


def find_adapter_dir(path: Path) -> Path:
    """Resolves a training output folder to its ``lora-final/`` (or its newest checkpoint's adapter)."""
    if (path / "adapter_config.json").is_file() or (path / CUSTOM_ADAPTER_FILE).is_file():
        return path
    if (path / "lora-final").is_dir():
        return path / "lora-final"
    newest = max((p for p in path.glob("checkpoint-*/lora") if p.parent.name.split("-")[-1].isdigit()),
                 key=lambda p: int(p.parent.name.split("-")[-1]), default=None)
    if newest is not None:
        return newest
    raise AdapterError(f"{path}: no LoRA found (expected adapter_config.json, {CUSTOM_ADAPTER_FILE}, lora-final/ or checkpoint-*/lora/)")


def _infer_config_from_keys(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
    if len(ranks) != 1:
        raise AdapterError(f"cannot infer one LoRA rank from the file (found ranks {sorted(ranks)})")
    rank = ranks.pop()
    targets = sorted({re.sub(r"^.*?\.((?:to_out\.0)|[^.]+)\.lora_A\..*$", r"\1", k) for k in state if "lora_A" in k})
    return lora_config_dict(rank=rank, alpha=rank, dropout=0.0, target_modules=targets)


def _strip_adapter_name(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {re.sub(r"\.(lora_[AB]|lora_magnitude_vector)\.default", r".\1", k): v for k, v in state.items()}


def read_lora(path: str | os.PathLike) -> LoadedAdapter:
    """Reads a LoRA from a training output folder, an exported/PEFT folder or a custom-adapter file;
    AdapterError (the reason in words) when nothing usable is at ``path``."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: LoRA path does not exist")
    if path.is_file():
        return _read_custom_adapter(path, path.parent / METADATA_FILE)
    folder = find_adapter_dir(path)
    metadata = _read_metadata(folder / METADATA_FILE)
    if (folder / "adapter_config.json").is_file():
        configs, weights = {}, {}
        for name in ADAPTER_MODELS:
            sub = folder if name == "transformer" else folder / name
            if not (sub / "adapter_config.json").is_file():
                continue
            try:
                config = LoraConfig.from_pretrained(str(sub))
            except Exception as exc:  # peft raises several types for a corrupt adapter_config.json
                raise AdapterError(f"{sub / 'adapter_config.json'}: unreadable PEFT adapter config ({exc})") from None
            configs[name] = _config_to_dict(config)
            weights[name] = {k.removeprefix(PEFT_PREFIX): v
                             for k, v in read_adapter_file(sub / "adapter_model.safetensors").items()}
        return LoadedAdapter(folder, "midi-lora" if metadata else "peft", configs, weights, **_from_metadata(metadata))
    return _read_custom_adapter(folder / CUSTOM_ADAPTER_FILE, folder / METADATA_FILE)


def _from_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The :class:`LoadedAdapter` fields that ``midi_adapter.json`` supplies."""
    metadata = metadata or {}
    model_cfg = ((metadata.get("training") or {}).get("config") or {}).get("model") or {}
    tiny_seed = metadata.get("tiny_seed", model_cfg.get("tiny_seed"))  # older exports: the training config's
    return dict(mi_blocks=metadata.get("mi_blocks"), base_transformer_config=metadata.get("base_transformer_config"),
                tiny_seed=tiny_seed)


def _read_custom_adapter(file: Path, metadata_file: Path) -> LoadedAdapter:
    state = read_adapter_file(file)
    metadata = _read_metadata(metadata_file)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for name in ADAPTER_MODELS:
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".") and "lora" in k}
        if part:
            weights[name] = _strip_adapter_name(part)
    if not weights:
        raise AdapterError(f"{file}: no LoRA weights (keys containing 'lora' with a transformer./image_encoder_N. prefix)")
    known = bool(metadata and "lora_configs" in metadata)
    configs = metadata["lora_configs"] if known else {name: _infer_config_from_keys(w) for name, w in weights.items()}
    return LoadedAdapter(file, "custom-adapter", configs, weights, alpha_known=known, **_from_metadata(metadata))


def check_base_model(adapter: LoadedAdapter, transformer) -> None:
    """Raises when the adapter was trained on a transformer of a different shape."""
    current = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    diffs = {k: (v, current.get(k)) for k, v in (adapter.base_transformer_config or {}).items() if current.get(k) != v}
    if diffs:
        text = ", ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in sorted(diffs.items()))
        raise AdapterError(f"{adapter.source}: LoRA was trained on a different base model ({text})")


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, name: str, source: object,
                 peft: bool = True, strict: bool = True) -> None:
    """The one strict weight check and load of adapters into ``model`` (its LoRA modules added).

    ``state`` has PEFT keys without the adapter name (``peft=True``: every LoRA tensor of the model
    must be there) or ``model.state_dict()`` keys (``peft=False``, a custom-adapter part). ``strict``
    refuses keys the model lacks (upstream ignores them). An AdapterError names ``source``, ``name``,
    the key and both shapes.
    """
    if peft and not getattr(model, "peft_config", None):
        raise AdapterError(f"{source}: {name} has no LoRA modules to load into (call init_custom_adapter first)")
    own = get_peft_model_state_dict(model) if peft else model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state)) if peft else []
    if strict and (unknown or missing):
        # The usual cause: loading before init_custom_adapter created the LoRA modules.
        hint = (" (call init_custom_adapter with the LoRA config the adapter was trained with first)"
                if any("lora" in k for k in unknown) else "")
        raise AdapterError(f"{source}: {name} keys do not match the model ({len(missing)} missing, "
                           f"{len(unknown)} unexpected, e.g. {(unknown or missing)[0]!r}){hint}")
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise AdapterError(f"{source}: {name}.{key} has shape {tuple(value.shape)} but the model expects "
                               f"{tuple(own[key].shape)} (different LoRA rank or base model?)")
    if not peft:
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return
    # Training keeps LoRA weights in float32 over a 16-bit base; do the same here (before loading,
    # so nothing is rounded) and a bf16 pipeline reproduces the training model.
    for param_name, param in model.named_parameters():
        if "lora_" in param_name and param.dtype != torch.float32:
            param.data = param.data.float()
    set_peft_model_state_dict(model, state)


def load_adapter(pipe, adapter: LoadedAdapter | str | os.PathLike, mi_blocks: Sequence[str] | None = None, *,
                 install: bool = True) -> LoadedAdapter:
    """The one strict adapter loader: reads ``adapter`` (a :class:`LoadedAdapter` or any :func:`read_lora`
    path) into ``pipe`` and returns it. ``mi_blocks``: the blocks to install (None: the adapter's own,
    else all). ``install=False`` loads into the LoRA modules already on ``pipe`` (a training resume).
    AdapterError for base-model, target, key or shape mismatches, in words.
    """
    if not isinstance(adapter, LoadedAdapter):
        adapter = read_lora(adapter)
    if install:
        check_base_model(adapter, pipe.transformer)
        for name, config in adapter.lora_configs.items():
            if not matched_lora_targets(getattr(pipe, name), config["target_modules"]):
                raise AdapterError(f"{adapter.source}: LoRA targets {config['target_modules']} match no module of {name}")
        pipe.init_custom_adapter(set_self_attn_module_names=adapter.mi_blocks if mi_blocks is None else mi_blocks,
                                 exact_module_names=True, **{f"{name}_lora_config": adapter.lora_configs.get(name)
                                                             for name in ADAPTER_MODELS})
    for name, state in adapter.weights.items():
        load_weights(getattr(pipe, name), state, name=name, source=adapter.source)
    return adapter


def merge_lora(pipe, scale: float = 1.0) -> int:
    """Folds every LoRA delta (times ``scale``) into its base weight; returns the layers merged."""
    layers = [m for name in ADAPTER_MODELS for m in getattr(pipe, name).modules() if isinstance(m, BaseTunerLayer)]
    for module in layers:
        if scale != 1.0:
            module.scale_layer(scale)
        module.merge()
    return len(layers)
