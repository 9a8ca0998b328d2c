"""LoRA finetuning of MIDI-3D (multi-instance diffusion: one image + instance masks -> a 3D scene).

One GPU or CPU::

    python train_lora.py --config configs/train/lora_finetune.yaml
    python train_lora.py --config configs/train/tiny.yaml                  # CPU demo, about a minute
    python train_lora.py --config configs/train/tiny.yaml --train.max_steps 50 --lora.rank=8

Several GPUs / nodes (same flags; see TRAINING_README.md)::

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_lora.py --config configs/train/lora_finetune.yaml
    torchrun --nproc_per_node 4 train_lora.py --config configs/train/lora_finetune.yaml

Resume, check a config, measure memory and speed without training::

    python train_lora.py --config configs/train/lora_finetune.yaml --resume_from_checkpoint latest
    python train_lora.py --config configs/train/lora_finetune.yaml --print_config
    python train_lora.py --config configs/train/lora_finetune.yaml --dry_run

Overrides are ``--section.key value`` (or ``--section.key=value``), values in YAML syntax.
Bad input exits with code 2 and one ``error:`` line per problem.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midi.config import DEFAULT_CONFIG, TrainingConfig, config_to_yaml
from midi.config_load import load_config, training_device_is_cpu
from midi.errors import MidiError, TrainingError

logger = logging.getLogger("train_lora")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The script's own flags; everything else is a config override."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML config (configs/train/); default {DEFAULT_CONFIG} (the real model)")
    parser.add_argument("--resume_from_checkpoint", metavar="latest|PATH",
                        help="continue a run: 'latest' checkpoint of train.output_dir, or a checkpoint folder")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate, build, time real training steps at the configured size, print "
                             "memory and estimates, write nothing, exit")
    parser.add_argument("--dry_run_json", metavar="PATH", help="with --dry_run: also write the report as JSON to PATH")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config with key docs and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.dry_run_json and not args.dry_run:
        parser.error("--dry_run_json needs --dry_run")
    if args.resume_from_checkpoint:
        overrides += ["--checkpointing.resume_from_checkpoint", args.resume_from_checkpoint]
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    """Parse -> validate -> build -> train -> export. Returns the exit code."""
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides, environment=True)
        if args.print_config:
            print(config_to_yaml(cfg, comments=True), end="")
            return 0
        from midi.train_setup import check_model_setup_or_raise

        check_model_setup_or_raise(cfg, args.config)
        return run(cfg, dry_run=args.dry_run, report_path=args.dry_run_json)
    except _user_errors() as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output/cache folder, full disk, ...: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """The project's error classes: bad input, not a bug (printed as ``error: ...``, exit code 2)."""
    return (MidiError,)


# ----------------------------------------------------------------------------- build
@dataclass
class Run:
    """Everything the loop needs, built once."""

    cfg: TrainingConfig
    accelerator: Any
    pipe: Any
    model: Any
    optimizer: Any
    lr_scheduler: Any
    sampler: Any
    loader: Any
    train_set: Any
    val_set: Any
    checkpoints: Any
    output_dir: Path
    weight_dtype: Any
    num_tokens: int
    max_steps: int
    params: list


