"""Building a run: precision, the pipeline with LoRA (or fully trainable models), data, optimizer and
schedule, and the model-structure checks of the config.

:func:`check_model_setup` builds the transformer (and the image encoders, when they get a LoRA)
on the meta device from their config files: LoRA targets that match nothing, unknown
multi-instance blocks and a zero trainable parameter count are reported before any weight is read.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, cpu_offload
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from midi.config import TrainingConfig, is_tiny, trained_models
from midi.config_load import training_device_is_cpu
from midi.errors import ConfigError, ModelError
from midi.lora import ADAPTER_MODELS, lora_config_dict, matched_lora_targets
from midi.pipelines.loading import resolve_pipeline_folder
from midi.pipelines.pipeline_midi import MIDIPipeline
from midi.tiny import load_pipeline, meta_models, mi_blocks_for
from midi.training.batches import (
    Collator,
    ConditionPreprocessor,
    SampleSettings,
    SceneDataset,
    StreamBatchSampler,
    ensure_dataset,
    open_split,
)
from midi.training.cache import prepare_cache
from midi.training.checkpoints import CheckpointManager
from midi.training.full import make_trainable
from midi.training.objective import FlowMatchingModel

logger = logging.getLogger(__name__)
ENCODERS = ("image_encoder_1", "image_encoder_2")


# ----------------------------------------------------------------------------- precision
def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """``auto`` -> ``bf16`` on a GPU that supports it, else ``no``; other values unchanged."""
    if requested != "auto":
        return requested
    return "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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
    targets = {"transformer": lo.target_modules, **{n: getattr(lo, f"{n}_target_modules") for n in ENCODERS}}
    return {name: lora_config_dict(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, target_modules=targets[name],
                                   init_lora_weights=lo.init_lora_weights, use_dora=lo.use_dora,
                                   use_rslora=lo.use_rslora) if getattr(lo, name) else None
            for name in ADAPTER_MODELS}


def build_pipeline(cfg: TrainingConfig, dtype: torch.dtype, device: torch.device | str) -> MIDIPipeline:
    """Loads the pipeline and prepares it for training as upstream does.

    Multi-instance attention on ``model.mi_blocks`` (exact names) and PEFT LoRA adapters via
    ``init_custom_adapter`` (which freezes every model without one); LoRA weights are kept in
    float32 for the optimizer; gradient checkpointing and VAE slicing as configured. With
    ``model.finetune: full`` there is no LoRA: the trained models are loaded in float32 (their
    master weights) and made trainable whole, only the frozen ones are cast to ``dtype``.
    """
    m = cfg.model
    full = m.finetune == "full"
    resolve_mi_blocks(cfg)
    pipe = load_pipeline(m.pretrained_model_name_or_path, torch.float32 if full else dtype, tiny_seed=m.tiny_seed,
                         device=device)
    configs = {} if full else lora_configs(cfg)
    pipe.init_custom_adapter(set_self_attn_module_names=m.mi_blocks, exact_module_names=True,
                             **{f"{name}_lora_config": config for name, config in configs.items()})
    if full:
        for name in ADAPTER_MODELS:
            if name in trained_models(cfg):
                make_trainable(getattr(pipe, name), name)
            elif dtype != torch.float32:
                torch.nn.Module.to(getattr(pipe, name), dtype)  # plain cast (ModelMixin.to warns for no reason)
    pipe.vae.requires_grad_(False)
    if not trainable_parameters(pipe):
        raise ConfigError(["lora: the adapters have zero trainable parameters; check lora.target_modules"])
    for param in trainable_parameters(pipe):
        param.data = param.data.float()  # trainable weights in fp32 even when the base is bf16/fp16
    if m.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    if m.vae_slicing_length:
        pipe.vae.enable_slicing(m.vae_slicing_length)
    return pipe


def trainable_parameters(pipe) -> list[torch.nn.Parameter]:
    """Every parameter that requires grad (the LoRA weights, or the fully trained models')."""
    return [p for name in ADAPTER_MODELS for p in getattr(pipe, name).parameters() if p.requires_grad]


def count_trainable(pipe) -> dict[str, int]:
    """Trainable parameter counts per model (models without any are left out)."""
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters() if p.requires_grad)
              for name in ADAPTER_MODELS}
    return {k: v for k, v in counts.items() if v}


# ----------------------------------------------------------------------------- model checks
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
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in matched_lora_targets(model, targets))


def scheduler_problems(model_cfg) -> list[str]:
    """The training objective samples sigmas with the scheduler's fixed ``shift``; dynamic
    (resolution-dependent) shifting has no fixed sigma schedule to train against."""
    if is_tiny(model_cfg.pretrained_model_name_or_path):
        return []
    path = resolve_pipeline_folder(model_cfg.pretrained_model_name_or_path) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        return [f"model.pretrained_model_name_or_path: {path}: unreadable scheduler config ({exc})"]
    if config.get("use_dynamic_shifting"):
        return [f"model.pretrained_model_name_or_path: {path} sets use_dynamic_shifting, which training does not "
                "support (sigmas are drawn with the fixed `shift`); set it to false"]
    return []


