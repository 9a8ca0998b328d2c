"""inference_with_lora.py end to end on the tiny pipeline: scenes, LoRA, formats, bad input."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import inference_with_lora as cli
from midi.errors import InputError, OutputError, run_cli
from midi.inference import export, extraction, generation
from midi.inference.export import save_outputs
from midi.inference.extraction import ExtractionConfig
from midi.inference.generation import (
    GenerationOptions,
    ModelOptions,
    build_pipeline,
    generate_latents,
    run_scene,
)
from midi.inference.scene import InputOptions, prepare_scene
from midi.lora import export_lora, lora_config_dict
from midi.tiny import TINY_MI_BLOCKS, mi_blocks_for, save_tiny_pipeline, tiny_pipeline
from midi.training.checkpoints import _check_inputs, _model_outputs

ROOT = Path(__file__).resolve().parents[2]
SCENES = ROOT / "tests" / "data" / "scenes"
PAIRS = ["ffb067ad-cf9a-4321-82ae-4e684c59ea3e_KidsRoom-5300", "cartoon-00", "cartoon-01", "kitchen"]
INSTANCES = {PAIRS[0]: 4, "cartoon-00": 4, "cartoon-01": 5, "kitchen": 3}
FAST = ["--pretrained_model_name_or_path", "tiny", "--num_inference_steps", "2", "--octree_depth", "4",
        "--no_progress", "--preview_size", "64"]


def cli_main(args: list[str]) -> int:
    """The command line as its ``__main__`` runs it: errors become ``error:`` lines and exit codes."""
    return run_cli(cli.main, args)


def pair(name: str) -> list[str]:
    return ["--rgb_image", str(SCENES / f"{name}_rgb.png"), "--seg_image", str(SCENES / f"{name}_seg.png")]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A tiny transformer LoRA with random (non-zero) B, exported in the toolkit's format."""
    pipe = tiny_pipeline(0)
    torch.manual_seed(0)
    config = lora_config_dict(rank=4, alpha=4, init_lora_weights=False)
    pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, transformer_lora_config=config,
                             exact_module_names=True)
    return export_lora(pipe, tmp_path_factory.mktemp("lora") / "lora-final", TINY_MI_BLOCKS)


@pytest.fixture(scope="module")
def kids_scene(tmp_path_factory):
    """The KidsRoom pair at 128 px (the tiny model sees 32 px anyway)."""
    folder = tmp_path_factory.mktemp("kids")
    for kind in ("rgb", "seg"):
        image = Image.open(SCENES / f"{PAIRS[0]}_{kind}.png")
        image.resize((128, 128), Image.Resampling.NEAREST).save(folder / f"kids_{kind}.png")
    return prepare_scene(folder / "kids_rgb.png", folder / "kids_seg.png", InputOptions())


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory) -> list[str]:
    """CLI arguments for the kitchen pair at 128 px (RGBA image, palette map, 3 instances)."""
    folder = tmp_path_factory.mktemp("kitchen")
    for kind in ("rgb", "seg"):
        image = Image.open(SCENES / f"kitchen_{kind}.png")
        image.resize((128, 128), Image.Resampling.NEAREST).save(folder / f"kitchen_{kind}.png")
    return ["--rgb_image", str(folder / "kitchen_rgb.png"), "--seg_image", str(folder / "kitchen_seg.png")]


def latents_for(scene, **model) -> torch.Tensor:
    loaded = build_pipeline(ModelOptions("tiny", **model))
    return generate_latents(loaded.pipe, *scene.conditions(), num_inference_steps=2, guidance_scale=7.0, seed=42,
                            lora_scale=loaded.lora_scale)


@pytest.fixture(scope="module")
def base_latents(kids_scene) -> torch.Tensor:
    return latents_for(kids_scene)


@pytest.fixture(scope="module")
def half_lora_latents(kids_scene, lora_dir) -> torch.Tensor:
    return latents_for(kids_scene, lora_path=lora_dir, lora_scale=0.5)


