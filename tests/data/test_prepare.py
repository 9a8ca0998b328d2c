"""The prepare pipeline: inputs and bad inputs, joint normalisation, resume, atomicity, workers, CLI."""

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
from PIL import Image

from midi.data import prepare as prepare_module
from midi.data.dataset import open_dataset
from midi.data.images import pad_to_square, read_label_map, resize_labels
from midi.data.jobs import PrepareOptions
from midi.data.meshes import load_object
from midi.data.prepare import prepare_dataset, run_jobs
from midi.data.surface_io import load_surface
from midi.data.synthetic import synthetic_jobs
from tests.data.helpers import MESHES, SCENES, box_at, front3d_from_prepared, synthetic, write_boxes

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = PrepareOptions(num_samples=512, image_size=48)
LAYOUT = {"box_a": (0.0, 0.5, 0.0), "box_b": (6.0, 0.5, 0.0), "box_c": (0.0, 0.5, 3.0)}


def _make_inputs(root: Path) -> Path:
    """Good and bad scenes side by side (reasons asserted in test_bad_scenes_are_skipped)."""
    write_boxes(root / "layout", LAYOUT)
    shutil.copy(MESHES / "nested.glb", root / "nested.glb")
    shutil.copy(MESHES / "two_objects.obj", root / "two_objects.obj")
    write_boxes(root / "bad_empty", {"box": (0, 0, 0)})
    shutil.copy(MESHES / "empty.stl", root / "bad_empty")
    write_boxes(root / "bad_points", {"box": (0, 0, 0)})
    shutil.copy(MESHES / "points_ascii.ply", root / "bad_points")
    write_boxes(root / "with_images", {"a": (0, 0, 0), "b": (2, 0, 0), "c": (4, 0, 0)}, ".stl")
    for name in ("kitchen_rgb.png", "kitchen_seg.png"):
        shutil.copy(SCENES / name, root / "with_images" / name)
    shutil.copytree(root / "with_images", root / "bad_count")
    write_boxes(root / "bad_count", {"d": (6, 0, 0)}, ".stl")
    shutil.copytree(root / "with_images", root / "bad_image")
    data = (SCENES / "kitchen_rgb.png").read_bytes()
    (root / "bad_image" / "kitchen_rgb.png").write_bytes(data[: len(data) // 3])
    return root


SKIP_REASONS = {
    "bad_empty": "empty.stl: no geometry in file (empty mesh)",
    "bad_points": "points_ascii.ply: points only, no faces",
    "bad_count": "kitchen_seg.png: labels [1, 2, 3] but the scene has 4 meshes; in no id map: d",
    "bad_image": "cannot read image",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("prepare")
    inputs = _make_inputs(base / "in")
    report = prepare_dataset(inputs, base / "out", OPTIONS, workers=1)
    return inputs, base / "out", report


def test_good_scenes_written_and_bad_ones_skipped(prepared):
    _, out, report = prepared
    assert sorted(report.written) == ["layout", "nested", "two_objects", "with_images"]
    reasons = {s["scene"]: s["reason"] for s in report.skipped}
    assert set(reasons) == set(SKIP_REASONS)
    for scene, reason in SKIP_REASONS.items():
        assert reason in reasons[scene] and "\n" not in reasons[scene]
        assert not (out / "scenes" / scene).exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    saved = json.loads((out / "prepare_report.json").read_text())
    assert {s["scene"] for s in saved["skipped"]} == set(SKIP_REASONS)


def test_manifest_lists_scenes_and_splits(prepared):
    _, out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "midi-scenes" and manifest["version"] == 1
    ids = sorted(s["id"] for s in manifest["scenes"])
    assert ids == ["layout", "nested", "two_objects", "with_images"]
    splits = manifest["splits"]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids
    assert len(splits["val"]) >= 1
    nested = next(s for s in manifest["scenes"] if s["id"] == "nested")
    assert nested["objects"] == ["block01", "block02", "block03"]


def test_joint_normalisation_keeps_relative_layout(prepared):
    _, out, _ = prepared
    scene = out / "scenes" / "layout"
    record = json.loads((scene / "scene.json").read_text())
    norm = record["normalization"]
    got = {}
    for name in LAYOUT:
        points, normals = load_surface(scene / "surfaces" / f"{name}.npy")
        assert np.abs(points).max() <= 0.95 + 1e-5
        np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
        got[name] = (points.min(0) + points.max(0)) / 2
    original = {k: np.asarray(v) for k, v in LAYOUT.items()}
    for name, centre in original.items():
        expected = (centre - np.asarray(norm["center"])) * norm["scale"]
        np.testing.assert_allclose(got[name], expected, atol=2e-3)
    ratio = lambda c: np.linalg.norm(c["box_a"] - c["box_b"]) / np.linalg.norm(c["box_a"] - c["box_c"])  # noqa: E731
    assert ratio(got) == pytest.approx(ratio(original), rel=1e-3)


def test_user_views_are_resized_nearest(prepared):
    _, out, _ = prepared
    labels = read_label_map(out / "scenes" / "with_images" / "views" / "view_00_ids.png")
    source = read_label_map(SCENES / "kitchen_seg.png")
    np.testing.assert_array_equal(labels, resize_labels(pad_to_square(source, 0), 48))
    record = json.loads((out / "scenes" / "with_images" / "scene.json").read_text())
    assert record["views"][0]["rendered"] is False and record["objects"][0]["source"] == "a.stl"


def test_invisible_instance_is_dropped_with_reason(prepared):
    _, out, _ = prepared
    record = json.loads((out / "scenes" / "two_objects" / "scene.json").read_text())
    assert [o["name"] for o in record["objects"]] == ["cube"]
    assert record["dropped"][0]["name"] == "tetra" and "not visible" in record["dropped"][0]["reason"]
    labels = read_label_map(out / "scenes" / "two_objects" / "views" / "view_00_ids.png")
    assert set(np.unique(labels)) == {0, 1}


def test_resume_skips_finished_scenes(tmp_path):
    synthetic(tmp_path, 3, seed=1, image_size=32, num_samples=128)
    scene = tmp_path / "scenes" / "synthetic_00001"
    marker = scene / "marker.txt"
    marker.write_text("untouched")
    mtime = (scene / "scene.json").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "scenes" / "synthetic_00002")
    stale = tmp_path / "scenes" / "synthetic_00009.tmp-123"
    stale.mkdir()
    (stale / "half.npy").write_bytes(b"half")
    report = synthetic(tmp_path, 3, seed=1, image_size=32, num_samples=128)
    assert report.written == ["synthetic_00002"]
    assert sorted(report.already_done) == ["synthetic_00000", "synthetic_00001"]
    assert marker.read_text() == "untouched" and (scene / "scene.json").stat().st_mtime_ns == mtime
    assert not stale.exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["id"] for s in manifest["scenes"]] == ["synthetic_00000", "synthetic_00001", "synthetic_00002"]


def test_resume_refuses_other_settings(tmp_path):
    synthetic(tmp_path, 1, image_size=32, num_samples=128)
    from midi.errors import UsageError

    with pytest.raises(UsageError, match="num_surface_points=128"):
        synthetic(tmp_path, 1, image_size=32, num_samples=256)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = prepare_module.save_png

    def failing_save_png(path, image):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        real(path, image)

    monkeypatch.setattr(prepare_module, "save_png", failing_save_png)
    with pytest.raises(KeyboardInterrupt):
        synthetic(tmp_path, 1, image_size=32, num_samples=128)
    assert not any((tmp_path / "scenes").iterdir())


def test_two_workers_match_one(tmp_path):
    opts = PrepareOptions(num_samples=256, image_size=32)
    one = run_jobs(tmp_path / "one", synthetic_jobs(4, 2), opts, workers=1)
    two = run_jobs(tmp_path / "two", synthetic_jobs(4, 2), opts, workers=2)
    assert sorted(one.written) == sorted(two.written) and len(two.written) == 4
    for path in (tmp_path / "one" / "scenes").rglob("*.npy"):
        twin = tmp_path / "two" / path.relative_to(tmp_path / "one")
        assert path.read_bytes() == twin.read_bytes()


def test_strict_stops_at_first_failure(tmp_path):
    inputs = tmp_path / "in"
    write_boxes(inputs / "a_bad", {"box": (0, 0, 0)})
    shutil.copy(MESHES / "points_ascii.ply", inputs / "a_bad")
    write_boxes(inputs / "b_good", {"box": (0, 0, 0)})
    report = prepare_dataset(inputs, tmp_path / "out", OPTIONS, workers=1, strict=True)
    assert report.aborted and report.written == [] and len(report.skipped) == 1


def test_single_object_mode_normalises_alone(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(MESHES / "nested.glb", inputs)
    shutil.copy(MESHES / "teapot.stl", inputs)
    report = prepare_dataset(inputs, tmp_path / "out", OPTIONS, workers=1)
    assert len(report.written) == 2
    report = prepare_dataset(inputs, tmp_path / "single", PrepareOptions(512, 48, single_object=True))
    for sid, file in (("nested", "nested.glb"), ("teapot", "teapot.stl")):
        record = json.loads((tmp_path / "single" / "scenes" / sid / "scene.json").read_text())
        assert len(record["objects"]) == 1
        points, _ = load_surface(tmp_path / "single" / "scenes" / sid / record["objects"][0]["surface"])
        assert np.abs(points).max() <= 0.95 + 1e-5
        vertices = load_object(MESHES / file).mesh.vertices
        norm = record["normalization"]
        moved = (vertices - np.asarray(norm["center"])) * norm["scale"]
        assert np.abs(moved).max() == pytest.approx(0.95)  # the object alone fills [-0.95, 0.95]


def test_converts_front3d_layout(tmp_path):
    synthetic(tmp_path / "syn", 2, seed=4, image_size=32, num_samples=256)
    rooms = front3d_from_prepared(tmp_path / "syn", tmp_path / "front")
    report = prepare_dataset(
        tmp_path / "front", tmp_path / "out", PrepareOptions(num_samples=256, image_size=32)
    )
    assert sorted(report.written) == ["house00-room00", "house01-room01"]
    records = {r.scene_id: r for r in open_dataset(tmp_path / "out")}
    assert list(records["house00-room00"].object_names) == rooms[0][1]
    src = read_label_map(tmp_path / "front" / "3D-FRONT-RENDER" / rooms[0][0] / "semantic_0000.png")
    np.testing.assert_array_equal(read_label_map(records["house00-room00"].views[0][1]), src)
    too_many = prepare_dataset(
        tmp_path / "front", tmp_path / "out2", PrepareOptions(num_samples=999, image_size=32)
    )
    assert len(too_many.skipped) == 2 and "256 points < --num_samples 999" in too_many.skipped[0]["reason"]


def _cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", ROOT / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exit_codes(tmp_path, capsys):
    cli = _cli()
    inputs = tmp_path / "in"
    write_boxes(inputs / "good", {"a": (0, 0, 0), "b": (2, 0, 0)})
    common = ["--image_size", "32", "--num_samples", "128", "--workers", "1", "--no_progress"]
    assert cli.main(["--input_dir", str(inputs), "--output_dir", str(tmp_path / "o1"), *common]) == 0
    write_boxes(inputs / "bad", {"a": (0, 0, 0)})
    shutil.copy(MESHES / "empty.stl", inputs / "bad")
    assert cli.main(["--input_dir", str(inputs), "--output_dir", str(tmp_path / "o1"), *common]) == 1
    out = capsys.readouterr().out
    assert "skipped bad: empty.stl: no geometry in file (empty mesh)" in out and "1 already done" in out
    assert (
        cli.main(["--input_dir", str(inputs), "--output_dir", str(tmp_path / "o2"), "--strict", *common]) == 2
    )
    assert cli.main(["--input_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o3")]) == 2


def test_cli_runs_as_a_script(tmp_path):
    out = tmp_path / "syn"
    cmd = [sys.executable, str(ROOT / "prepare_data.py"), "--synthetic", "2", "--output_dir", str(out),
           "--image_size", "32", "--num_samples", "128", "--workers", "2", "--no_progress"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr
    assert "prepared 2 scene(s)" in result.stdout
    check = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--check", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (out / "contact_sheet.png").is_file() and (out / "check_report.json").is_file()


def test_instances_json_sets_the_id_order(tmp_path):
    scene = tmp_path / "in" / "mapped"
    write_boxes(scene, {"a": (0, 0, 0), "b": (3, 0, 0)}, ".stl")
    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 2:8], labels[5:10, 20:28] = 1, 2
    Image.fromarray(labels).save(scene / "photo_ids.png")
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(scene / "photo.png")
    (scene / "instances.json").write_text(json.dumps({"1": "b.stl", "2": "a.stl"}))
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", OPTIONS)
    assert report.written == ["mapped"]
    record = json.loads((tmp_path / "out" / "scenes" / "mapped" / "scene.json").read_text())
    assert [o["name"] for o in record["objects"]] == ["b", "a"]
    (scene / "instances.json").write_text(json.dumps(["b.stl"]))
    report = prepare_dataset(tmp_path / "in", tmp_path / "out2", OPTIONS)
    assert "mesh files without an id: ['a.stl']" in report.skipped[0]["reason"]


def test_npz_surfaces_and_output_inside_input(tmp_path):
    write_boxes(tmp_path / "scene", {"a": (0, 0, 0), "b": (3, 0, 0)})
    options = PrepareOptions(num_samples=128, image_size=32, surface_format="npz")
    first = prepare_dataset(tmp_path, tmp_path / "prepared", options)
    again = prepare_dataset(tmp_path, tmp_path / "prepared", options)
    assert first.written == ["scene"] and again.already_done == ["scene"] and not again.skipped
    record = open_dataset(tmp_path / "prepared")[0]
    assert [p.suffix for p in record.surface_paths] == [".npz", ".npz"]
    assert load_surface(record.surface_paths[0])[0].shape == (128, 3)


def _boxes_inputs(root: Path, names) -> Path:
    for k, name in enumerate(names):
        write_boxes(root / name, {"a": (0, 0, 0), "b": (2 + k, 0, 0)})
    return root


def test_resume_refuses_other_background_margin_views_seed(tmp_path):
    from dataclasses import replace

    from midi.errors import UsageError

    inputs = _boxes_inputs(tmp_path / "in", ["s0"])
    prepare_dataset(inputs, tmp_path / "out", OPTIONS)
    for change, key in (
        ({"background": (0.0, 0.0, 0.0)}, "background"),
        ({"bound": 0.8}, "bound"),
        ({"views": 2}, "views"),
        ({"seed": 5}, "seed"),
    ):
        with pytest.raises(UsageError, match=key):
            prepare_dataset(inputs, tmp_path / "out", replace(OPTIONS, **change))
    # Without a manifest the finished scenes' records are compared.
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(UsageError, match="bound"):
        prepare_dataset(inputs, tmp_path / "out", replace(OPTIONS, bound=0.8))
    prepare_dataset(inputs, tmp_path / "out", OPTIONS)  # same settings: fine


def test_corrupt_manifest_on_resume_is_a_one_line_error(tmp_path):
    from midi.errors import DataError

    inputs = _boxes_inputs(tmp_path / "in", ["s0"])
    prepare_dataset(inputs, tmp_path / "out", OPTIONS)
    (tmp_path / "out" / "manifest.json").write_text('{"scenes": [')
    with pytest.raises(DataError, match="manifest.json: corrupt manifest"):
        prepare_dataset(inputs, tmp_path / "out", OPTIONS)


def test_adding_scenes_keeps_earlier_splits(tmp_path):
    from dataclasses import replace

    options = replace(OPTIONS, val_fraction=0.3)
    inputs = _boxes_inputs(tmp_path / "in", [f"s{k}" for k in range(4)])
    prepare_dataset(inputs, tmp_path / "out", options)
    before = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]
    # Whatever the hashes of the new ids, no earlier scene may change split.
    _boxes_inputs(inputs, [f"s{k}" for k in range(4, 12)])
    prepare_dataset(inputs, tmp_path / "out", options)
    after = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]
    for split, ids in before.items():
        assert set(ids) <= set(after[split]), (split, before, after)
    assert sum(map(len, after.values())) == 12