def resolve_mi_blocks(cfg: TrainingConfig, source: str | None = None) -> None:
    """``model.mi_blocks: null`` -> the model's own blocks (:func:`midi.tiny.mi_blocks_for`), written into
    ``cfg`` so the saved config, checkpoints and exports name them.

    Raises:
        ConfigError: the model records no blocks and is neither the release nor the tiny model.
    """
    if cfg.model.mi_blocks is None:
        try:
            cfg.model.mi_blocks = list(mi_blocks_for(cfg.model.pretrained_model_name_or_path))
        except ModelError as exc:
            raise ConfigError([f"model.mi_blocks: null (the model's own), but {exc}"], source) from None


def check_model_setup(cfg: TrainingConfig, source: str | None = None) -> None:
    """Checks LoRA targets, multi-instance blocks, trainable parameters and token budgets on models
    built on the meta device (no weights are read); resolves ``model.mi_blocks: null``.

    Raises:
        ConfigError: every problem, one line each.
    """
    lo, full = cfg.lora, cfg.model.finetune == "full"
    resolve_mi_blocks(cfg, source)
    try:
        models = meta_models(cfg.model.pretrained_model_name_or_path,
                             ["transformer", *[n for n in ENCODERS if getattr(lo, n) and not full]],
                             tiny_seed=cfg.model.tiny_seed)
    except (ModelError, OSError, ValueError) as exc:
        raise ConfigError([f"model.pretrained_model_name_or_path: cannot read the model configs "
                           f"({' '.join(str(exc).split())})"], source) from None
    problems: list[str] = scheduler_problems(cfg.model)
    transformer = models["transformer"]
    num_layers = len(transformer.blocks)
    for block in cfg.model.mi_blocks:
        if int(block.split(".")[1]) >= num_layers:
            problems.append(f"model.mi_blocks: {block!r} does not exist; the transformer has blocks.0 ... "
                            f"blocks.{num_layers - 1} (upstream MIDI uses blocks.8-12 of 21)")
    trainable = 0
    for name, key in (("transformer", "lora.target_modules"), *((n, f"lora.{n}_target_modules") for n in ENCODERS)):
        if getattr(lo, name) and not full:  # full finetuning trains every weight: no targets to check
            trainable += _check_targets(models[name], key, getattr(lo, key.removeprefix("lora.")), lo.rank, problems)
    if trainable == 0 and not problems and not full:
        problems.append("lora: the configured LoRA has zero trainable parameters; check lora.target_modules")
    width, budget = transformer.config.width, cfg.data.max_tokens_per_batch
    if budget is not None and budget < width:
        problems.append(f"data.max_tokens_per_batch: must be >= the latent tokens of one instance ({width}), got {budget}")
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
            import bitsandbytes as bnb  # optional: only for adamw_8bit
        except ImportError:
            raise ConfigError(["optimizer.name: adamw_8bit needs bitsandbytes (pip install bitsandbytes); "
                               "or use adamw"]) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(cfg: TrainingConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """diffusers' ``get_scheduler`` with warm-up; stepped once per optimizer step."""
    return get_scheduler(cfg.optimizer.lr_scheduler, optimizer, num_warmup_steps=cfg.optimizer.lr_warmup_steps,
                         num_training_steps=max_steps)


# ----------------------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything the loop needs, built once by :func:`build`."""

    cfg: TrainingConfig
    accelerator: Accelerator
    pipe: MIDIPipeline
    model: torch.nn.Module  # the FlowMatchingModel as accelerate prepared it (DDP/FSDP wrapper)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: StreamBatchSampler
    loader: Callable[[], torch.utils.data.DataLoader]  # a fresh loader over the sampler's current position
    train_set: SceneDataset
    val_set: SceneDataset
    checkpoints: CheckpointManager
    output_dir: Path
    weight_dtype: torch.dtype
    num_tokens: int  # latent tokens per instance (the transformer's width)
    max_steps: int
    params: list[torch.nn.Parameter]


def setup_logging(main_process: bool) -> None:
    """INFO on the main process, WARNING elsewhere; accelerate's per-file lines are muted."""
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    for name in ("midi", "train_lora"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise


def build(cfg: TrainingConfig, dry_run: bool) -> Run:
    """Accelerator, pipeline with LoRA, data, optimizer and schedule, prepared for (distributed) training."""
    cpu = training_device_is_cpu()
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, cpu)
    output_dir = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        cpu=cpu,  # without it accelerate ignores torchrun's environment on CPU-only machines
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.logging.report_to == "none" or dry_run else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / cfg.logging.logging_dir)),
        step_scheduler_with_optimizer=False,  # stepped by hand, once per optimizer step
    )
    setup_logging(accelerator.is_main_process)
    set_seed(cfg.train.seed)
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    weight_dtype = weight_dtype_for(mixed_precision, fsdp=accelerator.distributed_type == DistributedType.FSDP)
    pipe = build_pipeline(cfg, weight_dtype, accelerator.device)
    num_tokens = pipe.transformer.config.width
    train_set, val_set, sampler, loader = build_data(cfg, pipe, accelerator, num_tokens, dry_run)
    processes_per_step = accelerator.num_processes * cfg.train.gradient_accumulation_steps
    max_steps = cfg.train.max_steps or math.ceil(sampler.batches_for_epochs(cfg.train.num_epochs) / processes_per_step)
    optimizer = build_optimizer(cfg, trainable_parameters(pipe))
    lr_scheduler = build_lr_scheduler(cfg, optimizer, max_steps)
    configure_deepspeed(accelerator, cfg)
    model, optimizer, lr_scheduler = accelerator.prepare(FlowMatchingModel(pipe), optimizer, lr_scheduler)
    if cfg.cache.enabled and not dry_run:  # the dry run reads files, so it runs the encoders
        offload_cached_encoders(pipe, cfg, accelerator)
    checkpoints = CheckpointManager(accelerator, pipe, cfg, output_dir, weight_dtype)
    logger.info("mixed precision %s, frozen weights %s, %d process(es), %d optimizer steps", mixed_precision,
                weight_dtype, accelerator.num_processes, max_steps)
    return Run(cfg, accelerator, pipe, model, optimizer, lr_scheduler, sampler, loader, train_set, val_set,
               checkpoints, output_dir, weight_dtype, num_tokens, max_steps, trainable_parameters(pipe))


