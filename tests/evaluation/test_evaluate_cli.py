"""evaluate.py on a tiny synthetic set: the documented commands (base, LoRA, compare, gt vs gt),
resume, the refusal to mix settings, bad predictions and unusable arguments."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import trimesh
from PIL import Image

import evaluate
from midi.lora import export_lora, lora_config_dict
from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
FAST = ["--num_points", "256", "--no_progress"]
FAST_GENERATE = [
    "--pretrained_model_name_or_path",
    "tiny",
    "--num_inference_steps",
    "2",
    "--octree_depth",
    "4",
]


def documented_commands() -> list[list[str]]:
    """``python evaluate.py`` commands of TRAINING_README.md's section, then README.md's."""
    section = (REPO / "TRAINING_README.md").read_text().split("## Evaluate your LoRA", 1)[1]
    texts = [section, (REPO / "README.md").read_text()]
    return [
        shlex.split(line)[2:]
        for text in texts
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.startswith("python evaluate.py")
    ]


def localise(words: list[str], data_root: Path, root: Path, lora: Path) -> list[str]:
    """Points a documented command at the tiny data, a temporary folder and the tiny model/LoRA."""
    paths = {"data/midi-scenes": str(data_root), "outputs/midi-lora": str(lora)}
    words = [paths.get(w, str(root / w) if w.startswith("eval/") else w) for w in words]
    return words + FAST + (FAST_GENERATE if "--generate" in words else [])


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A tiny transformer LoRA with random (non-zero) B, so LoRA scenes differ from base scenes."""
    pipe = tiny_pipeline(0)
    torch.manual_seed(0)
    pipe.init_custom_adapter(
        set_self_attn_module_names=TINY_MI_BLOCKS,
        exact_module_names=True,
        transformer_lora_config=lora_config_dict(rank=4, alpha=4, init_lora_weights=False),
    )
    return export_lora(pipe, tmp_path_factory.mktemp("lora") / "lora-final", TINY_MI_BLOCKS)


@pytest.fixture(scope="module")
def runs(data_root, lora_dir, tmp_path_factory) -> Path:
    """Runs every documented command in order; returns the folder holding ``eval/``."""
    root = tmp_path_factory.mktemp("runs")
    for words in documented_commands():
        assert evaluate.main(localise(words, data_root, root, lora_dir)) == 0, words
    return root


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_documented_commands(runs, data_root):
    assert len(documented_commands()) == 5
    base, lora, sanity = (load(runs / "eval" / r / "metrics.json") for r in ("base", "lora", "sanity"))
    scenes = [s["scene_id"] for s in base["scenes"]]
    assert len(scenes) >= 2 and base["summary"]["failed"] == 0
    assert sorted(p.stem for p in (runs / "eval/base/predictions").glob("*.glb")) == sorted(scenes)
    for run in (base, lora):  # every key of the protocol is declared
        assert {"align", "tau", "points_per_instance", "sampling_seed", "cd", "fscore", "icp"} <= set(
            run["protocol"]
        )
        assert run["protocol"]["align"] == "icp" and "squared" in run["protocol"]["cd"]
        assert run["run"]["generation"]["model"] == "tiny" and run["run"]["toolkit"]["version"]
    assert (
        base["run"]["generation"]["lora"] is None and len(lora["run"]["generation"]["lora"]["sha256"]) == 64
    )
    assert base["scenes"][0]["metrics"] != lora["scenes"][0]["metrics"]  # the LoRA changed the scenes
    for entry in sanity["scenes"]:  # gt vs gt
        assert (
            entry["metrics"]["scene_fscore"] == pytest.approx(1, abs=1e-7)
            and entry["metrics"]["scene_cd"] < 1e-12
        )
        assert entry["metrics"]["object_cd"] < 1e-12 and entry["metrics"]["iou_bbox"] == pytest.approx(
            1, abs=1e-6
        )
    rows = list(csv.DictReader((runs / "eval/base/metrics.csv").open()))
    assert [r["scene_id"] for r in rows] == scenes and float(rows[0]["scene_fscore"]) == base["scenes"][0][
        "metrics"
    ]["scene_fscore"]
    assert (runs / "eval/base/comparison.png").is_file()
    comparison = load(runs / "eval/base-vs-lora/comparison.json")
    f = comparison["metrics"]["scene_fscore"]
    assert comparison["paired_scenes"] == len(scenes)
    assert f["mean_diff"] == pytest.approx(
        lora["summary"]["metrics"]["scene_fscore"]["mean"]
        - base["summary"]["metrics"]["scene_fscore"]["mean"]
    )
    assert (runs / "eval/base-vs-lora/differences.png").is_file()
    with Image.open(runs / "eval/base-vs-lora/comparison.png") as sheet:  # input | gt | A | B per scene
        assert sheet.width == 4 * 256 and sheet.height == min(4, len(scenes)) * (256 + 16)