def build(cfg: TrainingConfig, dry_run: bool) -> Run:
    """Accelerator, pipeline with LoRA, data, optimizer and schedule, prepared for (distributed) training."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from midi import train_setup as setup
    from midi.trainer import CheckpointManager
    from midi.training import FlowMatchingModel

    cpu = training_device_is_cpu()
    mixed_precision = setup.resolve_mixed_precision(cfg.train.mixed_precision, cpu)
    output_dir = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        cpu=cpu,  # without it accelerate ignores torchrun's environment on CPU-only machines
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.logging.report_to == "none" or dry_run else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging.logging_dir)),
        step_scheduler_with_optimizer=False,  # stepped by hand, once per optimizer step
    )
    _setup_logging(accelerator.is_main_process)
    set_seed(cfg.train.seed)
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    from accelerate.utils import DistributedType

    weight_dtype = setup.weight_dtype_for(mixed_precision, fsdp=accelerator.distributed_type == DistributedType.FSDP)
    pipe = setup.build_pipeline(cfg, weight_dtype, accelerator.device)
    num_tokens = pipe.transformer.config.width
    train_set, val_set, sampler, loader = _build_data(cfg, pipe, accelerator, num_tokens, dry_run)
    max_steps = cfg.train.max_steps or math.ceil(
        sampler.batches_for_epochs(cfg.train.num_epochs) / (accelerator.num_processes * cfg.train.gradient_accumulation_steps))
    optimizer = setup.build_optimizer(cfg, setup.trainable_parameters(pipe))
    lr_scheduler = setup.build_lr_scheduler(cfg, optimizer, max_steps)
    setup.configure_deepspeed(accelerator, cfg)
    model, optimizer, lr_scheduler = accelerator.prepare(FlowMatchingModel(pipe), optimizer, lr_scheduler)
    checkpoints = CheckpointManager(accelerator, pipe, cfg, output_dir, weight_dtype)
    logger.info("mixed precision %s, frozen weights %s, %d process(es), %d optimizer steps", mixed_precision,
                weight_dtype, accelerator.num_processes, max_steps)
    return Run(cfg, accelerator, pipe, model, optimizer, lr_scheduler, sampler, loader, train_set, val_set,
               checkpoints, output_dir, weight_dtype, num_tokens, max_steps, setup.trainable_parameters(pipe))


def _build_data(cfg: TrainingConfig, pipe, accelerator, num_tokens: int, dry_run: bool):
    import torch

    from midi import train_data as td

    with accelerator.main_process_first():  # the main process writes the synthetic set first
        td.ensure_dataset(cfg.data, cfg.train.seed)
    train_records = td.open_split(cfg.data.root, cfg.data.train_split)
    v = cfg.validation
    needs_val = bool(v.every_n_steps or (v.preview_every_n_steps and v.num_preview_scenes))
    val_records = td.open_split(cfg.data.root, cfg.data.val_split)[: v.num_scenes] if needs_val else []
    preprocessor = td.ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    train_settings = td.SampleSettings.from_config(cfg.data, train=True)
    cache = None
    if cfg.cache.enabled and not dry_run:
        from midi.train_cache import prepare_cache

        cache = prepare_cache(cfg, pipe, accelerator, preprocessor, train_settings, num_tokens,
                              train_records + val_records)
    train_set = td.SceneDataset(train_records, train_settings, preprocessor, cache)
    val_set = td.SceneDataset(val_records, td.SampleSettings.from_config(cfg.data, train=False), preprocessor, cache)
    d = cfg.data
    sampler = td.StreamBatchSampler(train_set.instance_counts(), cfg.train.batch_size, cfg.train.seed, num_tokens,
                                    d.max_tokens_per_batch, d.bucket_by_instances, accelerator.process_index,
                                    accelerator.num_processes)
    loader_args = dict(num_workers=d.num_workers, collate_fn=td.Collator(train_settings.pad_to),
                       pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(0))
    loader = lambda: torch.utils.data.DataLoader(train_set, batch_sampler=sampler, **loader_args)  # noqa: E731
    return train_set, val_set, sampler, loader


def _setup_logging(main_process: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if main_process else logging.WARNING)
    logging.getLogger("midi").setLevel(logging.INFO if main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    logger.setLevel(logging.INFO if main_process else logging.WARNING)


# ----------------------------------------------------------------------------- loop
def run(cfg: TrainingConfig, dry_run: bool = False, report_path: str | None = None) -> int:
    """Builds everything, then trains (or, with ``dry_run``, times a few steps) and exports."""
    from midi.trainer import check_output_dir

    if not dry_run:
        check_output_dir(Path(cfg.train.output_dir), cfg.checkpointing.resume_from_checkpoint)
    r = build(cfg, dry_run)
    if dry_run:
        print(measure_dry_run(r, report_path))
        return 0
    state = start(r)
    train(r, state)
    finish(r, state)
    return 0


def start(r: Run):
    """Resumes or starts the run: removes a killed run's leftovers, restores the state."""
    from midi.trainer import TrainerState, remove_stale, resolve_resume

    acc, cfg = r.accelerator, r.cfg
    if acc.is_main_process:
        for name in remove_stale(r.output_dir):
            logger.info("removed %s (left by an interrupted run)", name)
    acc.wait_for_everyone()
    resume = resolve_resume(r.output_dir, cfg.checkpointing.resume_from_checkpoint)
    state = r.checkpoints.load(resume) if resume else TrainerState()
    if resume:
        logger.info("resumed from %s at step %d", resume, state.global_step)
        # A resumed run gets a fresh allowance: an emergency checkpoint would otherwise stop again at once.
        state.consecutive_nonfinite, state.nonfinite_scenes = 0, []
    r.sampler.consumed = state.consumed_batches
    return state


