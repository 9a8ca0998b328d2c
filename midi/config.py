"""The training configuration schema and the constants the whole toolkit shares (torch-free).

A config file has the sections below, each a dataclass whose fields are the YAML keys (one to
one). Every field carries a one-line doc (``--print_config`` shows them next to the values).
Loading and checking a config is :mod:`midi.config_load`; checks that need the hardware or the
model's module names live in the training package and run before any weight is loaded.

This module is also the one home of the names more than one part of the toolkit uses: the tiny
model's name (:func:`is_tiny` is the only comparison with it), the download hint, default LoRA
targets and multi-instance blocks, file suffixes and the run folder's file names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.constants import HF_HUB_CACHE

from midi.errors import ModelError

TINY_MODEL = "tiny"
HUB_REPO = "VAST-AI/MIDI-3D"
DEFAULT_MODEL_DIR = "pretrained_weights/MIDI-3D"
DOWNLOAD_HINT = f"hf download {HUB_REPO} --local-dir {DEFAULT_MODEL_DIR}"
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_MI_BLOCKS: tuple[str, ...] = ("blocks.8", "blocks.9", "blocks.10", "blocks.11", "blocks.12")
MESH_SUFFIXES: tuple[str, ...] = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RGB_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # inference's X_rgb.* / X_seg.* pairs
DEFAULT_CONFIG = "configs/train/lora_finetune.yaml"  # what a plain `python train_lora.py` loads
TIMESTEP_SAMPLINGS = ("logit_normal", "logit_normal_dist", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SPLITS = ("train", "val", "test", "all")
FINETUNE_METHODS = ("lora", "full")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# The run folder (train.output_dir) and the adapter folders in it.
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
FINAL_DIR = "lora-final"
FULL_FINAL_DIR = "pipeline-final"  # model.finetune: full exports a whole pipeline folder instead of an adapter
BEST_DIR = "best"
ADAPTER_SUBDIR = "lora"
METADATA_FILE = "midi_adapter.json"
TRAINING_FILE = "midi_training.json"  # a full-finetune export's record: step, base model, config, export check
CUSTOM_ADAPTER_FILE = "custom_adapter.safetensors"
DRY_RUN_JSON = "dry_run.json"


def trained_models(cfg: TrainingConfig) -> tuple[str, ...]:
    """The pipeline components whose weights training changes (LoRA adapters or, with
    ``model.finetune: full``, the weights themselves), in pipeline order."""
    if cfg.model.finetune == "full":
        return ("transformer", *(("image_encoder_1", "image_encoder_2") if cfg.model.train_image_encoders else ()))
    return tuple(name for name in ("transformer", "image_encoder_1", "image_encoder_2") if getattr(cfg.lora, name))


def final_dir(cfg: TrainingConfig) -> str:
    """The final export's folder name in the run folder: ``lora-final`` or, full finetuning, ``pipeline-final``."""
    return FULL_FINAL_DIR if cfg.model.finetune == "full" else FINAL_DIR


def is_tiny(model: str | Path) -> bool:
    """Whether ``model`` names the in-process tiny pipeline (:mod:`midi.tiny`) rather than weights."""
    return str(model) == TINY_MODEL