def test_generate_resumes_and_refuses_other_settings(runs, data_root, capsys):
    out = runs / "eval" / "base"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "predictions").glob("*.glb")}
    args = ["--gt", str(data_root), "--generate", "--output_dir", str(out), *FAST, *FAST_GENERATE]
    assert evaluate.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing regenerated
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*args, "--seed", "1"])
    assert (
        exit_info.value.code == 2 and "generated with other settings (seed differ)" in capsys.readouterr().err
    )


def test_bad_predictions_are_listed_and_fail_the_run(runs, data_root, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(runs / "eval/base/predictions", pred)
    first, second = sorted(pred.glob("*.glb"))
    first.write_bytes(b"not a mesh")
    scene = trimesh.load(second, force="scene")
    scene.graph.transforms.remove_node("instance_1")  # instance 1 missing ...
    scene.add_geometry(
        trimesh.creation.box(extents=(0.1, 0.1, 0.1)), geom_name="stray", node_name="stray"
    )  # ... one extra
    scene.export(second)
    out = tmp_path / "out"
    assert (
        evaluate.main(
            ["--gt", str(data_root), "--split", "all", "--pred", str(pred), "--output_dir", str(out), *FAST]
        )
        == 1
    )
    err = capsys.readouterr().err
    report = load(out / "metrics.json")
    by_id = {s["scene_id"]: s for s in report["scenes"]}
    assert len(by_id) == report["summary"]["scenes"] > 2  # every scene of the split is listed
    assert (
        by_id[first.stem]["status"] == "failed" and "not a readable mesh file" in by_id[first.stem]["error"]
    )
    assert by_id[second.stem]["status"] == "ok" and by_id[second.stem]["instances"]["extra"] == ["stray"]
    missing_name = by_id[second.stem]["instances"]["missing"]
    assert len(missing_name) == 1 and f"{second.stem}: missing instances {missing_name[0]}" in err
    absent = [s for s in report["scenes"] if s["scene_id"] not in (first.stem, second.stem)]
    assert all(s["status"] == "failed" and "scene missing from the predictions" in s["error"] for s in absent)
    assert report["summary"]["failed"] == len(absent) + 1 and f"error: {first.stem}: failed:" in err


def test_compare_refuses_other_protocols(runs, data_root, tmp_path, capsys):
    other = tmp_path / "none"
    assert (
        evaluate.main(
            [
                "--gt",
                str(data_root),
                "--pred",
                str(data_root),
                "--align",
                "none",
                "--output_dir",
                str(other),
                *FAST,
            ]
        )
        == 0
    )
    for pair, message in [
        ((runs / "eval/base/metrics.json", other / "metrics.json"), "align differ"),
        ((runs / "eval/base/metrics.json", tmp_path / "nope.json"), "nope.json: not a metrics.json"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--compare", *map(str, pair)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--output_dir", "{t}/o"], "give --gt, --output_dir and --pred or --generate"),
    (["--pred", "{t}/nope", "--output_dir", "{t}/o"], "--pred folder not found"),
    (["--pred", "{d}", "--output_dir", "{t}/o", "--split", "test"], "split 'test' has no scenes"),
    (["--pred", "{d}", "--output_dir", "{t}/o", "--tau", "0"], "--tau must be > 0"),
    (["--pred", "{d}", "--output_dir", "{t}/o", "--lora_path", "{t}"], "--lora_path needs --generate"),
    (["--generate", "--pretrained_model_name_or_path", "{t}/model", "--output_dir", "{t}/o"], "model folder not found"),
    (["--generate", "--pretrained_model_name_or_path", "tiny", "--lora_path", "{t}", "--output_dir", "{t}/o"], "no LoRA found"),
])
def test_unusable_arguments_exit_2_and_write_nothing(data_root, tmp_path, capsys, extra, message):
    args = [a.format(t=tmp_path, d=data_root) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--gt", str(data_root), *args, *FAST])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_gt_root_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            ["--gt", str(tmp_path / "nope"), "--pred", str(tmp_path), "--output_dir", str(tmp_path / "o")]
        )
    assert exit_info.value.code == 2 and "neither a midi-scenes dataset" in capsys.readouterr().err