def test_assign_splits_keeps_existing_and_forces_val_among_new_only():
    from midi.data.layout import assign_splits

    ids = ["a", "b", "c"]
    existing = {"train": ["a"], "val": [], "test": []}
    splits = assign_splits(ids, val_fraction=1e-9, existing=existing)
    assert "a" in splits["train"] and len(splits["val"]) == 1 and splits["val"][0] in ("b", "c")
    # Only old scenes, all train: nothing is moved to val.
    assert assign_splits(["a", "b"], 1e-9, existing={"train": ["a", "b"]})["train"] == ["a", "b"]


def _die_on_bad(real):
    def build(job, options):
        if job.scene_id == "bad":
            os._exit(9)  # like the OOM killer: the worker vanishes
        return real(job, options)

    return build


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork to patch the workers")
def test_dead_worker_skips_in_flight_scenes_and_continues(tmp_path, monkeypatch):
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=False) != "fork":
        pytest.skip("needs the fork start method")
    from midi.data import sources

    monkeypatch.setattr(sources, "build_content", _die_on_bad(sources.build_content))
    inputs = _boxes_inputs(tmp_path / "in", ["bad", *[f"s{k}" for k in range(5)]])
    report = prepare_dataset(inputs, tmp_path / "out", OPTIONS, workers=2)
    reasons = {s["scene"]: s["reason"] for s in report.skipped}
    assert reasons.get("bad") == prepare_module.WORKER_DIED
    assert set(reasons.values()) == {prepare_module.WORKER_DIED}
    assert set(report.written) | set(reasons) == {"bad", *[f"s{k}" for k in range(5)]}
    assert report.written  # the run went on after the worker died


