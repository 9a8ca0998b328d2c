"""The training configuration: one typed schema, YAML + ``--section.key value`` overrides, checked at once.

A config file has the sections below, each a dataclass whose fields are the YAML keys (one to
one). Every field carries a one-line doc (``--print_config`` shows them next to the values).
Loading never imports torch, diffusers or transformers, so a bad config fails in well under a
second; checks that need the hardware or the model's module names live in
:mod:`midi.train_setup` and run before any weight is loaded.

Example::

    cfg = load_config("configs/train/tiny.yaml", ["--train.max_steps", "20", "--lora.rank=4"])
    cfg.lora.rank  # 4

Every problem is reported in one :class:`ConfigError`, one line per problem, each naming the key
and the fix, e.g. ``train.batch_size: must be >= 1, got 0`` or
``lora.rank_typo: unknown key; did you mean lora.rank?``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Kept equal to midi.lora.DEFAULT_TARGET_MODULES (a test checks); importing midi.lora here would
# pull in peft + transformers (~8 s) and defeat the fast failure on bad configs.
DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_MI_BLOCKS = ["blocks.8", "blocks.9", "blocks.10", "blocks.11", "blocks.12"]
TINY_MODEL = "tiny"
DEFAULT_CONFIG = "configs/train/lora_finetune.yaml"  # what a plain `python train_lora.py` loads
TIMESTEP_SAMPLINGS = ("logit_normal", "logit_normal_dist", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(ValueError):
    """One or more config problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