def labels_in_map(name: str) -> list[str]:
    """``instance_<label>`` for every non-background label of a shared seg map, read independently."""
    image = Image.open(SCENES / f"{name}_seg.png")
    array = np.asarray(image)
    if image.mode == "P":
        return [f"instance_{v}" for v in np.unique(array) if v != 0]
    colours = np.unique(array[..., :3].reshape(-1, 3), axis=0)
    return sorted(f"instance_{r:02x}{g:02x}{b:02x}" for r, g, b in colours if (r, g, b) != (0, 0, 0))


def scene_nodes(path: Path) -> list[str]:
    loaded = trimesh.load(path)
    return sorted(loaded.graph.nodes_geometry)


@pytest.mark.parametrize("name", PAIRS)
def test_each_shared_scene_gives_one_node_per_instance(tmp_path, name):
    out = tmp_path / f"{name}.glb"
    assert cli_main(pair(name) + ["--output", str(out)] + FAST) == 0
    nodes = scene_nodes(out)
    assert len(nodes) == INSTANCES[name]  # the tiny model's fields cross 0 for every instance here
    assert nodes == labels_in_map(name)
    assert Image.open(out.with_suffix(".png")).size == (64, 64)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_lora_changes_output_and_scale_zero_reproduces_base(kids_scene, lora_dir, base_latents, half_lora_latents):
    assert (half_lora_latents - base_latents).abs().max() > 1e-3
    assert torch.equal(latents_for(kids_scene, lora_path=lora_dir, lora_scale=0.0), base_latents)
    assert torch.equal(latents_for(kids_scene, lora_path=lora_dir, lora_scale=0.0, merge_lora=True), base_latents)


def test_merged_and_unmerged_agree(kids_scene, lora_dir, half_lora_latents):
    merged = latents_for(kids_scene, lora_path=lora_dir, lora_scale=0.5, merge_lora=True)
    torch.testing.assert_close(merged, half_lora_latents, rtol=1e-4, atol=1e-4)


def test_image_encoder_lora_is_scaled_too(kids_scene, tmp_path):
    """attention_kwargs["scale"] reaches only the transformer; encoder LoRAs are scaled directly."""
    pipe = tiny_pipeline(0)
    torch.manual_seed(1)
    pipe.init_custom_adapter(
        set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True,
        transformer_lora_config=lora_config_dict(rank=2, init_lora_weights=False),
        image_encoder_1_lora_config=lora_config_dict(rank=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = export_lora(pipe, tmp_path / "lora", TINY_MI_BLOCKS)
    unmerged = latents_for(kids_scene, lora_path=path, lora_scale=0.3)
    merged = latents_for(kids_scene, lora_path=path, lora_scale=0.3, merge_lora=True)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source", ["run-folder", "custom-adapter-file", "peft-folder"])
def test_every_lora_format_loads_the_same_adapter(kids_scene, lora_dir, half_lora_latents, tmp_path, source):
    path = {"run-folder": lora_dir.parent, "custom-adapter-file": lora_dir / "custom_adapter.safetensors",
            "peft-folder": tmp_path / "peft"}[source]
    if source == "peft-folder":  # a plain PEFT adapter folder: no toolkit metadata
        path.mkdir()
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            (path / file).write_bytes((lora_dir / file).read_bytes())
    torch.testing.assert_close(latents_for(kids_scene, lora_path=path, lora_scale=0.5), half_lora_latents)


def test_lora_run_through_the_cli_differs_from_base(tmp_path, kitchen, lora_dir):
    args = kitchen + FAST + ["--no_preview"]
    assert cli_main(args + ["--output", str(tmp_path / "base.obj")]) == 0
    assert cli_main(args + ["--output", str(tmp_path / "lora.obj"), "--lora_path", str(lora_dir)]) == 0
    assert (tmp_path / "base.obj").read_bytes() != (tmp_path / "lora.obj").read_bytes()


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, message",
    [("base", "different base model (width: adapter 128 vs model 64)"),
     ("rank", "has shape"),
     ("targets", "match no module of transformer")],
)
def test_lora_mismatch_is_reported_in_words(tmp_path, kitchen, lora_dir, capsys, case, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in lora_dir.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    if case == "base":
        edit_json(bad / "midi_adapter.json", lambda d: d["base_transformer_config"].update(width=128))
    else:
        (bad / "midi_adapter.json").unlink()
        key, value = ("r", 8) if case == "rank" else ("target_modules", ["not_a_layer"])
        edit_json(bad / "adapter_config.json", lambda d: d.update({key: value}))
    out = tmp_path / "scene.glb"
    assert cli_main(kitchen + FAST + ["--output", str(out), "--lora_path", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}") and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["gltf", "obj", "ply", "stl"])
def test_output_formats_and_instance_files(tmp_path, kitchen, fmt):
    out = tmp_path / f"scene.{fmt}"
    assert cli_main(kitchen + FAST + ["--output", str(out), "--save_instances", "--no_preview"]) == 0
    assert len(trimesh.load(out, force="mesh").faces) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name] + [f"scene_instance_{k}.{fmt}" for k in (1, 2, 3)])


def test_glb_keeps_names_from_json(tmp_path, kitchen):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "fridge", "2": "stove", "3": "counter"}))
    out = tmp_path / "kitchen.glb"
    assert cli_main(kitchen + FAST + ["--output", str(out), "--label_names", str(names), "--no_preview"]) == 0
    assert scene_nodes(out) == ["counter", "fridge", "stove"]