def check_model_path(model: str | Path) -> None:
    """Cheap early check of a model argument, before torch is imported.

    Accepts ``tiny``, a folder with ``model_index.json`` and a Hub repo id already in the local
    cache (nothing is downloaded).

    Raises:
        ModelError: anything else; the message says how to download the weights.
    """
    if is_tiny(model):
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"no model_index.json, so not a MIDI-3D pipeline folder; {DOWNLOAD_HINT}", path=model)
        return
    if path.exists():
        raise ModelError("not a folder (expected a MIDI-3D pipeline folder with model_index.json)", path=model)
    name = str(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and name != DEFAULT_MODEL_DIR:
        if (Path(HF_HUB_CACHE) / f"models--{name.replace('/', '--')}").is_dir():
            return
    raise ModelError(f"model folder not found; download it with `{DOWNLOAD_HINT}`, or use 'tiny' for a small "
                     "random demo model", path=model)


def _field(default: Any, doc: str, **rule: Any) -> Any:
    """A dataclass field with a doc string and its value rule (``ge``/``gt``/``le`` bounds or
    ``choices``, checked by :func:`midi.config_load.validate`); mutable defaults are copied."""
    if isinstance(default, list | dict):
        copy = list if isinstance(default, list) else dict
        return field(default_factory=lambda: copy(default), metadata={"doc": doc, **rule})
    return field(default=default, metadata={"doc": doc, **rule})


@dataclass
class ModelConfig:
    """Which MIDI-3D pipeline to finetune and how the frozen parts run."""

    pretrained_model_name_or_path: str = _field(
        TINY_MODEL, "MIDI-3D pipeline folder in the released layout, a Hub id already in the local cache, or `tiny` "
                    "(a toy pipeline built in-process by `midi.tiny`, for tests and demos)")
    tiny_seed: int = _field(0, "seed of the 'tiny' pipeline's random weights (ignored otherwise)")
    finetune: str = _field("lora", "`lora`: train PEFT adapters (the lora section), export `lora-final/`; `full`: "
                                   "train every transformer weight (no LoRA; lora.* must stay at their defaults), "
                                   "export a complete pipeline folder `pipeline-final/`", choices=FINETUNE_METHODS)
    train_image_encoders: bool = _field(False, "with model.finetune: full, also train every weight of both image "
                                               "encoders (CLIP, DINOv2); their embeddings are then not cached")
    mi_blocks: list[str] | None = _field(list(DEFAULT_MI_BLOCKS), "transformer blocks whose self-attention is "
                                         "multi-instance (exact names; upstream uses blocks 8-12 of 21); `null` = "
                                         "the model's own (the release's, the tiny model's, or the `_mi_blocks` its "
                                         "transformer/config.json records)")
    gradient_checkpointing: bool = _field(True, "recompute block activations in backward: much less activation "
                                                "memory, ~30% slower steps")
    vae_slicing_length: int | None = _field(8, "VAE-encode this many objects at a time (bounds the VAE's memory); "
                                               "`null` = all at once", ge=1)


@dataclass
class LoraSection:
    """The LoRA adapters (PEFT) and where they go."""

    rank: int = _field(16, "LoRA rank r: higher = more capacity, memory and adapter size", ge=1)
    alpha: float = _field(16.0, "LoRA alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora)", gt=0)
    dropout: float = _field(0.1, "dropout on the LoRA input (0 to disable)", ge=0, le=0.99)
    target_modules: list[str] = _field(list(DEFAULT_TARGET_MODULES), "transformer Linear modules to adapt (name suffixes); "
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
    train_split: str = _field("train", "split to train on (`train`, `val`, `test`, `all`)", choices=SPLITS)
    val_split: str = _field("val", "split used for validation loss and previews", choices=SPLITS)
    synthetic_if_missing: int = _field(0, "if data.root does not exist, write this many synthetic scenes there "
                                       "first (0 = off: a missing root is an error). A config file's value only "
                                       "applies to its own data.root: with --data.root pass it again", ge=0)
    image_size: int = _field(512, "side of the square images the scenes are resized to before the encoders' preprocessing", ge=8)
    num_surface_points: int = _field(20480, "surface points (xyz + normal) per object fed to the VAE encoder", ge=1)
    background: list[float] = _field([1.0, 1.0, 1.0], "RGB in [0, 1] outside the instance masks (upstream: white)")
    min_mask_fraction: float = _field(0.001, "drop instances whose mask covers at most this fraction of the image", ge=0, le=1)
    max_num_instances: int = _field(10, "keep at most this many instances per scene (a seeded random subset per draw)", ge=1)
    batching: Literal["packed", "padded"] = _field("packed", "`packed`: scenes back to back, no padding rows. "
                                                             "`padded`: upstream's layout, every scene filled with "
                                                             "duplicate instances up to "
                                                             "`data.num_instances_per_batch` rows (duplicates attend "
                                                             "alone)")
    num_instances_per_batch: int | None = _field(None, "rows per scene in padded mode (null = "
                                                       "`data.max_num_instances`)", ge=1)
    bucket_by_instances: bool = _field(False, "group scenes with similar instance counts into the same batch (packed mode)")
    max_tokens_per_batch: int | None = _field(None, "cap on latent tokens per batch (instances x tokens per instance,"
                                                    " 2048 for MIDI); batches then hold up to `train.batch_size` "
                                                    "scenes; a scene over the cap trains alone (packed mode)", ge=1)
    num_workers: int = _field(2, "DataLoader worker processes per process (0 = load in the training process)", ge=0)


@dataclass
class CacheConfig:
    """Precomputed frozen-model outputs (VAE posteriors, image embeddings) on disk."""

    enabled: bool = _field(False, "precompute what the frozen models produce: VAE posteriors (mean, logvar) per "
                                  "object and CLIP/DINOv2 embeddings per view, on disk, reused across runs")
    dir: str = _field("outputs/cache", "cache folder; entries are keyed by the files' path+size+mtime, a hash of the "
                                       "model weights and the sample settings, so one folder can serve many runs")
    num_surface_subsamples: int = _field(4, "surface subsets encoded per object; one is drawn per step (without the "
                                            "cache every step draws a new subset)", ge=1)


@dataclass
class ObjectiveConfig:
    """The rectified-flow objective (upstream-facts 5.3)."""

    timestep_sampling: str = _field("logit_normal", "density of sigma: `logit_normal` (= MIDI's `logit_normal_dist`),"
                                                    " `mode`, `uniform`; the scheduler's shift is applied on top", choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = _field(0.0, "mean of the logit-normal density")
    logit_std: float = _field(1.0, "std of the logit-normal density", gt=0)
    mode_scale: float = _field(1.29, "scale of the 'mode' density")
    loss_weighting: str = _field("none", "per-sample loss weight: `none` (MIDI), `sigma_sqrt`, `cosmap`", choices=LOSS_WEIGHTINGS)
    condition_drop_prob: float = _field(0.1, "probability per scene of replacing both image conditions by zeros "
                                        "(what classifier-free guidance uses as the negative)", ge=0, le=1)
    sample_posterior: bool = _field(True, "x0 = a sample of the VAE posterior (true) or its mean (false)")


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate schedule and clipping."""

    name: Literal["adamw", "adamw_8bit"] = _field("adamw", "`adamw`, or `adamw_8bit` (bitsandbytes, CUDA)")
    learning_rate: float = _field(1e-4, "peak learning rate", gt=0)
    betas: list[float] = _field([0.9, 0.999], "AdamW betas")
    weight_decay: float = _field(0.01, "AdamW weight decay", ge=0)
    eps: float = _field(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float | None = _field(1.0, "clip the gradient norm to this (null = no clipping; the norm is still logged)")
    lr_scheduler: str = _field("cosine", "schedule: " + ", ".join(LR_SCHEDULERS), choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _field(100, "linear warm-up (from 0) over this many optimizer steps", ge=0)


@dataclass
class TrainConfig:
    """The run: output folder, batch, length, precision."""

    output_dir: str = _field("outputs/midi-lora", "run folder: config, logs, checkpoints, lora-final/ (pipeline-final/ "
                                                  "with model.finetune: full)")
    seed: int = _field(42, "seeds the data order, views, subsets, sigmas, noise, condition dropout and LoRA dropout")
    batch_size: int = _field(4, "scenes per process per micro-step (all their instances)", ge=1)
    gradient_accumulation_steps: int = _field(1, "micro-steps per optimizer step", ge=1)
    max_steps: int | None = _field(None, "optimizer steps to run (null = train.num_epochs epochs)", ge=1)
    num_epochs: int = _field(100, "epochs to run when train.max_steps is null")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _field(
        "auto", "`auto` = bf16 on GPUs that have it, fp32 otherwise; `no`, `bf16`, `fp16` (GPU only). Frozen weights "
                "are stored in that dtype, trained ones (LoRA, or the full models) stay fp32; the VAE is always fp32")
    allow_tf32: bool = _field(True, "allow TF32 matmuls on Ampere+ GPUs")
    max_consecutive_nonfinite: int = _field(5, "a step with a non-finite loss or gradient is skipped (no update) and "
                                               "counted; after this many in a row training stops with an emergency "
                                               "checkpoint", ge=1)


@dataclass
class CheckpointingConfig:
    """Checkpoints (full training state + the adapter in its final format)."""

    every_n_steps: int = _field(500, "write `checkpoint-N/` every N optimizer steps (and at the last step)", ge=1)
    checkpoints_total_limit: int | None = _field(3, "keep only the newest N checkpoints (null = keep all)", ge=1)
    resume_from_checkpoint: str | None = _field(None, "latest, a checkpoint folder, or null (also --resume_from_checkpoint)")
    verify_exports: bool = _field(False, "also reload every checkpoint's adapter through the inference path "
                                         "(`lora-final/` and `pipeline-final/` are always checked; LoRA only: a "
                                         "full-finetune checkpoint holds the bare trained models)")


@dataclass
class ValidationConfig:
    """Validation loss, preview generation and scene metrics."""

    every_n_steps: int = _field(500, "validation loss every N steps and at the end (0 = off); the best one is "
                                     "exported to `best/`", ge=0)
    num_scenes: int = _field(8, "validation scenes (the first N of data.val_split)", ge=1)
    sigmas: list[float] = _field([0.1, 0.3, 0.5, 0.7, 0.9], "fixed noise levels; with fixed noise and the posterior "
                                                            "mean the number is deterministic")
    seed: int = _field(0, "seed of the validation noise, and of the scene metrics' generations and point samples (the "
                          "same every time)")
    preview_every_n_steps: int = _field(1000, "generate meshes for a few val scenes every N steps and at the end (0 ="
                                              " off)", ge=0)
    num_preview_scenes: int = _field(2, "scenes generated for previews", ge=0)
    metrics_every_n_steps: int = _field(0, "log `val/scene_fscore`, `val/scene_cd`, `val/object_fscore`, "
                                           "`val/iou_bbox` (evaluate.py's scoring: ICP, tau 0.1) of generated val "
                                           "scenes every N steps and at the end (0 = off; costs one generation per "
                                           "scene)", ge=0)
    metrics_num_scenes: int = _field(4, "val scenes generated and scored for the scene metrics (the first N)", ge=1)
    metrics_num_points: int = _field(20480, "points per instance sampled on generated and gt surfaces for the scene "
                                            "metrics (evaluate.py --num_points)", ge=1)
    num_inference_steps: int = _field(50, "sampler steps of the previews and scene metrics", ge=1)
    guidance_scale: float = _field(7.0, "classifier-free guidance of the previews and scene metrics", ge=0)
    octree_depth: int = _field(8, "decoding grid of the previews and scene metrics, 2^depth + 1 points per axis (8 "
                                  "is the inference default; lower is faster)", ge=2, le=10)
    preview_image_size: int = _field(256, "rendered preview size; previews show input image and rendered meshes side "
                                          "by side", ge=16)


@dataclass
class LoggingConfig:
    """Trackers and console output."""

    report_to: Literal["tensorboard", "wandb", "none"] = _field("tensorboard", "`tensorboard`, `wandb` (needs wandb) or "
                                                                               "`none`")
    logging_dir: str = _field("logs", "tracker folder, relative to train.output_dir")
    project_name: str = _field("midi-lora", "tracker project / run group name")
    log_every_n_steps: int = _field(10, "log `train/loss`, `train/lr`, `train/grad_norm`, `train/scenes_per_s`, "
                                        "`train/latent_tokens_per_s`, `train/peak_memory_gb`, `train/epoch`, "
                                        "`train/nonfinite_steps` (plus `val/loss`, the scene metrics and preview "
                                        "images on their own cadence)", ge=1)
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
