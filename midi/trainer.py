"""Run bookkeeping: checkpoints, resume, adapter export (verified through the inference path), metrics.

Output folder of a run::

    <output_dir>/
      config.yaml               the resolved config of the run
      logs/                     tracker files (TensorBoard by default)
      checkpoint-N/             accelerate state (optimizer, LR schedule, grad scaler, RNG states),
                                trainer_state.json (step, data position, best, counters),
                                config.yaml and lora/ (the adapter in its final format)
      best/                     adapter with the lowest validation loss so far (+ best.json)
      lora-final/               the final adapter + config.yaml, checked by reloading it
      previews/step-N/          preview renders and meshes

Every folder is written under a temporary name and renamed when complete, so an interrupted
run never leaves a half-written checkpoint or adapter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import statistics
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from midi.config import (  # noqa: F401  (the run-folder names: old import path for train_lora.py and tests)
    ADAPTER_SUBDIR,
    BEST_DIR,
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    FINAL_DIR,
    STATE_FILE,
    TrainingConfig,
    config_to_dict,
    config_to_yaml,
)
from midi.data.atomic import commit_dir, write_text
from midi.errors import TrainingError
from midi.lora import METADATA_FILE, AdapterError, export_lora, read_lora

logger = logging.getLogger(__name__)

# Keys whose change makes a checkpoint unusable (the adapter's shape or the model it belongs to).
STRUCTURAL_KEYS = ("model.pretrained_model_name_or_path", "model.tiny_seed", "model.mi_blocks", "lora.rank",
                   "lora.alpha", "lora.use_rslora", "lora.target_modules", "lora.use_dora", "lora.transformer", "lora.image_encoder_1",
                   "lora.image_encoder_2", "lora.image_encoder_1_target_modules",
                   "lora.image_encoder_2_target_modules")




@dataclass
class TrainerState:
    """What a checkpoint stores besides the accelerate state (``trainer_state.json``)."""

    global_step: int = 0
    consumed_batches: int = 0  # global micro-batches already trained on (the data stream position)
    epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    nonfinite_scenes: list[str] = field(default_factory=list)  # scenes with a non-finite loss in the current run of bad steps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        """Reads ``trainer_state.json`` content (unknown keys are ignored)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------- files
# Temporary names of this module, midi.lora and midi.data.atomic: <name>.tmp, <name>.tmp-<id>, .<name>.old-<pid>.
_STALE = re.compile(r"\.tmp(-\w+)?$|^\..+\.old-\d+$")


def remove_stale(output_dir: Path) -> list[str]:
    """Removes what a killed or failed run left in ``output_dir``: temporary files and folders, and
    checkpoints without their completion marker (a rotation killed half way). Returns the names."""
    removed = []
    for path in sorted(Path(output_dir).glob("*")) if Path(output_dir).is_dir() else []:
        half_deleted = re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", path.name) and not (path / STATE_FILE).is_file()
        if _STALE.search(path.name) or half_deleted:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def write_failure(exc: BaseException, path: Path, what: str) -> TrainingError | None:
    """One error line for a failed write (full disk, I/O error); None when ``exc`` is something else."""
    if isinstance(exc, OSError):
        where, reason = exc.filename or path, exc.strerror or str(exc)
    elif isinstance(exc, RuntimeError) and ("inline_container.cc" in str(exc) or "PytorchStreamWriter" in str(exc)):
        # torch.save reports a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos ..." or
        # "... PytorchStreamWriter failed writing file ...", without an errno.
        full = shutil.disk_usage(Path(path).parent).free < 2**26
        where, reason = path, os.strerror(errno.ENOSPC) if full else " ".join(str(exc).split())
    else:
        return None
    return TrainingError(f"{where}: {reason} ({what} not written; earlier checkpoints and adapters are intact)")


