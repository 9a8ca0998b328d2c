"""The page through Gradio's own client, against a server launched on a free local port (tiny model)."""

from __future__ import annotations

import importlib.util
import signal
import tempfile
from pathlib import Path

import pytest
import trimesh
from app_cases import GRADIO_MISSING, SMALL

from midi.config import TINY_MODEL
from midi.errors import run_cli
from midi.inference.scene import InputOptions, prepare_scene

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("gradio", reason=GRADIO_MISSING)
from gradio_client import Client, handle_file  # noqa: E402  (after the skip: optional dependency)
from gradio_client.exceptions import AppError  # noqa: E402

from midi.app import ui  # noqa: E402


@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> Client:
    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def generate(client, rgb, seg, lora="", scale=1.0, *, steps=2, seed=42, depth=4):
    return client.predict(handle_file(str(rgb)), handle_file(str(seg)), lora, scale, steps, 7.0, seed, "dense", depth,
                          True, api_name="/generate")


def test_the_app_builds_with_the_documented_controls(studio):
    demo = ui.build_demo(studio, [], None)
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"RGB image", "instance map", "LoRA scale (0 = base model)", "base model", "LoRA"} <= labels
    assert "/generate" in demo.get_api_info()["named_endpoints"]


def test_generation_returns_a_glb_with_one_node_per_instance(client, example, studio):
    out = generate(client, *example)
    base_glb, lora_glb, glb, obj, ply = out[:5]
    names = prepare_scene(*example, InputOptions()).names
    assert sorted(trimesh.load(base_glb).graph.nodes_geometry) == sorted(names) and len(names) == 2
    assert lora_glb is None and out[5:8] == (None, None, None)
    assert [p.rsplit(".", 1)[1] for p in (glb, obj, ply)] == ["glb", "obj", "ply"]
    stats, status, seed = out[-3:]
    assert [row[0] for row in stats["data"]] == names and "2/2 instances meshed" in status and seed == 42
    # Gradio kept the uploads in the studio's temporary upload folder (GRADIO_TEMP_DIR), nowhere else.
    assert list(studio.uploads.rglob(f"{SMALL}_rgb.png")) and list(studio.uploads.rglob(f"{SMALL}_seg.png"))


def test_moving_the_slider_reruns_only_the_lora_side(client, example, lora, studio):
    before = dict(studio.runs_made)
    first = generate(client, *example, str(lora), 1.0, seed=3)
    second = generate(client, *example, str(lora), 0.25, seed=3)
    assert (studio.runs_made["base"] - before["base"], studio.runs_made["lora"] - before["lora"]) == (1, 2)
    assert "(cached)" not in first[-2] and "base model: 2/2 instances meshed" in second[-2]
    assert second[-2].split("\n\n")[0].endswith("(cached)") and not second[-2].split("\n\n")[1].endswith("(cached)")
    lora_nodes = sorted(trimesh.load(second[1]).graph.nodes_geometry)
    assert len(lora_nodes) == 2


@pytest.mark.parametrize("case, message", [
    ("size", "small_seg.png: size 128x128 differs from the image synthetic_00102_rgb.png (256x256)"),
    ("empty", "empty_seg.png: no instance (every pixel is background: label 0 / black)"),
])
def test_bad_inputs_return_the_one_line_message(client, bad_pairs, case, message):
    with pytest.raises(AppError) as info:
        generate(client, *bad_pairs[case])
    assert str(info.value) == message  # the upload's server path is shown as the file's name


def test_a_lora_for_another_model_returns_the_one_line_message(client, example, foreign_lora):
    with pytest.raises(AppError) as info:
        generate(client, *example, str(foreign_lora))
    text = str(info.value)
    assert text.startswith(str(foreign_lora)) and "different base model (width: adapter 128 vs model 64)" in text
    assert "\n" not in text and "Traceback" not in text


def test_without_gradio_the_app_says_how_to_install_it(studio, monkeypatch):
    monkeypatch.setattr(ui, "gr", None)
    with pytest.raises(ui.InputError, match="pip install --no-deps -r requirements-app.txt"):
        ui.build_demo(studio)


def run_app_script(argv, monkeypatch, tmp_path) -> int:
    """app.py's main as its __main__ runs it, with its temporary folder made under ``tmp_path``."""
    spec = importlib.util.spec_from_file_location("app_script", ROOT / "app.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "unused"))  # main sets it; restored after the test
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return run_cli(script.main, argv)
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("argv, message", [
    (["--model", "no/such/folder"], "error: no/such/folder: model folder not found; download it with"),
    (["--model", TINY_MODEL, "--lora", "no/such/lora"], "error: no/such/lora: LoRA path does not exist"),
])
def test_bad_start_options_print_one_line_and_leave_no_folder(argv, message, monkeypatch, tmp_path, capsys):
    assert run_app_script(argv, monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not list(tmp_path.glob("midi-app-*"))  # the temporary folder went with the failed start
