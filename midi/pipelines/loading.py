"""Loading a MIDI-3D pipeline folder (the released ``VAST-AI/MIDI-3D`` layout) component by component.

``model_index.json`` names the custom classes by module path; rather than letting diffusers
resolve those strings, each sub-folder is loaded with the class this toolkit uses for that
component, after checking that every weight file has exactly the keys and shapes the config
implies. Any problem is one :class:`midi.errors.ModelError` naming the component, key and shapes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors import safe_open

from midi.config import DOWNLOAD_HINT, check_model_path
from midi.errors import ModelError
from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel
from midi.models.transformers.triposg_transformer import TripoSGDiTModel
from midi.schedulers.scheduling_rectified_flow import RectifiedFlowScheduler

logger = logging.getLogger(__name__)

COMPONENTS = ("vae", "transformer", "scheduler", "image_encoder_1", "image_encoder_2", "feature_extractor_1",
              "feature_extractor_2")
CUSTOM_CLASSES = {"transformer": TripoSGDiTModel, "vae": TripoSGVAEModel, "scheduler": RectifiedFlowScheduler}
TRANSFORMERS_ALLOWED = {
    "image_encoder_1": ("CLIPVisionModelWithProjection",),
    "image_encoder_2": ("Dinov2Model",),
    "feature_extractor_1": ("CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast"),
    "feature_extractor_2": ("BitImageProcessor", "BitImageProcessorPil", "BitImageProcessorFast"),
}


def resolve_pipeline_folder(path: str | Path) -> Path:
    """A local folder as is, else a Hub repo id already in the local cache (no download); else a
    ModelError with :func:`midi.config.check_model_path`'s message (how to download)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # huggingface_hub raises several types for a repo that is not cached
        check_model_path(path)  # raises for anything but a cached repo id (whose snapshot is then broken)
        raise ModelError(f"the cached Hub snapshot is incomplete; download it again with `{DOWNLOAD_HINT}`",
                         path=path) from None


def read_model_index(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"{folder}: no model_index.json (is this a MIDI-3D pipeline folder?)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file}: invalid JSON ({exc})") from None
    if missing := [c for c in COMPONENTS if c not in index]:
        raise ModelError(f"{index_file}: component(s) {missing} missing; a MIDI pipeline has {list(COMPONENTS)}")
    for name in COMPONENTS:
        if not (folder / name).is_dir():
            raise ModelError(f"{folder}: component '{name}' is listed in model_index.json but {name}/ is missing")
    return index


def build_on_meta(name: str, model_cls: type, folder: Path) -> torch.nn.Module:
    """``model_cls`` built from the component folder's ``config.json`` on the meta device (no weights)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder}: component '{name}' has no config.json")
    try:
        with torch.device("meta"):
            if hasattr(model_cls, "config_class") and model_cls.config_class is not None:  # transformers
                return model_cls(model_cls.config_class.from_pretrained(str(folder)))
            config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
            return model_cls.from_config(config)
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config_file}: config does not fit {model_cls.__name__} ({exc})") from None


def check_weights(name: str, model_cls: type, folder: Path) -> None:
    """Compares the weight files with a meta-device build of ``model_cls`` from ``config.json``; a
    ModelError names the component, the key and expected vs found shapes."""
    model = build_on_meta(name, model_cls, folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if not any(folder.glob("*.bin")):
            raise ModelError(f"{folder}: component '{name}' has no weight file (*.safetensors)")
        return  # legacy pickle weights: the library's own loading reports problems
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as exc:
            raise ModelError(f"{file}: unreadable safetensors file ({exc})") from None
    file = files[0]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelError(f"{file}: component '{name}' keys do not match {model_cls.__name__}(config.json): "
                         f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. {detail}")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ModelError(f"{file}: component '{name}' key {key!r} expected shape {shape} (from config.json), "
                             f"found {shapes[key]}")


def _load_transformers_component(name: str, library: str, class_name: str, folder: Path, dtype) -> Any:
    allowed = TRANSFORMERS_ALLOWED[name]
    if library != "transformers" or class_name not in allowed:
        raise ModelError(f"model_index.json: component '{name}' is [{library!r}, {class_name!r}]; "
                         f"expected transformers {allowed[0]}")
    if name.startswith("feature_extractor"):
        # The PIL-backed processors are what upstream (transformers 4.49) computed with; the
        # torchvision-backed ones give slightly different pixel values.
        cls = getattr(transformers, f"{allowed[0]}Pil", None) or getattr(transformers, allowed[0])
        return cls.from_pretrained(str(folder))
    cls = getattr(transformers, allowed[0])
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: component '{name}' has no config.json")
    try:
        # Mismatches are collected (not raised) so the error below can name key and shapes.
        model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{folder}: component '{name}' failed to load ({str(exc).splitlines()[0]})") from None
    for key, ckpt_shape, model_shape in sorted(info.get("mismatched_keys") or []):
        raise ModelError(f"{folder}: component '{name}' key {key!r} expected shape {tuple(model_shape)} (from "
                         f"config.json), found {tuple(ckpt_shape)}")
    for kind in ("missing_keys", "unexpected_keys"):
        if keys := sorted(info.get(kind) or []):
            raise ModelError(f"{folder}: component '{name}' weights do not fit its config: {len(keys)} {kind}, e.g. {keys[:3]}")
    return model.eval()


def component_dtype(torch_dtype: torch.dtype | dict[str, torch.dtype] | None, name: str) -> torch.dtype | None:
    """The dtype for one component: ``torch_dtype`` itself, or its entry (else ``"default"``) when a dict."""
    if isinstance(torch_dtype, dict):
        if unknown := set(torch_dtype) - set(COMPONENTS) - {"default"}:
            raise ModelError(f"torch_dtype names unknown component(s) {sorted(unknown)}; use {list(COMPONENTS)} or 'default'")
        return torch_dtype.get(name, torch_dtype.get("default"))
    return torch_dtype


def load_components(path: str | Path, torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None
                    ) -> dict[str, Any]:
    """Loads and validates the seven components of a MIDI-3D pipeline folder (or cached Hub repo id)
    into keyword arguments for ``MIDIPipeline(...)``. ``torch_dtype``: as in
    :meth:`MIDIPipeline.from_pretrained` (default: as stored, float32 for custom models). ModelError
    for a missing component, unknown class, wrong keys or shapes.
    """
    folder = resolve_pipeline_folder(path)
    index = read_model_index(folder)
    components: dict[str, Any] = {}
    for name in COMPONENTS:
        entry = index[name]
        if not (isinstance(entry, list | tuple) and len(entry) == 2):
            raise ModelError(f"model_index.json: component '{name}' must be [library, class], got {entry!r}")
        library, class_name = entry
        sub, dtype = folder / name, component_dtype(torch_dtype, name)
        if name in CUSTOM_CLASSES:
            cls = CUSTOM_CLASSES[name]
            if class_name != cls.__name__:
                logger.warning("model_index.json names %s for '%s'; loading it as %s", class_name, name, cls.__name__)
            if name == "scheduler":
                components[name] = cls.from_pretrained(str(sub))
                continue
            check_weights(name, cls, sub)
            components[name] = cls.from_pretrained(str(sub), torch_dtype=dtype).eval()
        else:
            components[name] = _load_transformers_component(name, library, class_name, sub, dtype)
    return components
