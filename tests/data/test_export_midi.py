"""--export_midi: upstream MIDI's 3D-Front layout, read back identically by this project's reader (and,
where upstream's source is at hand, by upstream's own MultiObjectDataset in a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from midi.data import export_midi as export_module
from midi.data import layout
from midi.data.check import check_dataset
from midi.data.dataset import load_scene_sample, open_dataset
from midi.data.export_midi import export_midi
from midi.data.jobs import PrepareOptions
from midi.data.prepare import prepare_dataset
from midi.data.surface_io import load_surface, save_surface
from midi.errors import DataError, UsageError
from tests.data.helpers import front3d_from_prepared, synthetic

ROOT = Path(__file__).resolve().parents[2]
POINTS = 256
UPSTREAM_GIT = Path(os.environ.get("MIDI_UPSTREAM_GIT", "/work/.mirror/VAST-AI-Research+MIDI-3D/repo"))


def _cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", ROOT / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export") / "scenes"
    synthetic(root, 6, seed=2, image_size=32, num_samples=POINTS, views=2, val_fraction=0.25, test_fraction=0.25)
    return root


@pytest.fixture(scope="module")
def exported(prepared) -> Path:
    out = prepared.parent / "midi"
    assert _cli().main(["--export_midi", str(prepared), "--output_dir", str(out), "--num_samples", str(POINTS),
                        "--workers", "2"]) == 0
    return out


def test_export_writes_upstream_names_and_formats(prepared, exported):
    rooms = json.loads((exported / "midi_room_ids.json").read_text())
    furniture = json.loads((exported / "midi_furniture_ids.json").read_text())
    manifest = json.loads((prepared / layout.MANIFEST).read_text())
    by_id = {s["id"]: s for s in manifest["scenes"]}
    # Rooms listed split by split, so upstream's index slices select our splits.
    assert rooms == [f"scenes/{sid}" for split in ("train", "val", "test") for sid in manifest["splits"][split]]
    assert furniture == [by_id[room.split("/")[1]]["objects"] for room in rooms]
    room, names = rooms[0], furniture[0]
    render = exported / "3D-FRONT-RENDER" / room
    assert sorted(p.name for p in render.iterdir()) == ["render_0000.webp", "render_0001.webp",
                                                        "semantic_0000.png", "semantic_0001.png"]
    with Image.open(render / "render_0000.webp") as webp, Image.open(render / "semantic_0000.png") as ids:
        assert webp.format == "WEBP" and webp.mode == "RGB" and ids.mode == "L"
        views = prepared / "scenes" / room.split("/")[1] / "views"
        np.testing.assert_array_equal(np.asarray(webp), np.asarray(Image.open(views / "view_00.png")))
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(Image.open(views / "view_00_ids.png")))
    # Upstream's reading: np.load(allow_pickle=True).tolist() -> the dict of (P, 3) float32 arrays.
    data = np.load(exported / "3D-FRONT-SURFACE" / room / f"{names[0]}.npy", allow_pickle=True).tolist()
    assert data["surface_points"].shape == (POINTS, 3) and data["surface_normals"].dtype == np.float32
    record = json.loads((exported / layout.EXPORT_JSON).read_text())
    n_train, n_val = len(manifest["splits"]["train"]), len(manifest["splits"]["val"])
    assert record["splits"] == {"train": [0, n_train], "val": [n_train, n_train + n_val],
                                "test": [n_train + n_val, len(rooms)]}
    config = yaml.safe_load((exported / layout.EXPORT_CONFIG).read_text())["data"]
    assert config["num_surface_samples_per_object"] == POINTS and config["image_names"] == ["0000", "0001"]
    assert config["train_indices"] == record["splits"]["train"] and config["height"] == 32
    assert Path(config["scene_list"]) == (exported / "midi_room_ids.json").resolve()
    assert not check_dataset(exported, min_points=POINTS, write=False).errors


@pytest.mark.parametrize("split", ["train", "val", "test", "all"])
def test_export_reads_back_with_identical_tensors(prepared, exported, split):
    ours = {r.scene_id: r for r in open_dataset(prepared, split)}
    back = open_dataset(exported, split)
    assert sorted(r.scene_id for r in back) == sorted(f"scenes-{sid}" for sid in ours) and back
    for record in back:
        original = ours[record.scene_id.removeprefix("scenes-")]
        assert record.object_names == original.object_names and len(record.views) == len(original.views) == 2
        for view in range(2):
            a, b = (load_scene_sample(r, view, POINTS, np.random.default_rng(7), image_size=None)
                    for r in (original, record))
            for key in ("surfaces", "instance_images", "masks", "scene_image"):
                np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=f"{record.scene_id} {key}")
            assert a.object_names == b.object_names


def test_front3d_rooms_keep_their_paths(tmp_path):
    synthetic(tmp_path / "syn", 2, seed=4, image_size=32, num_samples=POINTS)
    rooms = front3d_from_prepared(tmp_path / "syn", tmp_path / "front")
    prepare_dataset(tmp_path / "front", tmp_path / "prepared", PrepareOptions(num_samples=POINTS, image_size=32))
    export_midi(tmp_path / "prepared", tmp_path / "out", min_points=POINTS)
    exported = dict(zip(json.loads((tmp_path / "out" / "midi_room_ids.json").read_text()),
                        json.loads((tmp_path / "out" / "midi_furniture_ids.json").read_text())))
    assert exported == dict(rooms)  # the same <house>/<room> folders and object names as the source
    for room, names in rooms:
        src, _ = load_surface(tmp_path / "front" / "3D-FRONT-SURFACE" / room / f"{names[0]}.npy")
        out, _ = load_surface(tmp_path / "out" / "3D-FRONT-SURFACE" / room / f"{names[0]}.npy")
        np.testing.assert_array_equal(out, src)


def test_too_few_points_is_refused_with_the_fix(prepared, tmp_path, capsys):
    assert _cli().main(["--export_midi", str(prepared), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"surfaces hold {POINTS} points" in err and "--num_samples 20480" in err
    assert f"export with --num_samples {POINTS}" in err and not (tmp_path / "o").exists()


def test_a_room_with_too_few_points_is_skipped(prepared, tmp_path):
    copy = tmp_path / "scenes"
    shutil.copytree(prepared, copy)
    first = json.loads((copy / layout.MANIFEST).read_text())["scenes"][0]
    surface = copy / "scenes" / first["id"] / "surfaces" / f"{first['objects'][0]}.npy"
    points, normals = load_surface(surface)
    save_surface(surface, points[:100], normals[:100])
    report = export_midi(copy, tmp_path / "out", min_points=POINTS)
    assert [s["scene"] for s in report.skipped] == [first["id"]] and "100 surface points < 256" in report.skipped[0][
        "reason"]
    rooms = json.loads((tmp_path / "out" / "midi_room_ids.json").read_text())
    assert f"scenes/{first['id']}" not in rooms and len(rooms) == 5
    assert len(open_dataset(tmp_path / "out", "all")) == 5  # the recorded splits match the shorter list
    assert not (tmp_path / "out" / "3D-FRONT-SURFACE" / "scenes" / first["id"]).exists()


def test_interrupted_export_is_no_root_and_a_rerun_completes(prepared, exported, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = export_module.save_surface, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "save_surface", dying)
    with pytest.raises(KeyboardInterrupt):
        export_midi(prepared, out, min_points=POINTS)
    assert layout.detect_layout(out) is None  # no room list: never taken for a 3D-Front root
    leftovers = [p for p in out.rglob("*") if layout.is_tmp_name(p.name)]
    assert leftovers == []
    monkeypatch.setattr(export_module, "save_surface", real)
    export_midi(prepared, out, min_points=POINTS)
    for name in ("midi_room_ids.json", "midi_furniture_ids.json"):
        assert (out / name).read_bytes() == (exported / name).read_bytes()


def test_foreign_output_and_edited_lists_are_refused(prepared, exported, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an export"):
        export_midi(prepared, tmp_path / "busy", min_points=POINTS)
    with pytest.raises(UsageError, match="not a prepared dataset"):
        export_midi(exported, tmp_path / "again", min_points=POINTS)
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    for name, extra in (("midi_room_ids.json", "scenes/extra"), ("midi_furniture_ids.json", ["x"])):
        (edited / name).write_text(json.dumps(json.loads((edited / name).read_text()) + [extra]))
    with pytest.raises(DataError, match="midi_export.json: its splits cover rooms 0..6 but the room list has 7"):
        open_dataset(edited, "train")


# Upstream's MultiObjectDataset, run on the export: its own source (read from the mirror at test
# time, never copied here), with stubs for what the data module imports but this path never uses
# (cv2, pytorch_lightning, its config/typing helpers), subsampling replaced by "the first P rows"
# and random view picks by "the first", so its tensors can be compared exactly.
UPSTREAM_RUNNER = r'''
import json, random, sys, types, typing
import numpy as np

source, export_json, out = sys.argv[1:4]
for name in ("cv2", "pytorch_lightning"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["pytorch_lightning"].LightningDataModule = object
for name in ("up", "up.data", "up.utils"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = []
sys.modules["up.utils.config"] = types.ModuleType("up.utils.config")
sys.modules["up.utils.config"].parse_structured = lambda cls, cfg: cls(**cfg)
typing_stub = sys.modules["up.utils.typing"] = types.ModuleType("up.utils.typing")
for name in ("Any", "Dict", "List", "Optional", "Tuple", "Union"):
    setattr(typing_stub, name, getattr(typing, name))
typing_stub.DictConfig = dict
module = types.ModuleType("up.data.multi_object")
module.__package__ = "up.data"
exec(compile(open(source).read(), "multi_object.py", "exec"), module.__dict__)


class FirstRows:
    def choice(self, n, size, replace=True):
        return np.arange(size)


np.random.default_rng = lambda *args, **kwargs: FirstRows()
random.choice = lambda options: options[0]
config = json.load(open(export_json))["upstream_data_config"]
config.update(padding=False, num_instances_per_batch=None, max_num_instances=None)
cfg = module.MultiObjectDataModuleConfig(**config)
arrays = {}
for split in ("train", "val", "test"):
    dataset = module.MultiObjectDataset(cfg, split)
    for index in range(len(dataset)):
        sample = dataset._getitem_scene(index)  # not __getitem__: it hides errors behind a random redraw
        for key in ("surface", "rgb", "mask", "rgb_scene"):
            arrays[f"{split}|{sample['id']}|{key}"] = sample[key].numpy()
np.savez(out, **arrays)
'''


def test_upstream_loader_reads_the_export(prepared, exported, tmp_path):
    source = tmp_path / "multi_object.py"
    shown = subprocess.run(["git", f"--git-dir={UPSTREAM_GIT}", "show", "HEAD:midi/data/multi_object.py"],
                           capture_output=True)
    if shown.returncode != 0:
        pytest.skip(f"upstream MIDI-3D's source is not at {UPSTREAM_GIT} (set MIDI_UPSTREAM_GIT)")
    source.write_bytes(shown.stdout)
    (tmp_path / "runner.py").write_text(UPSTREAM_RUNNER)
    result = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(source),
                             str(exported / layout.EXPORT_JSON), str(tmp_path / "upstream.npz")],
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    upstream = np.load(tmp_path / "upstream.npz")
    seen = 0
    for split in ("train", "val", "test"):
        for record in open_dataset(prepared, split):
            key = f"{split}|scenes-{record.scene_id}|"
            sample = load_scene_sample(record, 0, POINTS, np.random.default_rng(0), image_size=None)
            stored = np.stack([np.concatenate(load_surface(record.surface_paths[k]), axis=1)
                               for k in sample.object_indices])
            np.testing.assert_array_equal(upstream[key + "surface"], stored)
            np.testing.assert_array_equal(upstream[key + "rgb"], sample.instance_images.transpose(0, 3, 1, 2))
            np.testing.assert_array_equal(upstream[key + "mask"][:, 0], sample.masks)
            np.testing.assert_array_equal(upstream[key + "rgb_scene"][0], sample.scene_image.transpose(2, 0, 1))
            seen += 1
    assert seen == 6 and len(upstream.files) == 4 * 6
