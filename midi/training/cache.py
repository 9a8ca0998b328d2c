"""Disk cache of the frozen models' outputs: VAE posteriors per object, image embeddings per view.

Layout (safetensors, float16, written atomically)::

    <cache.dir>/vae/<key>.safetensors      mean, logvar: (K, T, C) for K surface subsets of one object
    <cache.dir>/embeds/<key>.safetensors   embeds_1 (N, 1, C1), embeds_2 (N, T2, C2) of one view;
                                           metadata: the kept object names (or the load error)

A key hashes everything the entry depends on: the input files' identity (resolved path, size,
mtime), the model's fingerprint (a hash of its state dict, plus the processors' settings for
the embeddings) and the sample settings. Any change gives new keys, so one cache folder can
serve many runs and models; stale entries are simply never read.

At train time a posterior sample is drawn fresh every step from the cached (mean, logvar) of one
of the K subsets (chosen by the item's seed), so caching changes how many distinct surface
subsets an object shows (K instead of one per step), not the posterior noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from tqdm.auto import tqdm

from midi.config import trained_models
from midi.data.dataset import SceneRecord, subsample_surface
from midi.errors import DataError
from midi.lora import save_tensors
from midi.training.batches import ConditionPreprocessor, SampleSettings, load_images

logger = logging.getLogger(__name__)
CACHE_DTYPE = torch.float16


def file_identity(path: str | os.PathLike) -> str:
    """``path:size:mtime_ns`` of a file (cheap; changes whenever the file is rewritten)."""
    p = Path(path).resolve()
    stat = p.stat()
    return f"{p}:{stat.st_size}:{stat.st_mtime_ns}"


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """A hash of the state dicts (names, dtypes, shapes and bytes) of ``modules``."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors, metadata)


class FeatureCache:
    """Looks up and builds cache entries for one model and one set of sample settings.

    Args:
        root: cache folder.
        settings: the sample settings (image size, surface points, ...).
        num_tokens: latent tokens per object.
        num_subsamples: K, surface subsets per object.
        vae_fingerprint: :func:`module_fingerprint` of the VAE.
        embed_fingerprint: fingerprint of both image encoders and processors, or None when the
            embeddings must not be cached (image-encoder LoRA).
    """

    def __init__(self, root: str | os.PathLike, settings: SampleSettings, num_tokens: int, num_subsamples: int,
                 vae_fingerprint: str, embed_fingerprint: str | None) -> None:
        self.root = Path(root)
        self.settings = settings
        self.num_tokens = num_tokens
        self.num_subsamples = num_subsamples
        self.vae_fingerprint = vae_fingerprint
        self.embed_fingerprint = embed_fingerprint

    # ------------------------------------------------------------------ keys
    def posterior_path(self, surface_path: Path) -> Path:
        """Where the VAE posteriors of one surface file live."""
        key = _key("vae", file_identity(surface_path), self.vae_fingerprint, self.settings.num_surface_points,
                   self.num_tokens, self.num_subsamples)
        return self.root / "vae" / f"{key}.safetensors"

    def view_path(self, record: SceneRecord, view: int) -> Path:
        """Where the image embeddings of one view live."""
        image, ids = record.views[view]
        s = self.settings
        key = _key("embeds", file_identity(image), file_identity(ids), record.object_names, self.embed_fingerprint,
                   s.image_size, s.background, s.min_mask_fraction)
        return self.root / "embeds" / f"{key}.safetensors"

    # ------------------------------------------------------------------ reading
    def load_posterior(self, record: SceneRecord, name: str, rng: np.random.Generator) -> torch.Tensor:
        """``[mean | logvar]`` ``(T, 2C)`` float32 of one object, from a random one of its K subsets.

        Raises:
            DataError: the entry is missing (the cache was not built for this run's data).
        """
        path = self.posterior_path(record.surface_paths[record.object_names.index(name)])
        k = int(rng.integers(self.num_subsamples))
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                mean, logvar = f.get_slice("mean")[k], f.get_slice("logvar")[k]
        except (OSError, safetensors.SafetensorError) as exc:
            raise DataError(f"{path}: VAE cache entry of {record.scene_id}/{name} unreadable or missing ({exc}); "
                            "delete it to rebuild") from None
        return torch.cat([mean, logvar], dim=-1).float()

    def load_view(self, record: SceneRecord, view: int) -> dict | None:
        """Cached embeddings of one view (None when embeddings are not cached).

        Raises:
            DataError: the view had no usable instance when the cache was built, or the entry is missing.
        """
        if self.embed_fingerprint is None:
            return None
        path = self.view_path(record, view)
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "error" in meta:
                    raise DataError(meta["error"])
                entry = {k: f.get_tensor(k) for k in ("embeds_1", "embeds_2")}
        except (OSError, safetensors.SafetensorError) as exc:
            raise DataError(f"{path}: embedding cache entry of {record.scene_id} view {view} unreadable or "
                            f"missing ({exc}); delete it to rebuild") from None
        entry["object_names"] = json.loads(meta["object_names"])
        return entry

    # ------------------------------------------------------------------ building
    def missing(self, records: Sequence[SceneRecord]) -> list[tuple[str, SceneRecord, int]]:
        """Entries to build: ``("vae", record, object index)`` and ``("view", record, view index)``."""
        todo: list[tuple[str, SceneRecord, int]] = []
        seen: set[Path] = set()
        for record in records:
            for i, surface in enumerate(record.surface_paths):
                path = self.posterior_path(surface)
                if path not in seen and not path.is_file():
                    todo.append(("vae", record, i))
                seen.add(path)
            if self.embed_fingerprint is not None:
                todo += [("view", record, v) for v in range(len(record.views)) if not self.view_path(record, v).is_file()]
        return todo

    @torch.no_grad()
    def build_entry(self, kind: str, record: SceneRecord, index: int, pipe, preprocessor: ConditionPreprocessor) -> None:
        """Computes and writes one entry (see :meth:`missing`)."""
        if kind == "vae":
            self._build_posterior(record, index, pipe.vae)
        else:
            self._build_view(record, index, pipe, preprocessor)

    def surface_subsets(self, surface: Path) -> np.ndarray:
        """The K surface subsets ``(K, P, 6)`` of one object (seeded by the file's path)."""
        rng = np.random.default_rng(int(_key("subsets", surface.resolve()), 16))
        return np.stack([subsample_surface(surface, self.settings.num_surface_points, rng)
                         for _ in range(self.num_subsamples)])

    def _build_posterior(self, record: SceneRecord, index: int, vae) -> None:
        surface = record.surface_paths[index]
        param = next(vae.parameters())
        x = torch.from_numpy(self.surface_subsets(surface)).to(param.device, param.dtype)
        posterior = vae.encode(x, num_tokens=self.num_tokens, seed=0).latent_dist
        _save(self.posterior_path(surface), {"mean": posterior.mean.to(CACHE_DTYPE).cpu(),
                                             "logvar": posterior.logvar.to(CACHE_DTYPE).cpu()},
              {"scene": record.scene_id, "object": record.object_names[index]})

    def _build_view(self, record: SceneRecord, view: int, pipe, preprocessor: ConditionPreprocessor) -> None:
        path = self.view_path(record, view)
        try:
            sample = load_images(record, view, self.settings, surfaces=False)
        except DataError as exc:
            # Remember the failure, so training skips this view without re-reading it.
            _save(path, {"none": torch.zeros(1)}, {"error": str(exc)})
            return
        pixels = preprocessor(sample.instance_images, sample.masks, sample.scene_image)
        device = pipe.transformer.device
        embeds_1, _ = pipe.encode_image_1(pixels["pixels_1"], device)
        embeds_2, _ = pipe.encode_image_2(pixels["pixels_2_instance"], pixels["pixels_2_scene"], pixels["masks"], device)
        _save(path, {"embeds_1": embeds_1.to(CACHE_DTYPE).cpu(), "embeds_2": embeds_2.to(CACHE_DTYPE).cpu()},
              {"object_names": json.dumps(sample.object_names)})


