"""Training data: deterministic resumable order, bucketing, collation, both layouts, the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from midi.data.dataset import load_scene_sample, open_dataset
from midi.data.images import conditions_to_pil
from midi.training.batches import (
    Collator,
    ConditionPreprocessor,
    SampleSettings,
    SceneDataset,
    StreamBatchSampler,
    form_batches,
    item_seed,
    load_images,
    select_rows,
)
from tests.data.helpers import front3d_from_prepared
from training.conftest import NUM_POINTS, tiny_config


@pytest.fixture(scope="module")
def pipe():
    from midi.tiny import tiny_pipeline

    return tiny_pipeline(0)


def _settings(**kw) -> SampleSettings:
    base = dict(num_surface_points=NUM_POINTS, image_size=64, background=(1.0, 1.0, 1.0), min_mask_fraction=0.001,
                max_num_instances=3)
    return SampleSettings(**{**base, **kw})


def _dataset(root, pipe, split="train", **kw) -> SceneDataset:
    preprocessor = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    return SceneDataset(open_dataset(root, split), _settings(**kw), preprocessor)


# ----------------------------------------------------------------------------- order
def test_stream_covers_every_scene_once_per_epoch_and_is_deterministic():
    counts = [1, 2, 3, 4, 5, 6, 7]
    a = StreamBatchSampler(counts, batch_size=2, seed=3, tokens_per_instance=64)
    b = StreamBatchSampler(counts, batch_size=2, seed=3, tokens_per_instance=64)
    for epoch in range(3):
        scenes = sorted(i for batch in a.epoch_batches(epoch) for i in batch)
        assert scenes == list(range(7))
        assert a.epoch_batches(epoch) == b.epoch_batches(epoch)
    assert a.epoch_batches(0) != a.epoch_batches(1)  # a new permutation every epoch


def test_stream_deals_batches_round_robin_and_resumes_mid_epoch():
    counts = [2] * 10
    full = StreamBatchSampler(counts, 3, seed=0, tokens_per_instance=64)
    stream = iter(full)
    first = [next(stream) for _ in range(9)]  # crosses two epoch boundaries (4 batches per epoch)
    ranks = [iter(StreamBatchSampler(counts, 3, seed=0, tokens_per_instance=64, rank=r, num_processes=2))
             for r in range(2)]
    dealt = [next(ranks[k % 2]) for k in range(8)]
    assert dealt == first[:8]
    resumed = iter(StreamBatchSampler(counts, 3, seed=0, tokens_per_instance=64, consumed=5))
    assert [next(resumed) for _ in range(4)] == first[5:9]
    assert full.locate(5) == (1, 1)


def test_token_budget_and_bucketing():
    counts = [1, 5, 1, 5, 2, 4, 1, 5, 3, 3, 1, 5]
    budget = 6 * 64
    sampler = StreamBatchSampler(counts, batch_size=4, seed=0, tokens_per_instance=64, max_tokens_per_batch=budget,
                                 bucket_by_instances=True)
    batches = sampler.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(counts)))
    for batch in batches:
        assert len(batch) <= 4
        assert sum(counts[i] for i in batch) * 64 <= budget or len(batch) == 1
    spread = np.mean([max(counts[i] for i in b) - min(counts[i] for i in b) for b in batches])
    plain = StreamBatchSampler(counts, batch_size=4, seed=0, tokens_per_instance=64).epoch_batches(0)
    assert spread <= np.mean([max(counts[i] for i in b) - min(counts[i] for i in b) for b in plain])
    # a scene over budget goes alone
    assert form_batches([9, 1], np.array([0, 1]), 4, 64, 64 * 2) == [[0], [1]]


def test_select_rows_caps_and_pads():
    rng = np.random.default_rng(0)
    rows = select_rows(7, rng, max_num_instances=3, pad_to=None)
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and list(rows) == sorted(rows)
    rows = select_rows(2, rng, max_num_instances=3, pad_to=5)
    assert len(rows) == 5 and list(rows[:2]) == [0, 1] and set(rows.tolist()) <= {0, 1}


# ----------------------------------------------------------------------------- items and batches
def test_item_is_a_function_of_its_key(data_root, pipe):
    ds = _dataset(data_root, pipe)
    key = (1, item_seed(0, 1))
    a, b = ds[key], ds[key]
    assert a["scene_id"] == b["scene_id"]
    for name in ("surfaces", "pixels_1", "pixels_2_instance", "pixels_2_scene", "masks"):
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["surfaces"], ds[(1, item_seed(0, 2))]["surfaces"])


def test_packed_and_padded_collation(data_root, pipe):
    packed = _dataset(data_root, pipe)
    items = [packed[(i, item_seed(0, i))] for i in range(3)]
    batch = Collator(None)(items)
    assert batch.num_instances == batch.rows_per_scene  # no padding rows
    assert batch.surfaces.shape == (sum(batch.rows_per_scene), NUM_POINTS, 6)
    assert batch.pixels_1.shape[0] == batch.masks.shape[0] == batch.num_rows
    assert max(batch.num_instances) <= 3

    padded = _dataset(data_root, pipe, pad_to=4)
    batch = Collator(4)([padded[(i, item_seed(0, i))] for i in range(3)])
    assert batch.rows_per_scene == [4, 4, 4] and batch.num_instances_per_batch == 4
    assert all(1 <= n <= 3 for n in batch.num_instances)


def test_preprocessed_pixels_give_the_pipelines_embeddings(data_root, pipe):
    """Worker-side preprocessing == MIDIPipeline's own PIL path (training sees inference inputs)."""
    record = open_dataset(data_root, "train")[0]
    sample = load_scene_sample(record, 0, NUM_POINTS, np.random.default_rng(0), image_size=64)
    pre = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    pixels = pre(sample.instance_images, sample.masks, sample.scene_image)
    images, masks, scene = conditions_to_pil(sample.instance_images, sample.masks > 0.5, sample.scene_image)
    assert np.asarray(masks[0]).max() == 255 and images[0].mode == "RGB"
    with torch.no_grad():
        e1_pil, _ = pipe.encode_image_1(images, "cpu")
        e1_t, _ = pipe.encode_image_1(pixels["pixels_1"], "cpu")
        e2_pil, _ = pipe.encode_image_2(images, [scene] * len(images), masks, "cpu")
        e2_t, _ = pipe.encode_image_2(pixels["pixels_2_instance"], pixels["pixels_2_scene"], pixels["masks"], "cpu")
    torch.testing.assert_close(e1_t, e1_pil, atol=0, rtol=0)
    torch.testing.assert_close(e2_t, e2_pil, atol=0, rtol=0)


