"""Sharded prepare (--num_shards/--shard_index) and --merge: sharded + merged == one run, byte for byte."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from midi.data import layout
from midi.data.jobs import PrepareOptions
from midi.data.prepare import prepare_dataset
from midi.data.shards import merge_parts
from midi.errors import DataError, UsageError
from tests.data.helpers import MESHES, synthetic, write_boxes

ROOT = Path(__file__).resolve().parents[2]
# Few scenes and a tiny val fraction: no scene hashes into val, so the "at least one val scene"
# rule picks one, and it must pick it once over all scenes, not once per part.
SYNTHETIC = ["--synthetic", "7", "--image_size", "32", "--num_samples", "128", "--views", "2", "--seed", "3",
             "--val_fraction", "0.01", "--workers", "1", "--no_progress"]


def _cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", ROOT / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree(root: Path, under: str = layout.SCENES_DIR) -> dict[str, bytes]:
    """Every file under ``root/under`` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / under).rglob("*")) if p.is_file()}


def test_shard_of_is_a_stable_hash_of_the_id():
    # crc32, not Python's salted hash(): every machine of an array job must agree.
    assert [layout.shard_of(f"synthetic_{i:05d}", 3) for i in range(7)] == [0, 1, 1, 0, 0, 2, 0]


def test_three_shards_merged_equal_one_run(tmp_path, capsys):
    cli = _cli()
    assert cli.main([*SYNTHETIC, "--output_dir", str(tmp_path / "one")]) == 0
    parts = [tmp_path / "parts" / f"part-{i}" for i in range(3)]
    for i, part in enumerate(parts):
        assert cli.main([*SYNTHETIC, "--output_dir", str(part), "--num_shards", "3", "--shard_index", str(i)]) == 0
        assert f"(shard {i} of 3" in capsys.readouterr().out
    per_part = [json.loads((p / layout.MANIFEST).read_text()) for p in parts]
    assert sorted(sid for m in per_part for s in m["scenes"] for sid in [s["id"]]) == [f"synthetic_{i:05d}"
                                                                                        for i in range(7)]
    assert [m["shard"] for m in per_part] == [{"index": i, "count": 3} for i in range(3)]
    assert cli.main(["--merge", *map(str, parts), "--output_dir", str(tmp_path / "merged"), "--no_progress"]) == 0
    assert "merged 3 part(s): 7 scene(s) added" in capsys.readouterr().out

    one, merged = tmp_path / "one", tmp_path / "merged"
    assert (merged / layout.MANIFEST).read_bytes() == (one / layout.MANIFEST).read_bytes()
    assert tree(merged) == tree(one)
    splits = json.loads((one / layout.MANIFEST).read_text())["splits"]
    assert len(splits["val"]) == 1  # forced once over all scenes...
    assert sum(len(m["splits"]["val"]) for m in per_part) > 1  # ...where each part forced its own


def test_folder_inputs_sharded_and_merged_equal_one_run(tmp_path):
    inputs = tmp_path / "in"
    for k, name in enumerate(("alpha", "beta", "gamma", "delta")):
        write_boxes(inputs / name, {"a": (0, 0, 0), "b": (2 + k, 0, 0)})
    options = PrepareOptions(num_samples=64, image_size=32, val_fraction=0.3)
    prepare_dataset(inputs, tmp_path / "one", options)
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, part in enumerate(parts):
        prepare_dataset(inputs, part, options, shard=(i, 2))
    merge_parts(parts, tmp_path / "merged")
    assert (tmp_path / "merged" / layout.MANIFEST).read_bytes() == (tmp_path / "one" / layout.MANIFEST).read_bytes()
    assert tree(tmp_path / "merged") == tree(tmp_path / "one")


