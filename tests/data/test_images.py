"""midi.data.images, the one reader: formats, order, lossy maps, composition, and data/inference parity."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from midi.data.images import (
    BASIC_PALETTE,
    conditions_to_pil,
    instance_images,
    open_image,
    pad_to_square,
    read_id_map,
    read_label_map,
    read_rgb,
    upstream_padding,
)
from midi.errors import DataError, InputError
from midi.inference.scene import InputOptions, prepare_scene


def layout() -> np.ndarray:
    """Labels 1, 2, 3 as flat blocks of different sizes (label 2 largest) on background 0."""
    labels = np.zeros((48, 48), np.uint8)
    labels[4:20, 4:20], labels[24:46, 10:40], labels[6:16, 30:44] = 1, 2, 3
    return labels


def save_as(kind: str, labels: np.ndarray, path) -> None:
    if kind == "palette":
        image = Image.fromarray(labels, mode="P")
        image.putpalette([v for c in BASIC_PALETTE for v in c] + [0] * (768 - 3 * len(BASIC_PALETTE)))
        image.save(path)
    elif kind == "grey":
        Image.fromarray(labels * 40).save(path)  # 40, 80, 120: ascending grey = ascending label
    elif kind == "rgb":  # palette colours: red 1, green 2, blue 3
        Image.fromarray(np.asarray(BASIC_PALETTE, np.uint8)[labels]).save(path)
    else:  # colours outside the palette, luminance ascending with the label
        Image.fromarray(np.array([(0, 0, 0), (90, 20, 20), (20, 160, 20), (240, 240, 100)], np.uint8)[labels]).save(path)


@pytest.mark.parametrize("kind", ["palette", "grey", "rgb", "rgb-off-palette"])
def test_parity_data_tools_and_inference_give_the_same_instances_in_the_same_order(tmp_path, kind):
    labels = layout()
    save_as(kind, labels, seg := tmp_path / "x_seg.png")
    Image.new("RGB", (48, 48), (30, 60, 90)).save(rgb := tmp_path / "x_rgb.png")
    expected = [labels == k for k in (1, 2, 3)]
    # The data tools' reader: instance k = label k, in ascending label order.
    data_labels = read_label_map(seg)
    data_masks = [data_labels == v for v in np.unique(data_labels) if v != 0]
    # Inference's scene reader, through to the per-instance masks the pipeline gets.
    scene = prepare_scene(rgb, seg, InputOptions(), log_notes=False)
    _, masks, _ = scene.conditions()
    inference_masks = [np.asarray(m) == 255 for m in masks]
    for found in (data_masks, inference_masks):
        assert len(found) == 3 and all(np.array_equal(a, b) for a, b in zip(found, expected))


def test_kinds_keys_and_notes(tmp_path):
    labels = layout()
    for kind, expected in (("palette", "palette"), ("grey", "grey"), ("rgb", "rgb")):
        save_as(kind, labels, tmp_path / f"{kind}.png")
        assert read_id_map(tmp_path / f"{kind}.png").kind == expected
    id_map = read_id_map(tmp_path / "rgb.png")
    assert [i.key for i in id_map.instances] == ["ff0000", "00ff00", "0000ff"] and id_map.labels.dtype == np.int32
    assert [i.pixels for i in id_map.instances] == [int((labels == k).sum()) for k in (1, 2, 3)]
    upstream = read_id_map(tmp_path / "rgb.png", order="upstream")  # grey: blue 29 < red 76 < green 150
    assert upstream.kind == "upstream-grey" and [i.key for i in upstream.instances] == ["29", "76", "150"]


def test_fringe_colours_become_background_with_a_note(tmp_path):
    colours = np.asarray(BASIC_PALETTE, np.uint8)[layout()]
    colours[0, 0] = (7, 7, 9)  # one stray pixel: under 0.1 % of the image
    Image.fromarray(colours).save(tmp_path / "seg.png")
    id_map = read_id_map(tmp_path / "seg.png")
    assert len(id_map.instances) == 3 and id_map.labels[0, 0] == 0 and "fringe" in id_map.notes[0]
    with pytest.raises(DataError, match="no solid area"):  # kept as an instance, it is a speck: lossy
        read_id_map(tmp_path / "seg.png", min_pixels=1)


@pytest.mark.parametrize("kind", ["jpeg", "resized"])
def test_lossy_maps_are_refused(tmp_path, kind):
    image = Image.fromarray(np.asarray(BASIC_PALETTE, np.uint8)[layout()])
    if kind == "jpeg":
        image.save(path := tmp_path / "seg.jpg", quality=90)
    else:
        image.resize((37, 37), Image.Resampling.BILINEAR).save(path := tmp_path / "seg.png")
    with pytest.raises(DataError, match="save the instance map as PNG") as info:
        read_id_map(path)
    assert str(info.value).startswith(f"{path}: ") and isinstance(info.value, InputError)


def test_open_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        open_image(tmp_path / "none.png")
    with pytest.raises(DataError, match="not a file"):
        open_image(tmp_path)
    (bad := tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)
    with pytest.raises(DataError, match="cannot read image"):
        open_image(bad)


def test_rgb_reading_alpha_and_16_bit(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[0, :, 3] = 200, 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    composited = read_rgb(tmp_path / "a.png")
    assert composited.dtype == np.float32 and np.allclose(composited[1], 1.0)
    assert np.allclose(read_rgb(tmp_path / "a.png", (0.0, 0.0, 0.0))[1], 0.0)
    assert np.allclose(read_rgb(tmp_path / "a.png", rgba="upstream")[1], [200 / 255, 0, 0])
    Image.fromarray(np.full((2, 2), 65535, np.uint16)).save(tmp_path / "g.png")
    assert np.allclose(read_rgb(tmp_path / "g.png"), 1.0)


def test_composition_and_padding():
    labels = layout().astype(np.int32)
    rgb = np.full((48, 48, 3), 0.25, np.float32)
    images, masks = instance_images(rgb, labels, [2, 1])
    assert images.shape == (2, 48, 48, 3) and masks.shape == (2, 48, 48) and masks.dtype == bool
    assert np.array_equal(masks[0], labels == 2) and (images[0][~masks[0]] == 1.0).all()
    assert (images[0][masks[0]] == 0.25).all()
    pil_images, pil_masks, scene = conditions_to_pil(images, masks, rgb)
    assert [m.mode for m in pil_masks] == ["L", "L"] and scene.size == (48, 48) and pil_images[0].mode == "RGB"
    wide = pad_to_square(np.zeros((2, 4), np.int32), 0)
    assert wide.shape == (4, 4)
    same_rgb, same_labels = upstream_padding(rgb, np.zeros_like(labels))
    assert same_rgb is rgb and same_labels.shape == (48, 48)