def open_outputs(r: Run) -> None:
    """Writes ``config.yaml`` and opens the trackers (``logs/``), once the first step has run, so
    a run that fails while starting leaves nothing behind."""
    from midi.trainer import tracker_config, write_run_config

    if r.accelerator.is_main_process:
        write_run_config(r.cfg, r.output_dir)
    r.accelerator.init_trackers(r.cfg.logging.project_name, config=tracker_config(r.cfg))


def train(r: Run, state) -> None:
    """The loop: accumulate micro-steps, clip, step, then log / validate / checkpoint on cadence."""
    from tqdm.auto import tqdm

    from midi.trainer import ThroughputMeter

    acc, cfg = r.accelerator, r.cfg
    batches = iter(r.loader())
    meter = ThroughputMeter()
    bar = tqdm(total=r.max_steps, initial=state.global_step, desc="train", unit="step",
               disable=not (acc.is_main_process and cfg.logging.progress_bar))
    r.model.train()
    first = True
    while state.global_step < r.max_steps:
        loss, grad_norm, skipped = optimizer_step(r, state, batches, meter)
        if first:
            open_outputs(r)
            first = False
        state.global_step += 1
        count_nonfinite(r, state, skipped)
        state.epoch = r.sampler.locate(state.consumed_batches)[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{r.lr_scheduler.get_last_lr()[0]:.2e}")
        on_step_end(r, state, meter, grad_norm)
    bar.close()


def optimizer_step(r: Run, state, batches, meter) -> tuple[float, float, bool]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

    Returns:
        ``(mean loss, grad norm, skipped)``; a step with a non-finite loss or gradient makes no update.
    """
    import torch

    from midi.train_data import item_seed
    from midi.training import training_step

    acc, cfg = r.accelerator, r.cfg
    losses, bad = [], False
    grad_norm = float("nan")
    for micro in range(cfg.train.gradient_accumulation_steps):
        batch = next(batches).to(acc.device)
        state.consumed_batches += acc.num_processes
        seed = item_seed(cfg.train.seed, state.global_step, micro, acc.process_index)
        torch.manual_seed(seed)  # LoRA dropout: the same masks whether or not the run was resumed
        with acc.accumulate(r.model):
            out = training_step(r.model, r.pipe.vae, r.pipe.scheduler, batch, cfg.objective, r.num_tokens,
                                torch.Generator().manual_seed(seed))
            # All processes must agree before backward, or DDP's gradient all-reduce would hang.
            finite = bool(acc.reduce(torch.isfinite(out.loss.detach()).float().reshape(1), "sum") == acc.num_processes)
            if finite:
                acc.backward(out.loss)
                losses.append(float(out.loss.detach()))
            else:
                state.nonfinite_scenes += [s for s in batch.scene_ids if s not in state.nonfinite_scenes]
            bad = bad or not finite
            meter.update(losses[-1] if finite else None, len(batch.scene_ids), out.num_tokens)
            del out  # a skipped micro-step's activations are not kept alive through the next one
            if acc.sync_gradients:
                grad_norm, bad = apply_update(r, bad)
    return (sum(losses) / len(losses) if losses else float("nan")), grad_norm, bad


def apply_update(r: Run, bad: bool) -> tuple[float, bool]:
    """Clip, optimizer step (unless ``bad``), zero the gradients, step the schedule.

    A step already known to be non-finite is neither clipped nor stepped. Under fp16 the
    gradient scaler then backs its scale off by hand: ``clip_grad_norm_`` would unscale the
    gradients and, without the ``update()`` that only ``optimizer.step()`` runs, the next
    step's unscale would fail. A step the scaler skips itself (inf/nan gradients) counts as skipped.

    Returns:
        ``(grad norm, skipped)``; the norm is NaN when not computed (skipped, or DeepSpeed clips itself).
    """
    from accelerate.utils import DistributedType

    acc, cfg = r.accelerator, r.cfg
    grad_norm = float("nan")
    if not bad:
        # FSDP clips through the wrapped model (its sharded flat parameters), everything else the LoRA weights.
        params = list(r.model.parameters()) if acc.distributed_type == DistributedType.FSDP else r.params
        norm = acc.clip_grad_norm_(params, cfg.optimizer.max_grad_norm or float("inf"))
        grad_norm = float("nan") if norm is None else float(norm)  # None: DeepSpeed clips itself
        bad = norm is not None and not math.isfinite(grad_norm) and acc.scaler is None
    if not bad:
        r.optimizer.step()
        bad = bool(getattr(r.optimizer, "step_was_skipped", False))  # the fp16 scaler found inf/nan gradients
    elif acc.scaler is not None:
        scaler = acc.scaler
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # also resets its per-step state
    r.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
        warnings.simplefilter("ignore", UserWarning)
        r.lr_scheduler.step()  # also when skipped: the schedule follows the step count
    return grad_norm, bad


def count_nonfinite(r: Run, state, skipped: bool) -> None:
    """Counts skipped steps; too many in a row stop the run with an emergency checkpoint.

    Raises:
        TrainingError: ``train.max_consecutive_nonfinite`` skipped steps in a row.
    """
    if not skipped:
        state.consecutive_nonfinite, state.nonfinite_scenes = 0, []
        return
    state.nonfinite_steps += 1
    state.consecutive_nonfinite += 1
    logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", state.global_step,
                   state.consecutive_nonfinite)
    if state.consecutive_nonfinite >= r.cfg.train.max_consecutive_nonfinite:
        path = r.checkpoints.save(state, name=f"emergency-{state.global_step}", rotate=False)
        scenes = state.nonfinite_scenes
        cause = (f"non-finite loss in scenes: {', '.join(scenes[:10])}{' ...' if len(scenes) > 10 else ''} (check "
                 "their data with prepare_data.py --check)" if scenes else "finite losses, non-finite gradients")
        raise TrainingError(f"stopped at step {state.global_step}: {state.consecutive_nonfinite} non-finite steps in a "
                            f"row (train.max_consecutive_nonfinite); {cause}; state saved to {path}; or lower "
                            "optimizer.learning_rate or use train.mixed_precision: bf16/no")


def on_step_end(r: Run, state, meter, grad_norm: float) -> None:
    """Logging, validation, previews and checkpoints on their cadences."""
    cfg, step = r.cfg, state.global_step
    if step % cfg.logging.log_every_n_steps == 0 or step == r.max_steps:
        log_metrics(r, state, meter, grad_norm)
    v, last, start = cfg.validation, step == r.max_steps, time.perf_counter()
    if v.every_n_steps and (step % v.every_n_steps == 0 or last):
        validate(r, state)
    if v.preview_every_n_steps and v.num_preview_scenes and (step % v.preview_every_n_steps == 0 or last):
        preview(r, step)
    if step % cfg.checkpointing.every_n_steps == 0 or last:
        r.checkpoints.save(state)
    meter.start += time.perf_counter() - start  # throughput counts training time only


def log_metrics(r: Run, state, meter, grad_norm: float) -> None:
    """Loss (mean over processes), lr, grad norm, global throughput and peak memory."""
    from midi.trainer import training_metrics

    values = training_metrics(r.accelerator, meter, state, r.lr_scheduler.get_last_lr()[0], grad_norm)
    r.accelerator.log(values, step=state.global_step)
    meter.reset()


def validate(r: Run, state) -> None:
    """Validation loss; the best adapter so far is exported to ``best/``."""
    from accelerate.utils import DistributedType

    from midi.train_eval import evaluate_loss
    from midi.trainer import BEST_DIR, export_adapter, full_parameters

    acc = r.accelerator
    # FSDP: the wrapped model gathers its shards in forward; the unwrapped one holds only this process's shard.
    model = r.model if acc.distributed_type == DistributedType.FSDP else acc.unwrap_model(r.model)
    loss = evaluate_loss(acc, model, r.pipe.vae, r.val_set, r.cfg, r.num_tokens)
    acc.log({"val/loss": loss}, step=state.global_step)
    logger.info("step %d: validation loss %.5f", state.global_step, loss)
    if state.best_val_loss is None or loss < state.best_val_loss:
        state.best_val_loss, state.best_step = loss, state.global_step
        with full_parameters(acc, r.model):
            if acc.is_main_process:
                record = f'{{"step": {state.global_step}, "val_loss": {loss!r}}}\n'
                export_adapter(r.pipe, r.output_dir / BEST_DIR, r.cfg, state, r.cfg.model.mi_blocks, verify=False,
                               dtype=r.weight_dtype, extra_files={"best.json": record})
    acc.wait_for_everyone()


def preview(r: Run, step: int) -> None:
    """Preview generations on the main process (the others wait)."""
    from accelerate.utils import DistributedType

    from midi.train_eval import log_images, write_previews

    acc = r.accelerator
    if acc.distributed_type == DistributedType.FSDP:
        logger.info("step %d: previews skipped under FSDP (the model is sharded across processes)", step)
        return
    if acc.is_main_process:
        with acc.autocast():  # write_previews runs the models in eval mode and restores their modes
            images = write_previews(r.pipe, r.val_set.records, r.val_set.settings, r.cfg, step, r.output_dir)
        log_images(acc, images, step)
    acc.wait_for_everyone()


DRY_RUN_WARMUP_STEPS, DRY_RUN_TIMED_STEPS = 1, 5


def measure_dry_run(r: Run, report_path: str | None = None) -> str:
    """Times real optimizer steps at the configured size after a warm-up (first-step allocations and
    kernel selection) and reports the median; writes nothing but the optional JSON report."""
    import torch

    from midi.data.atomic import write_json
    from midi.train_setup import count_trainable
    from midi.trainer import ThroughputMeter, TrainerState, dry_run_report, format_dry_run, peak_memory_bytes

    acc = r.accelerator
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    batches, state, meter = iter(r.loader()), TrainerState(), ThroughputMeter()
    r.model.train()
    times = []
    for _ in range(DRY_RUN_WARMUP_STEPS + DRY_RUN_TIMED_STEPS):
        start = time.perf_counter()
        optimizer_step(r, state, batches, meter)
        times.append(time.perf_counter() - start)
    steps = DRY_RUN_WARMUP_STEPS + DRY_RUN_TIMED_STEPS
    rows = meter.tokens // (steps * r.num_tokens * r.cfg.train.gradient_accumulation_steps)
    report = dry_run_report(r.cfg, device=acc.device, num_processes=acc.num_processes, mixed_precision=acc.mixed_precision,
                            trainable=count_trainable(r.pipe), step_seconds=times[DRY_RUN_WARMUP_STEPS:],
                            warmup_steps=DRY_RUN_WARMUP_STEPS, peak_bytes=peak_memory_bytes(acc.device),
                            batches_per_epoch=r.sampler.epoch_length(0), rows_per_batch=rows, num_tokens=r.num_tokens,
                            max_steps=r.max_steps, num_scenes=len(r.train_set))
    if report_path and acc.is_main_process:
        write_json(report_path, report)
    return format_dry_run(r.cfg, report)


def finish(r: Run, state) -> None:
    """Exports ``lora-final/`` and checks it through the inference path, then closes the trackers."""
    from midi.trainer import FINAL_DIR, export_adapter, full_parameters

    acc = r.accelerator
    acc.wait_for_everyone()
    with full_parameters(acc, r.model):
        if acc.is_main_process:
            path = export_adapter(r.pipe, r.output_dir / FINAL_DIR, r.cfg, state, r.cfg.model.mi_blocks,
                                  verify=True, dtype=r.weight_dtype)
            logger.info("final adapter: %s (%d steps, %d skipped as non-finite)", path, state.global_step,
                        state.nonfinite_steps)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    sys.exit(main())