def test_coarse_to_fine_cli(tmp_path, kitchen):
    out = tmp_path / "kitchen.glb"
    args = ["--output", str(out), "--extraction", "coarse_to_fine", "--coarse_depth", "3", "--no_preview"]
    assert cli_main(kitchen + FAST + args) == 0
    assert len(scene_nodes(out)) == 3


def test_instance_without_surface_is_reported_and_others_exported(tmp_path, kids_scene, caplog):
    loaded = build_pipeline(ModelOptions("tiny"))
    calls = []

    def decode(z, sampled_points, return_dict=True, num_chunks=50000, to_cpu=False):
        calls.append(1)
        radius = -1.0 if len(calls) == 2 else 0.5  # the second instance has no surface
        return SimpleNamespace(sample=radius - sampled_points.float().norm(dim=-1, keepdim=True))

    loaded.pipe.vae.decode = decode
    options = GenerationOptions(num_inference_steps=1, progress=False, extraction=ExtractionConfig(octree_depth=4))
    with caplog.at_level(logging.INFO, logger="midi.inference.generation"):
        result = run_scene(loaded, kids_scene, options)
    assert [s.mesh is None for s in result.surfaces] == [False, True, False, False]
    assert "instance_2: no surface (field never crosses 0)" in caplog.text
    save_outputs(result, tmp_path / "scene.glb", preview=False)
    assert scene_nodes(tmp_path / "scene.glb") == ["instance_1", "instance_3", "instance_4"]

    calls.clear()
    loaded.pipe.vae.decode = lambda z, sampled_points, **kw: SimpleNamespace(sample=-torch.ones(*sampled_points.shape[:2], 1))
    empty = run_scene(loaded, kids_scene, options)
    with pytest.raises(InputError, match="no instance produced a surface"):
        save_outputs(empty, tmp_path / "empty.glb")
    assert not (tmp_path / "empty.glb").exists() and not (tmp_path / "empty.png").exists()