def _field(default: Any, doc: str) -> Any:
    """A dataclass field with a doc string; mutable defaults are copied per instance."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: list(default) if isinstance(default, list) else dict(default),
                     metadata={"doc": doc})  # fmt: skip
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """Which MIDI-3D pipeline to finetune and how the frozen parts run."""

    pretrained_model_name_or_path: str = _field(
        TINY_MODEL, "MIDI-3D pipeline folder in the released layout, a Hub id already in the local cache, or `tiny` "
                    "(a toy pipeline built in-process by `midi.testing`, for tests and demos)")
    tiny_seed: int = _field(0, "seed of the 'tiny' pipeline's random weights (ignored otherwise)")
    mi_blocks: list[str] = _field(DEFAULT_MI_BLOCKS, "transformer blocks whose self-attention is multi-instance "
                                                     "(exact names; upstream uses blocks 8-12 of 21)")
    gradient_checkpointing: bool = _field(True, "recompute block activations in backward: much less activation "
                                                "memory, ~30% slower steps")
    vae_slicing_length: int | None = _field(8, "VAE-encode this many objects at a time (bounds the VAE's memory); "
                                               "`null` = all at once")


@dataclass
class LoraSection:
    """The LoRA adapters (PEFT) and where they go."""

    rank: int = _field(16, "LoRA rank r: higher = more capacity, memory and adapter size")
    alpha: float = _field(16.0, "LoRA alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora)")
    dropout: float = _field(0.1, "dropout on the LoRA input (0 to disable)")
    target_modules: list[str] = _field(DEFAULT_TARGET_MODULES, "transformer Linear modules to adapt (name suffixes); "
                                                               "the default covers self-attention and both "
                                                               "cross-attentions")
    init_lora_weights: bool | str = _field(True, "`true`: B = 0, so training starts exactly at the base model; "
                                                 "`gaussian`")
    use_dora: bool = _field(False, "DoRA (weight-decomposed LoRA)")
    use_rslora: bool = _field(False, "rank-stabilised scaling alpha / sqrt(rank)")
    transformer: bool = _field(True, "put a LoRA on the transformer (the usual choice)")
    image_encoder_1: bool = _field(False, "also put a LoRA on the CLIP image encoder (disables the embedding cache)")
    image_encoder_2: bool = _field(False, "also put a LoRA on the DINOv2 image encoder (disables the embedding cache)")
    image_encoder_1_target_modules: list[str] = _field(["q_proj", "k_proj", "v_proj", "out_proj"],
                                                       "CLIP modules to adapt when lora.image_encoder_1 is true")
    image_encoder_2_target_modules: list[str] = _field(["q_proj", "k_proj", "v_proj", "o_proj"],
                                                       "DINOv2 modules to adapt when lora.image_encoder_2 is true")


@dataclass
class DataConfig:
    """Where the scenes come from and how batches are formed."""

    root: str = _field("data/midi-scenes", "dataset root: a prepare_data.py output (manifest.json) or a 3D-Front root")
    train_split: str = _field("train", "split to train on (`train`, `val`, `test`, `all`)")
    val_split: str = _field("val", "split used for validation loss and previews")
    synthetic_if_missing: int = _field(0, "if data.root does not exist, write this many synthetic scenes there "
                                       "first (0 = off: a missing root is an error). A config file's value only "
                                       "applies to its own data.root: with --data.root pass it again")
    image_size: int = _field(512, "side of the square images the scenes are resized to before the encoders' preprocessing")
    num_surface_points: int = _field(20480, "surface points (xyz + normal) per object fed to the VAE encoder")
    background: list[float] = _field([1.0, 1.0, 1.0], "RGB in [0, 1] outside the instance masks (upstream: white)")
    min_mask_fraction: float = _field(0.001, "drop instances whose mask covers at most this fraction of the image")
    max_num_instances: int = _field(10, "keep at most this many instances per scene (a seeded random subset per draw)")
    batching: Literal["packed", "padded"] = _field("packed", "`packed`: scenes back to back, no padding rows. "
                                                             "`padded`: upstream's layout, every scene filled with "
                                                             "duplicate instances up to "
                                                             "`data.num_instances_per_batch` rows (duplicates attend "
                                                             "alone)")
    num_instances_per_batch: int | None = _field(None, "rows per scene in padded mode (null = "
                                                       "`data.max_num_instances`)")
    bucket_by_instances: bool = _field(False, "group scenes with similar instance counts into the same batch (packed mode)")
    max_tokens_per_batch: int | None = _field(None, "cap on latent tokens per batch (instances x tokens per instance,"
                                                    " 2048 for MIDI); batches then hold up to `train.batch_size` "
                                                    "scenes; a scene over the cap trains alone (packed mode)")
    num_workers: int = _field(2, "DataLoader worker processes per process (0 = load in the training process)")


@dataclass
class CacheConfig:
    """Precomputed frozen-model outputs (VAE posteriors, image embeddings) on disk."""

    enabled: bool = _field(False, "precompute what the frozen models produce: VAE posteriors (mean, logvar) per "
                                  "object and CLIP/DINOv2 embeddings per view, on disk, reused across runs")
    dir: str = _field("outputs/cache", "cache folder; entries are keyed by the files' path+size+mtime, a hash of the "
                                       "model weights and the sample settings, so one folder can serve many runs")
    num_surface_subsamples: int = _field(4, "surface subsets encoded per object; one is drawn per step (without the "
                                            "cache every step draws a new subset)")


@dataclass
class ObjectiveConfig:
    """The rectified-flow objective (upstream-facts 5.3)."""

    timestep_sampling: str = _field("logit_normal", "density of sigma: `logit_normal` (= MIDI's `logit_normal_dist`),"
                                                    " `mode`, `uniform`; the scheduler's shift is applied on top")
    logit_mean: float = _field(0.0, "mean of the logit-normal density")
    logit_std: float = _field(1.0, "std of the logit-normal density")
    mode_scale: float = _field(1.29, "scale of the 'mode' density")
    loss_weighting: str = _field("none", "per-sample loss weight: `none` (MIDI), `sigma_sqrt`, `cosmap`")
    condition_drop_prob: float = _field(0.1, "probability per scene of replacing both image conditions by zeros "
                                        "(what classifier-free guidance uses as the negative)")
    sample_posterior: bool = _field(True, "x0 = a sample of the VAE posterior (true) or its mean (false)")


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate schedule and clipping."""

    name: Literal["adamw", "adamw_8bit"] = _field("adamw", "`adamw`, or `adamw_8bit` (bitsandbytes, CUDA)")
    learning_rate: float = _field(1e-4, "peak learning rate")
    betas: list[float] = _field([0.9, 0.999], "AdamW betas")
    weight_decay: float = _field(0.01, "AdamW weight decay")
    eps: float = _field(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = _field(1.0, "clip the gradient norm to this (null = no clipping; the norm is still logged)")
    lr_scheduler: str = _field("cosine", "schedule: " + ", ".join(LR_SCHEDULERS))
    lr_warmup_steps: int = _field(100, "linear warm-up (from 0) over this many optimizer steps")


@dataclass
class TrainConfig:
    """The run: output folder, batch, length, precision."""

    output_dir: str = _field("outputs/midi-lora", "run folder: config, logs, checkpoints, lora-final/")
    seed: int = _field(42, "seeds the data order, views, subsets, sigmas, noise, condition dropout and LoRA dropout")
    batch_size: int = _field(4, "scenes per process per micro-step (all their instances)")
    gradient_accumulation_steps: int = _field(1, "micro-steps per optimizer step")
    max_steps: int | None = _field(None, "optimizer steps to run (null = train.num_epochs epochs)")
    num_epochs: int = _field(100, "epochs to run when train.max_steps is null")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _field(
        "auto", "`auto` = bf16 on GPUs that have it, fp32 otherwise; `no`, `bf16`, `fp16` (GPU only). Frozen weights "
                "are stored in that dtype, LoRA weights stay fp32; the VAE is always fp32")
    allow_tf32: bool = _field(True, "allow TF32 matmuls on Ampere+ GPUs")
    max_consecutive_nonfinite: int = _field(5, "a step with a non-finite loss or gradient is skipped (no update) and "
                                               "counted; after this many in a row training stops with an emergency "
                                               "checkpoint")


@dataclass
class CheckpointingConfig:
    """Checkpoints (full training state + the adapter in its final format)."""

    every_n_steps: int = _field(500, "write `checkpoint-N/` every N optimizer steps (and at the last step)")
    checkpoints_total_limit: int | None = _field(3, "keep only the newest N checkpoints (null = keep all)")
    resume_from_checkpoint: str | None = _field(None, "latest, a checkpoint folder, or null (also --resume_from_checkpoint)")
    verify_exports: bool = _field(False, "also reload every checkpoint's adapter through the inference path "
                                         "(`lora-final/` is always checked)")


@dataclass
class ValidationConfig:
    """Validation loss and preview generation."""

    every_n_steps: int = _field(500, "validation loss every N steps and at the end (0 = off); the best one is "
                                     "exported to `best/`")
    num_scenes: int = _field(8, "validation scenes (the first N of data.val_split)")
    sigmas: list[float] = _field([0.1, 0.3, 0.5, 0.7, 0.9], "fixed noise levels; with fixed noise and the posterior "
                                                            "mean the number is deterministic")
    seed: int = _field(0, "seed of the validation noise (the same every time)")
    preview_every_n_steps: int = _field(1000, "generate meshes for a few val scenes every N steps and at the end (0 ="
                                              " off)")
    num_preview_scenes: int = _field(2, "scenes generated for previews")
    num_inference_steps: int = _field(50, "sampler steps of the previews")
    guidance_scale: float = _field(7.0, "classifier-free guidance of the previews")
    octree_depth: int = _field(8, "decoding grid, 2^depth + 1 points per axis (8 is the inference default; lower is "
                                  "faster)")
    preview_image_size: int = _field(256, "rendered preview size; previews show input image and rendered meshes side "
                                          "by side")


@dataclass
class LoggingConfig:
    """Trackers and console output."""

    report_to: Literal["tensorboard", "wandb", "none"] = _field("tensorboard", "`tensorboard`, `wandb` (needs wandb) or "
                                                                               "`none`")
    logging_dir: str = _field("logs", "tracker folder, relative to train.output_dir")
    project_name: str = _field("midi-lora", "tracker project / run group name")
    log_every_n_steps: int = _field(10, "log `train/loss`, `train/lr`, `train/grad_norm`, `train/scenes_per_s`, "
                                        "`train/latent_tokens_per_s`, `train/peak_memory_gb`, `train/epoch`, "
                                        "`train/nonfinite_steps` (plus `val/loss` and preview images on their own "
                                        "cadence)")
    progress_bar: bool = _field(True, "tqdm progress bar with loss and ETA (main process)")


@dataclass
class TrainingConfig:
    """The whole training config: one attribute per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainingConfig)}  # type: ignore[misc]


# ----------------------------------------------------------------------------- schema helpers
def section_fields(section: str) -> dict[str, dataclasses.Field]:
    """The fields of one section, by key."""
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def all_keys() -> list[str]:
    """Every dotted key of the schema (``section.key``), in schema order."""
    return [f"{s}.{k}" for s in SECTIONS for k in section_fields(s)]


def key_doc(dotted: str) -> str:
    """The one-line doc of a dotted key."""
    section, key = dotted.split(".", 1)
    return section_fields(section)[key].metadata["doc"]


def _hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


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

    Accepts what YAML 1.1 leaves as strings (``1e-4`` for a float, ``none`` for null) and a
    comma-separated string for a list.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg)
            except ValueError:
                continue
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
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and not math.isfinite(number):  # YAML's .nan/.inf: no key means anything by them
            raise ValueError(f"must be a finite number, got {value!r}")
        if number is not None:
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"must be {_type_name(hint)}, got {value!r}")


# ----------------------------------------------------------------------------- loading
def parse_overrides(args: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Parses ``--section.key value`` / ``--section.key=value`` pairs (values are YAML).

    Returns:
        ``([(dotted key, value), ...], problems)``.
    """
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
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections (model:, lora:, data:, ...)"], str(path))
    return data


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
            setattr(getattr(cfg, section), key, coerce_value(value, _hints(section)[key]))
        except ValueError as exc:
            problems.append(f"{dotted}: {exc}")


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, environment: bool = False
) -> TrainingConfig:
    """Reads a YAML config, applies ``--section.key value`` overrides and validates everything.

    Args:
        path: YAML file (None = schema defaults only).
        overrides: command-line overrides, e.g. ``["--train.batch_size", "2", "--lora.rank=8"]``.
        environment: also check paths, optional packages and the hardware
            (:func:`check_environment`; imports torch only when the precision needs it).

    Returns:
        The resolved config.

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
                                "synthetic set there)")  # fmt: skip
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


def _at_least(problems: list[str], key: str, value: float | None, low: float, allow_none: bool = False) -> None:
    if value is None:
        if not allow_none:
            problems.append(f"{key}: must be set")
        return
    if value < low:
        problems.append(f"{key}: must be >= {low:g}, got {value!r}")


def _in_range(problems: list[str], key: str, value: float, low: float, high: float, closed_low: bool = True) -> None:
    ok = (low <= value if closed_low else low < value) and value <= high
    if not ok:
        bracket = "[" if closed_low else "("
        problems.append(f"{key}: must be in {bracket}{low:g}, {high:g}], got {value!r}")


def _one_of(problems: list[str], key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"{key}: must be one of {', '.join(choices)}, got {value!r}{hint}")


def validate(cfg: TrainingConfig) -> list[str]:
    """Field ranges and cross-field rules that need neither torch nor the model.

    Returns:
        One line per problem (empty when the config is valid).
    """
    problems: list[str] = []
    for check in (_validate_model, _validate_lora, _validate_data, _validate_objective,
                  _validate_optimizer, _validate_train, _validate_checkpointing, _validate_validation,
                  _validate_logging):  # fmt: skip
        check(cfg, problems)
    return problems


def _validate_model(cfg: TrainingConfig, p: list[str]) -> None:
    m = cfg.model
    if not m.pretrained_model_name_or_path:
        p.append("model.pretrained_model_name_or_path: must be a pipeline folder, a cached Hub id or 'tiny'")
    if not m.mi_blocks:
        p.append("model.mi_blocks: must name at least one block (upstream MIDI: blocks.8 ... blocks.12)")
    for name in m.mi_blocks:
        if not _BLOCK_NAME.match(name):
            p.append(f"model.mi_blocks: {name!r} is not a block name like 'blocks.8'")
    if len(set(m.mi_blocks)) != len(m.mi_blocks):
        p.append("model.mi_blocks: lists a block twice")
    _at_least(p, "model.vae_slicing_length", m.vae_slicing_length, 1, allow_none=True)


def _validate_lora(cfg: TrainingConfig, p: list[str]) -> None:
    lo = cfg.lora
    _at_least(p, "lora.rank", lo.rank, 1)
    if lo.alpha <= 0:
        p.append(f"lora.alpha: must be > 0, got {lo.alpha!r}")
    _in_range(p, "lora.dropout", lo.dropout, 0.0, 0.99)
    if lo.init_lora_weights not in (True, "gaussian"):
        p.append(f"lora.init_lora_weights: must be true or 'gaussian', got {lo.init_lora_weights!r}")
    if not (lo.transformer or lo.image_encoder_1 or lo.image_encoder_2):
        p.append("lora: lora.transformer, lora.image_encoder_1 and lora.image_encoder_2 are all false, so nothing "
                 "would be trained; set lora.transformer: true")
    for key, enabled in (("target_modules", lo.transformer), ("image_encoder_1_target_modules", lo.image_encoder_1),
                         ("image_encoder_2_target_modules", lo.image_encoder_2)):  # fmt: skip
        if enabled and not getattr(lo, key):
            p.append(f"lora.{key}: must list at least one module name (e.g. {DEFAULT_TARGET_MODULES})")


def _validate_data(cfg: TrainingConfig, p: list[str]) -> None:
    d = cfg.data
    for key in ("train_split", "val_split"):
        _one_of(p, f"data.{key}", getattr(d, key), ("train", "val", "test", "all"))
    _at_least(p, "data.synthetic_if_missing", d.synthetic_if_missing, 0)
    _at_least(p, "data.image_size", d.image_size, 8)
    _at_least(p, "data.num_surface_points", d.num_surface_points, 1)
    if len(d.background) != 3 or any(not 0.0 <= c <= 1.0 for c in d.background):
        p.append(f"data.background: must be 3 numbers in [0, 1] (RGB), got {d.background!r}")
    _in_range(p, "data.min_mask_fraction", d.min_mask_fraction, 0.0, 1.0)
    _at_least(p, "data.max_num_instances", d.max_num_instances, 1)
    _at_least(p, "data.num_workers", d.num_workers, 0)
    _at_least(p, "data.num_instances_per_batch", d.num_instances_per_batch, 1, allow_none=True)
    _at_least(p, "data.max_tokens_per_batch", d.max_tokens_per_batch, 1, allow_none=True)
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
    _at_least(p, "cache.num_surface_subsamples", cfg.cache.num_surface_subsamples, 1)
    if cfg.cache.enabled and not cfg.cache.dir:
        p.append("cache.dir: must be set when cache.enabled is true")


def _validate_objective(cfg: TrainingConfig, p: list[str]) -> None:
    o = cfg.objective
    _one_of(p, "objective.timestep_sampling", o.timestep_sampling, TIMESTEP_SAMPLINGS)
    _one_of(p, "objective.loss_weighting", o.loss_weighting, LOSS_WEIGHTINGS)
    if o.logit_std <= 0:
        p.append(f"objective.logit_std: must be > 0, got {o.logit_std!r}")
    _in_range(p, "objective.condition_drop_prob", o.condition_drop_prob, 0.0, 1.0)


def _validate_optimizer(cfg: TrainingConfig, p: list[str]) -> None:
    o = cfg.optimizer
    if o.learning_rate <= 0:
        p.append(f"optimizer.learning_rate: must be > 0, got {o.learning_rate!r}")
    if len(o.betas) != 2 or any(not 0.0 <= b < 1.0 for b in o.betas):
        p.append(f"optimizer.betas: must be two numbers in [0, 1), got {o.betas!r}")
    _at_least(p, "optimizer.weight_decay", o.weight_decay, 0.0)
    if o.eps <= 0:
        p.append(f"optimizer.eps: must be > 0, got {o.eps!r}")
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        p.append(f"optimizer.max_grad_norm: must be > 0 or null (no clipping), got {o.max_grad_norm!r}")
    _one_of(p, "optimizer.lr_scheduler", o.lr_scheduler, LR_SCHEDULERS)
    _at_least(p, "optimizer.lr_warmup_steps", o.lr_warmup_steps, 0)


def _validate_train(cfg: TrainingConfig, p: list[str]) -> None:
    t = cfg.train
    if not t.output_dir:
        p.append("train.output_dir: must be set")
    _at_least(p, "train.batch_size", t.batch_size, 1)
    _at_least(p, "train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1)
    _at_least(p, "train.max_steps", t.max_steps, 1, allow_none=True)
    if t.max_steps is None:
        _at_least(p, "train.num_epochs", t.num_epochs, 1)
    _at_least(p, "train.max_consecutive_nonfinite", t.max_consecutive_nonfinite, 1)


def _validate_checkpointing(cfg: TrainingConfig, p: list[str]) -> None:
    c = cfg.checkpointing
    _at_least(p, "checkpointing.every_n_steps", c.every_n_steps, 1)
    _at_least(p, "checkpointing.checkpoints_total_limit", c.checkpoints_total_limit, 1, allow_none=True)
    if c.resume_from_checkpoint == "":
        p.append("checkpointing.resume_from_checkpoint: must be 'latest', a checkpoint folder or null")


def _validate_validation(cfg: TrainingConfig, p: list[str]) -> None:
    v = cfg.validation
    _at_least(p, "validation.every_n_steps", v.every_n_steps, 0)
    _at_least(p, "validation.preview_every_n_steps", v.preview_every_n_steps, 0)
    _at_least(p, "validation.num_scenes", v.num_scenes, 1)
    _at_least(p, "validation.num_preview_scenes", v.num_preview_scenes, 0)
    _at_least(p, "validation.num_inference_steps", v.num_inference_steps, 1)
    _at_least(p, "validation.guidance_scale", v.guidance_scale, 0.0)
    _at_least(p, "validation.preview_image_size", v.preview_image_size, 16)
    if not 2 <= v.octree_depth <= 10:
        p.append(f"validation.octree_depth: must be in [2, 10], got {v.octree_depth}")
    if not v.sigmas:
        p.append("validation.sigmas: must list at least one noise level, e.g. [0.1, 0.5, 0.9]")
    for s in v.sigmas:
        if not 0.0 < s <= 1.0:
            p.append(f"validation.sigmas: every sigma must be in (0, 1], got {s!r}")


def _validate_logging(cfg: TrainingConfig, p: list[str]) -> None:
    _at_least(p, "logging.log_every_n_steps", cfg.logging.log_every_n_steps, 1)


# ----------------------------------------------------------------------------- environment
def training_device_is_cpu() -> bool:
    """True when training will run on CPU (no CUDA device, or accelerate told to use the CPU)."""
    import os

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    import torch

    return not torch.cuda.is_available()


def check_environment(cfg: TrainingConfig) -> list[str]:
    """Checks what the config needs from this machine: paths, optional packages, precision.

    Returns:
        One line per problem.
    """
    import importlib.util

    p: list[str] = []
    if cfg.train.mixed_precision == "fp16" and training_device_is_cpu():
        p.append("train.mixed_precision: fp16 needs a CUDA GPU and none is available; use auto, no or bf16")
    if cfg.optimizer.name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        p.append("optimizer.name: adamw_8bit needs the bitsandbytes package (pip install bitsandbytes) and a "
                 "CUDA GPU; install it or use adamw")
    if cfg.logging.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        p.append("logging.report_to: wandb needs the wandb package (pip install wandb); or use tensorboard")
    _check_paths(cfg, p)
    return p


def _check_paths(cfg: TrainingConfig, p: list[str]) -> None:
    from midi.data.layout import detect_layout

    root = Path(cfg.data.root)
    if not root.exists():
        if cfg.data.synthetic_if_missing == 0:
            p.append(f"data.root: {root} does not exist; prepare data with `python prepare_data.py --input_dir RAW "
                     f"--output_dir {root}` or set data.synthetic_if_missing: N for a synthetic demo set")
    elif detect_layout(root) is None:
        p.append(f"data.root: {root} is neither a prepare_data.py output (manifest.json) nor a 3D-Front root")
    model = cfg.model.pretrained_model_name_or_path
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") != 1
    if model != TINY_MODEL and looks_local and not Path(model).expanduser().is_dir():
        p.append(f"model.pretrained_model_name_or_path: {model} is not a folder (download the weights, e.g. "
                 "`hf download VAST-AI/MIDI-3D --local-dir pretrained_weights/MIDI-3D`, or use 'tiny')")
    resume = cfg.checkpointing.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        p.append(f"checkpointing.resume_from_checkpoint: {resume} is not a checkpoint folder (use 'latest' or "
                 f"a {cfg.train.output_dir}/checkpoint-N folder)")


# ----------------------------------------------------------------------------- output
def config_to_dict(cfg: TrainingConfig) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts (YAML/JSON-able)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: TrainingConfig, comments: bool = False) -> str:
    """The resolved config as YAML; with ``comments`` every key carries its doc."""
    if not comments:
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    lines = []
    for section, body in config_to_dict(cfg).items():
        lines.append(f"{section}:")
        for key, value in body.items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            lines.append(f"  {text}  # {key_doc(f'{section}.{key}')}")
    return "\n".join(lines) + "\n"


def render_key_tables(cfg: TrainingConfig) -> str:
    """TRAINING_README's key tables (Markdown): every key with its value in ``cfg`` and its doc.

    The README shows them for :data:`DEFAULT_CONFIG` and a test keeps them equal, so the schema
    docs and the default config are the one source of both.
    """

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:g}"
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        return text if value is None or isinstance(value, bool | int) else f"`{text}`"

    out = []
    for section, body in config_to_dict(cfg).items():
        out += [f"### {section}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        out += [f"| `{section}.{k}` | {show(v)} | {key_doc(f'{section}.{k}')} |" for k, v in body.items()] + [""]
    return "\n".join(out)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> TrainingConfig:
    """Rebuilds (and validates) a config saved with :func:`config_to_dict`.

    Raises:
        ConfigError: the saved config does not fit the schema.
    """
    problems: list[str] = []
    cfg = TrainingConfig()
    _apply(cfg, _flatten(data, problems), problems)
    problems += _merge(problems, validate(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg
