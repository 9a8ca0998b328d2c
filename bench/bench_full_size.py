#!/usr/bin/env python
"""Memory and speed at the released size (issue 14), measured instead of claimed.

The released pipeline's architecture (DiT 21 x 2048 over 2048 latent tokens x 64 channels, the
TripoSG VAE, CLIP ViT-L/14 and 7-channel DINOv2-L) is built from its config with seeded random
weights (no download). Training goes through the toolkit's own code: ``midi.training.build.build``
(LoRA, multi-instance blocks 8-12, fp32 LoRA weights, the cache's encoder offload) and
``train_lora.optimizer_step`` (forward, backward, clipping, AdamW). Four subcommands:

    python bench/bench_full_size.py train --device cuda --json train.json
        one scene of 2, 5, 10 instances x checkpointing on/off x cache on/off: peak memory and step time
    python bench/bench_full_size.py train --count --json count.json
        the same grid on fake tensors (no arithmetic, any CPU, under a minute a cell): every tensor's bytes counted
    python bench/bench_full_size.py encoders
        what the cache takes off the accelerator (the VAE encoder and both image encoders)
    python bench/bench_full_size.py infer --device cuda
        seconds per scene (5 instances, 50 steps, CFG 7): denoising and extraction, dense vs coarse-to-fine
    python bench/bench_full_size.py flops --device cuda
        achieved FLOP/s of DiT blocks next to the dense-matmul peak, fp32 and bf16

``--model toy`` runs any of them on the tiny model in seconds (the tests and ``gpu_check.sh --dry_run``
do). Memory: CUDA allocator peak (``max_memory_allocated``) on a GPU; on the CPU the process's peak
resident set (VmHWM, reset per cell) minus its resident set before the cell. ``--count`` reports
the live bytes of every tensor the step creates (weights, activations, gradients), counted by a
dispatch mode over fake tensors under CPU autocast; the optimizer state is added as 8 bytes per
trainable parameter (AdamW's two fp32 moments). It is a count, not a measurement: no allocator
rounding, no CUDA context.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repo is the package root

import torch  # noqa: E402

GIB = 2**30
# The release's image encoders (upstream-facts 1.3): CLIP ViT-L/14 at 224 px projecting to 768, and
# DINOv2-L with 7 input channels. feature_extractor_2's size is not known: 224 px crops (257 DINO tokens),
# as TripoSG's processor, are assumed.
RELEASE_CLIP = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=768)
RELEASE_DINO = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=518,
                    patch_size=14, num_channels=7)
RELEASE_CROP, RELEASE_DINO_RESIZE = 224, 256
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
# The training config the cells use (rank 16 and the release's blocks come from it), and the sizes of the
# synthetic scenes build() needs to exist (the cells feed their own batches of exact instance counts).
TRAIN_YAML = REPO / "configs" / "train" / "lora_finetune.yaml"
SIZES = {"release": dict(num_points=20480, image_size=512), "toy": dict(num_points=1024, image_size=64)}


# ----------------------------------------------------------------------------- the pipeline
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Builds modules directly in ``dtype``: a float32 build of the 1.7 B-parameter DiT would need twice the memory."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def release_pipeline(device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The released MIDIPipeline's architecture with each model's own seeded initialisation; the VAE in
    float32 (as ``load_pipeline`` keeps it), the rest in ``dtype``; built on ``device`` (or fake tensors,
    inside a FakeTensorMode)."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel
    from midi.models.transformers.triposg_transformer import TripoSGDiTModel
    from midi.pipelines.pipeline_midi import MIDIPipeline
    from midi.schedulers.scheduling_rectified_flow import RectifiedFlowScheduler

    builders = [("image_encoder_1", dtype, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**RELEASE_CLIP))),
                ("image_encoder_2", dtype, lambda: Dinov2Model(Dinov2Config(**RELEASE_DINO))),
                ("transformer", dtype, TripoSGDiTModel),  # the class defaults are the release's config
                ("vae", torch.float32, TripoSGVAEModel)]
    models = {}
    for k, (name, model_dtype, build) in enumerate(builders):
        torch.manual_seed(seed + k)
        with torch.device(device), default_dtype(model_dtype):
            models[name] = build().eval()
    crop = {"height": RELEASE_CROP, "width": RELEASE_CROP}
    clip_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    bit_processor = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    pipe = MIDIPipeline(**models,
                        scheduler=RectifiedFlowScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
                        feature_extractor_1=clip_processor(size={"shortest_edge": RELEASE_CROP}, crop_size=crop),
                        feature_extractor_2=bit_processor(size={"shortest_edge": RELEASE_DINO_RESIZE}, crop_size=crop,
                                                          **IMAGENET))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_pipeline(model: str, device: str, dtype: torch.dtype):
    """``release`` (random weights) or ``toy`` (midi.tiny's pipeline, its frozen models cast to ``dtype``)."""
    if model == "release":
        return release_pipeline(device, dtype)
    from midi.tiny import load_pipeline

    return load_pipeline("tiny", dtype, device=device)


def to_fake(pipe, fake_mode):
    """Replaces every parameter and buffer of a meta-device pipeline by a fake CPU tensor of its shape, dtype
    and requires_grad (in place, no ``.to()``: modules cannot convert fake parameters). Meta first, because
    some initialisers read values, which fake tensors do not have."""
    with fake_mode:
        for component in pipe_models(pipe):
            for module in component.modules():
                for name, p in module._parameters.items():
                    if p is not None:
                        module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), p.requires_grad)
                for name, b in module._buffers.items():
                    if b is not None:
                        module._buffers[name] = torch.empty_like(b, device="cpu")
    return pipe