@contextlib.contextmanager
def cleaned_on_failure(output_dir: Path, what: str) -> Iterator[None]:
    """Removes the partial output of a failed write and turns a write failure into one error line."""
    try:
        yield
    except BaseException as exc:
        remove_stale(output_dir)
        error = write_failure(exc, output_dir, what)
        if error is None:
            raise
        raise error from None


def write_run_config(cfg: TrainingConfig, folder: Path) -> None:
    """Saves the resolved config as ``config.yaml`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / CONFIG_FILE, config_to_yaml(cfg))


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints ``(step, folder)``, oldest first (temporary folders are ignored)."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` (None when there is none yet), or a folder.

    Raises:
        TrainingError: the folder is not a finished checkpoint.
    """
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("resume_from_checkpoint=latest: no checkpoint in %s yet; starting a new run", output_dir)
            return None
        return found[-1][1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"{path}: not a finished checkpoint (no {STATE_FILE}); pass 'latest' or a checkpoint-N folder")
    return path


def check_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuses to start a new run over the checkpoints of an earlier one.

    Raises:
        TrainingError: checkpoints exist and no resume was asked for.
    """
    if resume is None and list_checkpoints(output_dir):
        raise TrainingError(f"train.output_dir: {output_dir} already holds checkpoints of an earlier run; pass "
                            "--resume_from_checkpoint latest to continue it, or choose another train.output_dir")


def rotate_checkpoints(output_dir: Path, limit: int | None) -> list[Path]:
    """Deletes the oldest checkpoints beyond ``limit``; returns the deleted folders."""
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - limit)]]
    for path in doomed:
        (path / STATE_FILE).unlink(missing_ok=True)  # first: a folder that is only half deleted no longer counts as finished
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def check_resume_config(saved: dict[str, dict[str, Any]], cfg: TrainingConfig, source: Path) -> list[str]:
    """Compares a checkpoint's config with the current one.

    Returns:
        Changed keys that are allowed (e.g. the learning rate), as ``key: old -> new``.

    Raises:
        TrainingError: a structural key changed (the adapter would not fit).
    """
    current = config_to_dict(cfg)
    changed, fatal = [], []
    for section, body in saved.items():
        for key, old in body.items():
            new = current.get(section, {}).get(key)
            if old != new and f"{section}.{key}" != "checkpointing.resume_from_checkpoint":
                (fatal if f"{section}.{key}" in STRUCTURAL_KEYS else changed).append(f"{section}.{key}: {old!r} -> {new!r}")
    if fatal:
        raise TrainingError(f"{source}: cannot resume, the adapter's structure changed ({'; '.join(fatal)})")
    return changed


# ----------------------------------------------------------------------------- adapter I/O
def load_adapter_weights(pipe, adapter_dir: Path) -> None:
    """Loads an exported adapter's weights into the LoRA modules already on ``pipe`` (strict).

    Raises:
        TrainingError: keys or shapes differ.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = read_lora(adapter_dir)
    for name, state in adapter.weights.items():
        model = getattr(pipe, name)
        expected = get_peft_model_state_dict(model)
        if set(expected) != set(state) or any(expected[k].shape != v.shape for k, v in state.items()):
            raise TrainingError(f"{adapter_dir}: {name} adapter does not fit the model (different LoRA config?)")
        set_peft_model_state_dict(model, state)


def adapter_metadata(cfg: TrainingConfig, state: TrainerState) -> dict[str, Any]:
    """Extra metadata written into ``midi_adapter.json`` of every export."""
    return {"training": {"global_step": state.global_step, "base_model": cfg.model.pretrained_model_name_or_path,
                         "config": config_to_dict(cfg)}}


