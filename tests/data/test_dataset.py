"""The reading side: open_dataset (both layouts, splits) and load_scene_sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from midi.data.dataset import SceneRecord, load_scene_sample, open_dataset
from midi.data.images import read_label_map, read_rgb, resize_labels
from midi.data.surface_io import save_surface
from midi.errors import DataError
from tests.data.helpers import SCENES, front3d_from_prepared, synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    synthetic(root, 5, seed=11, image_size=48, num_samples=512, views=2)
    return root


def test_splits_partition_the_dataset(dataset):
    everything = {r.scene_id for r in open_dataset(dataset)}
    parts = [{r.scene_id for r in open_dataset(dataset, s)} for s in ("train", "val", "test")]
    assert set.union(*parts) == everything and sum(map(len, parts)) == len(everything) == 5
    assert len(parts[1]) >= 1
    with pytest.raises(DataError):
        open_dataset(dataset, "nope")


def test_sample_shapes_and_semantics(dataset):
    record = open_dataset(dataset)[0]
    sample = load_scene_sample(record, 1, 256, np.random.default_rng(0), image_size=32)
    n = len(record.object_names)
    assert sample.surfaces.shape == (n, 256, 6) and sample.surfaces.dtype == np.float32
    assert sample.instance_images.shape == (n, 32, 32, 3) and sample.masks.shape == (n, 32, 32)
    assert sample.scene_image.shape == (32, 32, 3) and sample.dropped == []
    labels = resize_labels(read_label_map(record.views[1][1]), 32)
    for k in range(n):
        np.testing.assert_array_equal(sample.masks[k], (labels == k + 1).astype(np.float32))
        outside = sample.masks[k] == 0
        assert np.all(sample.instance_images[k][outside] == 1.0)
        inside = ~outside
        np.testing.assert_array_equal(sample.instance_images[k][inside], sample.scene_image[inside])
    np.testing.assert_allclose(np.linalg.norm(sample.surfaces[..., 3:], axis=-1), 1.0, atol=1e-5)


def test_sample_is_deterministic_given_rng(dataset):
    record = open_dataset(dataset)[1]
    a = load_scene_sample(record, None, 128, np.random.default_rng(5))
    b = load_scene_sample(record, None, 128, np.random.default_rng(5))
    c = load_scene_sample(record, None, 128, np.random.default_rng(6))
    assert a.view_index == b.view_index
    np.testing.assert_array_equal(a.surfaces, b.surfaces)
    assert not np.array_equal(a.surfaces, c.surfaces)
    rows = a.surfaces[0, :, :3]
    assert len(np.unique(rows, axis=0)) == 128  # without replacement


def test_small_and_empty_masks_are_dropped(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    record = open_dataset(copy)[2]
    labels = read_label_map(record.views[0][1])
    labels[labels == 1] = 0
    labels[0, 0] = 1  # object 0: one pixel
    labels[labels == 2] = 0  # object 1: gone
    Image.fromarray(labels.astype(np.uint8)).save(record.views[0][1])
    sample = load_scene_sample(record, 0, 64, np.random.default_rng(0), min_mask_fraction=0.001)
    dropped = dict(sample.dropped)
    assert "mask too small" in dropped[record.object_names[0]]
    assert dropped[record.object_names[1]] == "empty mask"
    assert (
        sample.object_names == list(record.object_names[2:])
        and len(sample.surfaces) == len(record.object_names) - 2
    )
    Image.fromarray(np.zeros_like(labels, dtype=np.uint8)).save(record.views[0][1])
    with pytest.raises(DataError, match="no instance left"):
        load_scene_sample(record, 0, 64, np.random.default_rng(0))


def _fake_record(tmp_path, image, seg, count: int) -> SceneRecord:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        p = rng.normal(size=(300, 3)).astype(np.float32)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        paths.append(tmp_path / f"obj{k}.npz")
        save_surface(paths[-1], p * 0.5, p)
    return SceneRecord("real", tuple(f"obj{k}" for k in range(count)), tuple(paths), ((image, seg),))


def test_palette_id_map_and_rgba_image(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 20:, 3] = 255  # left half transparent
    Image.fromarray(rgba).save(tmp_path / "scene.png")
    seg = Image.open(SCENES / "kitchen_seg.png").resize((40, 40), Image.Resampling.NEAREST)
    assert seg.mode == "P"
    seg.save(tmp_path / "seg.png")
    record = _fake_record(tmp_path, tmp_path / "scene.png", tmp_path / "seg.png", 3)
    sample = load_scene_sample(record, 0, 100, np.random.default_rng(0), background=(0.0, 0.0, 1.0))
    left, right = sample.scene_image[:, :20], sample.scene_image[:, 20:]
    np.testing.assert_allclose(
        left, np.broadcast_to([0.0, 0.0, 1.0], left.shape)
    )  # composited on the background
    np.testing.assert_allclose(right, np.broadcast_to([200 / 255, 0.0, 0.0], right.shape), atol=1e-6)
    raw = np.asarray(Image.open(tmp_path / "seg.png"))  # palette indices
    for k in range(sample.num_instances):
        np.testing.assert_array_equal(sample.masks[k], raw == sample.object_indices[k] + 1)


def test_colour_coded_and_16bit_id_maps(tmp_path):
    labels = read_label_map(SCENES / "cartoon-01_seg.png")
    rgb = np.asarray(Image.open(SCENES / "cartoon-01_seg.png").convert("RGB"))
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5}
    assert np.all(rgb[labels == 1] == [255, 0, 0]) and np.all(rgb[labels == 0] == 0)
    big = np.zeros((8, 8), np.uint16)
    big[2:4, 2:4] = 300
    Image.fromarray(big).save(tmp_path / "ids16.png")
    assert Image.open(tmp_path / "ids16.png").mode.startswith("I")
    assert read_label_map(tmp_path / "ids16.png").max() == 300
    rgb_image = read_rgb(SCENES / "kitchen_rgb.png", (1.0, 1.0, 1.0))
    assert rgb_image.shape == (1024, 1024, 3) and rgb_image.max() <= 1.0


def test_front3d_layout_is_read_in_place(dataset, tmp_path):
    rooms = front3d_from_prepared(dataset, tmp_path / "front")
    records = open_dataset(tmp_path / "front")
    assert [r.scene_id for r in records] == [r.replace("/", "-") for r, _ in rooms]
    assert records[0].layout == "3d-front" and records[0].object_names == tuple(rooms[0][1])
    assert [p.name for p, _ in records[0].views] == ["render_0000.webp", "render_0001.webp"]
    sample = load_scene_sample(records[0], 0, 128, np.random.default_rng(0), image_size=48)
    ours = load_scene_sample(open_dataset(dataset)[0], 0, 128, np.random.default_rng(0), image_size=48)
    np.testing.assert_array_equal(sample.masks, ours.masks)
    np.testing.assert_allclose(sample.scene_image, ours.scene_image, atol=1 / 255 + 1e-6)
    splits = [open_dataset(tmp_path / "front", s) for s in ("train", "val", "test")]
    assert sum(map(len, splits)) == len(records)
    json.loads((tmp_path / "front" / "midi_room_ids.json").read_text())


def test_colour_map_outside_palette_orders_by_grey_level(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, :2] = (10, 200, 30)  # grey ~123: second
    rgb[1, :2] = (200, 10, 10)  # grey ~66: first
    rgb[2, :2] = (250, 250, 200)  # grey ~244: third
    Image.fromarray(np.kron(rgb, np.ones((4, 4, 1), np.uint8))).save(tmp_path / "coded.png")  # flat areas, not lines
    labels = read_label_map(tmp_path / "coded.png")
    assert labels[4, 0] == 1 and labels[0, 0] == 2 and labels[8, 0] == 3 and labels[12, 0] == 0


def test_invalid_front3d_room_list_is_a_one_line_error(dataset, tmp_path):
    front3d_from_prepared(dataset, tmp_path / "front")
    (tmp_path / "front" / "midi_room_ids.json").write_text('["house00/room00", ')
    with pytest.raises(DataError, match="midi_room_ids.json: invalid JSON"):
        open_dataset(tmp_path / "front")


def test_front3d_txt_lists(dataset, tmp_path):
    rooms = front3d_from_prepared(dataset, tmp_path / "front")
    root = tmp_path / "front"
    (root / "midi_room_ids.json").unlink()
    (root / "midi_furniture_ids.json").unlink()
    (root / "midi_room_ids.txt").write_text("".join(f"{r}\n" for r, _ in rooms))
    (root / "midi_furniture_ids.txt").write_text("".join(", ".join(n) + "\n" for _, n in rooms))
    records = open_dataset(root)
    assert [list(r.object_names) for r in records] == [n for _, n in rooms]


def test_reader_rejects_more_labels_than_objects_like_check(dataset, tmp_path):
    from midi.data.check import check_dataset

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    record = open_dataset(copy)[0]
    labels = read_label_map(record.views[0][1]).astype(np.uint16)
    labels[:3, :] = np.arange(labels.shape[1] * 3).reshape(3, -1) % 300 + 1  # labels up to 300
    Image.fromarray(labels).save(record.views[0][1])
    with pytest.raises(DataError, match=r"view_00_ids.png: labels \[.*\] but the scene has") as info:
        load_scene_sample(record, 0, 64, np.random.default_rng(0))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    from midi.training.batches import SampleSettings, load_images  # the VAE-cache path of training

    with pytest.raises(DataError) as cached:
        load_images(record, 0, SampleSettings(64, 48, (1.0, 1.0, 1.0), 0.001, 16), surfaces=False)
    assert str(cached.value) == str(info.value)
    found = [p.detail for p in check_dataset(copy, write=False).problems if p.kind == "extra_label"]
    assert found == [str(info.value)]


def _escape_manifest(root, key: str) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["scenes"][0]
    entry[key] = "../../../../outside/secret" if key == "id" else ["../../../../outside/secret"]
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("key", ["objects", "views", "id"])
def test_manifest_names_must_stay_inside_the_root(dataset, tmp_path, key):
    from midi.data.check import check_dataset

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    (tmp_path / "outside").mkdir()
    save_surface(tmp_path / "outside" / "secret.npy", np.ones((600, 3)) * 0.5, np.ones((600, 3)) / 3**0.5)
    _escape_manifest(copy, key)
    pattern = r"manifest.json: .*outside/secret.* (leaves|outside)"
    with pytest.raises(DataError, match=pattern):
        open_dataset(copy)
    with pytest.raises(DataError, match=pattern):
        check_dataset(copy, write=False)


@pytest.mark.parametrize("which", ["room", "object"])
def test_front3d_lists_must_stay_inside_the_root(dataset, tmp_path, which):
    rooms = front3d_from_prepared(dataset, tmp_path / "front")
    root = tmp_path / "front"
    if which == "room":
        rooms[0] = ("../../outside", rooms[0][1])
        (root / "midi_room_ids.json").write_text(json.dumps([r for r, _ in rooms]))
        listing = "midi_room_ids.json"
    else:
        rooms[0][1][0] = "../../../../outside/secret"
        (root / "midi_furniture_ids.json").write_text(json.dumps([n for _, n in rooms]))
        listing = "midi_furniture_ids.json"
    with pytest.raises(DataError, match=rf"{listing}: .*outside.* (leaves|outside)"):
        open_dataset(root)
