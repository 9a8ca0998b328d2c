"""LoRA (or full) finetuning of MIDI-3D (multi-instance diffusion: one image + instance masks -> a 3D scene).

One GPU or CPU::

    python train_lora.py --config configs/train/lora_finetune.yaml
    python train_lora.py --config configs/train/tiny.yaml                  # CPU demo, about a minute
    python train_lora.py --config configs/train/tiny.yaml --train.max_steps 50 --lora.rank=8
    python train_lora.py --config configs/train/mini_pretrain.yaml   # full finetune -> a pipeline folder

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
import functools
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from midi.config import BEST_DIR, DEFAULT_CONFIG, config_to_yaml, final_dir
from midi.config_load import load_config
from midi.errors import TrainingError, run_cli

if TYPE_CHECKING:
    from midi.training.build import Run
    from midi.training.checkpoints import TrainerState
    from midi.training.metrics import ThroughputMeter

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
    parser.add_argument("--dry_run_json", metavar="PATH",
                        help='with --dry_run: also write the report as JSON to PATH ({"status": "oom", ...} '
                             "when the steps do not fit in memory)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config with key docs and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.dry_run_json and not args.dry_run:
        parser.error("--dry_run_json needs --dry_run")
    if args.resume_from_checkpoint:
        overrides += ["--checkpointing.resume_from_checkpoint", args.resume_from_checkpoint]
    return args, overrides


def exit_code(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """``main`` under :func:`midi.errors.run_cli`: bad input -> ``error:`` lines and the error's exit code."""
    return functools.wraps(main)(lambda argv=None: run_cli(main, argv))


@exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse -> load_config -> build -> loop -> export. Returns the exit code (bad input: 2)."""
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides, environment=True)
    if args.print_config:
        print(config_to_yaml(cfg, comments=True), end="")
        return 0
    # Deferred (the declared exception): a bad config above fails in a second, without importing torch.
    global build, checkpoints, metrics, objective, validation
    from midi.training import build, checkpoints, metrics, objective, validation

    build.check_model_setup(cfg, args.config)
    if not args.dry_run:
        checkpoints.check_output_dir(Path(cfg.train.output_dir), cfg.checkpointing.resume_from_checkpoint)
    r = build.build(cfg, args.dry_run)
    if args.dry_run:
        print(metrics.measure_dry_run(r, lambda *a: optimizer_step(r, *a), args.dry_run_json))
        return 0
    state = start(r)
    train(r, state)
    finish(r, state)
    return 0


# ----------------------------------------------------------------------------- loop
def start(r: Run) -> TrainerState:
    """Resumes or starts the run: removes a killed run's leftovers, restores the state."""
    acc, cfg = r.accelerator, r.cfg
    if acc.is_main_process:
        for name in checkpoints.remove_stale(r.output_dir):
            logger.info("removed %s (left by an interrupted run)", name)
    acc.wait_for_everyone()
    resume = checkpoints.resolve_resume(r.output_dir, cfg.checkpointing.resume_from_checkpoint)
    state = r.checkpoints.load(resume) if resume else checkpoints.TrainerState()
    if resume:
        logger.info("resumed from %s at step %d", resume, state.global_step)
        # A resumed run gets a fresh allowance: an emergency checkpoint would otherwise stop again at once.
        state.consecutive_nonfinite, state.nonfinite_scenes = 0, []
    r.sampler.consumed = state.consumed_batches
    return state


def open_outputs(r: Run) -> None:
    """Writes ``config.yaml`` and opens the trackers (``logs/``), once the first step has run, so
    a run that fails while starting leaves nothing behind."""
    if r.accelerator.is_main_process:
        checkpoints.write_run_config(r.cfg, r.output_dir)
    r.accelerator.init_trackers(r.cfg.logging.project_name, config=metrics.tracker_config(r.cfg))


def train(r: Run, state: TrainerState) -> None:
    """The loop: accumulate micro-steps, clip, step, then log / validate / checkpoint on cadence."""
    acc, cfg = r.accelerator, r.cfg
    batches = iter(r.loader())
    meter = metrics.ThroughputMeter()
    bar = metrics.progress_bar(r.max_steps, state.global_step, acc.is_main_process and cfg.logging.progress_bar)
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


