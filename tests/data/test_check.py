"""--check finds planted defects and writes the report and the contact sheet."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from midi.data.check import check_dataset
from midi.data.contact_sheet import HEADER, MAX_INSTANCE_TILES, TILE
from midi.data.images import read_label_map
from midi.data.surface_io import load_surface
from tests.data.helpers import front3d_from_prepared, synthetic

ROOT = Path(__file__).resolve().parents[2]


def _scene(root: Path, index: int) -> Path:
    return root / "scenes" / f"synthetic_{index:05d}"


def _edit_surface(scene: Path, edit) -> None:
    path = sorted((scene / "surfaces").glob("*.npy"))[0]
    points, normals = load_surface(path)
    points, normals = edit(points.copy(), normals.copy())
    np.save(path, {"surface_points": points, "surface_normals": normals}, allow_pickle=True)


def _edit_ids(scene: Path, edit) -> None:
    path = scene / "views" / "view_00_ids.png"
    labels = edit(read_label_map(path))
    Image.fromarray(labels.astype(np.uint8)).save(path)


def _nan(p, n):
    p[3] = np.nan
    return p, n


def _outside(p, n):
    return p * 1.5, n


def _long_normals(p, n):
    return p, n * 1.2


def _collapsed(p, n):
    return np.zeros_like(p), n


def _extra_label(labels):
    labels[:2, :2] = labels.max() + 1
    return labels


def _erase_first(labels):
    labels[labels == 1] = 0
    return labels


EXPECTED = {
    1: "nan",
    2: "out_of_bounds",
    3: "non_unit_normals",
    4: "no_area",
    5: "extra_label",
    6: "empty_mask",
}


@pytest.fixture(scope="module")
def defective(tmp_path_factory):
    root = tmp_path_factory.mktemp("check") / "ds"
    synthetic(root, 8, seed=3, image_size=48, num_samples=256)
    for index, edit in ((1, _nan), (2, _outside), (3, _long_normals), (4, _collapsed)):
        _edit_surface(_scene(root, index), edit)
    _edit_ids(_scene(root, 5), _extra_label)
    _edit_ids(_scene(root, 6), _erase_first)
    shutil.rmtree(_scene(root, 7))
    return root, check_dataset(root)


def test_clean_dataset_has_no_problems(tmp_path):
    synthetic(tmp_path, 2, seed=3, image_size=48, num_samples=256)
    report = check_dataset(tmp_path, write=False)
    assert report.problems == [] and len(report.scenes) == 2
    assert all(s.instances_per_view == [s.num_objects] for s in report.scenes)


def test_planted_defects_are_found(defective):
    _, report = defective
    by_scene = {s.scene_id: {p.kind for p in s.problems} for s in report.scenes}
    assert by_scene["synthetic_00000"] == set()
    for index, kind in EXPECTED.items():
        assert kind in by_scene[f"synthetic_{index:05d}"], (index, by_scene)
    assert "missing_object" in by_scene["synthetic_00006"]
    missing = [p for p in report.dataset_problems if p.kind == "missing_scene"]
    assert [p.scene for p in missing] == ["synthetic_00007"]
    extra = next(s for s in report.scenes if s.scene_id == "synthetic_00005")
    assert extra.instances_per_view[0] == extra.num_objects  # the extra label has no object behind it


def test_report_and_contact_sheet_written(defective):
    root, report = defective
    saved = json.loads((root / "check_report.json").read_text())
    assert saved["num_errors"] == len(report.errors) > 0
    assert {p["kind"] for p in saved["problems"]} >= set(EXPECTED.values())
    sheet = Image.open(root / "contact_sheet.png")
    rows = len(report.scenes)
    assert sheet.size == ((3 + MAX_INSTANCE_TILES) * TILE, rows * (TILE + HEADER))
    pixels = np.asarray(sheet.convert("RGB"))
    assert pixels.std() > 10  # not blank


def test_cli_check_exit_code(defective, tmp_path, capsys):
    root, _ = defective
    spec = importlib.util.spec_from_file_location("prepare_data_cli", ROOT / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--check", str(root), "--report_dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "out_of_bounds" in out and "error(s)" in out
    assert (tmp_path / "check_report.json").is_file() and (tmp_path / "contact_sheet.png").is_file()


def test_check_front3d_layout_in_place(tmp_path):
    synthetic(tmp_path / "syn", 2, seed=8, image_size=32, num_samples=256)
    rooms = front3d_from_prepared(tmp_path / "syn", tmp_path / "front")
    room, names = rooms[1]
    path = tmp_path / "front" / "3D-FRONT-SURFACE" / room / f"{names[0]}.npy"
    points, normals = load_surface(path)
    np.save(path, {"surface_points": points * 3, "surface_normals": normals}, allow_pickle=True)
    report = check_dataset(tmp_path / "front", min_points=256)
    assert report.layout == "3d-front"
    by_scene = {s.scene_id: {p.kind for p in s.problems} for s in report.scenes}
    assert by_scene == {"house00-room00": set(), "house01-room01": {"out_of_bounds"}}


def test_object_in_no_id_map_is_a_warning(defective):
    _, report = defective
    missing = [p for p in report.problems if p.kind == "missing_object"]
    assert missing and all(p.severity == "warning" for p in missing)


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_empty_dataset_or_empty_train_split_fails_the_check(tmp_path):
    synthetic(tmp_path / "a", 2, seed=3, image_size=32, num_samples=256)
    manifest = _manifest(tmp_path / "a")
    manifest["splits"] = {"train": [], "val": [s["id"] for s in manifest["scenes"]], "test": []}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    report = check_dataset(tmp_path / "a", write=False)
    assert [p.kind for p in report.errors] == ["empty_split"]
    manifest.update(scenes=[], splits={"train": [], "val": [], "test": []})
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    report = check_dataset(tmp_path / "a", write=False)
    assert "no_scenes" in {p.kind for p in report.errors}


def test_manifest_scene_without_id_is_a_one_line_error(tmp_path):
    from midi.data.dataset import open_dataset
    from midi.errors import DataError

    synthetic(tmp_path, 1, seed=3, image_size=32, num_samples=256)
    manifest = _manifest(tmp_path)
    del manifest["scenes"][0]["id"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json: scene entry 0 has no \"id\""):
        open_dataset(tmp_path)
    with pytest.raises(DataError, match="manifest.json"):
        check_dataset(tmp_path, write=False)
