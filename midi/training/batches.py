"""Training data: scenes -> per-scene tensors -> batches of instance rows, in a resumable order.

- :class:`SceneDataset` reads one scene per item through :mod:`midi.data` (our "midi-scenes"
  layout or the 3D-Front layout), keeps at most ``max_num_instances`` instances (a seeded
  subset), optionally pads to ``num_instances_per_batch`` rows with duplicates (upstream's
  layout), and runs the pipeline's own image processors on PIL images built from the sample
  (instance RGB uint8, mask "L" 0/255, scene RGB), so training sees the inference preprocessing.
  With a :class:`midi.training.cache.FeatureCache` it returns cached posteriors / embeddings instead.
- :func:`collate_scenes` concatenates the instance rows of all scenes of a batch (no padding
  rows in packed mode) into a :class:`TrainBatch`.
- :class:`StreamBatchSampler` turns the dataset into an endless stream of batches: a seeded
  permutation per epoch (optionally bucketed by instance count and capped by a latent-token
  budget), dealt round-robin to the processes. Its only state is the number of batches consumed,
  so a resumed run continues with exactly the batches the interrupted one would have used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midi.data.dataset import SceneRecord, load_scene_sample, open_dataset
from midi.data.images import conditions_to_pil
from midi.data.jobs import PrepareOptions
from midi.data.prepare import prepare_synthetic
from midi.errors import DataError

logger = logging.getLogger(__name__)
MAX_SCENE_RETRIES = 10
# The batch's tensor fields, in collate order (a scene item carries the same keys).
TENSOR_FIELDS = ("surfaces", "posterior", "pixels_1", "pixels_2_instance", "pixels_2_scene", "masks", "embeds_1",
                 "embeds_2")


@dataclass
class TrainBatch:
    """A collated batch of scenes; rows = instances of all scenes.

    Either ``surfaces`` (encode with the VAE) or ``posterior`` (cached ``[mean | logvar]``) is set,
    and either the preprocessed pixels or the cached embeddings.
    """

    scene_ids: list[str]
    num_instances: list[int]
    rows_per_scene: list[int]
    num_instances_per_batch: int | None = None
    surfaces: torch.Tensor | None = None  # (R, P, 6)
    posterior: torch.Tensor | None = None  # (R, T, 2C)
    pixels_1: torch.Tensor | None = None  # (R, 3, S1, S1) CLIP pixel values
    pixels_2_instance: torch.Tensor | None = None  # (R, 3, S2, S2)
    pixels_2_scene: torch.Tensor | None = None  # (R, 3, S2, S2)
    masks: torch.Tensor | None = None  # (R, 1, H, W) in [0, 1]
    embeds_1: torch.Tensor | None = None  # (R, 1, C1) cached CLIP embeddings
    embeds_2: torch.Tensor | None = None  # (R, T2, C2) cached DINOv2 embeddings

    @property
    def num_rows(self) -> int:
        """Instance rows in the batch (padding rows included)."""
        return sum(self.rows_per_scene)

    def _apply(self, fn) -> TrainBatch:
        for name in TENSOR_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        return self

    def to(self, device: torch.device | str) -> TrainBatch:
        """Moves every tensor to ``device`` (returns self)."""
        return self._apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> TrainBatch:
        """Pins every tensor (called by ``DataLoader(pin_memory=True)``'s worker thread; returns self)."""
        return self._apply(torch.Tensor.pin_memory)


@dataclass(frozen=True)
class SampleSettings:
    """How a scene becomes a sample (from the ``data`` config section)."""

    num_surface_points: int
    image_size: int
    background: tuple[float, float, float]
    min_mask_fraction: float
    max_num_instances: int
    pad_to: int | None = None  # rows per scene in padded mode
    random_view: bool = True  # train: a random view per draw; validation: view 0

    @classmethod
    def from_config(cls, data, train: bool) -> SampleSettings:
        """Settings for the train (random view) or validation (first view) split."""
        pad_to = (data.num_instances_per_batch or data.max_num_instances) if data.batching == "padded" else None
        return cls(data.num_surface_points, data.image_size, tuple(data.background), data.min_mask_fraction,
                   data.max_num_instances, pad_to, random_view=train)


def item_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from a tuple of integers (independent streams for different keys)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def select_rows(num: int, rng: np.random.Generator, max_num_instances: int, pad_to: int | None) -> np.ndarray:
    """Which instances fill a scene's rows.

    At most ``max_num_instances`` instances are kept (a random subset, in their original order);
    with ``pad_to`` the rows are then filled up with random duplicates, as upstream pads.

    Returns:
        Row -> instance index, ``(rows,)``; the first ``min(num, max_num_instances)`` are distinct.
    """
    rows = np.arange(num)
    if num > max_num_instances:
        rows = np.sort(rng.choice(num, size=max_num_instances, replace=False))
    if pad_to is not None and len(rows) < pad_to:
        rows = np.concatenate([rows, rows[rng.choice(len(rows), size=pad_to - len(rows))]])
    return rows


# ----------------------------------------------------------------------------- preprocessing
class ConditionPreprocessor:
    """The pipeline's image processors, applied to PIL images exactly as ``MIDIPipeline`` does.

    Produces the tensors ``MIDIPipeline.encode_image_1`` / ``encode_image_2`` accept in place of
    PIL lists (a test checks both give the same embeddings). Runs in DataLoader workers.
    """

    def __init__(self, feature_extractor_1, feature_extractor_2) -> None:
        self.feature_extractor_1 = feature_extractor_1
        self.feature_extractor_2 = feature_extractor_2

    def __call__(self, instance_images: np.ndarray, masks: np.ndarray, scene_image: np.ndarray) -> dict[str, torch.Tensor]:
        """Pixel tensors for N instances of one scene (the scene image is processed once)."""
        images, pil_masks, scene = conditions_to_pil(instance_images, masks > 0.5, scene_image)
        num = len(images)
        pixels_1 = self.feature_extractor_1(images, return_tensors="pt").pixel_values
        pixels_2 = self.feature_extractor_2(images, return_tensors="pt").pixel_values
        scene_2 = self.feature_extractor_2([scene], return_tensors="pt").pixel_values.expand(num, -1, -1, -1)
        # Same arithmetic as MIDIPipeline.prepare_image_2_input on PIL "L" masks.
        mask_t = torch.stack([torch.from_numpy((np.asarray(m) / 255.0).astype(np.float32))[None] for m in pil_masks])
        return {"pixels_1": pixels_1, "pixels_2_instance": pixels_2, "pixels_2_scene": scene_2.contiguous(),
                "masks": mask_t}


def load_images(record: SceneRecord, view: int, settings: SampleSettings, rng: np.random.Generator | None = None,
                surfaces: bool = True):
    """One view of a scene as a :class:`midi.data.dataset.SceneSample`; ``surfaces=False`` reads only the
    images (the VAE cache holds the posteriors)."""
    s = settings
    return load_scene_sample(record, view, s.num_surface_points, rng or np.random.default_rng(0),
                             image_size=s.image_size, background=s.background, min_mask_fraction=s.min_mask_fraction,
                             surfaces=surfaces)


# ----------------------------------------------------------------------------- dataset
class SceneDataset(torch.utils.data.Dataset):
    """One item = one scene seen from one view, as tensors for its rows.

    Items are addressed by ``(scene index, seed)``: everything random about the item (view,
    surface subsets, instance subset, padding) comes from the seed, so the same key always gives
    the same tensors, in any worker.
    """

    def __init__(self, records: Sequence[SceneRecord], settings: SampleSettings,
                 preprocessor: ConditionPreprocessor | None, cache=None) -> None:
        self.records = list(records)
        self.settings = settings
        self.preprocessor = preprocessor
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    def instance_counts(self) -> list[int]:
        """Rows each scene is expected to take (object count, capped) for bucketing and token budgets."""
        s = self.settings
        if s.pad_to is not None:
            return [s.pad_to] * len(self.records)
        return [min(len(r.object_names), s.max_num_instances) for r in self.records]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        for attempt in range(MAX_SCENE_RETRIES):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return self._load(record, np.random.default_rng(seed))
            except DataError as exc:
                # Upstream redraws another scene at random; we step to the next one deterministically.
                logger.warning("skipping scene %s: %s", record.scene_id, exc)
        raise DataError(f"{MAX_SCENE_RETRIES} scenes in a row could not be loaded (from {self.records[index].scene_id})")

    def _views(self, record: SceneRecord, rng: np.random.Generator) -> list[int]:
        """View indices to try, the drawn one first."""
        count = len(record.views)
        if count == 0:
            raise DataError(f"{record.scene_id}: scene has no views")
        first = int(rng.integers(count)) if self.settings.random_view else 0
        return [first] + [v for v in range(count) if v != first]

    def _load(self, record: SceneRecord, rng: np.random.Generator) -> dict[str, Any]:
        error: DataError | None = None
        for view in self._views(record, rng):
            try:
                if self.cache is not None:
                    return self._from_cache(record, view, rng)
                return self._from_files(record, view, rng)
            except DataError as exc:
                error = exc
        raise error or DataError(f"{record.scene_id}: no usable view")

    def _from_files(self, record: SceneRecord, view: int, rng: np.random.Generator) -> dict[str, Any]:
        s = self.settings
        sample = load_images(record, view, s, rng)
        rows = select_rows(sample.num_instances, rng, s.max_num_instances, s.pad_to)
        item = self._item(record, sample.num_instances, rows)
        item["surfaces"] = torch.from_numpy(sample.surfaces[rows])
        pixels = self.preprocessor(sample.instance_images, sample.masks, sample.scene_image)
        item.update({k: v[torch.from_numpy(rows)] for k, v in pixels.items()})
        return item

    def _from_cache(self, record: SceneRecord, view: int, rng: np.random.Generator) -> dict[str, Any]:
        s = self.settings
        entry = self.cache.load_view(record, view)
        if entry is None:  # image encoders are trained: embeddings are not cached, pixels are needed
            sample = load_images(record, view, s, surfaces=False)
            names = sample.object_names
        else:
            names = entry["object_names"]
        rows = select_rows(len(names), rng, s.max_num_instances, s.pad_to)
        item = self._item(record, len(names), rows)
        item["posterior"] = torch.stack([self.cache.load_posterior(record, names[r], rng) for r in rows])
        if entry is None:
            pixels = self.preprocessor(sample.instance_images, sample.masks, sample.scene_image)
            item.update({k: v[torch.from_numpy(rows)] for k, v in pixels.items()})
        else:
            index = torch.from_numpy(rows)
            item["embeds_1"], item["embeds_2"] = entry["embeds_1"][index], entry["embeds_2"][index]
        return item

    def _item(self, record: SceneRecord, num_found: int, rows: np.ndarray) -> dict[str, Any]:
        real = min(num_found, self.settings.max_num_instances)
        return {"scene_id": record.scene_id, "num_instances": real, "num_rows": len(rows)}


def collate_scenes(items: list[dict[str, Any]], num_instances_per_batch: int | None = None) -> TrainBatch:
    """Concatenates the rows of all scenes of a batch into one :class:`TrainBatch`."""
    tensors = {name: torch.cat([item[name] for item in items]) for name in TENSOR_FIELDS if name in items[0]}
    return TrainBatch(
        scene_ids=[item["scene_id"] for item in items],
        num_instances=[item["num_instances"] for item in items],
        rows_per_scene=[item["num_rows"] for item in items],
        num_instances_per_batch=num_instances_per_batch,
        **tensors,
    )


class Collator:
    """Picklable collate function for DataLoader workers."""

    def __init__(self, num_instances_per_batch: int | None) -> None:
        self.num_instances_per_batch = num_instances_per_batch

    def __call__(self, items: list[dict[str, Any]]) -> TrainBatch:
        return collate_scenes(items, self.num_instances_per_batch)


# ----------------------------------------------------------------------------- order
def form_batches(
    counts: Sequence[int],
    order: np.ndarray,
    batch_size: int,
    tokens_per_instance: int,
    max_tokens_per_batch: int | None,
) -> list[list[int]]:
    """Cuts an ordered list of scenes into batches of at most ``batch_size`` scenes and, if
    given, at most ``max_tokens_per_batch`` latent tokens (a scene over budget goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in order.tolist():
        cost = counts[index] * tokens_per_instance
        full = len(current) == batch_size or (max_tokens_per_batch is not None and tokens + cost > max_tokens_per_batch)
        if current and full:
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += cost
    if current:
        batches.append(current)
    return batches


class StreamBatchSampler:
    """An endless, deterministic stream of scene batches, dealt round-robin to processes.

    Epoch ``e`` is a permutation of the scenes drawn from ``(seed, e)``; with
    ``bucket_by_instances`` scenes are sorted by instance count inside windows of 16 batches
    and the batches shuffled again, so a batch holds similar counts. Global batch ``g`` goes to
    process ``g % num_processes``. ``consumed`` (global batches already trained on) is the whole
    state: a resumed run restarts the stream there.

    Yields:
        Lists of ``(scene index, item seed)`` keys for :class:`SceneDataset`.
    """

    def __init__(self, counts: Sequence[int], batch_size: int, seed: int, tokens_per_instance: int,
                 max_tokens_per_batch: int | None = None, bucket_by_instances: bool = False,
                 rank: int = 0, num_processes: int = 1, consumed: int = 0) -> None:
        if not counts:
            raise DataError("the training split has no scenes")
        self.counts = list(counts)
        self.batch_size = batch_size
        self.seed = seed
        self.tokens_per_instance = tokens_per_instance
        self.max_tokens_per_batch = max_tokens_per_batch
        self.bucket_by_instances = bucket_by_instances
        self.rank = rank
        self.num_processes = num_processes
        self.consumed = consumed
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self._lengths: dict[int, int] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (scene indices), in order."""
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.counts))
            if self.bucket_by_instances:
                window = 16 * self.batch_size
                chunks = [order[i:i + window] for i in range(0, len(order), window)]
                order = np.concatenate([c[np.argsort([self.counts[i] for i in c], kind="stable")] for c in chunks])
            batches = form_batches(self.counts, order, self.batch_size, self.tokens_per_instance,
                                   self.max_tokens_per_batch)
            if self.bucket_by_instances:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            # Keep two epochs of batch lists (workers prefetch across the boundary), all lengths.
            self._epoch_cache = {e: b for e, b in self._epoch_cache.items() if e == epoch - 1}
            self._epoch_cache[epoch] = batches
            self._lengths[epoch] = len(batches)
        return self._epoch_cache[epoch]

    def epoch_length(self, epoch: int) -> int:
        """Number of global batches in ``epoch``."""
        if epoch not in self._lengths:
            self.epoch_batches(epoch)
        return self._lengths[epoch]

    def locate(self, global_index: int) -> tuple[int, int]:
        """``(epoch, batch index in the epoch)`` of a global batch index."""
        epoch = 0
        while global_index >= self.epoch_length(epoch):
            global_index -= self.epoch_length(epoch)
            epoch += 1
        return epoch, global_index

    def batches_for_epochs(self, num_epochs: int) -> int:
        """Global batches in the first ``num_epochs`` epochs."""
        return sum(self.epoch_length(e) for e in range(num_epochs))

    def keys(self, global_index: int) -> list[tuple[int, int]]:
        """The dataset keys of one global batch."""
        epoch, position = self.locate(global_index)
        scenes = self.epoch_batches(epoch)[position]
        return [(scene, item_seed(self.seed, epoch, position, slot)) for slot, scene in enumerate(scenes)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        index = self.consumed + self.rank
        while True:
            yield self.keys(index)
            index += self.num_processes


# ----------------------------------------------------------------------------- datasets on disk
def ensure_dataset(data, seed: int) -> bool:
    """Writes the synthetic demo set when ``data.root`` is missing and ``data.synthetic_if_missing`` asks.

    Returns:
        True when a dataset was written.
    """
    root = Path(data.root)
    if root.exists() or data.synthetic_if_missing == 0:
        return False
    logger.info("data.root %s does not exist: writing %d synthetic scenes there", root, data.synthetic_if_missing)
    options = PrepareOptions(image_size=data.image_size, num_samples=data.num_surface_points)
    report = prepare_synthetic(root, data.synthetic_if_missing, seed=seed, options=options)
    if getattr(report, "skipped", None):
        logger.warning("synthetic data: %d scenes skipped", len(report.skipped))
    return True


def open_split(root: str | Path, split: str) -> list[SceneRecord]:
    """The records of a split; a clear error when it is empty.

    Raises:
        DataError: unknown layout, or no scene in the split.
    """
    records = open_dataset(root, split=split)
    if not records:
        raise DataError(f"{root}: split {split!r} has no scenes (set data.train_split/data.val_split, re-run "
                        "prepare_data.py with --val_fraction, or turn validation off with "
                        "validation.every_n_steps: 0 and validation.preview_every_n_steps: 0)")
    return records
