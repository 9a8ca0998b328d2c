"""Loading a training config: YAML + ``--section.key value`` overrides, every problem at once.

``load_config("configs/train/tiny.yaml", ["--train.max_steps", "20", "--lora.rank=4"])`` raises one
:class:`midi.errors.ConfigError` with one line per problem, naming the key and the fix (e.g.
``lora.rank_typo: unknown key; did you mean lora.rank?``). Loading never imports torch (only
:func:`training_device_is_cpu` does, for fp16), so a bad config fails in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from midi.config import (
    DEFAULT_TARGET_MODULES,
    SECTIONS,
    LoraSection,
    TrainingConfig,
    all_keys,
    check_model_path,
    section_fields,
)
from midi.data.layout import detect_layout
from midi.errors import ConfigError, ModelError


def _suggest(section: str, key: str) -> str:
    """``; did you mean x.y?`` for a mistyped key (searching its section first, then all keys)."""
    own = difflib.get_close_matches(key, list(section_fields(section)), n=1, cutoff=0.6) if section in SECTIONS else []
    if own:
        return f"; did you mean {section}.{own[0]}?"
    elsewhere = [k for k in all_keys() if k.split(".", 1)[1] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]}?"
    close = difflib.get_close_matches(f"{section}.{key}", all_keys(), n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else ""


# ----------------------------------------------------------------------------- value checking
def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def coerce_value(value: Any, hint: Any) -> Any:
    """Converts a parsed YAML value to ``hint``; raises ValueError with the expected type in words.
    Accepts what YAML 1.1 leaves as strings (``1e-4``, ``none``) and a comma-separated list."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ValueError):
                return coerce_value(value, arg)
        raise ValueError(f"must be {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"must be {_type_name(hint)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be {_type_name(hint)}, got {value!r}")
        (item,) = typing.get_args(hint)
        return [coerce_value(v, item) for v in value]
    return _coerce_scalar(value, hint)


def _coerce_scalar(value: Any, hint: Any) -> Any:
    if hint in (bool, int, str) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    if hint is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if not math.isfinite(number):  # YAML's .nan/.inf: no key means anything by them
                raise ValueError(f"must be a finite number, got {value!r}")
            return number
    raise ValueError(f"must be {_type_name(hint)}, got {value!r}")


# ----------------------------------------------------------------------------- loading
def parse_overrides(args: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """``--section.key value`` / ``--section.key=value`` pairs (values are YAML) -> ``(pairs, problems)``."""
    pairs: list[tuple[str, Any]] = []
    problems: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            problems.append(f"{arg}: expected an override --section.key value (e.g. --train.batch_size 2)")
            i += 1
            continue
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 2
        else:
            problems.append(f"{arg[2:]}: override has no value (--{arg[2:]} VALUE)")
            break
        try:
            pairs.append((key, yaml.safe_load(text) if text != "" else ""))
        except yaml.YAMLError:
            pairs.append((key, text))
    return pairs, problems


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(["config file not found (shipped configs are in configs/train/)"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML ({' '.join(str(exc).split())})"], str(path)) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections (model:, lora:, data:, ...)"], str(path))
    return data or {}


def _flatten(data: dict[str, Any], problems: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for section, body in data.items():
        if section not in SECTIONS:
            problems.append(f"{section}: unknown section{_suggest_section(str(section))}")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{section}: must be a mapping of keys, got {body!r}")
            continue
        pairs.extend((f"{section}.{key}", value) for key, value in body.items())
    return pairs


def _suggest_section(name: str) -> str:
    close = difflib.get_close_matches(name, list(SECTIONS), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f" (sections: {', '.join(SECTIONS)})"


def _apply(cfg: TrainingConfig, pairs: list[tuple[str, Any]], problems: list[str]) -> None:
    for dotted, value in pairs:
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            problems.append(f"{dotted}: unknown section {section!r}{_suggest_section(section)}")
            continue
        if key not in section_fields(section):
            problems.append(f"{dotted}: unknown key{_suggest(section, key)}")
            continue
        try:
            setattr(getattr(cfg, section), key, coerce_value(value, typing.get_type_hints(SECTIONS[section])[key]))
        except ValueError as exc:
            problems.append(f"{dotted}: {exc}")


def load_config(path: str | Path | None, overrides: list[str] | None = None, environment: bool = False
                ) -> TrainingConfig:
    """Reads a YAML config (None: schema defaults), applies ``--section.key value`` overrides and
    validates everything; ``environment`` also runs :func:`check_environment`.

    Raises:
        ConfigError: every problem found, one line each.
    """
    problems: list[str] = []
    cfg = TrainingConfig()
    if path is not None:
        _apply(cfg, _flatten(_read_yaml(Path(path)), problems), problems)
    pairs, parse_problems = parse_overrides(list(overrides or []))
    problems += parse_problems
    _apply(cfg, pairs, problems)
    problems += _merge(problems, validate(cfg))
    given = {key for key, _ in pairs}
    if environment:
        if {"data.root"} <= given and "data.synthetic_if_missing" not in given and cfg.data.synthetic_if_missing:
            # The file's synthetic set belongs to the file's root: a mistyped --data.root must not get one.
            cfg.data.synthetic_if_missing = 0
            if not Path(cfg.data.root).exists():
                problems.append(f"data.root: {cfg.data.root} does not exist (the config's data.synthetic_if_missing "
                                "applies only to its own data.root; add --data.synthetic_if_missing N to write a "
                                "synthetic set there)")
        problems += _merge(problems, check_environment(cfg))
    if problems:
        raise ConfigError(problems, str(path) if path is not None else None)
    return cfg


def _merge(found: list[str], more: list[str]) -> list[str]:
    """The problems of ``more`` about keys that have no problem in ``found`` yet (a key whose
    value was rejected keeps its default, which must not be reported a second time)."""
    seen = {p.split(":", 1)[0] for p in found}
    return [p for p in more if p.split(":", 1)[0] not in seen]


# ----------------------------------------------------------------------------- validation
_BLOCK_NAME = re.compile(r"^blocks\.\d+$")


def _check_rules(cfg: TrainingConfig, p: list[str]) -> None:
    """The per-field rules the schema declares (``_field(..., ge=, gt=, le=, choices=)``)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            rule, key, value = f.metadata, f"{section.name}.{f.name}", getattr(values, f.name)
            if not rule.keys() & {"ge", "gt", "le", "choices"}:
                continue
            if value is None:
                if "None" not in str(f.type):  # an Optional field's null means "off" / "all"
                    p.append(f"{key}: must be set")
            elif "choices" in rule and value not in rule["choices"]:
                close = difflib.get_close_matches(value, rule["choices"], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                p.append(f"{key}: must be one of {', '.join(rule['choices'])}, got {value!r}{hint}")
            elif "le" in rule:
                low = rule.get("ge", rule.get("gt"))
                if not ((value >= low if "ge" in rule else value > low) and value <= rule["le"]):
                    p.append(f"{key}: must be in {'[' if 'ge' in rule else '('}{low:g}, {rule['le']:g}], got {value!r}")
            elif "ge" in rule and value < rule["ge"]:
                p.append(f"{key}: must be >= {rule['ge']:g}, got {value!r}")
            elif "gt" in rule and value <= rule["gt"]:
                p.append(f"{key}: must be > {rule['gt']:g}, got {value!r}")


def validate(cfg: TrainingConfig) -> list[str]:
    """Field ranges and cross-field rules that need neither torch nor the model; one line per problem."""
    problems: list[str] = []
    for check in (_check_rules, _validate_model, _validate_lora, _validate_data, _validate_optimizer,
                  _validate_train, _validate_validation):
        check(cfg, problems)
    return problems


def _validate_model(cfg: TrainingConfig, p: list[str]) -> None:
    m = cfg.model
    if not m.pretrained_model_name_or_path:
        p.append("model.pretrained_model_name_or_path: must be a pipeline folder, a cached Hub id or 'tiny'")
    # null is resolved from the model before it loads (midi.training.build.resolve_mi_blocks)
    if m.mi_blocks is not None and not m.mi_blocks:
        p.append("model.mi_blocks: must name at least one block (upstream MIDI: blocks.8 ... blocks.12), or null for "
                 "the model's own")
    for name in m.mi_blocks or []:
        if not _BLOCK_NAME.match(name):
            p.append(f"model.mi_blocks: {name!r} is not a block name like 'blocks.8'")
    if m.mi_blocks and len(set(m.mi_blocks)) != len(m.mi_blocks):
        p.append("model.mi_blocks: lists a block twice")
    if m.finetune == "lora" and m.train_image_encoders:
        p.append("model.train_image_encoders: only applies to model.finetune: full; for LoRA adapters on the "
                 "encoders set lora.image_encoder_1 / lora.image_encoder_2 instead")
    if m.finetune == "full" and cfg.checkpointing.verify_exports:
        p.append("checkpointing.verify_exports: only checks LoRA checkpoints (a full-finetune checkpoint holds the bare "
                 "trained models; pipeline-final/ is always checked); set it to false")


def _validate_lora(cfg: TrainingConfig, p: list[str]) -> None:
    lo = cfg.lora
    if cfg.model.finetune == "full":
        # Defaults are ignored (so a LoRA config can be switched with --model.finetune full); a chosen value
        # would silently do nothing, so it is refused.
        default = LoraSection()
        for key in section_fields("lora"):
            if getattr(lo, key) != getattr(default, key):
                p.append(f"lora.{key}: only used by model.finetune: lora (full finetuning trains the weights "
                         "themselves); remove it, or set model.finetune: lora")
        return
    if lo.init_lora_weights not in (True, "gaussian"):
        p.append(f"lora.init_lora_weights: must be true or 'gaussian', got {lo.init_lora_weights!r}")
    if not (lo.transformer or lo.image_encoder_1 or lo.image_encoder_2):
        p.append("lora: lora.transformer, lora.image_encoder_1 and lora.image_encoder_2 are all false, so nothing "
                 "would be trained; set lora.transformer: true")
    enabled_by = {"target_modules": lo.transformer, "image_encoder_1_target_modules": lo.image_encoder_1,
                  "image_encoder_2_target_modules": lo.image_encoder_2}
    for key, enabled in enabled_by.items():
        if enabled and not getattr(lo, key):
            p.append(f"lora.{key}: must list at least one module name (e.g. {list(DEFAULT_TARGET_MODULES)})")


def _validate_data(cfg: TrainingConfig, p: list[str]) -> None:
    d = cfg.data
    if len(d.background) != 3 or any(not 0.0 <= c <= 1.0 for c in d.background):
        p.append(f"data.background: must be 3 numbers in [0, 1] (RGB), got {d.background!r}")
    if d.batching == "padded":
        if d.num_instances_per_batch is not None and d.num_instances_per_batch < d.max_num_instances:
            p.append(f"data.num_instances_per_batch: must be >= data.max_num_instances ({d.max_num_instances}) in "
                     f"padded mode, got {d.num_instances_per_batch}; raise it or lower data.max_num_instances")
        for key in ("bucket_by_instances", "max_tokens_per_batch"):
            if getattr(d, key):
                p.append(f"data.{key}: only applies to data.batching: packed (padded scenes all have the same "
                         "number of rows); remove it or use packed batching")
    elif d.num_instances_per_batch is not None:
        p.append("data.num_instances_per_batch: only applies to data.batching: padded; remove it (packed batches "
                 "have no padding rows)")
    if cfg.cache.enabled and not cfg.cache.dir:
        p.append("cache.dir: must be set when cache.enabled is true")


def _validate_optimizer(cfg: TrainingConfig, p: list[str]) -> None:
    o = cfg.optimizer
    if len(o.betas) != 2 or any(not 0.0 <= b < 1.0 for b in o.betas):
        p.append(f"optimizer.betas: must be two numbers in [0, 1), got {o.betas!r}")
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        p.append(f"optimizer.max_grad_norm: must be > 0 or null (no clipping), got {o.max_grad_norm!r}")


def _validate_train(cfg: TrainingConfig, p: list[str]) -> None:
    t = cfg.train
    if not t.output_dir:
        p.append("train.output_dir: must be set")
    if t.max_steps is None and t.num_epochs < 1:  # num_epochs only counts without max_steps
        p.append(f"train.num_epochs: must be >= 1, got {t.num_epochs!r}")
    if cfg.checkpointing.resume_from_checkpoint == "":
        p.append("checkpointing.resume_from_checkpoint: must be 'latest', a checkpoint folder or null")


def _validate_validation(cfg: TrainingConfig, p: list[str]) -> None:
    v = cfg.validation
    if not v.sigmas:
        p.append("validation.sigmas: must list at least one noise level, e.g. [0.1, 0.5, 0.9]")
    for s in v.sigmas:
        if not 0.0 < s <= 1.0:
            p.append(f"validation.sigmas: every sigma must be in (0, 1], got {s!r}")


# ----------------------------------------------------------------------------- environment
def training_device_is_cpu() -> bool:
    """True when training will run on CPU (no CUDA device, or accelerate told to use the CPU)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    import torch  # deferred: only an fp16 config asks, and loading a config must stay torch-free

    return not torch.cuda.is_available()


def check_environment(cfg: TrainingConfig) -> list[str]:
    """What the config needs from this machine (paths, optional packages, precision); one line per problem."""
    p: list[str] = []
    if cfg.train.mixed_precision == "fp16" and training_device_is_cpu():
        p.append("train.mixed_precision: fp16 needs a CUDA GPU and none is available; use auto, no or bf16")
    if cfg.optimizer.name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        p.append("optimizer.name: adamw_8bit needs the bitsandbytes package (pip install bitsandbytes) and a "
                 "CUDA GPU; install it or use adamw")
    if cfg.logging.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        p.append("logging.report_to: wandb needs the wandb package (pip install wandb); or use tensorboard")
    root = Path(cfg.data.root)
    if not root.exists():
        if cfg.data.synthetic_if_missing == 0:
            p.append(f"data.root: {root} does not exist; prepare data with `python prepare_data.py --input_dir RAW "
                     f"--output_dir {root}` or set data.synthetic_if_missing: N for a synthetic demo set")
    elif detect_layout(root) is None:
        p.append(f"data.root: {root} is neither a prepare_data.py output (manifest.json) nor a 3D-Front root")
    try:
        check_model_path(cfg.model.pretrained_model_name_or_path)
    except ModelError as exc:
        p.append(f"model.pretrained_model_name_or_path: {exc}")
    resume = cfg.checkpointing.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        p.append(f"checkpointing.resume_from_checkpoint: {resume} is not a checkpoint folder (use 'latest' or "
                 f"a {cfg.train.output_dir}/checkpoint-N folder)")
    return p