def test_shard_rerun_skips_finished_scenes_and_keeps_its_assignment(tmp_path, capsys):
    cli = _cli()
    part = tmp_path / "part-0"
    args = [*SYNTHETIC, "--output_dir", str(part), "--num_shards", "3", "--shard_index", "0"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "prepared 0 scene(s)" in capsys.readouterr().out  # resumed: every scene was finished
    other = [*SYNTHETIC, "--output_dir", str(part), "--num_shards", "2", "--shard_index", "0"]
    assert cli.main(other) == 2
    assert "was prepared as shard 0 of --num_shards 3, not shard 0 of --num_shards 2" in capsys.readouterr().err
    assert cli.main([*SYNTHETIC, "--output_dir", str(part)]) == 2
    assert "not one unsharded run" in capsys.readouterr().err


def test_shard_flags_are_checked(tmp_path, capsys):
    cli = _cli()
    out = str(tmp_path / "o")
    for extra, message in ((["--num_shards", "3"], "go together"),
                           (["--num_shards", "3", "--shard_index", "3"], "must be in [0, --num_shards)")):
        assert cli.main([*SYNTHETIC, "--output_dir", out, *extra]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["--check", out, "--num_shards", "2", "--shard_index", "0"]) == 2
    assert "shard a prepare run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("parts")
    out = []
    for i in range(2):
        synthetic(base / f"part-{i}", 5, seed=1, image_size=32, num_samples=64)
        out.append(base / f"part-{i}")
    # Re-shard what was written as two plain runs into two real shards: scenes of the other shard go.
    for i, part in enumerate(out):
        for scene in list((part / layout.SCENES_DIR).iterdir()):
            if layout.shard_of(scene.name, 2) != i:
                shutil.rmtree(scene)
        manifest = json.loads((part / layout.MANIFEST).read_text())
        manifest["scenes"] = [s for s in manifest["scenes"] if layout.shard_of(s["id"], 2) == i]
        manifest["shard"] = {"index": i, "count": 2}
        (part / layout.MANIFEST).write_text(json.dumps(manifest))
    return out


def test_merge_refuses_incomplete_or_mixed_parts(parts, tmp_path):
    with pytest.raises(UsageError, match=r"shard\(s\) 1 of 2 missing"):
        merge_parts(parts[:1], tmp_path / "m")
    with pytest.raises(UsageError, match="names a part folder twice"):
        merge_parts([parts[0], parts[0]], tmp_path / "m")
    with pytest.raises(UsageError, match="must not be one of the parts"):
        merge_parts(parts, parts[1])
    other = tmp_path / "other"
    shutil.copytree(parts[1], other)
    manifest = json.loads((other / layout.MANIFEST).read_text())
    manifest["seed"] = 9
    (other / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="was prepared with seed=9"):
        merge_parts([parts[0], other], tmp_path / "m")
    (other / layout.MANIFEST).unlink()
    with pytest.raises(DataError, match="has not finished"):
        merge_parts([parts[0], other], tmp_path / "m")
    assert not (tmp_path / "m").exists()  # every refusal comes before anything is written


def test_merge_refuses_a_live_part(parts, tmp_path):
    (parts[1] / ".prepare.lock").write_text(f"{os.getppid()}\n")  # a live process (pytest's parent)
    try:
        with pytest.raises(UsageError, match="another prepare run"):
            merge_parts(parts, tmp_path / "m")
    finally:
        (parts[1] / ".prepare.lock").unlink()


def test_merge_resumes_and_never_overwrites_a_different_scene(parts, tmp_path):
    out = tmp_path / "merged"
    first = merge_parts(parts, out)
    assert len(first.merged) == 5 and first.num_scenes_total == 5
    again = merge_parts(parts, out)
    assert again.merged == [] and len(again.already_merged) == 5
    record = sorted((out / layout.SCENES_DIR).iterdir())[0] / layout.SCENE_JSON
    text = record.read_text()
    record.unlink()  # the merge hard-links: an edit in place would change the part's file too
    record.write_text(text.replace('"id"', '"id" ', 1))
    with pytest.raises(DataError, match="differs from"):
        merge_parts(parts, out)


def test_merge_reports_scenes_a_part_skipped(tmp_path, capsys):
    inputs = tmp_path / "in"
    write_boxes(inputs / "good", {"a": (0, 0, 0), "b": (2, 0, 0)})
    (inputs / "bad").mkdir()
    shutil.copy(MESHES / "empty.stl", inputs / "bad")
    cli = _cli()
    common = ["--input_dir", str(inputs), "--image_size", "32", "--num_samples", "64", "--workers", "1",
              "--no_progress", "--num_shards", "1", "--shard_index", "0"]
    assert cli.main([*common, "--output_dir", str(tmp_path / "p0")]) == 1
    assert cli.main(["--merge", str(tmp_path / "p0"), "--output_dir", str(tmp_path / "m"), "--no_progress"]) == 1
    out = capsys.readouterr().out
    assert "skipped by" in out and "bad: " in out and "rerun that shard" in out
