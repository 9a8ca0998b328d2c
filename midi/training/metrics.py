"""Training metrics: throughput, peak memory, tracker scalars, and the ``--dry_run`` measurement."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from midi.config import TrainingConfig, config_to_dict
from midi.data.atomic import write_json
from midi.errors import OutOfMemory
from midi.training.build import Run, count_trainable
from midi.training.checkpoints import TrainerState

DRY_RUN_WARMUP_STEPS, DRY_RUN_TIMED_STEPS = 1, 5


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak on GPU, peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class ThroughputMeter:
    """Averages the loss and counts scenes/tokens between two log points."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Starts a new interval."""
        self.loss_sum = 0.0
        self.loss_count = 0
        self.scenes = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def update(self, loss: float | None, scenes: int, tokens: int) -> None:
        """Adds one micro-step (``loss`` None when it was not finite)."""
        if loss is not None:
            self.loss_sum += loss
            self.loss_count += 1
        self.scenes += scenes
        self.tokens += tokens

    def summary(self) -> dict[str, float]:
        """Mean loss and per-second rates since the last reset (this process only)."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        loss = self.loss_sum / self.loss_count if self.loss_count else float("nan")
        return {"loss": loss, "scenes_per_s": self.scenes / seconds, "tokens_per_s": self.tokens / seconds}


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """The step bar of the main process (a disabled bar elsewhere, so the loop needs no branch)."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled)


def finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (a collective: all processes call it together)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.reduce(finite, "sum") == accelerator.num_processes)


def training_metrics(accelerator, meter: ThroughputMeter, state: TrainerState, lr: float,
                     grad_norm: float) -> dict[str, float]:
    """The logged training scalars; loss averaged and throughput summed over processes."""
    s = meter.summary()
    local = torch.tensor([s["loss"], s["scenes_per_s"], s["tokens_per_s"]], device=accelerator.device,
                         dtype=torch.float64)
    total = accelerator.reduce(local, "sum")
    return {"train/loss": float(total[0]) / accelerator.num_processes, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/scenes_per_s": float(total[1]), "train/latent_tokens_per_s": float(total[2]),
            "train/epoch": state.epoch, "train/peak_memory_gb": peak_memory_bytes(accelerator.device) / 2**30,
            "train/nonfinite_steps": state.nonfinite_steps}


def tracker_config(cfg: TrainingConfig) -> dict[str, Any]:
    """The config flattened to ``section.key`` scalars (what TensorBoard's hparams accept)."""
    flat = {}
    for section, body in config_to_dict(cfg).items():
        for key, value in body.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                       and "can't allocate memory" in str(exc))


