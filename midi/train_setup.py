"""Building what training needs: precision, the pipeline with LoRA, data loaders, optimizer, schedule.

Also the model-structure checks of the config (:func:`check_model_setup`), which build the
transformer (and image encoders, when they get a LoRA) on the meta device from their config
files: LoRA targets that match nothing, unknown multi-instance blocks and a zero trainable
parameter count are reported before any weight is read.
"""

from __future__ import annotations

import difflib
import json
import logging
from typing import Any

import torch

from midi.config import TrainingConfig, is_tiny
from midi.errors import ConfigError
from midi.lora import lora_config_dict, matched_lora_targets
from midi.tiny import load_pipeline, meta_models

logger = logging.getLogger(__name__)
ENCODER_CONFIG_CLASSES = {"image_encoder_1": ("CLIPVisionConfig", "CLIPVisionModelWithProjection"),
                          "image_encoder_2": ("Dinov2Config", "Dinov2Model")}


# ----------------------------------------------------------------------------- precision
def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """``auto`` -> ``bf16`` on a GPU that supports it, else ``no``; other values unchanged."""
    if requested != "auto":
        return requested
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def weight_dtype_for(mixed_precision: str, fsdp: bool = False) -> torch.dtype:
    """Dtype of the frozen weights: the autocast dtype under mixed precision, else float32.

    Under FSDP every weight stays float32: FSDP1 flattens frozen and LoRA weights of a block into
    one flat parameter, which needs a single dtype; FSDP's mixed-precision policy (from
    ``train.mixed_precision``) casts them for compute.
    """
    if fsdp:
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def configure_deepspeed(accelerator, cfg: TrainingConfig) -> None:
    """Fills DeepSpeed's batch settings from the training config (no-op without DeepSpeed).

    ``accelerator.prepare`` gets no dataloader (batches come from our own sampler), so accelerate
    cannot infer ``train_micro_batch_size_per_gpu`` and refuses to start while it is ``auto``.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps
    ds.pop("train_batch_size", None)  # derived by accelerate from the two above and the process count


# ----------------------------------------------------------------------------- model
def lora_configs(cfg: TrainingConfig) -> dict[str, dict[str, Any] | None]:
    """``LoraConfig`` kwargs per model (None = frozen), as ``init_custom_adapter`` takes them."""
    lo = cfg.lora

    def make(targets: list[str]) -> dict[str, Any]:
        return lora_config_dict(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, target_modules=targets,
                                init_lora_weights=lo.init_lora_weights, use_dora=lo.use_dora,
                                use_rslora=lo.use_rslora)

    return {
        "transformer": make(lo.target_modules) if lo.transformer else None,
        "image_encoder_1": make(lo.image_encoder_1_target_modules) if lo.image_encoder_1 else None,
        "image_encoder_2": make(lo.image_encoder_2_target_modules) if lo.image_encoder_2 else None,
    }


def load_base_pipeline(model_cfg, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """The pipeline without adapters (:func:`midi.tiny.load_pipeline`; the VAE stays float32)."""
    return load_pipeline(model_cfg.pretrained_model_name_or_path, dtype, tiny_seed=model_cfg.tiny_seed, device=device)


def build_pipeline(cfg: TrainingConfig, dtype: torch.dtype, device: torch.device | str):
    """Loads the pipeline and prepares it for training as upstream does.

    Multi-instance attention on ``model.mi_blocks`` (exact names) and PEFT LoRA adapters via
    ``init_custom_adapter`` (which freezes every model without one); LoRA weights are kept in
    float32 for the optimizer; gradient checkpointing and VAE slicing as configured.
    """
    pipe = load_base_pipeline(cfg.model, dtype, device)
    configs = lora_configs(cfg)
    pipe.init_custom_adapter(
        set_self_attn_module_names=cfg.model.mi_blocks,
        transformer_lora_config=configs["transformer"],
        image_encoder_1_lora_config=configs["image_encoder_1"],
        image_encoder_2_lora_config=configs["image_encoder_2"],
        exact_module_names=True,
    )
    pipe.vae.requires_grad_(False)
    if not trainable_parameters(pipe):
        raise ConfigError(["lora: the adapters have zero trainable parameters; check lora.target_modules"])
    for param in trainable_parameters(pipe):
        param.data = param.data.float()  # trainable weights in fp32 even when the base is bf16/fp16
    if cfg.model.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    if cfg.model.vae_slicing_length:
        pipe.vae.enable_slicing(cfg.model.vae_slicing_length)
    return pipe


def trainable_parameters(pipe) -> list[torch.nn.Parameter]:
    """Every parameter that requires grad (the LoRA weights)."""
    return [p for name in ("transformer", "image_encoder_1", "image_encoder_2")
            for p in getattr(pipe, name).parameters() if p.requires_grad]


def count_trainable(pipe) -> dict[str, int]:
    """Trainable parameter counts per model (models without any are left out)."""
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters() if p.requires_grad)
              for name in ("transformer", "image_encoder_1", "image_encoder_2")}
    return {k: v for k, v in counts.items() if v}


# ----------------------------------------------------------------------------- model checks
def _meta_models(model_cfg, names: list[str]) -> dict[str, torch.nn.Module]:
    """The named models built on the meta device from their config files (no weights read)."""
    return meta_models(model_cfg.pretrained_model_name_or_path, names, tiny_seed=model_cfg.tiny_seed)


def _linear_suffixes(model: torch.nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if any(n.endswith("to_out.0") for n, _ in model.named_modules()):
        names.add("to_out.0")
    return sorted(names)


def _check_targets(model: torch.nn.Module, key: str, targets: list[str], rank: int, problems: list[str]) -> int:
    """Reports targets that match nothing; returns the LoRA parameter count of the matches."""
    suffixes = _linear_suffixes(model)
    for target in targets:
        if not matched_lora_targets(model, [target]):
            close = difflib.get_close_matches(target, suffixes, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"Linear modules end in: {', '.join(suffixes[:12])}"
            problems.append(f"{key}: {target!r} matches no Linear module; {hint}")
    modules = dict(model.named_modules())
    matched = matched_lora_targets(model, targets)
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in matched)


def scheduler_problems(model_cfg) -> list[str]:
    """The training objective samples sigmas with the scheduler's fixed ``shift``; dynamic
    (resolution-dependent) shifting has no fixed sigma schedule to train against."""
    if is_tiny(model_cfg.pretrained_model_name_or_path):
        return []
    from midi.pipelines.loading import resolve_pipeline_folder

    path = resolve_pipeline_folder(model_cfg.pretrained_model_name_or_path) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        return [f"model.pretrained_model_name_or_path: {path}: unreadable scheduler config ({exc})"]
    if config.get("use_dynamic_shifting"):
        return [f"model.pretrained_model_name_or_path: {path} sets use_dynamic_shifting, which training does not "
                "support (sigmas are drawn with the fixed `shift`); set it to false"]
    return []


def check_model_setup(cfg: TrainingConfig) -> list[str]:
    """Problems with LoRA targets, multi-instance blocks, trainable parameters and token budgets.

    Builds the models on the meta device (no weights are read).

    Returns:
        One line per problem.
    """
    from midi.pipelines.loading import PipelineLoadError

    lo = cfg.lora
    wanted = ["transformer"] + [n for n in ("image_encoder_1", "image_encoder_2") if getattr(lo, n)]
    try:
        models = _meta_models(cfg.model, wanted)
    except (PipelineLoadError, OSError, ValueError) as exc:
        return [f"model.pretrained_model_name_or_path: cannot read the model configs ({' '.join(str(exc).split())})"]
    problems: list[str] = scheduler_problems(cfg.model)
    transformer = models["transformer"]
    num_layers = len(transformer.blocks)
    for block in cfg.model.mi_blocks:
        if int(block.split(".")[1]) >= num_layers:
            problems.append(f"model.mi_blocks: {block!r} does not exist; the transformer has blocks.0 ... "
                            f"blocks.{num_layers - 1} (upstream MIDI uses blocks.8-12 of 21)")
    trainable = 0
    if lo.transformer:
        trainable += _check_targets(transformer, "lora.target_modules", lo.target_modules, lo.rank, problems)
    for name in ("image_encoder_1", "image_encoder_2"):
        if getattr(lo, name):
            key = f"lora.{name}_target_modules"
            trainable += _check_targets(models[name], key, getattr(lo, f"{name}_target_modules"), lo.rank, problems)
    if trainable == 0 and not problems:
        problems.append("lora: the configured LoRA has zero trainable parameters; check lora.target_modules")
    width = transformer.config.width
    budget = cfg.data.max_tokens_per_batch
    if budget is not None and budget < width:
        problems.append(f"data.max_tokens_per_batch: must be >= the latent tokens of one instance ({width}), got {budget}")
    return problems


def check_model_setup_or_raise(cfg: TrainingConfig, source: str | None = None) -> None:
    """:func:`check_model_setup`, raising :class:`ConfigError` with every problem."""
    problems = check_model_setup(cfg)
    if problems:
        raise ConfigError(problems, source)


# ----------------------------------------------------------------------------- optimizer
def build_optimizer(cfg: TrainingConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) over the trainable parameters.

    Raises:
        ConfigError: ``adamw_8bit`` without bitsandbytes installed.
    """
    o = cfg.optimizer
    kwargs = dict(lr=o.learning_rate, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    if o.name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(["optimizer.name: adamw_8bit needs bitsandbytes (pip install bitsandbytes); "
                               "or use adamw"]) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(cfg: TrainingConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """diffusers' ``get_scheduler`` with warm-up; stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optimizer.lr_scheduler, optimizer, num_warmup_steps=cfg.optimizer.lr_warmup_steps,
                         num_training_steps=max_steps)