def optimizer_step(r: Run, state: TrainerState, batches, meter: ThroughputMeter) -> tuple[float, float, bool]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

    Returns:
        ``(mean loss, grad norm, skipped)``; a step with a non-finite loss or gradient makes no update.
    """
    acc, cfg = r.accelerator, r.cfg
    losses, bad = [], False
    grad_norm = float("nan")
    for micro in range(cfg.train.gradient_accumulation_steps):
        batch = next(batches).to(acc.device)
        state.consumed_batches += acc.num_processes
        # Every draw of the micro-step (LoRA dropout included) from one seed: a resumed run repeats it exactly.
        generator = objective.seed_step(cfg.train.seed, state.global_step, micro, acc.process_index)
        with acc.accumulate(r.model):
            out = objective.training_step(r.model, r.pipe.vae, r.pipe.scheduler, batch, cfg.objective, r.num_tokens,
                                          generator)
            # All processes must agree before backward, or DDP's gradient all-reduce would hang.
            finite = metrics.finite_everywhere(acc, out.loss)
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
    acc, cfg = r.accelerator, r.cfg
    grad_norm = float("nan")
    if not bad:
        # FSDP clips through the wrapped model (its sharded flat parameters), everything else the LoRA weights.
        # (DistributedType is a str enum, so comparing with its name needs no accelerate import.)
        params = list(r.model.parameters()) if acc.distributed_type == "FSDP" else r.params
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


def count_nonfinite(r: Run, state: TrainerState, skipped: bool) -> None:
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


def on_step_end(r: Run, state: TrainerState, meter: ThroughputMeter, grad_norm: float) -> None:
    """Logging, validation, previews, scene metrics and checkpoints on their cadences."""
    cfg, step = r.cfg, state.global_step
    if step % cfg.logging.log_every_n_steps == 0 or step == r.max_steps:
        log_metrics(r, state, meter, grad_norm)
    v, last, start = cfg.validation, step == r.max_steps, time.perf_counter()
    if v.every_n_steps and (step % v.every_n_steps == 0 or last):
        validate(r, state)
    if v.preview_every_n_steps and v.num_preview_scenes and (step % v.preview_every_n_steps == 0 or last):
        preview(r, step)
    if v.metrics_every_n_steps and (step % v.metrics_every_n_steps == 0 or last):
        scene_metrics(r, step)
    if step % cfg.checkpointing.every_n_steps == 0 or last:
        r.checkpoints.save(state)
    meter.start += time.perf_counter() - start  # throughput counts training time only


def log_metrics(r: Run, state: TrainerState, meter: ThroughputMeter, grad_norm: float) -> None:
    """Loss (mean over processes), lr, grad norm, global throughput and peak memory."""
    values = metrics.training_metrics(r.accelerator, meter, state, r.lr_scheduler.get_last_lr()[0], grad_norm)
    r.accelerator.log(values, step=state.global_step)
    meter.reset()


def validate(r: Run, state: TrainerState) -> None:
    """Validation loss; the best adapter (or pipeline) so far is exported to ``best/``."""
    acc = r.accelerator
    # FSDP: the wrapped model gathers its shards in forward; the unwrapped one holds only this process's shard.
    model = r.model if acc.distributed_type == "FSDP" else acc.unwrap_model(r.model)
    loss = validation.evaluate_loss(acc, model, r.pipe.vae, r.val_set, r.cfg, r.num_tokens)
    acc.log({"val/loss": loss}, step=state.global_step)
    logger.info("step %d: validation loss %.5f", state.global_step, loss)
    if state.best_val_loss is None or loss < state.best_val_loss:
        state.best_val_loss, state.best_step = loss, state.global_step
        with checkpoints.full_parameters(acc, r.model):
            if acc.is_main_process:
                record = f'{{"step": {state.global_step}, "val_loss": {loss!r}}}\n'
                checkpoints.export_model(r.pipe, r.output_dir / BEST_DIR, r.cfg, state, verify=False,
                                         dtype=r.weight_dtype, extra_files={"best.json": record})
    acc.wait_for_everyone()


def on_main_process(r: Run, step: int, what: str, generate) -> None:
    """Runs a generating validation step on the main process only (the others wait).

    Skipped under FSDP: the model is sharded across processes, so one process cannot generate alone.
    generate_meshes runs the models in eval mode and restores their modes.
    """
    acc = r.accelerator
    if acc.distributed_type == "FSDP":
        logger.info("step %d: %s skipped under FSDP (the model is sharded across processes)", step, what)
        return
    if acc.is_main_process:
        with acc.autocast():
            generate()
    acc.wait_for_everyone()


def preview(r: Run, step: int) -> None:
    """Preview generations, written as images and logged."""
    def run() -> None:
        images = validation.write_previews(r.pipe, r.val_set.records, r.val_set.settings, r.cfg, step, r.output_dir)
        validation.log_images(r.accelerator, images, step)
    on_main_process(r, step, "previews", run)


def scene_metrics(r: Run, step: int) -> None:
    """evaluate.py's scene metrics of a few generated val scenes, logged as val/* scalars."""
    def run() -> None:
        values = validation.scene_metrics(r.pipe, r.val_set.records, r.val_set.settings, r.cfg)
        if values:
            r.accelerator.log({f"val/{k}": x for k, x in values.items()}, step=step)
            logger.info("step %d: scene metrics %s", step, ", ".join(f"{k} {x:.4f}" for k, x in values.items()))
        else:
            logger.warning("step %d: scene metrics: no val scene could be scored", step)
    on_main_process(r, step, "scene metrics", run)


def finish(r: Run, state: TrainerState) -> None:
    """Exports ``lora-final/`` (``pipeline-final/``), checks it through the inference path, closes the trackers."""
    acc = r.accelerator
    acc.wait_for_everyone()
    with checkpoints.full_parameters(acc, r.model):
        if acc.is_main_process:
            path = checkpoints.export_model(r.pipe, r.output_dir / final_dir(r.cfg), r.cfg, state, verify=True,
                                            dtype=r.weight_dtype)
            logger.info("final export: %s (%d steps, %d skipped as non-finite)", path, state.global_step,
                        state.nonfinite_steps)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    sys.exit(main())