def mi_blocks(model: str) -> list[str]:
    from midi.config import DEFAULT_MI_BLOCKS
    from midi.tiny import TINY_MI_BLOCKS

    return list(DEFAULT_MI_BLOCKS if model == "release" else TINY_MI_BLOCKS)


def dino_tokens(pipe) -> int:
    """Tokens DINOv2 gives for the processor's crops (class token + patches): the cached embeddings' length."""
    crop = pipe.feature_extractor_2.crop_size["height"]
    return (crop // pipe.image_encoder_2.config.patch_size) ** 2 + 1


# ----------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def release_host_memory() -> None:
    """Collects garbage and returns freed heap pages to the OS, so the next cell's baseline is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Memory:
    """Peak memory of a stretch of work: CUDA allocator peak, or the process's peak RSS (VmHWM) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> int:
        """Bytes in use now (allocated tensors on CUDA, resident set on the CPU)."""
        return torch.cuda.memory_allocated(self.device) if self.cuda else _status_kib("VmRSS:") * 1024

    def start(self) -> int:
        """Resets the peak; returns the bytes in use at the start."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_host_memory()
            with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
        return self.now()

    def peak(self) -> dict[str, int]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return {"peak": torch.cuda.max_memory_allocated(self.device),
                    "peak_reserved": torch.cuda.max_memory_reserved(self.device)}
        return {"peak": _status_kib("VmHWM:") * 1024}

    @property
    def what(self) -> str:
        return ("CUDA allocator peak (max_memory_allocated)" if self.cuda
                else "process peak RSS (VmHWM, reset per cell) minus RSS before the cell")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LiveBytes:
    """Counts the bytes of every tensor storage alive, and their peak, while active (a dispatch mode).

    Storages that exist before (the weights, ``resident``) are known up front, so views of them are
    not counted twice; a storage's bytes are released when Python frees it (weak references).
    """

    def __init__(self, resident: list[torch.Tensor]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        counter.track(t)
                return out

        self.mode = _Mode()
        self.seen = WeakIdKeyDictionary()
        self.live = self.peak = 0
        for t in resident:
            self.seen[t.untyped_storage()] = 0

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.seen:
            return
        nbytes = storage.nbytes()
        self.seen[storage] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __enter__(self) -> LiveBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights count once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes()) if s.device.type != "meta" and not _is_fake(t) else id(s)] = s.nbytes()
    return sum(seen.values())


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


# ----------------------------------------------------------------------------- training
def train_overrides(opts: argparse.Namespace, work: Path, cache: bool) -> list[str]:
    size = SIZES[opts.model]
    return ["--model.pretrained_model_name_or_path", f"{opts.model}-random", "--model.mi_blocks", json.dumps(mi_blocks(opts.model)),
            "--lora.rank", str(opts.rank), "--lora.alpha", str(opts.rank),
            "--data.root", str(work / "data"), "--data.synthetic_if_missing", "3", "--data.image_size", "64",
            "--data.num_surface_points", str(min(size["num_points"], 4096)), "--data.num_workers", "0",
            "--cache.enabled", str(cache).lower(), "--cache.dir", str(work / "cache"), "--cache.num_surface_subsamples", "1",
            "--train.output_dir", str(work / f"out-{'cache' if cache else 'plain'}"), "--train.batch_size", "1",
            # json.dumps: a bare "no" would read as YAML false
            "--train.max_steps", "1000", "--train.mixed_precision", json.dumps(opts.mixed_precision),
            "--validation.every_n_steps", "0", "--validation.preview_every_n_steps", "0",
            "--validation.metrics_every_n_steps", "0", "--logging.report_to", "none", "--logging.progress_bar", "false"]


@contextlib.contextmanager
def patched_loader(pipe):
    """build() loads its pipeline by name; this hands it the random one (there is no weights folder)."""
    from midi.training import build

    original = build.load_pipeline
    build.load_pipeline = lambda *args, **kwargs: pipe
    try:
        yield
    finally:
        build.load_pipeline = original


def build_run(opts: argparse.Namespace, work: Path, cache: bool):
    """A training Run exactly as ``train_lora.py`` builds it, over the random pipeline."""
    from accelerate.state import AcceleratorState, GradientState

    import train_lora
    from midi.config_load import load_config
    from midi.training import build, metrics, objective

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_lora.metrics, train_lora.objective = metrics, objective  # imported by train_lora.main, which is bypassed
    cfg = load_config(TRAIN_YAML, train_overrides(opts, work, cache))
    device = "cuda" if opts.device == "cuda" else "cpu"
    dtype = build.weight_dtype_for(build.resolve_mixed_precision(opts.mixed_precision, device == "cpu"))
    with patched_loader(make_pipeline(opts.model, device, dtype)):
        return build.build(cfg, dry_run=False)


def make_batch(pipe, num_instances: int, cached: bool, num_points: int, image_size: int, seed: int = 0):
    """One scene of ``num_instances`` rows as the data loader yields it: cached posteriors and embeddings
    (float16, as the cache stores them), or surfaces and processed pixels for the encoders to run on."""
    from midi.training.batches import TrainBatch

    g = torch.Generator().manual_seed(seed)
    n, t = num_instances, pipe.transformer.config
    scene = dict(scene_ids=["bench"], num_instances=[n], rows_per_scene=[n])
    if cached:
        mean = torch.randn(n, t.width, t.in_channels, generator=g)
        posterior = torch.cat([mean, torch.full_like(mean, -6.0)], dim=-1).half()
        return TrainBatch(**scene, posterior=posterior,
                          embeds_1=torch.randn(n, 1, t.cross_attention_dim, generator=g).half(),
                          embeds_2=torch.randn(n, dino_tokens(pipe), t.cross_attention_2_dim, generator=g).half())
    points = torch.rand(n, num_points, 3, generator=g) * 2 - 1
    normals = torch.nn.functional.normalize(torch.randn(n, num_points, 3, generator=g), dim=-1)
    s1, s2 = (fe.crop_size["height"] for fe in (pipe.feature_extractor_1, pipe.feature_extractor_2))
    return TrainBatch(**scene, surfaces=torch.cat([points, normals], dim=-1),
                      pixels_1=torch.randn(n, 3, s1, s1, generator=g),
                      pixels_2_instance=torch.randn(n, 3, s2, s2, generator=g),
                      pixels_2_scene=torch.randn(1, 3, s2, s2, generator=g).expand(n, -1, -1, -1).contiguous(),
                      masks=(torch.rand(n, 1, image_size, image_size, generator=g) > 0.5).float())


def set_checkpointing(transformer, on: bool) -> None:
    if on:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()


def measure_cell(run, num_instances: int, checkpointing: bool, cached: bool, opts: argparse.Namespace) -> dict:
    """Warm-up and timed optimizer steps of one cell; peak memory over all of them (fresh optimizer state)."""
    import train_lora
    from midi.training.checkpoints import TrainerState
    from midi.training.metrics import ThroughputMeter

    size = SIZES[opts.model]
    device = run.accelerator.device
    set_checkpointing(run.pipe.transformer, checkpointing)
    run.optimizer.optimizer.state.clear()  # every cell allocates its AdamW state inside its own peak
    template = make_batch(run.pipe, num_instances, cached, size["num_points"], size["image_size"])
    batches = (dataclasses.replace(template) for _ in iter(int, 1))  # .to() moves a copy's fields, not the template's
    state, meter, mem = TrainerState(), ThroughputMeter(), Memory(device)
    run.model.train()
    before = mem.start()
    times, skipped, loss = [], 0, float("nan")
    for i in range(opts.warmup + opts.steps):
        start = time.perf_counter()
        loss, _, bad = train_lora.optimizer_step(run, state, batches, meter)
        sync(device)
        if i >= opts.warmup:
            times.append(time.perf_counter() - start)
        skipped += bool(bad)
    peak = mem.peak()
    return {"instances": num_instances, "checkpointing": checkpointing, "cache": cached, "status": "ok",
            "step_seconds": statistics.median(times), "step_seconds_all": times, "before_bytes": before,
            **{f"{k}_bytes": v for k, v in peak.items()}, "extra_bytes": peak["peak"] - before,
            "loss": loss, "skipped_updates": skipped}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def bench_train(opts: argparse.Namespace, work: Path) -> dict:
    """The grid: one build per cache setting (the offload differs), cells over instances and checkpointing."""
    if opts.count:
        return count_train(opts)
    cells, resident = [], {}
    for cached in opts.cache:
        run = build_run(opts, work, cached)
        device = run.accelerator.device
        mem = Memory(device)
        resident[f"cache_{'on' if cached else 'off'}"] = {
            "bytes_in_use": mem.start(),
            "weights_bytes_on_device": storage_bytes([t for t in module_tensors(*pipe_models(run.pipe))
                                                      if t.device.type == device.type]),
            "offloaded": sorted({n.rsplit(".", 1)[0] if n.startswith("vae.") else n for n in offloaded_names(run)})}
        for n in opts.instances:
            for ckpt in opts.checkpointing:
                label = f"{n} instances, checkpointing {'on' if ckpt else 'off'}, cache {'on' if cached else 'off'}"
                try:
                    cell = measure_cell(run, n, ckpt, cached, opts)
                except Exception as exc:  # an OOM is a result: the cell does not fit
                    if not is_oom(exc):
                        raise
                    cell = {"instances": n, "checkpointing": ckpt, "cache": cached, "status": "oom"}
                    run.optimizer.zero_grad(set_to_none=True)
                    release_device(device)
                cells.append(cell)
                print(f"  {label}: {_cell_text(cell)}", flush=True)
                opts.save({"mode": "measured", "what": mem.what, "resident": resident, "cells": cells})
        run.accelerator.free_memory()
        del run
        release_device(device)
    return {"mode": "measured", "what": Memory(device).what, "resident": resident, "cells": cells}


def pipe_models(pipe) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.vae, pipe.image_encoder_1, pipe.image_encoder_2]


def offloaded_names(run) -> list[str]:
    """The modules build() left in host memory (accelerate's offload hooks mark them)."""
    return [name for name, module in (("image_encoder_1", run.pipe.image_encoder_1),
                                      ("image_encoder_2", run.pipe.image_encoder_2),
                                      *((f"vae.encoder.blocks.{i}", b) for i, b in enumerate(run.pipe.vae.encoder.blocks)))
            if hasattr(module, "_hf_hook")]


def release_device(device: torch.device) -> None:
    release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cell_text(cell: dict) -> str:
    if cell["status"] != "ok":
        return cell["status"]
    note = f", {cell['skipped_updates']} update(s) skipped (non-finite)" if cell.get("skipped_updates") else ""
    return (f"{cell['step_seconds']:.2f} s/step, peak {cell['peak_bytes'] / GIB:.2f} GiB "
            f"(+{cell['extra_bytes'] / GIB:.2f} over {cell['before_bytes'] / GIB:.2f}){note}")


# ----------------------------------------------------------------------------- counting (fake tensors)
def count_train(opts: argparse.Namespace) -> dict:
    """The grid counted on fake tensors: the real model code (LoRA, checkpointing, multi-instance attention,
    objective) under CPU bf16 autocast, no arithmetic. Cache on excludes what ``offload_cached_encoders``
    moves off one GPU from the resident weights."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from midi.config_load import load_config
    from midi.training import build, objective

    size = SIZES[opts.model]
    cells, resident_info = [], {}
    for cached in opts.cache:
        cfg = load_config(TRAIN_YAML, train_overrides(opts, Path(tempfile.gettempdir()), cached))
        dtype = build.weight_dtype_for(opts.mixed_precision if opts.mixed_precision != "auto" else "bf16")
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with patched_loader(make_pipeline(opts.model, "meta", dtype)):
            pipe = to_fake(build.build_pipeline(cfg, dtype, "meta"), fake)  # LoRA, MI blocks, fp32 LoRA weights
        model = objective.FlowMatchingModel(pipe)
        every = module_tensors(*pipe_models(pipe))
        away = {id(t) for t in module_tensors(*build.cached_encoders(pipe, cfg).values())} if cached else set()
        on_device = [t for t in every if id(t) not in away]
        resident = storage_bytes(on_device)
        trainable = sum(p.numel() for p in build.trainable_parameters(pipe))
        optimizer_bytes = 8 * trainable  # AdamW: exp_avg and exp_avg_sq in fp32
        resident_info[f"cache_{'on' if cached else 'off'}"] = {"weights_bytes_on_device": resident,
                                                               "offloaded_bytes": storage_bytes(every) - resident,
                                                               "trainable_parameters": trainable}
        for n in opts.instances:
            for ckpt in opts.checkpointing:
                set_checkpointing(pipe.transformer, ckpt)
                model.train()
                for scenes in opts.scenes:
                    batch = _scenes_batch(pipe, n, scenes, cached, size)
                    start = time.perf_counter()
                    step_peak, grads = _count_step(model, pipe, cfg, batch, every, dtype)
                    cell = {"instances": n, "scenes": scenes, "checkpointing": ckpt, "cache": cached, "status": "counted",
                            "weights_bytes": resident, "optimizer_bytes": optimizer_bytes, "step_peak_bytes": step_peak,
                            "peak_bytes": resident + optimizer_bytes + step_peak, "grad_bytes": grads,
                            "count_seconds": time.perf_counter() - start}
                    cells.append(cell)
                    opts.save({"mode": "counted", "resident": resident_info, "cells": cells})
                    print(f"  {scenes} scene(s) x {n} instances, checkpointing {'on' if ckpt else 'off'}, cache "
                          f"{'on' if cached else 'off'}: {cell['peak_bytes'] / GIB:.2f} GiB counted "
                          f"(weights {resident / GIB:.2f} + AdamW {optimizer_bytes / GIB:.2f} + step {step_peak / GIB:.2f})",
                          flush=True)
        del model, pipe
        release_host_memory()
    return {"mode": "counted", "what": "live tensor bytes on fake tensors (CPU autocast rules), AdamW state added",
            "resident": resident_info, "cells": cells}


def _scenes_batch(pipe, num_instances: int, scenes: int, cached: bool, size: dict):
    """``scenes`` scenes of ``num_instances`` each, back to back (packed batching)."""
    from midi.training.batches import TENSOR_FIELDS

    parts = [make_batch(pipe, num_instances, cached, size["num_points"], size["image_size"], seed=k) for k in range(scenes)]
    first = parts[0]
    merged = {name: torch.cat([getattr(p, name) for p in parts]) for name in TENSOR_FIELDS if getattr(first, name) is not None}
    return dataclasses.replace(first, scene_ids=[f"bench{k}" for k in range(scenes)], num_instances=[num_instances] * scenes,
                               rows_per_scene=[num_instances] * scenes, **merged)


def _count_step(model, pipe, cfg, batch, weights: list[torch.Tensor], dtype: torch.dtype) -> tuple[int, int]:
    """Peak live bytes of one forward + backward of the objective beyond the weights, and the gradients' bytes.

    Outside the fake mode on purpose: the batch and the objective's random draws stay real (small) tensors,
    so data-dependent shapes (repeat_interleave by scene) work; every op touching a weight is fake.
    """
    from midi.training import objective

    generator = objective.seed_step(cfg.train.seed, 0, 0, 0)
    counter = LiveBytes(weights)
    with counter, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = objective.training_step(model, pipe.vae, pipe.scheduler, batch, cfg.objective,
                                      pipe.transformer.config.width, generator)
        out.loss.backward()
    grads = storage_bytes([p.grad for p in model.parameters() if p.grad is not None])
    for p in model.parameters():
        p.grad = None
    return counter.peak, grads


# ----------------------------------------------------------------------------- encoders (item 2)
def bench_encoders(opts: argparse.Namespace) -> dict:
    """Bytes the cache takes off the accelerator: each offloaded module's weights, counted, and measured
    as the resident memory its materialisation adds (RSS on the CPU, allocated bytes on CUDA); on CUDA
    also the allocator before and after ``offload_cached_encoders`` and one encoder forward afterwards."""
    from midi.config_load import load_config
    from midi.training import build

    device = torch.device("cuda" if opts.device == "cuda" else "cpu")
    dtype = torch.bfloat16
    mem = Memory(device)
    base = mem.start()
    # On the CPU the weights' bytes are read off a meta-device build; each module is then materialised alone.
    pipe = make_pipeline(opts.model, str(device) if device.type == "cuda" else "meta", dtype)
    after_build = mem.now()
    cfg = load_config(TRAIN_YAML, train_overrides(opts, Path(tempfile.gettempdir()), True))
    modules = build.cached_encoders(pipe, cfg)
    groups = {"vae.encoder.blocks": [m for n, m in modules.items() if n.startswith("vae.")],
              **{n: [m] for n, m in modules.items() if not n.startswith("vae.")}}
    result = {"device": str(device), "modules": {}}
    if device.type == "cuda":
        result["pipeline_bytes_in_use"] = after_build - base
    for name, mods in groups.items():
        result["modules"][name] = {"weights_bytes": storage_bytes(module_tensors(*mods)),
                                   "dtype": str(next(mods[0].parameters()).dtype).removeprefix("torch.")}
    result["offload_bytes"] = sum(m["weights_bytes"] for m in result["modules"].values())
    if device.type == "cuda":
        from accelerate import Accelerator

        accelerator = Accelerator()
        before = mem.now()
        names = build.offload_cached_encoders(pipe, cfg, accelerator)
        result.update(offloaded=names, allocated_before=before, allocated_after=mem.now(),
                      measured_saving_bytes=before - mem.now(),
                      pipeline_device=str(pipe.device), execution_device=str(pipe._execution_device))
        pixels = torch.randn(1, 3, RELEASE_CROP if opts.model == "release" else 32, RELEASE_CROP if opts.model == "release"
                             else 32, device=device, dtype=dtype)
        start = time.perf_counter()
        pipe.image_encoder_1(pixels)  # on demand: the hook copies the weights in for this forward
        sync(device)
        result["on_demand_forward_seconds"] = time.perf_counter() - start
    else:
        # On the CPU nothing moves (the host is the device); what the offload would take off an accelerator
        # is what these modules hold in memory: measured as the RSS their materialisation adds.
        for name in groups:
            start = mem.start()
            held = _materialise(opts.model, name, dtype)
            result["modules"][name]["measured_rss_bytes"] = mem.now() - start
            del held
            release_host_memory()
        result["measured_rss_bytes"] = sum(m["measured_rss_bytes"] for m in result["modules"].values())
    for name, m in result["modules"].items():
        extra = f", RSS +{m['measured_rss_bytes'] / GIB:.3f} GiB" if "measured_rss_bytes" in m else ""
        print(f"  {name:<20} {m['dtype']:>9}: {m['weights_bytes'] / GIB:.3f} GiB of weights{extra}")
    print(f"  off the accelerator with the cache on: {result['offload_bytes'] / GIB:.3f} GiB"
          + (f" (measured on {device}: {result['measured_saving_bytes'] / GIB:.3f} GiB)" if "measured_saving_bytes" in result
             else f" (RSS measured on the CPU: {result['measured_rss_bytes'] / GIB:.3f} GiB)"))
    return result


def _materialise(model: str, name: str, dtype: torch.dtype):
    """One offloaded module alone, with real weights (for its resident-memory measurement)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGEncoder, TripoSGVAEModel

    if model == "toy":
        pipe = make_pipeline(model, "cpu", dtype)
        return pipe.vae.encoder.blocks if name.startswith("vae.") else getattr(pipe, name)
    if name.startswith("vae."):
        with torch.device("meta"):
            vae = TripoSGVAEModel()
        c = vae.config  # the encoder alone, in float32 as the VAE runs (the decoder is not offloaded)
        return TripoSGEncoder(c.in_channels + vae.embedder.out_dim, c.width_encoder, c.num_attention_heads,
                              c.num_layers_encoder).blocks
    build = {"image_encoder_1": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**RELEASE_CLIP)),
             "image_encoder_2": lambda: Dinov2Model(Dinov2Config(**RELEASE_DINO))}[name]
    with default_dtype(dtype):
        return build()


