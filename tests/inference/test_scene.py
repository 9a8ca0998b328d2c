"""midi.inference.scene: instance maps as users have them, instance order, padding, names, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from midi.data.images import read_id_map, read_rgb, to_uint8, upstream_padding
from midi.errors import InputError
from midi.inference.scene import InputOptions, find_pairs, prepare_scene

SCENES = Path(__file__).resolve().parents[1] / "data" / "scenes"
KIDS = "ffb067ad-cf9a-4321-82ae-4e684c59ea3e_KidsRoom-5300"


def scene_files(name: str) -> tuple[Path, Path]:
    return SCENES / f"{name}_rgb.png", SCENES / f"{name}_seg.png"


def test_palette_map_default_order_is_palette_index():
    seg = read_id_map(scene_files(KIDS)[1])
    assert seg.kind == "palette"
    assert [i.key for i in seg.instances] == ["1", "2", "3", "4"]
    assert [i.pixels for i in seg.instances] == [125660, 6265, 4149, 15505]


def test_upstream_order_sorts_by_grey_level():
    path = scene_files("cartoon-00")[1]
    default = read_id_map(path)
    upstream = read_id_map(path, order="upstream")
    # Palette 1 red (L 76), 2 green (150), 3 blue (29), 4 yellow (226): upstream order is 3, 1, 2, 4.
    assert [i.key for i in upstream.instances] == ["29", "76", "150", "226"]
    for up, label in zip(upstream.instances, [3, 1, 2, 4]):
        np.testing.assert_array_equal(upstream.labels == up.label, default.labels == label)


def test_upstream_order_reports_labels_merged_by_equal_luminance(tmp_path):
    labels = np.zeros((8, 8), np.uint8)
    labels[:4], labels[4:, :4] = 1, 2
    image = Image.fromarray(labels, mode="P")
    image.putpalette([0, 0, 0, 90, 90, 90, 90, 90, 90] + [0] * 759)  # two labels, one grey level
    image.save(tmp_path / "seg.png")
    seg = read_id_map(tmp_path / "seg.png", order="upstream")
    assert len(seg.instances) == 1 and "merges 2 labels into 1" in seg.notes[0]


def test_rgb_colour_map_orders_by_colour_and_ignores_fringe(tmp_path, caplog):
    rgb_path, seg_path = scene_files("cartoon-01")
    seg = np.asarray(Image.open(seg_path)).copy()
    clean = read_id_map(seg_path)
    assert clean.kind == "rgb" and not clean.notes
    assert [i.key for i in clean.instances] == ["ff0000", "00ff00", "0000ff", "ffff00", "ff00ff"]  # BASIC_PALETTE order
    # Anti-aliasing: blend a 1-pixel border of every instance with black, in 20 different shades.
    inside = seg.any(axis=2)
    border = inside & ~np.pad(inside, 1)[2:, 1:-1]
    rows, cols = np.nonzero(border)
    shades = (np.arange(len(rows)) % 20 + 5) / 30
    seg[rows, cols] = (seg[rows, cols] * shades[:, None]).astype(np.uint8)
    Image.fromarray(seg).save(tmp_path / "x_seg.png")
    Image.open(rgb_path).save(tmp_path / "x_rgb.png")
    with caplog.at_level(logging.INFO, logger="midi.inference.scene"):
        scene = prepare_scene(tmp_path / "x_rgb.png", tmp_path / "x_seg.png", InputOptions())
    assert [i.key for i in scene.segmentation.instances] == [i.key for i in clean.instances]
    assert (scene.segmentation.labels[rows, cols] == 0).all()
    assert any("anti-aliased fringe" in r.getMessage() and "x_seg.png" in r.getMessage() for r in caplog.records)


def test_grey_map_saved_as_rgb_reads_as_grey_labels(tmp_path):
    labels = np.zeros((16, 16), np.uint8)
    labels[2:6, 2:6], labels[8:12, 8:12] = 7, 3
    Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(tmp_path / "seg.png")
    seg = read_id_map(tmp_path / "seg.png")
    assert seg.kind == "grey" and [i.key for i in seg.instances] == ["3", "7"]


def test_rgba_is_composited_on_white(tmp_path):
    array = np.zeros((4, 4, 4), np.uint8)
    array[..., 0] = 200
    array[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(array, mode="RGBA").save(tmp_path / "rgba.png")
    rgb = to_uint8(read_rgb(tmp_path / "rgba.png"))
    assert (rgb[:2] == [200, 0, 0]).all() and (rgb[2:] == 255).all()
    assert read_rgb(scene_files("kitchen")[0]).shape == (1024, 1024, 3)


def test_rgba_upstream_drops_alpha_like_upstream(tmp_path):
    array = np.zeros((4, 4, 4), np.uint8)
    array[..., 0] = 200
    array[:2, :, 3] = 255
    Image.fromarray(array, mode="RGBA").save(tmp_path / "rgba.png")
    rgb = to_uint8(read_rgb(tmp_path / "rgba.png", rgba="upstream"))
    assert np.array_equal(rgb, np.asarray(Image.open(tmp_path / "rgba.png").convert("RGB")))
    assert (rgb[2:] == [200, 0, 0]).all()  # transparent pixels keep their stored colour
    Image.fromarray(np.full((4, 4), 1, np.uint8), mode="L").save(tmp_path / "seg.png")
    scene = prepare_scene(tmp_path / "rgba.png", tmp_path / "seg.png", InputOptions(rgba="upstream"))
    assert (np.asarray(scene.rgb)[2:] == [200, 0, 0]).all()


def test_conditions_match_upstream_convention():
    scene = prepare_scene(*scene_files(KIDS), InputOptions())
    images, masks, full = scene.conditions()
    assert len(images) == len(masks) == 4
    rgb = np.asarray(scene.rgb)
    for inst, image, mask in zip(scene.segmentation.instances, images, masks):
        inside = scene.segmentation.labels == inst.label
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) == {0, 255}
        np.testing.assert_array_equal(np.asarray(mask) == 255, inside)
        np.testing.assert_array_equal(np.asarray(image)[inside], rgb[inside])
        assert (np.asarray(image)[~inside] == 255).all()
    np.testing.assert_array_equal(np.asarray(full), np.asarray(scene.rgb))
    assert scene.names == ["instance_1", "instance_2", "instance_3", "instance_4"]


def test_non_square_images_are_centred_on_a_square(tmp_path, caplog):
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "a_rgb.png")
    labels = np.zeros((20, 40), np.uint8)
    labels[5:10, 5:30] = 1
    Image.fromarray(labels).save(tmp_path / "a_seg.png")
    with caplog.at_level(logging.INFO, logger="midi.inference.scene"):
        scene = prepare_scene(tmp_path / "a_rgb.png", tmp_path / "a_seg.png", InputOptions())
    assert scene.rgb.size == (40, 40) and scene.segmentation.labels.shape == (40, 40)
    assert (np.asarray(scene.rgb)[:10] == 255).all() and (np.asarray(scene.rgb)[10:30] == (10, 20, 30)).all()
    assert (scene.segmentation.labels == 1).sum() == 125 and (scene.segmentation.labels[15:20, 5:30] == 1).all()
    assert any("not square" in r.getMessage() for r in caplog.records)


def test_upstream_padding_on_a_square_image():
    # Instances spanning rows 10..89 / cols 30..69 of a 100x100 image: extent 2 * 40 = 80, not > 80:
    # no growth; rows 5..94: extent 90 > 80 -> canvas int(90 * 1.25) = 112, image pasted at (6, 6).
    labels = np.zeros((100, 100), np.int64)
    labels[10:90, 30:70] = 1
    rgb = np.full((100, 100, 3), 0.5, np.float32)
    same_rgb, same = upstream_padding(rgb, labels)
    assert same_rgb.shape == (100, 100, 3) and np.array_equal(same, labels)
    labels[5:95, 30:70] = 1
    padded_rgb, padded = upstream_padding(rgb, labels)
    assert padded_rgb.shape == (112, 112, 3) and padded.shape == (112, 112)
    assert padded[6:106, 6:106].sum() == labels.sum() and padded.sum() == labels.sum()
    assert padded_rgb[0, 0].tolist() == [1, 1, 1] and padded_rgb[6, 6].tolist() == [0.5, 0.5, 0.5]


def test_label_names_from_json(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "bed", "4": "lamp"}))
    scene = prepare_scene(*scene_files(KIDS), InputOptions(label_names=names))
    assert scene.names == ["bed", "instance_2", "instance_3", "lamp"]
    names.write_text(json.dumps({"1": "chair", "2": "chair"}))
    with pytest.raises(InputError, match="'chair' given to labels 1 and 2"):
        prepare_scene(*scene_files(KIDS), InputOptions(label_names=names))


@pytest.mark.parametrize(
    "case, message",
    [("size", "differs from the image"), ("empty", "no instance"), ("many", "more than --max_instances 3"),
     ("corrupt", "cannot read image"), ("missing", "file not found")],
)
def test_bad_inputs_name_the_file(tmp_path, case, message):
    rgb, seg = scene_files("kitchen")
    options = InputOptions()
    if case == "size":
        Image.new("L", (64, 64), 1).save(seg := tmp_path / "seg.png")
    elif case == "empty":
        Image.new("L", (1024, 1024), 0).save(seg := tmp_path / "seg.png")
    elif case == "many":
        rgb, seg = scene_files("cartoon-00")
        options = InputOptions(max_instances=3)
    elif case == "corrupt":
        (seg := tmp_path / "seg.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    else:
        seg = tmp_path / "nothing.png"
    with pytest.raises(InputError, match=message) as info:
        prepare_scene(rgb, seg, options)
    assert str(info.value).startswith(f"{seg}: ")


def test_find_pairs(tmp_path):
    for name in ("b", "a"):
        (tmp_path / f"{name}_rgb.png").touch()
        (tmp_path / f"{name}_seg.png").touch()
    assert [n for n, _, _ in find_pairs(tmp_path)] == ["a", "b"]
    (tmp_path / "c_rgb.jpg").touch()
    with pytest.raises(InputError, match="no matching c_seg.png"):
        find_pairs(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no X_rgb.png"):
        find_pairs(tmp_path / "empty")


def three_instance_map() -> np.ndarray:
    colours = np.zeros((96, 96, 3), np.uint8)
    colours[10:50, 10:40], colours[20:80, 50:90], colours[60:90, 5:45] = (255, 0, 0), (0, 200, 0), (30, 60, 255)
    return colours


@pytest.mark.parametrize("kind", ["jpeg", "jpeg-grey", "jpeg-as-png", "anti-aliased"])
def test_lossy_instance_map_says_save_as_png(tmp_path, kind):
    """JPEG noise and interpolated edges invent colours that would count as extra instances."""
    image = Image.fromarray(three_instance_map())
    seg = tmp_path / ("seg.jpg" if kind.startswith("jpeg-g") or kind == "jpeg" else "seg.png")
    if kind == "jpeg-grey":
        image.convert("L").save(seg, quality=90)
    elif kind == "jpeg":
        image.save(seg, quality=90)
    elif kind == "jpeg-as-png":
        image.save(tmp_path / "seg.jpg", quality=90)
        Image.open(tmp_path / "seg.jpg").save(seg)
    else:
        image.resize((64, 64), Image.Resampling.BILINEAR).save(seg)
    Image.new("RGB", Image.open(seg).size, "white").save(rgb := tmp_path / "rgb.png")
    with pytest.raises(InputError, match="save the instance map as PNG") as info:
        prepare_scene(rgb, seg, InputOptions())
    assert str(info.value).startswith(f"{seg}: ") and "\n" not in str(info.value)
    Image.fromarray(three_instance_map()).save(clean := tmp_path / "clean.png")  # the same map, lossless
    assert len(read_id_map(clean).instances) == 3


def test_shared_maps_are_not_taken_for_lossy():
    for seg in sorted(SCENES.glob("*_seg.png")):
        assert read_id_map(seg).instances