def test_view_sample_matches_the_readers_images(data_root):
    record = open_dataset(data_root, "train")[0]
    full = load_scene_sample(record, 0, NUM_POINTS, np.random.default_rng(0), image_size=64)
    views = load_images(record, 0, _settings(max_num_instances=10), surfaces=False)
    assert views.object_names == full.object_names
    np.testing.assert_array_equal(views.instance_images, full.instance_images)
    np.testing.assert_array_equal(views.masks, full.masks)


def test_3d_front_layout_trains_through_the_same_dataset(data_root, pipe, tmp_path):
    front3d_from_prepared(data_root, tmp_path / "front")
    ds = _dataset(tmp_path / "front", pipe, split="all")
    batch = Collator(None)([ds[(i, item_seed(0, i))] for i in range(2)])
    assert batch.scene_ids[0].startswith("house") and batch.surfaces.shape[1:] == (NUM_POINTS, 6)


# ----------------------------------------------------------------------------- cache
def _cache(pipe, root, settings, embeds=True):
    from midi.training.cache import FeatureCache, module_fingerprint

    key = module_fingerprint(pipe.image_encoder_1, pipe.image_encoder_2) if embeds else None
    return FeatureCache(root, settings, 64, 2, module_fingerprint(pipe.vae), key)


def test_cache_entries_match_the_models_and_are_reused(data_root, pipe, tmp_path):
    from midi.training.cache import build_cache

    settings = _settings()
    records = open_dataset(data_root, "train")[:2]
    cache = _cache(pipe, tmp_path / "cache", settings)
    pre = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    assert build_cache(cache, records, pipe, pre) == sum(len(r.object_names) + len(r.views) for r in records)
    assert build_cache(cache, records, pipe, pre) == 0  # everything reused

    # Embeddings: what the pipeline computes from the same view (float16 on disk).
    entry = cache.load_view(records[0], 0)
    view = load_images(records[0], 0, settings, surfaces=False)
    pixels = pre(view.instance_images, view.masks, view.scene_image)
    with torch.no_grad():
        e2, _ = pipe.encode_image_2(pixels["pixels_2_instance"], pixels["pixels_2_scene"], pixels["masks"], "cpu")
    torch.testing.assert_close(entry["embeds_2"].float(), e2, atol=2e-3, rtol=2e-3)

    # Posteriors: the VAE's posterior of one of the K stored surface subsets.
    record = records[0]
    post = cache.load_posterior(record, record.object_names[0], np.random.default_rng(0))
    k = int(np.random.default_rng(0).integers(2))  # the subset load_posterior drew
    with torch.no_grad():
        subsets = torch.from_numpy(cache.surface_subsets(record.surface_paths[0]))
        dist = pipe.vae.encode(subsets, num_tokens=64, seed=0).latent_dist
    torch.testing.assert_close(post, torch.cat([dist.mean[k], dist.logvar[k]], -1), atol=2e-3, rtol=2e-3)