def test_failed_export_leaves_no_file(tmp_path, kids_scene, monkeypatch):
    loaded = build_pipeline(ModelOptions("tiny"))
    options = GenerationOptions(num_inference_steps=1, progress=False, extraction=ExtractionConfig(octree_depth=4))
    result = run_scene(loaded, kids_scene, options)

    real_export = export.export_bytes

    def export_fails_on_the_scene(scene, fmt):  # the per-instance files are encoded first and succeed
        if isinstance(scene, trimesh.Scene):
            raise RuntimeError("encoder broke")
        return real_export(scene, fmt)

    monkeypatch.setattr("midi.inference.export.export_bytes", export_fails_on_the_scene)
    with pytest.raises(OutputError, match=r"scene\.glb: cannot encode GLB \(RuntimeError: encoder broke\)"):
        save_outputs(result, tmp_path / "scene.glb", save_instances=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_set(tmp_path, kids_scene, monkeypatch):
    """A rename failing after others succeeded (disk full) removes the files already in place."""
    loaded = build_pipeline(ModelOptions("tiny"))
    options = GenerationOptions(num_inference_steps=1, progress=False, extraction=ExtractionConfig(octree_depth=4))
    result = run_scene(loaded, kids_scene, options)
    real_replace = os.replace
    calls = []

    def replace_fails_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr("midi.data.atomic.os.replace", replace_fails_third)
    with pytest.raises(OutputError, match="No space left on device") as caught:
        save_outputs(result, tmp_path / "scene.glb", save_instances=True)
    assert str(caught.value).startswith(str(calls[2]))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_one_line_exit_1(tmp_path, kitchen, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli_main(kitchen + ["--output", str(blocker / "scene.glb")] + FAST) == 1  # OutputError
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {blocker / 'scene.glb'}: ") and "Traceback" not in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("stage", ["denoising", "surface extraction"])
def test_out_of_memory_is_one_line_and_batch_goes_on(tmp_path, monkeypatch, capsys, stage):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("kitchen", "cartoon-01"):
        for kind in ("rgb", "seg"):
            image = Image.open(SCENES / f"{name}_{kind}.png")
            image.resize((128, 128), Image.Resampling.NEAREST).save(inputs / f"{name}_{kind}.png")
    target = "midi.inference.generation." + ("generate_latents" if stage == "denoising" else "extract_surfaces")
    real = generation.generate_latents if stage == "denoising" else extraction.extract_surfaces
    calls = []

    def first_call_runs_out(*a, **k):  # cartoon-01 comes first (sorted); CUDA's error, then the CPU's
        calls.append(1)
        if len(calls) == 1:
            raise (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if stage == "denoising"
                   else RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"))
        return real(*a, **k)

    monkeypatch.setattr(target, first_call_runs_out)
    assert cli_main(["--input_dir", str(inputs), "--output_dir", str(out), "--format", "obj"] + FAST) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: cartoon-01: out of memory during {stage}; try --num_chunks 25000 or smaller, "
                   "--extraction coarse_to_fine or a lower --octree_depth"]
    assert sorted(p.name for p in out.iterdir()) == ["kitchen.obj", "kitchen.png"]


def test_other_runtime_errors_are_not_reported_as_memory(tmp_path, kitchen, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr("midi.inference.generation.generate_latents", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli_main(kitchen + ["--output", str(tmp_path / "s.glb")] + FAST)


def test_batch_mode(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("kitchen", "cartoon-01"):
        for kind in ("rgb", "seg"):
            image = Image.open(SCENES / f"{name}_{kind}.png")
            image.resize((128, 128), Image.Resampling.NEAREST).save(inputs / f"{name}_{kind}.png")
    out = tmp_path / "out"
    assert cli_main(["--input_dir", str(inputs), "--output_dir", str(out), "--format", "obj"] + FAST) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cartoon-01.obj", "cartoon-01.png", "kitchen.obj", "kitchen.png"]


BAD_INPUTS = {
    "size mismatch": (lambda t: pair("kitchen")[:3] + [str(t / "small.png")], "small.png: size 32x32 differs"),
    "no instance": (lambda t: pair("kitchen")[:3] + [str(t / "blank.png")], "blank.png: no instance"),
    "too many": (lambda t: pair("cartoon-01") + ["--max_instances", "4"], "more than --max_instances 4"),
    "unreadable": (lambda t: pair("kitchen")[:3] + [str(t / "junk.png")], "junk.png: cannot read image"),
    "lora missing": (lambda t: pair("kitchen") + ["--lora_path", str(t / "nope")], "nope: LoRA path does not exist"),
    "bad format": (lambda t: pair("kitchen") + ["--output", str(t / "scene.fbx")], "unsupported output format .fbx"),
    "lora scale nan": (lambda t: pair("kitchen") + ["--lora_scale", "nan"], "--lora_scale must be a finite number, got nan"),
    "lora scale inf": (lambda t: pair("kitchen") + ["--lora_scale", "inf"], "--lora_scale must be a finite number, got inf"),
    "lora alpha nan": (lambda t: pair("kitchen") + ["--lora_alpha", "nan"], "--lora_alpha must be a finite number > 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_exit_2_no_output(tmp_path, capsys, case):
    Image.new("L", (32, 32), 1).save(tmp_path / "small.png")
    Image.new("L", (1024, 1024), 0).save(tmp_path / "blank.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    make_args, message = BAD_INPUTS[case]
    args = make_args(tmp_path)
    if "--output" not in args:
        args += ["--output", str(tmp_path / "scene.glb")]
    before = set(tmp_path.iterdir())
    assert cli_main(args + FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert set(tmp_path.iterdir()) == before


def test_subprocess_cli_bad_input_fails_fast(tmp_path):
    out = tmp_path / "scene.glb"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "inference_with_lora.py"), "--rgb_image", str(SCENES / "kitchen_rgb.png"),
           "--seg_image", str(tmp_path / "missing_seg.png"), "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing_seg.png'}: file not found"
    assert not out.exists()
    # Without the released weights the default model path explains how to get them.
    proc = subprocess.run(cmd[:-3] + [str(SCENES / "kitchen_seg.png"), "--output", str(out)], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "hf download VAST-AI/MIDI-3D" in proc.stderr


@pytest.mark.slow
def test_subprocess_cli_full_run(tmp_path):
    out = tmp_path / "scene.glb"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "inference_with_lora.py")] + pair("cartoon-00") + ["--output", str(out)] + FAST
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(scene_nodes(out)) == 4 and out.with_suffix(".png").is_file()
    assert "4/4 instances meshed" in proc.stderr
    np.testing.assert_array_less(0, [len(g.faces) for g in trimesh.load(out).geometry.values()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_an_input_error(tmp_path, kitchen, capsys):
    assert cli_main(kitchen + FAST + ["--output", str(tmp_path / "scene.glb"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- hardening (issue 9)
def transformer_out(pipe) -> torch.Tensor:
    """The export check's forward: its fixed batch through the transformer."""
    return _model_outputs(pipe, _check_inputs(pipe, torch.device("cpu"), torch.float32))["transformer"]


def trained_pipe(seed: int = 0, **lora):
    """A tiny pipeline with a random (non-zero) transformer LoRA, as training leaves it."""
    pipe = tiny_pipeline(seed)
    torch.manual_seed(1)
    pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True,
                             transformer_lora_config=lora_config_dict(**{"rank": 4, "alpha": 4, **lora},
                                                                      init_lora_weights=False))
    return pipe


def mi_blocks_of(pipe) -> list[str]:
    return sorted(n.rsplit(".attn", 1)[0] for n, p in pipe.transformer.attn_processors.items() if p.use_mi)


def test_inference_build_runs_in_eval_mode(tmp_path):
    """LoRA dropout must be off: identical forwards agree, and agree with the export check's reference."""
    trained = trained_pipe(dropout=0.5)
    pipe = build_pipeline(ModelOptions("tiny", lora_path=export_lora(trained, tmp_path / "lora", TINY_MI_BLOCKS))).pipe
    first = transformer_out(pipe)
    assert torch.equal(first, transformer_out(pipe))
    torch.testing.assert_close(first, transformer_out(trained.transformer.eval() and trained), rtol=0, atol=1e-6)
    assert not any(m.training for name in ("transformer", "vae", "image_encoder_1", "image_encoder_2")
                   for m in getattr(pipe, name).modules())


def test_upstream_custom_adapter_without_metadata(tmp_path, caplog):
    """r=8/alpha=16 saved by save_custom_adapter (no midi_adapter.json): --lora_alpha restores it, else one warning."""
    trained = trained_pipe(rank=8, alpha=16)
    file = trained.save_custom_adapter(tmp_path / "upstream", "custom_adapter.safetensors")
    want = transformer_out(trained.transformer.eval() and trained)
    with caplog.at_level(logging.WARNING):
        given = transformer_out(build_pipeline(ModelOptions("tiny", lora_path=file, lora_alpha=16)).pipe)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    torch.testing.assert_close(given, want, rtol=0, atol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assumed = transformer_out(build_pipeline(ModelOptions("tiny", lora_path=file)).pipe)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "lora_alpha = rank (8)" in warnings[0] and "--lora_alpha" in warnings[0]
    assert (assumed - want).abs().max() > 1e-4


def test_mi_blocks_follow_the_model_or_the_flag(tmp_path, lora_dir):
    save_tiny_pipeline(tmp_path / "tiny")
    assert mi_blocks_of(build_pipeline(ModelOptions(str(tmp_path / "tiny"))).pipe) == list(TINY_MI_BLOCKS)  # was 8-12
    assert mi_blocks_of(build_pipeline(ModelOptions("tiny", mi_blocks=["blocks.1"])).pipe) == ["blocks.1"]
    flagged = build_pipeline(ModelOptions("tiny", lora_path=lora_dir, mi_blocks=["blocks.0", "blocks.2"])).pipe
    assert mi_blocks_of(flagged) == ["blocks.0", "blocks.2"]
    edit_json(tmp_path / "tiny" / "transformer" / "config.json", lambda d: d.update(num_layers=21))
    assert mi_blocks_for(str(tmp_path / "tiny")) == tuple(f"blocks.{i}" for i in range(8, 13))
    edit_json(tmp_path / "tiny" / "transformer" / "config.json", lambda d: d.update(num_layers=7))
    with pytest.raises(InputError, match="7 layers.*--mi_blocks"):
        build_pipeline(ModelOptions(str(tmp_path / "tiny")))
    with pytest.raises(InputError, match="blocks.9"):
        build_pipeline(ModelOptions("tiny", mi_blocks=["blocks.9"]))


def test_tiny_seed_is_recorded_and_honoured(tmp_path):
    trained = trained_pipe(seed=3)
    path = export_lora(trained, tmp_path / "lora", TINY_MI_BLOCKS)
    assert json.loads((path / "midi_adapter.json").read_text())["tiny_seed"] == 3
    loaded = build_pipeline(ModelOptions("tiny", lora_path=path))
    assert "seed 3" in loaded.description
    torch.testing.assert_close(transformer_out(loaded.pipe), transformer_out(trained.transformer.eval() and trained),
                               rtol=0, atol=1e-6)
    reference = tiny_pipeline(3)
    for name in ("vae", "image_encoder_1", "image_encoder_2"):  # every base model is seed 3's
        theirs = getattr(reference, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(loaded.pipe, name).state_dict().items())


def test_octree_depth_default_follows_the_model(kitchen):
    args = cli.parse_args(kitchen + ["--output", "x.glb", "--pretrained_model_name_or_path", "tiny"])
    assert cli.extraction_settings(args)["octree_depth"] == 6
    args = cli.parse_args(kitchen + ["--output", "x.glb", "--pretrained_model_name_or_path", "some/folder"])
    assert cli.extraction_settings(args)["octree_depth"] == 8
    args = cli.parse_args(kitchen + ["--output", "x.glb", "--pretrained_model_name_or_path", "tiny", "--octree_depth", "5"])
    assert cli.extraction_settings(args)["octree_depth"] == 5
