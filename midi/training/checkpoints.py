"""Run bookkeeping: checkpoints, resume and export (verified through the inference path).

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

With ``model.finetune: full`` a checkpoint holds the trained models instead of ``lora/``, and
``best/`` and ``pipeline-final/`` (instead of ``lora-final/``) are complete pipeline folders
(:mod:`midi.training.full`).

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
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import DistributedType
from accelerate.utils.other import (
    load as accelerate_load,  # accelerate's own loader: weights_only, numpy allowed
)
from torch.distributed.fsdp import FullyShardedDataParallel

from midi.config import (
    ADAPTER_SUBDIR,
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    METADATA_FILE,
    STATE_FILE,
    TRAINING_FILE,
    TrainingConfig,
    config_to_dict,
    config_to_yaml,
    trained_models,
)
from midi.data.atomic import commit_dir, write_json, write_text
from midi.errors import InputError, MidiError, OutputError, TrainingError, UsageError
from midi.lora import ADAPTER_MODELS, export_lora, load_adapter
from midi.tiny import load_pipeline, mi_blocks_for
from midi.training.full import load_models, save_models, write_pipeline

logger = logging.getLogger(__name__)

# Keys whose change makes a checkpoint unusable (the adapter's shape or the model it belongs to).
STRUCTURAL_KEYS = ("model.pretrained_model_name_or_path", "model.tiny_seed", "model.mi_blocks", "model.finetune",
                   "model.train_image_encoders", "lora.rank",
                   "lora.alpha", "lora.use_rslora", "lora.target_modules", "lora.use_dora", "lora.transformer",
                   "lora.image_encoder_1", "lora.image_encoder_2", "lora.image_encoder_1_target_modules",
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


def write_failure(exc: BaseException, path: Path, what: str) -> OutputError | None:
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
    return OutputError(f"{where}: {reason} ({what} not written; earlier checkpoints and adapters are intact)")


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
        UsageError: the folder is not a finished checkpoint.
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
        raise UsageError(f"{path}: not a finished checkpoint (no {STATE_FILE}); pass 'latest' or a checkpoint-N folder")
    return path


def check_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuses to start a new run over the checkpoints of an earlier one.

    Raises:
        UsageError: checkpoints exist and no resume was asked for.
    """
    if resume is None and list_checkpoints(output_dir):
        raise UsageError(f"train.output_dir: {output_dir} already holds checkpoints of an earlier run; pass "
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
        UsageError: a structural key changed (the adapter would not fit).
    """
    current = config_to_dict(cfg)
    changed, fatal = [], []
    for section, body in saved.items():
        for key, old in body.items():
            new = current.get(section, {}).get(key)
            if old != new and f"{section}.{key}" != "checkpointing.resume_from_checkpoint":
                (fatal if f"{section}.{key}" in STRUCTURAL_KEYS else changed).append(f"{section}.{key}: {old!r} -> {new!r}")
    if fatal:
        raise UsageError(f"{source}: cannot resume, the adapter's structure changed ({'; '.join(fatal)})")
    return changed


# ----------------------------------------------------------------------------- adapter I/O
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
def _model_outputs(pipe, inputs: dict[str, torch.Tensor], names: tuple[str, ...] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Transformer output on the fixed batch, plus the outputs of the image encoders in ``names`` (None:
    those that carry a LoRA)."""
    t = torch.full((2,), 500.0, device=inputs["x"].device)
    out = {"transformer": pipe.transformer(inputs["x"], t, encoder_hidden_states=inputs["e1"],
                                           encoder_hidden_states_2=inputs["e2"],
                                           attention_kwargs={"num_instances": [2]}, return_dict=False)[0]}
    for name in ("image_encoder_1", "image_encoder_2"):
        encoder = getattr(pipe, name)
        if name in names if names is not None else getattr(encoder, "peft_config", None):
            g = torch.Generator().manual_seed(99)
            size = encoder.config.image_size
            pixels = torch.randn(1, encoder.config.num_channels, size, size, generator=g)
            pixels = pixels.to(inputs["x"].device, next(encoder.parameters()).dtype)
            result = encoder(pixels)
            out[name] = result.image_embeds if name == "image_encoder_1" else result.last_hidden_state
    return out


def verify_export(pipe, folder: Path, cfg: TrainingConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Reloads an export the way inference does and compares outputs with the training model.

    A fresh pipeline is loaded on CPU (its trained models are then moved to the training device):
    the base with the adapter installed by :func:`midi.lora.load_adapter`, or with full finetuning
    the exported folder itself in float32 (the trained weights' dtype) with the multi-instance
    blocks it records; both pipelines run the same fixed batch in eval mode.

    Returns:
        ``{"max_abs_diff", "tolerance", "ok", "compared", "dtype"}``.
    """
    device = pipe.transformer.device
    if cfg.model.finetune == "full":
        dtype, names = torch.float32, trained_models(cfg)
        fresh = load_pipeline(str(folder), dtype)
        fresh.init_custom_adapter(set_self_attn_module_names=mi_blocks_for(str(folder)), exact_module_names=True)
    else:
        fresh = load_pipeline(cfg.model.pretrained_model_name_or_path, dtype, tiny_seed=cfg.model.tiny_seed)
        adapter = load_adapter(fresh, folder)
        names = ("transformer", *[n for n in ADAPTER_MODELS[1:] if n in adapter.weights])
    for name in names:
        getattr(fresh, name).to(device).eval()
    inputs = _check_inputs(pipe, device, dtype)
    modes = {n: getattr(pipe, n).training for n in ADAPTER_MODELS}
    try:
        for name in modes:
            getattr(pipe, name).eval()
        # load_adapter keeps LoRA weights in float32 over a 16-bit base, exactly like training.
        reference, reloaded = _model_outputs(pipe, inputs, names), _model_outputs(fresh, inputs, names)
    finally:
        for name, mode in modes.items():
            getattr(pipe, name).train(mode)
    del fresh
    return _compare(reference, reloaded, dtype)


def _compare(reference: dict[str, torch.Tensor], reloaded: dict[str, torch.Tensor], dtype: torch.dtype
             ) -> dict[str, Any]:
    diff = _max_diff(reference, reloaded)
    scale = max(1.0, max(float(v.float().abs().max()) for v in reference.values()))
    tolerance = (1e-5 if dtype == torch.float32 else 1e-2) * scale
    return {"max_abs_diff": diff, "tolerance": tolerance, "ok": diff <= tolerance, "compared": sorted(reference),
            "dtype": str(dtype).removeprefix("torch.")}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def export_model(pipe, target: Path, cfg: TrainingConfig, state: TrainerState, verify: bool, dtype: torch.dtype,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Exports what the run trains to ``target`` (atomically), with the config, optionally verified: the
    adapter, or with ``model.finetune: full`` the complete pipeline folder (:mod:`midi.training.full`).

    Raises:
        TrainingError: the reloaded export does not reproduce the training model; the export is
            left in ``<target>.unverified`` for inspection.
    """
    tmp, full = target.with_name(f"{target.name}.tmp"), cfg.model.finetune == "full"
    metadata_file = tmp / (TRAINING_FILE if full else METADATA_FILE)
    with cleaned_on_failure(target.parent, target.name):
        if full:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_pipeline(pipe, tmp, cfg, trained_models(cfg), cfg.model.mi_blocks)
            write_json(metadata_file, json.loads(json.dumps(
                {"format": "midi-full-finetune", "version": 1, "trained": list(trained_models(cfg)),
                 "mi_blocks": cfg.model.mi_blocks, **adapter_metadata(cfg, state)}, default=str)))
        else:
            export_lora(pipe, tmp, cfg.model.mi_blocks, extra_metadata=adapter_metadata(cfg, state))
        write_run_config(cfg, tmp)
        for name, text in (extra_files or {}).items():
            write_text(tmp / name, text)
    if verify:
        check = verify_export(pipe, tmp, cfg, dtype)
        write_json(metadata_file, {**json.loads(metadata_file.read_text()), "export_check": check})
        if not check["ok"]:
            failed = target.with_name(f"{target.name}.unverified")
            commit_dir(tmp, failed)
            raise TrainingError(f"{failed}: the export does not reproduce the training model after reloading "
                                f"(max abs diff {check['max_abs_diff']:.3g} > {check['tolerance']:.3g})")
        logger.info("export check passed for %s: max abs diff %.3g", target.name, check["max_abs_diff"])
    commit_dir(tmp, target)
    return target


@contextlib.contextmanager
def full_parameters(accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Makes the full weights visible for an export; a no-op except under FSDP, where every
    process must enter it together (the weights are gathered from the shards)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        yield


# ----------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """Saves and restores full training state with accelerate, the adapter in its final format.

    accelerate's ``save_state`` writes optimizer, LR schedule, grad scaler and every process's
    RNG state; the registered hooks replace its full-model weight file by ``lora/`` (the export
    format, so any checkpoint is also a usable adapter), or with ``model.finetune: full`` by the
    trained models' folders, and load them back on resume.
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
            if self.accelerator.is_main_process and self.cfg.model.finetune == "full":
                save_models(self.pipe, Path(folder), trained_models(self.cfg))
            elif self.accelerator.is_main_process:
                export_lora(self.pipe, Path(folder) / ADAPTER_SUBDIR, self.cfg.model.mi_blocks,
                            extra_metadata=adapter_metadata(self.cfg, self._state))
        weights.clear()  # the frozen base is not saved; lora/ (or the trained models) holds everything trainable

    def _load_hook(self, models: list, folder: str) -> None:
        if self.cfg.model.finetune == "full":
            load_models(self.pipe, Path(folder), trained_models(self.cfg))  # strict, in place
        else:
            load_adapter(self.pipe, Path(folder) / ADAPTER_SUBDIR, install=False)  # strict: keys and shapes must fit
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
                write_json(tmp / STATE_FILE, asdict(state))
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
        saved = (folder / CONFIG_FILE).read_text(encoding="utf-8") if (folder / CONFIG_FILE).is_file() else None
        if saved is not None:
            try:
                saved_cfg = yaml.safe_load(saved)
                if not isinstance(saved_cfg, dict) or not all(isinstance(v, dict) for v in saved_cfg.values()):
                    raise ValueError("not a mapping of config sections")
            except (yaml.YAMLError, ValueError) as exc:
                raise InputError(f"{folder / CONFIG_FILE}: unreadable checkpoint config ({' '.join(str(exc).split())})") from None
            changed = check_resume_config(saved_cfg, self.cfg, folder)
            if changed:
                logger.warning("resuming %s with changed settings: %s", folder.name, "; ".join(changed))
        try:
            state = TrainerState.from_dict(json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise InputError(f"{folder / STATE_FILE}: unreadable trainer state ({exc})") from None
        check_state_files(folder, self.accelerator.process_index)
        try:
            self.accelerator.load_state(str(folder))
        except (MidiError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure inside accelerate: one line naming the folder
            raise InputError(f"{folder}: cannot restore the training state ({_first_line(exc)})") from None
        self._state = state
        return state


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_state_files(folder: Path, process_index: int) -> None:
    """Refuses a checkpoint whose RNG state does not load or whose torch files are cut short.

    accelerate would go on silently with other RNG states (so the run would not continue exactly)
    or fail deep inside ``torch.load`` without naming the file.

    Raises:
        InputError: naming the file.
    """
    rng = folder / f"random_states_{process_index}.pkl"
    try:
        accelerate_load(rng)
    except Exception as exc:  # noqa: BLE001 - missing, truncated or a pickle that weights_only refuses
        raise InputError(f"{rng}: refused ({_first_line(exc)}); without this process's RNG state the run would "
                            "not continue exactly; resume from another checkpoint") from None
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pkl", ".pt")):
        if not zipfile.is_zipfile(path):  # torch.save writes a zip whose directory is at the end
            raise InputError(f"{path}: truncated or not a torch file; resume from another checkpoint")