def test_cache_keys_follow_files_and_models(data_root, pipe, tmp_path):
    settings = _settings()
    record = open_dataset(data_root, "train")[0]
    cache = _cache(pipe, tmp_path, settings)
    before = cache.posterior_path(record.surface_paths[0]), cache.view_path(record, 0)
    stat = os.stat(record.surface_paths[0])
    os.utime(record.surface_paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert cache.posterior_path(record.surface_paths[0]) != before[0]  # file changed -> new key
    from midi.tiny import tiny_pipeline

    other = _cache(tiny_pipeline(1), tmp_path, settings)
    assert other.view_path(record, 0) != before[1]  # model changed -> new key
    assert _cache(pipe, tmp_path, settings, embeds=False).load_view(record, 0) is None


def test_cached_dataset_items(data_root, pipe, tmp_path):
    from midi.training.cache import build_cache

    settings = _settings()
    records = open_dataset(data_root, "train")
    pre = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    for embeds in (True, False):
        cache = _cache(pipe, tmp_path / "c", settings, embeds=embeds)
        build_cache(cache, records, pipe, pre)
        ds = SceneDataset(records, settings, pre, cache)
        batch = Collator(None)([ds[(i, item_seed(0, i))] for i in range(2)])
        assert batch.surfaces is None and batch.posterior.shape == (batch.num_rows, 64, 16)
        assert (batch.embeds_1 is not None) == embeds and (batch.pixels_1 is not None) == (not embeds)


def test_missing_dataset_is_written_only_when_asked(tmp_path):
    from midi.training.batches import ensure_dataset

    cfg = tiny_config(tmp_path / "none", tmp_path / "out", "--data.synthetic_if_missing", "0")
    assert not ensure_dataset(cfg.data, 0) and not (tmp_path / "none").exists()


def test_cache_shares_cover_everything_whatever_the_timing(data_root, pipe, tmp_path):
    """Process 1 finishing before process 0 even lists its entries must not leave any unbuilt."""
    from midi.training.cache import build_cache

    records = open_dataset(data_root, "train")[:3]
    cache = _cache(pipe, tmp_path / "cache", _settings())
    pre = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    total = len(cache.missing(records))
    built = build_cache(cache, records, pipe, pre, rank=1, num_processes=2)
    built += build_cache(cache, records, pipe, pre, rank=0, num_processes=2)
    assert cache.missing(records) == [] and built == total


def test_prepare_cache_completes_what_another_process_left(data_root, pipe, tmp_path):
    """The main process checks completeness after the barrier and builds whatever is still missing."""
    from types import SimpleNamespace

    from midi.training.cache import prepare_cache

    cfg = tiny_config(data_root, tmp_path / "out", "--cache.dir", str(tmp_path / "cache"))
    records = open_dataset(data_root, "train")[:2]
    acc = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True, wait_for_everyone=lambda: None)
    pre = ConditionPreprocessor(pipe.feature_extractor_1, pipe.feature_extractor_2)
    cache = prepare_cache(cfg, pipe, acc, pre, _settings(), 64, records)  # process 1 never ran
    assert cache.missing(records) == []
