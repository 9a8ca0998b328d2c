"""The app's model side without a web server: comparisons, the cache, messages, LoRA discovery, examples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trimesh
from PIL import Image

from midi.app.examples import EXAMPLES_DIR, list_examples, write_examples
from midi.app.studio import Settings, find_loras, shown_message
from midi.config import TINY_MODEL
from midi.errors import InputError
from midi.inference.scene import InputOptions, prepare_scene


def nodes(path) -> list[str]:
    return sorted(trimesh.load(path).graph.nodes_geometry)


def test_base_only_scene_has_one_node_per_instance_in_every_format(studio, example, fast):
    comparison = studio.compare(*example, None, 1.0, fast)
    scene = prepare_scene(*example, InputOptions())
    assert comparison.lora is None
    assert nodes(comparison.base.glb) == sorted(scene.names)
    assert [row[0] for row in comparison.base.rows] == scene.names and all(row[2] > 0 for row in comparison.base.rows)
    assert {p.suffix for p in comparison.base.files.values()} == {".glb", ".obj", ".ply"}
    assert all(p.is_file() and p.is_relative_to(studio.workdir) for p in comparison.base.files.values())
    assert Image.open(comparison.base.preview).size == (320, 320)


def test_moving_the_scale_reruns_only_the_lora_side(studio, example, lora, fast):
    settings = dataclasses.replace(fast, seed=7)  # a key no other test uses: the first call computes both sides
    before = dict(studio.runs_made)
    first = studio.compare(*example, str(lora), 1.0, settings)
    second = studio.compare(*example, str(lora), 0.5, settings)
    again = studio.compare(*example, str(lora), 0.5, settings)
    assert (studio.runs_made["base"] - before["base"], studio.runs_made["lora"] - before["lora"]) == (1, 2)
    assert first.cached == () and second.cached == ("base",) and again.cached == ("base", "lora")
    assert second.base.glb == first.base.glb
    assert first.lora.glb.read_bytes() != second.lora.glb.read_bytes()  # the scale reaches the model


def test_base_side_under_a_lora_is_the_base_model(studio, example, lora, fast):
    """The base side runs on the LoRA's pipeline at scale 0: it must equal the plain base model's scene."""
    settings = dataclasses.replace(fast, seed=11)
    with_lora = studio.compare(*example, str(lora), 1.0, settings)
    without = studio.compare(*example, None, 1.0, settings)
    assert without.cached == ("base",)  # same base, same inputs: one entry
    studio._cache.clear()  # recompute the base on a fresh base-only pipeline
    fresh = studio.compare(*example, None, 1.0, settings)
    assert fresh.base.glb.read_bytes() == with_lora.base.glb.read_bytes()
    assert fresh.lora is None and with_lora.lora.glb.read_bytes() != fresh.base.glb.read_bytes()


def test_random_seed_is_drawn_once_for_both_sides(studio, example, lora, fast):
    comparison = studio.compare(*example, str(lora), 1.0, dataclasses.replace(fast, seed=-1))
    assert comparison.seed >= 0
    assert comparison.base.glb.read_bytes() == studio.compare(
        *example, None, 1.0, dataclasses.replace(fast, seed=comparison.seed)).base.glb.read_bytes()


@pytest.mark.parametrize("case, message", [
    ("size", "small_seg.png: size 128x128 differs from the image synthetic_00102_rgb.png (256x256)"),
    ("empty", "empty_seg.png: no instance (every pixel is background: label 0 / black)"),
])
def test_bad_inputs_give_the_command_lines_message(studio, bad_pairs, case, message, fast):
    with pytest.raises(InputError) as info:
        studio.compare(*bad_pairs[case], None, 1.0, fast)
    assert str(info.value).endswith(message) and "\n" not in str(info.value)
    assert shown_message(info.value, bad_pairs[case][1].parent) == message  # upload paths shown by name


def test_lora_for_another_model_is_refused_in_words(studio, example, foreign_lora, fast):
    with pytest.raises(InputError, match=r"different base model \(width: adapter 128 vs model 64\)") as info:
        studio.compare(*example, str(foreign_lora), 1.0, fast)
    assert str(foreign_lora) in str(info.value)
    assert studio.compare(*example, None, 1.0, fast).base.glb.is_file()  # the studio still works after it


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps must be a whole number in 1..500, got 0"),
    (dict(octree_depth=12), "octree_depth must be a whole number in 3..10, got 12"),
    (dict(guidance=float("nan")), "guidance must be a finite number >= 0, got nan"),
    (dict(method="marching"), "extraction must be one of dense, coarse_to_fine, got 'marching'"),
])
def test_bad_settings_are_one_line_errors(change, message, fast):
    with pytest.raises(InputError) as info:
        dataclasses.replace(fast, **change).check()
    assert str(info.value) == message


def test_missing_inputs_and_lora_paths(studio, example, tmp_path, fast):
    with pytest.raises(InputError, match="give an RGB image and its instance map"):
        studio.compare(example[0], None, None, 1.0, fast)
    with pytest.raises(InputError, match="LoRA path does not exist"):
        studio.compare(*example, str(tmp_path / "nope"), 1.0, fast)


def test_tiny_defaults_are_fast_and_release_defaults_are_the_clis():
    assert Settings.defaults_for(TINY_MODEL).steps < 20 and Settings.defaults_for(TINY_MODEL).octree_depth <= 6
    assert Settings.defaults_for("pretrained_weights/MIDI-3D") == Settings(steps=50, guidance=7.0, seed=42, octree_depth=8)
    mini = Settings.defaults_for(str(EXAMPLES_DIR.parent / "models" / "midi-mini"))  # the card's settings
    assert (mini.steps, mini.guidance, mini.method, mini.octree_depth) == (25, 4.0, "coarse_to_fine", 6)


def test_loras_are_found_under_a_runs_folder(runs, lora, tmp_path):
    (runs / "tiny-run" / "checkpoint-2" / "lora").mkdir(parents=True)
    (runs / "tiny-run" / "checkpoint-2" / "lora" / "adapter_config.json").write_text("{}")
    found = find_loras(runs)
    assert lora in found and runs / "tiny-run" / "checkpoint-2" / "lora" in found
    assert find_loras(tmp_path / "missing") == [] and find_loras(None) == []


def test_bundled_examples_read_and_can_be_regenerated(tmp_path):
    examples = list_examples(EXAMPLES_DIR)
    assert [name for name, _, _ in examples] == ["synthetic_00100", "synthetic_00101", "synthetic_00102",
                                                 "synthetic_target_00000", "synthetic_target_00001"]
    counts = [len(prepare_scene(rgb, seg, InputOptions()).names) for _, rgb, seg in examples]
    assert counts[:3] == [5, 3, 2] and min(counts) >= 2
    target = write_examples(tmp_path / "target", count=1, size=64, seed=300, domain="target", start=0)
    assert [p.name for p in target] == ["synthetic_target_00000_rgb.png", "synthetic_target_00000_seg.png"]
    written = write_examples(tmp_path, count=1, size=64)
    assert [p.name for p in written] == ["synthetic_00100_rgb.png", "synthetic_00100_seg.png"]
    scene = prepare_scene(*written, InputOptions())
    assert len(scene.names) >= 2 and Image.open(written[1]).mode == "P"  # a palette map: visible, same labels
    assert np.asarray(Image.open(written[1])).max() == len(scene.names)