def _check_inputs(pipe, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A fixed batch: one scene of two instances, random latents and embeddings (seeded)."""
    config = pipe.transformer.config
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, config.width, config.in_channels, generator=g)
    e1 = torch.randn(2, 1, config.cross_attention_dim, generator=g)
    e2 = torch.randn(2, 5, config.cross_attention_2_dim, generator=g)
    return {k: v.to(device, dtype) for k, v in {"x": x, "e1": e1, "e2": e2}.items()}


@torch.no_grad()
def _model_outputs(pipe, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformer output on the fixed batch, plus image-encoder outputs when they carry a LoRA."""
    t = torch.full((2,), 500.0, device=inputs["x"].device)
    out = {"transformer": pipe.transformer(inputs["x"], t, encoder_hidden_states=inputs["e1"],
                                           encoder_hidden_states_2=inputs["e2"],
                                           attention_kwargs={"num_instances": [2]}, return_dict=False)[0]}
    for name in ("image_encoder_1", "image_encoder_2"):
        encoder = getattr(pipe, name)
        if getattr(encoder, "peft_config", None):
            g = torch.Generator().manual_seed(99)
            size = encoder.config.image_size
            pixels = torch.randn(1, encoder.config.num_channels, size, size, generator=g)
            pixels = pixels.to(inputs["x"].device, next(encoder.parameters()).dtype)
            result = encoder(pixels)
            out[name] = result.image_embeds if name == "image_encoder_1" else result.last_hidden_state
    return out


def verify_export(pipe, adapter_dir: Path, cfg: TrainingConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Reloads an exported adapter the way inference does and compares outputs with the training model.

    A fresh pipeline is loaded (on CPU; its trained models are then moved to the training
    device), the adapter read with :func:`midi.lora.read_lora` and installed with
    :func:`midi.lora.apply_lora`; both models run the same fixed batch in eval mode.

    Returns:
        ``{"max_abs_diff", "tolerance", "ok", "compared"}``.
    """
    from midi.lora import apply_lora
    from midi.train_setup import load_base_pipeline

    device = pipe.transformer.device
    fresh = load_base_pipeline(cfg.model, dtype, device=None)
    adapter = read_lora(adapter_dir)
    apply_lora(fresh, adapter, adapter.mi_blocks)
    trained = ("transformer", *[n for n in ("image_encoder_1", "image_encoder_2") if n in adapter.weights])
    for name in trained:
        getattr(fresh, name).to(device).eval()
    inputs = _check_inputs(pipe, device, dtype)
    modes = {n: getattr(pipe, n).training for n in ("transformer", "image_encoder_1", "image_encoder_2")}
    try:
        for name in modes:
            getattr(pipe, name).eval()
        # apply_lora keeps LoRA weights in float32 over a 16-bit base, exactly like training.
        reference, reloaded = _model_outputs(pipe, inputs), _model_outputs(fresh, inputs)
    finally:
        for name, mode in modes.items():
            getattr(pipe, name).train(mode)
    diff = _max_diff(reference, reloaded)
    scale = max(1.0, max(float(v.float().abs().max()) for v in reference.values()))
    tolerance = (1e-5 if dtype == torch.float32 else 1e-2) * scale
    del fresh
    return {"max_abs_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance, "compared": sorted(reference),
            "dtype": str(dtype).removeprefix("torch.")}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def export_adapter(pipe, target: Path, cfg: TrainingConfig, state: TrainerState, mi_blocks: list[str],
                   verify: bool, dtype: torch.dtype, extra_files: dict[str, str] | None = None) -> Path:
    """Exports the adapter to ``target`` (atomically), with the config, optionally verified.

    Raises:
        TrainingError: the reloaded adapter does not reproduce the training model; the export is
            left in ``<target>.unverified`` for inspection.
    """
    tmp = target.with_name(f"{target.name}.tmp")
    with cleaned_on_failure(target.parent, target.name):
        export_lora(pipe, tmp, mi_blocks, extra_metadata=adapter_metadata(cfg, state))
        write_run_config(cfg, tmp)
        for name, text in (extra_files or {}).items():
            write_text(tmp / name, text)
    if verify:
        check = verify_export(pipe, tmp, cfg, dtype)
        metadata = json.loads((tmp / METADATA_FILE).read_text())
        metadata["export_check"] = check
        write_text(tmp / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
        if not check["ok"]:
            failed = target.with_name(f"{target.name}.unverified")
            commit_dir(tmp, failed)
            raise TrainingError(f"{failed}: the exported adapter does not reproduce the training model after "
                                f"reloading (max abs diff {check['max_abs_diff']:.3g} > {check['tolerance']:.3g})")
        logger.info("export check passed for %s: max abs diff %.3g", target.name, check["max_abs_diff"])
    commit_dir(tmp, target)
    return target


@contextlib.contextmanager
def full_parameters(accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Makes the full weights visible for an export; a no-op except under FSDP, where every
    process must enter it together (the weights are gathered from the shards)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        yield


# ----------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """Saves and restores full training state with accelerate, the adapter in its final format.

    accelerate's ``save_state`` writes optimizer, LR schedule, grad scaler and every process's
    RNG state; the registered hooks replace its full-model weight file by ``lora/`` (the export
    format, so any checkpoint is also a usable adapter) and load it back on resume.
    """

    def __init__(self, accelerator, pipe, cfg: TrainingConfig, output_dir: Path, dtype: torch.dtype) -> None:
        self.accelerator = accelerator
        self.pipe = pipe
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.dtype = dtype
        self._state = TrainerState()
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _save_hook(self, models: list, weights: list, folder: str) -> None:
        with full_parameters(self.accelerator, models[0]):
            if self.accelerator.is_main_process:
                export_lora(self.pipe, Path(folder) / ADAPTER_SUBDIR, self.cfg.model.mi_blocks,
                            extra_metadata=adapter_metadata(self.cfg, self._state))
        weights.clear()  # the frozen base is not saved; lora/ holds everything trainable

    def _load_hook(self, models: list, folder: str) -> None:
        load_adapter_weights(self.pipe, Path(folder) / ADAPTER_SUBDIR)
        models.clear()  # nothing left for accelerate to load into the model

    def save(self, state: TrainerState, name: str | None = None, rotate: bool = True) -> Path:
        """Writes ``checkpoint-<step>`` (or ``name``) atomically; every process must call it."""
        acc = self.accelerator
        self._state = state
        final = self.output_dir / (name or f"{CHECKPOINT_PREFIX}{state.global_step}")
        tmp = final.with_name(f"{final.name}.tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        with cleaned_on_failure(self.output_dir, final.name):
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_run_config(self.cfg, tmp)
                write_text(tmp / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
        if acc.is_main_process:
            if self.cfg.checkpointing.verify_exports:
                check = verify_export(self.pipe, tmp / ADAPTER_SUBDIR, self.cfg, self.dtype)
                if not check["ok"]:
                    raise TrainingError(f"{tmp}: checkpoint adapter fails the reload check ({check})")
            commit_dir(tmp, final)
            if rotate:
                for path in rotate_checkpoints(self.output_dir, self.cfg.checkpointing.checkpoints_total_limit):
                    logger.info("removed old checkpoint %s", path.name)
        acc.wait_for_everyone()
        return final

    def load(self, folder: Path) -> TrainerState:
        """Restores a checkpoint written by :meth:`save` (adapter, optimizer, schedule, RNG, counters)."""
        import yaml

        saved = (folder / CONFIG_FILE).read_text(encoding="utf-8") if (folder / CONFIG_FILE).is_file() else None
        if saved is not None:
            try:
                saved_cfg = yaml.safe_load(saved)
                if not isinstance(saved_cfg, dict) or not all(isinstance(v, dict) for v in saved_cfg.values()):
                    raise ValueError("not a mapping of config sections")
            except (yaml.YAMLError, ValueError) as exc:
                raise TrainingError(f"{folder / CONFIG_FILE}: unreadable checkpoint config ({' '.join(str(exc).split())})") from None
            changed = check_resume_config(saved_cfg, self.cfg, folder)
            if changed:
                logger.warning("resuming %s with changed settings: %s", folder.name, "; ".join(changed))
        try:
            state = TrainerState.from_dict(json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise TrainingError(f"{folder / STATE_FILE}: unreadable trainer state ({exc})") from None
        check_state_files(folder, self.accelerator.process_index)
        try:
            self.accelerator.load_state(str(folder))
        except (TrainingError, AdapterError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure inside accelerate: one line naming the folder
            raise TrainingError(f"{folder}: cannot restore the training state ({_first_line(exc)})") from None
        self._state = state
        return state


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_state_files(folder: Path, process_index: int) -> None:
    """Refuses a checkpoint whose RNG state does not load or whose torch files are cut short.

    accelerate would go on silently with other RNG states (so the run would not continue exactly)
    or fail deep inside ``torch.load`` without naming the file.

    Raises:
        TrainingError: naming the file.
    """
    from accelerate.utils.other import load  # accelerate's own loader: weights_only, numpy arrays allowed

    rng = folder / f"random_states_{process_index}.pkl"
    try:
        load(rng)
    except Exception as exc:  # noqa: BLE001 - missing, truncated or a pickle that weights_only refuses
        raise TrainingError(f"{rng}: refused ({_first_line(exc)}); without this process's RNG state the run would "
                            "not continue exactly; resume from another checkpoint") from None
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pkl", ".pt")):
        if not zipfile.is_zipfile(path):  # torch.save writes a zip whose directory is at the end
            raise TrainingError(f"{path}: truncated or not a torch file; resume from another checkpoint")


# ----------------------------------------------------------------------------- metrics
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


def dry_run_report(cfg: TrainingConfig, device: torch.device, num_processes: int, mixed_precision: str,
                   trainable: dict[str, int], step_seconds: list[float], warmup_steps: int, peak_bytes: int,
                   batches_per_epoch: int, rows_per_batch: int, num_tokens: int, max_steps: int,
                   num_scenes: int) -> dict[str, Any]:
    """The ``--dry_run`` measurements and estimates as plain values (also written by ``--dry_run_json``)."""
    times, median = sorted(step_seconds), statistics.median(step_seconds)
    steps_per_epoch = max(1.0, batches_per_epoch / (num_processes * cfg.train.gradient_accumulation_steps))
    return {"device": str(device), "num_processes": num_processes, "mixed_precision": mixed_precision,
            "model": cfg.model.pretrained_model_name_or_path, "num_tokens": num_tokens,
            "trainable_parameters": sum(trainable.values()), "trainable_by_model": trainable,
            "num_scenes": num_scenes, "batches_per_epoch": batches_per_epoch, "rows_per_batch": rows_per_batch,
            "warmup_steps": warmup_steps, "timed_steps": len(times), "step_seconds": list(step_seconds),
            "step_seconds_median": median, "step_seconds_min": times[0], "step_seconds_max": times[-1],
            "peak_memory_gib": peak_bytes / 2**30, "steps_per_epoch": steps_per_epoch,
            "epoch_seconds": steps_per_epoch * median, "max_steps": max_steps, "run_seconds": max_steps * median}


def format_dry_run(cfg: TrainingConfig, report: dict[str, Any]) -> str:
    """The ``--dry_run`` report: sizes, measured step time (median and spread) and memory, estimates."""
    r, accum = report, cfg.train.gradient_accumulation_steps
    memory = "CUDA allocator peak" if r["device"].startswith("cuda") else "peak resident memory of the process"
    lines = [
        f"dry run on {r['device']} ({r['num_processes']} process(es)), mixed precision {r['mixed_precision']}",
        f"  model: {r['model']} ({r['num_tokens']} latent tokens per instance)",
        f"  trainable parameters: {r['trainable_parameters']:,} "
        f"({', '.join(f'{k} {v:,}' for k, v in r['trainable_by_model'].items())})",
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