# ----------------------------------------------------------------------------- inference (item 3)
def synthetic_scene(num_instances: int, size: int = 512):
    """A scene image with ``num_instances`` coloured boxes, its instance masks and instance images (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = np.full((size, size, 3), 255, np.uint8)
    masks = []
    for _ in range(num_instances):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 4, 2)
        m = np.zeros((size, size), bool)
        m[y0:y0 + h, x0:x0 + w] = True
        rgb[m] = rng.integers(0, 255, 3)
        masks.append(m)
    scene = Image.fromarray(rgb)
    images = [Image.fromarray(np.where(m[..., None], rgb, 255).astype(np.uint8)) for m in masks]
    return images, [Image.fromarray(m.astype(np.uint8) * 255) for m in masks], scene


def bench_infer(opts: argparse.Namespace) -> dict:
    """Denoising and extraction of one scene; decoder queries counted; stub fields for a realistic surface."""
    from midi.inference.extraction import ExtractionConfig, extract_surfaces
    from midi.inference.generation import generate_latents

    device = torch.device("cuda" if opts.device == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or opts.model == "toy" else torch.float32
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "instances": opts.instances[0],
              "steps": opts.infer_steps, "guidance_scale": opts.guidance, "octree_depth": opts.depth}
    result["denoise_step_flops"] = denoise_step_flops(opts.model, opts.instances[0], opts.guidance > 1)
    if opts.infer_steps > 0:
        pipe = make_pipeline(opts.model, str(device), dtype)
        pipe.init_custom_adapter(set_self_attn_module_names=mi_blocks(opts.model), exact_module_names=True)
    else:  # no denoising: only the VAE is materialised (the rest stays on the meta device, free)
        pipe = make_pipeline(opts.model, "meta", dtype)
        vae_config = dict(pipe.vae.config)
        torch.manual_seed(3)
        with torch.device(device):
            pipe.register_modules(vae=type(pipe.vae).from_config(vae_config).eval())
    n = opts.instances[0]
    mem = Memory(device)
    if opts.infer_steps > 0:
        images, masks, scene = synthetic_scene(n)
        mem.start()
        start = time.perf_counter()
        latents = generate_latents(pipe, images, masks, scene, num_inference_steps=opts.infer_steps,
                                   guidance_scale=opts.guidance, seed=42)
        sync(device)
        result["denoise_seconds"] = time.perf_counter() - start
        result["denoise_peak_bytes"] = mem.peak()["peak"]
        opts.save(result)
        print(f"  denoising: {n} instances, {opts.infer_steps} steps, CFG {opts.guidance}: "
              f"{result['denoise_seconds']:.2f} s ({result['denoise_step_flops'] / 1e12:.1f} TFLOP per step, counted)")
        result["extraction"] = {}
        for method in ("dense", "coarse_to_fine"):
            config = ExtractionConfig(method=method, octree_depth=opts.depth)
            mem.start()
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the VAE decodes in its own dtype
                surfaces = extract_surfaces(pipe, latents.to(pipe.vae.dtype), config)
            sync(device)
            seconds = time.perf_counter() - start
            result["extraction"][method] = {"seconds": seconds, "queries": sum(s.queries for s in surfaces),
                                            "peak_bytes": mem.peak()["peak"],
                                            "meshes": sum(s.mesh is not None for s in surfaces)}
            opts.save(result)
            print(f"  extraction {method:<14}: {seconds:7.2f} s, {result['extraction'][method]['queries']:>12,} decoder "
                  f"queries (random weights: a rough field)")
        result["scene_seconds"] = {m: result["denoise_seconds"] + e["seconds"] for m, e in result["extraction"].items()}
    else:
        latents = torch.randn(1, pipe.transformer.config.width, pipe.vae.config.latent_channels).to(device)
        result["denoise_seconds"] = None
        print(f"  denoising: not run (--infer_steps 0); {result['denoise_step_flops'] / 1e12:.1f} TFLOP per step, counted")
    result["decoder"] = decoder_throughput(pipe, latents[:1], opts.decoder_queries, device)
    d = result["decoder"]
    print(f"  decoder: {d['queries_per_second']:,.0f} queries/s ({opts.decoder_queries:,} timed) + "
          f"{d['latent_seconds_per_call']:.3f} s of latent self-attention per decode call ({d['dtype']})")
    result["stub_queries"] = stub_queries(pipe, latents[:1], opts.depth)
    for name, q in result["stub_queries"].items():
        # Decoder time per instance on such a surface: queries at the measured rate, plus the latent part per call.
        est = {m: q[m] / d["queries_per_second"] + q[f"{m}_decode_calls"] * d["latent_seconds_per_call"]
               for m in ("dense", "coarse_to_fine")}
        q["decoder_seconds_estimate"] = est
        print(f"  stub field {name:<22}: dense {q['dense']:,} vs coarse_to_fine {q['coarse_to_fine']:,} queries "
              f"({q['dense'] / q['coarse_to_fine']:.1f}x fewer) -> decoder time per instance {est['dense']:.1f} s vs "
              f"{est['coarse_to_fine']:.1f} s (estimated from the rates above)")
    return result


def denoise_step_flops(model: str, num_instances: int, cfg: bool) -> int:
    """FLOPs of one denoising step (one transformer forward over 2 x instances rows with CFG), counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)  # to_fake reads the meta tensors' shapes
    pipe = make_pipeline(model, "meta", torch.bfloat16)
    pipe.init_custom_adapter(set_self_attn_module_names=mi_blocks(model), exact_module_names=True)
    to_fake(pipe, fake)
    with fake:
        t = pipe.transformer.config
        rows = num_instances * (2 if cfg else 1)
        x = torch.randn(rows, t.width, t.in_channels, dtype=torch.bfloat16)
        e1 = torch.randn(rows, 1, t.cross_attention_dim, dtype=torch.bfloat16)
        e2 = torch.randn(rows, dino_tokens(pipe), t.cross_attention_2_dim, dtype=torch.bfloat16)
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        with counter, torch.no_grad():
            pipe.transformer(x, torch.full((rows,), 500.0), e1, e2, attention_kwargs={"num_instances": num_instances})
    return counter.get_total_flops()