def measure_dry_run(r: Run, optimizer_step: Callable[[TrainerState, Any, ThroughputMeter], Any],
                    report_path: str | None = None) -> str:
    """Times ``optimizer_step`` at the configured size after a warm-up (first-step allocations and kernel
    selection); writes nothing but the optional JSON report. Returns the text report.

    Raises:
        OutOfMemory: the steps did not fit; the JSON report then says ``"status": "oom"`` (the wizard's signal).
    """
    acc, cfg = r.accelerator, r.cfg
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    batches, state, meter = iter(r.loader()), TrainerState(), ThroughputMeter()
    r.model.train()
    times = []
    try:
        for _ in range(DRY_RUN_WARMUP_STEPS + DRY_RUN_TIMED_STEPS):
            start = time.perf_counter()
            optimizer_step(state, batches, meter)
            times.append(time.perf_counter() - start)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if report_path and acc.is_main_process:
            write_json(report_path, {"status": "oom", "device": str(acc.device), "batch_size": cfg.train.batch_size,
                                     "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                                     "peak_memory_gib": peak_memory_bytes(acc.device) / 2**30})
        raise OutOfMemory("dry run", f"batch size {cfg.train.batch_size} does not fit on {acc.device}: "
                                     f"{str(exc).splitlines()[0]}") from None
    rows = meter.tokens // (len(times) * r.num_tokens * cfg.train.gradient_accumulation_steps)
    report = dry_run_report(r, times[DRY_RUN_WARMUP_STEPS:], rows)
    if report_path and acc.is_main_process:
        write_json(report_path, report)
    return format_dry_run(cfg, report)


def dry_run_report(r: Run, step_seconds: list[float], rows_per_batch: int) -> dict[str, Any]:
    """The ``--dry_run`` measurements and estimates as plain values (the JSON the wizard reads)."""
    acc, cfg = r.accelerator, r.cfg
    times, median = sorted(step_seconds), statistics.median(step_seconds)
    trainable, batches_per_epoch = count_trainable(r.pipe), r.sampler.epoch_length(0)
    steps_per_epoch = max(1.0, batches_per_epoch / (acc.num_processes * cfg.train.gradient_accumulation_steps))
    epoch_seconds, run_seconds = steps_per_epoch * median, r.max_steps * median
    return {"status": "ok", "device": str(acc.device), "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision, "model": cfg.model.pretrained_model_name_or_path,
            "num_tokens": r.num_tokens, "batch_size": cfg.train.batch_size,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
            "trainable_parameters": sum(trainable.values()), "trainable_by_model": trainable,
            "num_scenes": len(r.train_set), "batches_per_epoch": batches_per_epoch, "rows_per_batch": rows_per_batch,
            "warmup_steps": DRY_RUN_WARMUP_STEPS, "timed_steps": len(times), "step_seconds": list(step_seconds),
            "step_seconds_median": median, "step_seconds_min": times[0], "step_seconds_max": times[-1],
            "peak_memory_gib": peak_memory_bytes(acc.device) / 2**30, "steps_per_epoch": steps_per_epoch,
            "epoch_seconds": epoch_seconds, "max_steps": r.max_steps, "run_seconds": run_seconds,
            "estimates": {"epoch_seconds": epoch_seconds, "run_seconds": run_seconds}}


def format_dry_run(cfg: TrainingConfig, report: dict[str, Any]) -> str:
    """The ``--dry_run`` report: sizes, measured step time (median and spread) and memory, estimates."""
    r, accum = report, cfg.train.gradient_accumulation_steps
    memory = "CUDA allocator peak" if r["device"].startswith("cuda") else "peak resident memory of the process"
    lines = [
        f"dry run on {r['device']} ({r['num_processes']} process(es)), mixed precision {r['mixed_precision']}",
        f"  model: {r['model']} ({r['num_tokens']} latent tokens per instance)",
        f"  trainable parameters: {r['trainable_parameters']:,} "
        f"({', '.join(f'{k} {v:,}' for k, v in r['trainable_by_model'].items())})",
        f"  trained weights: {r['trainable_parameters'] * 4 / 2**20:.2f} MB in float32 (checkpoints hold them; "
        "pipeline-final/ adds the frozen components)" if cfg.model.finetune == "full" else
        f"  adapter size: {r['trainable_parameters'] * 4 / 2**20:.2f} MB in float32 (lora-final/ holds it twice: "
        "PEFT + custom_adapter)",
        f"  data: {r['num_scenes']} training scenes -> {r['batches_per_epoch']} batches per epoch of up to "
        f"{cfg.train.batch_size} scenes; measured batch: {r['rows_per_batch']} instance rows",
        f"  step time (data + forward + backward + optimizer, {accum} micro-step(s)): median "
        f"{r['step_seconds_median']:.3f} s (min {r['step_seconds_min']:.3f}, max {r['step_seconds_max']:.3f} over "
        f"{r['timed_steps']} steps after {r['warmup_steps']} warm-up)",
        f"  peak memory: {r['peak_memory_gib']:.2f} GiB ({memory})",
        f"  estimate: {_duration(r['epoch_seconds'])} per epoch ({r['steps_per_epoch']:.0f} steps), "
        f"{_duration(r['run_seconds'])} for {r['max_steps']} steps (checkpoints and validation not included)",
    ]
    if r["step_seconds_max"] > 2 * r["step_seconds_min"]:
        lines.append("  note: step times vary by more than 2x (a busy machine?); the estimate uses the median")
    if cfg.cache.enabled:
        lines.append("  note: the dry run reads the files directly; the cache (cache.enabled) makes steps faster")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