def test_full_disk_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "x.npy"))

    monkeypatch.setattr(prepare_module, "save_surface", full)
    inputs = _boxes_inputs(tmp_path / "in", ["s0", "s1"])
    with pytest.raises(OSError):
        prepare_dataset(inputs, tmp_path / "out", OPTIONS)
    cli = _cli()
    args = [
        "--input_dir",
        str(inputs),
        "--output_dir",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--no_progress",
    ]
    assert cli.main([*args, "--image_size", "48", "--num_samples", "512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'out' / 'x.npy'}: {os.strerror(errno.ENOSPC)}"]


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    from midi.data import atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    assert synced and json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_textures_next_to_meshes_are_not_scene_images(tmp_path):
    import trimesh

    scene = tmp_path / "in" / "textured"
    scene.mkdir(parents=True)
    box = box_at((0, 0, 0))
    texture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    box.visual = trimesh.visual.TextureVisuals(uv=box.vertices[:, :2] + 0.5, image=texture)
    box.export(scene / "crate.obj")  # trimesh's exporter writes crate.obj, material.mtl, material_0.png
    box_at((2, 0, 0)).export(scene / "plain.obj")
    (scene / "textures").mkdir()
    texture.save(scene / "textures" / "wood.png")
    (scene / "extra.mtl").write_text("newmtl wood\nmap_Kd albedo.jpg\n")
    texture.save(scene / "albedo.jpg")
    assert (scene / "material_0.png").is_file() and (scene / "material.mtl").is_file()
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", OPTIONS, workers=1)
    assert report.written == ["textured"], report.skipped
    record = json.loads((tmp_path / "out" / "scenes" / "textured" / "scene.json").read_text())
    assert [v["rendered"] for v in record["views"]] == [True]
    assert [o["name"] for o in record["objects"]] == ["crate", "plain"]


NAN_OBJ = """v 3 0 0\nv 4 0 0\nv 3 1 0\nv 3 0 1\nv nan 0 0
f 1 2 3\nf 1 2 4\nf 1 3 5\nf 2 5 4\n"""


def test_dropped_objects_and_nan_faces_are_warnings(tmp_path):
    from midi.data.check import check_dataset

    scene = tmp_path / "in" / "hidden"
    write_boxes(scene, {"outer": (0, 0, 0)})
    box_at((0, 0, 0), (0.2, 0.2, 0.2)).export(scene / "inner.obj")  # inside outer: never visible
    (scene / "broken.obj").write_text(NAN_OBJ)
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", OPTIONS, workers=1)
    assert report.written == ["hidden"]
    details = {w["object"]: w["detail"] for w in report.warnings}
    assert "not visible" in details["inner"] and "2 face(s) with NaN/inf" in details["broken"]
    summary = report.summary()
    assert "2 warning(s)" in summary and "hidden/inner" in summary and "hidden/broken" in summary
    record = json.loads((tmp_path / "out" / "scenes" / "hidden" / "scene.json").read_text())
    assert next(o for o in record["objects"] if o["name"] == "broken")["num_faces"] == 2
    check = check_dataset(tmp_path / "out", write=False)
    kinds = {(p.kind, p.severity) for p in check.problems}
    assert kinds == {("dropped_object", "warning"), ("repaired_mesh", "warning")}
    warned = " ".join(p.detail for p in check.warnings)
    assert "inner" in warned and "broken" in warned
    assert " 0 clean" in check.summary()


def test_instances_json_names_must_stay_in_the_folder(tmp_path):
    write_boxes(tmp_path / "in" / "scene", {"a": (0, 0, 0)})
    write_boxes(tmp_path, {"secret": (1, 0, 0)})
    (tmp_path / "in" / "scene" / "instances.json").write_text(json.dumps(["a.obj", "../../secret.obj"]))
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", OPTIONS, workers=1)
    reason = report.skipped[0]["reason"]
    assert "instances.json" in reason and "'../../secret.obj' leaves" in reason


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    import signal
    import time

    import psutil

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "prepare_data.py"), "--synthetic", "40", "--output_dir", str(out),
           "--workers", "2", "--image_size", "64", "--num_samples", "256", "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            time.sleep(0.05)
        assert len(workers) >= 2, "the pool never started"
        assert (out / ".prepare.lock").read_text().split()[0] == str(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(workers) == []
    finally:
        for pid in _alive(workers):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    # The dead run's lock is stale: a rerun takes it over, finishes and removes it.
    report = run_jobs(out, synthetic_jobs(3), PrepareOptions(num_samples=256, image_size=64))
    assert len(report.written) + len(report.already_done) == 3 and not (out / ".prepare.lock").exists()


def test_live_lock_refuses_a_second_run(tmp_path):
    from midi.errors import UsageError

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "30"])
    try:
        (out / ".prepare.lock").write_text(f"{holder.pid}\n")
        with pytest.raises(UsageError, match=rf"pid {holder.pid}"):
            run_jobs(out, synthetic_jobs(1), OPTIONS)
        assert not (out / "scenes").exists() or not any((out / "scenes").iterdir())
        assert (out / ".prepare.lock").read_text().strip() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