def decoder_throughput(pipe, latent: torch.Tensor, queries: int, device: torch.device) -> dict:
    """The VAE decoder's two costs, in its own dtype: the self-attention over the latent tokens (once per
    ``vae.decode`` call) and the per-query cross-attention (queries per second on random points)."""
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype
    z = latent.to(device, dtype)
    points = (torch.rand(1, queries, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        if device.type == "cuda":  # first calls pay for kernel selection and workspaces
            vae.decoder.query(vae.decoder.latent_features(vae.post_quant(z)), vae.embedder(points[:, :1024]))
        sync(device)
        start = time.perf_counter()
        features = vae.decoder.latent_features(vae.post_quant(z))
        sync(device)
        latent_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for chunk in points.split(50000, dim=1):  # the extraction's chunk size (ExtractionConfig.num_chunks)
            vae.decoder.query(features, vae.embedder(chunk))
        sync(device)
    seconds = time.perf_counter() - start
    return {"queries": queries, "query_seconds": seconds, "queries_per_second": queries / seconds,
            "latent_seconds_per_call": latent_seconds, "dtype": str(dtype).removeprefix("torch.")}


def stub_queries(pipe, latent: torch.Tensor, depth: int) -> dict:
    """Decoder queries of dense vs coarse-to-fine at ``depth`` with bench_extraction's analytic fields in place of
    the decoder (a trained model's surfaces are closer to these than a random decoder's field)."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_extraction import sphere_decode, table_decode

    from midi.inference.extraction import ExtractionConfig, extract_surfaces

    out = {}
    for name, decode in (("sphere (r = 0.5)", sphere_decode), ("table with thin legs", table_decode)):
        calls = [0]

        def counted(*args, decode=decode, calls=calls, **kwargs):
            calls[0] += 1
            return decode(*args, **kwargs)

        pipe.vae.decode = counted  # an instance attribute shadows the method until deleted
        out[name] = {}
        try:
            for method in ("dense", "coarse_to_fine"):
                calls[0] = 0
                surfaces = extract_surfaces(pipe, latent.float().cpu(), ExtractionConfig(method=method, octree_depth=depth))
                out[name][method] = sum(s.queries for s in surfaces)
                out[name][f"{method}_decode_calls"] = calls[0]
        finally:
            del pipe.vae.decode
    return out


# ----------------------------------------------------------------------------- FLOP/s (item 6)
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, tq, d = query_shape
    return 4 * b * h * tq * key_shape[-2] * d  # Q K^T and P V


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, tq, d = query_shape
    return 10 * b * h * tq * key_shape[-2] * d  # recompute Q K^T, then dV, dP, dQ, dK (as torch counts flash's)


# torch's FLOP counter knows the CUDA attention kernels; the CPU flash kernel is added here.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n x n matrix product in ``dtype`` (the dense peak the DiT is compared with),
    through ``F.linear`` as the DiT's projections run (on CPUs without bf16 units ``a @ b`` in bf16 takes a
    far slower path than ``linear``: 0.08 vs 1.1 GFLOP/s on this project's development VM)."""
    linear = torch.nn.functional.linear
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    linear(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        linear(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench_flops(opts: argparse.Namespace) -> dict:
    """Forward + backward of ``--blocks`` full-width DiT blocks (every one multi-instance) on one scene;
    achieved FLOP/s (FLOPs counted on fake tensors) over the dense-matmul peak in the same precision."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from midi.loaders.custom_adapter import set_mi_attention
    from midi.models.transformers.triposg_transformer import TripoSGDiTModel

    device = torch.device("cuda" if opts.device == "cuda" else "cpu")
    width, heads = (2048, 16) if opts.model == "release" else (64, 4)
    n, tokens = opts.instances[0], opts.tokens or (2048 if opts.model == "release" else 64)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would be a third precision)

    def blocks():
        model = TripoSGDiTModel(num_layers=opts.blocks, width=width, num_attention_heads=heads)
        set_mi_attention(model, None)
        return model.requires_grad_(True)

    def step(model, precision: str, dev) -> None:
        x = torch.randn(n, tokens, 64, device=dev)
        e1 = torch.randn(n, 1, 768, device=dev)
        e2 = torch.randn(n, 257, 1024, device=dev)
        with torch.autocast(dev.type if isinstance(dev, torch.device) else dev, dtype=torch.bfloat16,
                            enabled=precision == "bf16"):
            out = model(x, torch.full((n,), 500.0, device=dev), e1, e2, attention_kwargs={"num_instances": n}).sample
        out.float().square().mean().backward()

    with FakeTensorMode():
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
        with counter:
            step(blocks(), "fp32", "cpu")
    flops = counter.get_total_flops()
    torch.manual_seed(0)
    model = blocks().to(device)
    result = {"device": str(device), "blocks": opts.blocks, "width": width, "instances": n, "tokens": tokens,
              "flops_per_step": flops, "precisions": {}}
    for precision in opts.precisions:
        step(model, precision, device)  # warm-up
        model.zero_grad(set_to_none=True)
        sync(device)
        times = []
        for _ in range(opts.steps):
            start = time.perf_counter()
            step(model, precision, device)
            sync(device)
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        seconds = min(times)
        peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32, opts.matmul_size)
        result["precisions"][precision] = {"seconds": seconds, "achieved_flops": flops / seconds, "matmul_peak_flops": peak,
                                           "ratio": flops / seconds / peak}
        r = result["precisions"][precision]
        print(f"  {precision}: {seconds:.3f} s per fwd+bwd, {r['achieved_flops'] / 1e9:,.1f} GFLOP/s achieved, "
              f"dense matmul {opts.matmul_size}^3 peak {peak / 1e9:,.1f} GFLOP/s -> {r['ratio']:.0%} of peak")
    if {"fp32", "bf16"} <= set(result["precisions"]):
        p = result["precisions"]
        result["bf16_speedup"] = p["fp32"]["seconds"] / p["bf16"]["seconds"]
        print(f"  bf16 speed-up over fp32: {result['bf16_speedup']:.2f}x")
    return result


# ----------------------------------------------------------------------------- main
def _on_off(values: list[str]) -> list[bool]:
    return [v == "on" for v in values]


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "encoders", "infer", "flops"])
    parser.add_argument("--model", choices=["release", "toy"], default="release",
                        help="release: the released size, random weights; toy: midi.tiny's model (seconds)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--instances", type=int, nargs="+", default=None,
                        help="instances per scene (train: 2 5 10; infer: 5; flops: 4)")
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--cache", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--scenes", type=int, nargs="+", default=[1], help="--count: scenes per batch (1)")
    parser.add_argument("--count", action="store_true", help="train: count bytes on fake tensors instead of running")
    parser.add_argument("--mixed_precision", default="bf16", choices=["bf16", "fp16", "no", "auto"])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per cell (1; inside the peak)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per cell / flops repeats (2)")
    parser.add_argument("--infer_steps", type=int, default=50, help="infer: denoising steps (50; 0 = skip denoising)")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--depth", type=int, default=8, help="infer: octree depth (8)")
    parser.add_argument("--decoder_queries", type=int, default=200_000, help="infer: queries timed through the decoder")
    parser.add_argument("--blocks", type=int, default=2, help="flops: DiT blocks (2)")
    parser.add_argument("--tokens", type=int, default=None, help="flops: tokens per instance (2048; toy 64)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--matmul_size", type=int, default=4096, help="flops: side of the peak-measuring matmul")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    opts = parser.parse_args(argv)
    opts.instances = opts.instances or {"train": [2, 5, 10], "infer": [5], "flops": [4]}.get(opts.what, [5])
    opts.checkpointing, opts.cache = _on_off(opts.checkpointing), _on_off(opts.cache)
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    print(f"{opts.what}: model {opts.model}, device {opts.device}, torch threads {torch.get_num_threads()}", flush=True)
    start = time.perf_counter()

    def save(partial: dict, done: bool = False) -> dict:
        """Writes the JSON as results come in, so a run stopped by a time limit still leaves what it measured."""
        result = {"bench": opts.what, "model": opts.model, "device": opts.device, "machine": machine(),
                  "argv": list(argv if argv is not None else sys.argv[1:]), "complete": done,
                  "seconds": time.perf_counter() - start, **partial}
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(result, indent=1, default=str))
        return result

    opts.save = save
    with tempfile.TemporaryDirectory() as tmp:
        work = opts.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        partial = {"train": bench_train, "encoders": lambda o, w: bench_encoders(o), "infer": lambda o, w: bench_infer(o),
                   "flops": lambda o, w: bench_flops(o)}[opts.what](opts, work)
    result = save(partial, done=True)
    if opts.what == "train":
        print_table(result)
    if opts.json:
        print(f"wrote {opts.json}")
    return result


def print_table(result: dict) -> None:
    """The grid as one table (GiB, seconds per optimizer step)."""
    cells = result["cells"]
    counted = result["mode"] == "counted"
    print(f"\n{result['model']} model, {result['device']}, {result['what']}")
    head = f"{'scenes':>6} {'inst':>4} {'ckpt':>4} {'cache':>5} {'peak GiB':>9} " + (
        f"{'weights':>8} {'AdamW':>6} {'step':>7}" if counted else f"{'over base':>9} {'s/step':>8}")
    print(head)
    for c in cells:
        key = f"{c.get('scenes', 1):>6} {c['instances']:>4} {'on' if c['checkpointing'] else 'off':>4} " \
              f"{'on' if c['cache'] else 'off':>5} "
        if c["status"] not in ("ok", "counted"):
            print(key + f"{c['status']:>9}")
        elif counted:
            print(key + f"{c['peak_bytes'] / GIB:>9.2f} {c['weights_bytes'] / GIB:>8.2f} {c['optimizer_bytes'] / GIB:>6.2f} "
                  f"{c['step_peak_bytes'] / GIB:>7.2f}")
        else:
            print(key + f"{c['peak_bytes'] / GIB:>9.2f} {c['extra_bytes'] / GIB:>9.2f} {c['step_seconds']:>8.2f}")


if __name__ == "__main__":
    main()