def cached_encoders(pipe, cfg: TrainingConfig) -> dict[str, torch.nn.Module]:
    """The frozen modules whose outputs the feature cache holds, so the cached training step never runs them:
    the VAE encoder's blocks (always; its first Linear stays, as ``vae.device`` and ``vae.dtype`` read it) and
    the image encoders, when neither trains (else the embeddings are not cached, see ``prepare_cache``)."""
    modules = {f"vae.encoder.blocks.{i}": block for i, block in enumerate(pipe.vae.encoder.blocks)}
    if not set(trained_models(cfg)) & set(ENCODERS):
        modules.update({name: getattr(pipe, name) for name in ENCODERS})
    return modules


def offload_applies(accelerator) -> bool:
    """Whether :func:`offload_cached_encoders` frees anything: one process on an accelerator."""
    return accelerator.device.type != "cpu" and accelerator.distributed_type == DistributedType.NO


def offload_cached_encoders(pipe, cfg: TrainingConfig, accelerator) -> list[str]:
    """With the cache on, keeps :func:`cached_encoders` in host memory instead of on the accelerator
    (about 1.3 GB at the released size); returns their names (none where nothing is offloaded).

    accelerate's ``cpu_offload`` copies a module's weights to the device for each of its forwards, so the
    previews and validation metrics, which encode their images, still work unchanged. Only on one
    accelerator: on the CPU there is nothing to move, DDP keeps a reference to every parameter (no memory
    would be freed) and FSDP/DeepSpeed shard the parameters themselves.
    """
    if not offload_applies(accelerator):
        return []
    modules = cached_encoders(pipe, cfg)
    for module in modules.values():
        cpu_offload(module, execution_device=accelerator.device)
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()  # hand the freed blocks back, so the step's peak can use them
    logger.info("cache on: %s kept in host memory (copied to %s only when previews run them)",
                ", ".join(sorted({n.rsplit(".", 1)[0] if n.startswith("vae.") else n for n in modules})),
                accelerator.device)
    return list(modules)


def build_data(cfg: TrainingConfig, pipe, accelerator, num_tokens: int, dry_run: bool):
    """The train and val datasets (through the cache when enabled), the batch stream and a loader factory."""
    d, v = cfg.data, cfg.validation
    with accelerator.main_process_first():  # the main process writes the synthetic set first
        ensure_dataset(d, cfg.train.seed)
    train_records = open_split(d.root, d.train_split)
    needs_val = bool(v.every_n_steps or (v.preview_every_n_steps and v.num_preview_scenes))
    val_records = open_split(d.root, d.val_split)[: v.num_scenes] if needs_val else []
    preprocessor = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    train_settings = SampleSettings.from_config(d, train=True)
    cache = None
    if cfg.cache.enabled and not dry_run:  # the dry run reads files directly (it must write nothing)
        cache = prepare_cache(cfg, pipe, accelerator, preprocessor, train_settings, num_tokens,
                              train_records + val_records)
    train_set = SceneDataset(train_records, train_settings, preprocessor, cache)
    val_set = SceneDataset(val_records, SampleSettings.from_config(d, train=False), preprocessor, cache)
    sampler = StreamBatchSampler(train_set.instance_counts(), cfg.train.batch_size, cfg.train.seed, num_tokens,
                                 d.max_tokens_per_batch, d.bucket_by_instances, accelerator.process_index,
                                 accelerator.num_processes)
    loader_args = dict(num_workers=d.num_workers, collate_fn=Collator(train_settings.pad_to),
                       pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(0))
    return train_set, val_set, sampler, lambda: torch.utils.data.DataLoader(train_set, batch_sampler=sampler,
                                                                            **loader_args)