def entry_path(cache: FeatureCache, kind: str, record: SceneRecord, index: int) -> Path:
    """The file of one entry (see :meth:`FeatureCache.missing`)."""
    return cache.posterior_path(record.surface_paths[index]) if kind == "vae" else cache.view_path(record, index)


def entry_owner(path: Path, num_processes: int) -> int:
    """The process that builds an entry: a stable hash of its file name, the same on every process."""
    return zlib.crc32(path.name.encode()) % num_processes


def build_cache(cache: FeatureCache, records: Sequence[SceneRecord], pipe, preprocessor: ConditionPreprocessor,
                rank: int = 0, num_processes: int = 1, progress: bool = False) -> int:
    """Builds this process's share of the missing entries of the cache.

    Each entry belongs to one process by a hash of its key (:func:`entry_owner`), so the shares
    do not depend on which entries another process has already written.

    Returns:
        Entries written by this process.
    """
    todo = [e for e in cache.missing(records) if entry_owner(entry_path(cache, *e), num_processes) == rank]
    if todo:
        logger.info("cache: building %d entries in %s", len(todo), cache.root)
    for kind, record, index in tqdm(todo, desc="cache", unit="entry", disable=not (progress and todo)):
        cache.build_entry(kind, record, index, pipe, preprocessor)
    return len(todo)


def prepare_cache(cfg, pipe, accelerator, preprocessor: ConditionPreprocessor, settings: SampleSettings,
                  num_tokens: int, records: Sequence[SceneRecord]) -> FeatureCache:
    """The run's cache: keys from the models' fingerprints, missing entries built by all processes.

    Image embeddings are cached only while both image encoders are frozen (no LoRA, not trained in full).
    """
    embeds = not set(trained_models(cfg)) & {"image_encoder_1", "image_encoder_2"}
    if not embeds:
        logger.info("cache: an image encoder trains (LoRA or full), so its embeddings change during training and are "
                    "not cached; only VAE posteriors are")
    processors = pipe.feature_extractor_1.to_json_string() + pipe.feature_extractor_2.to_json_string()
    embed_key = module_fingerprint(pipe.image_encoder_1, pipe.image_encoder_2) + processors if embeds else None
    cache = FeatureCache(cfg.cache.dir, settings, num_tokens, cfg.cache.num_surface_subsamples,
                         module_fingerprint(pipe.vae), embed_key)
    built = build_cache(cache, records, pipe, preprocessor, accelerator.process_index, accelerator.num_processes,
                        progress=cfg.logging.progress_bar and accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # completeness check: a share that failed to appear is built here
        left = cache.missing(records)
        if left:
            logger.warning("cache: %d entries missing after the parallel build; building them now", len(left))
            for kind, record, index in left:
                cache.build_entry(kind, record, index, pipe, preprocessor)
            built += len(left)
    accelerator.wait_for_everyone()
    logger.info("cache: %s (%d entries built by this process)", cache.root, built)
    return cache
