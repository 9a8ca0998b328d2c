"""bench/bench_full_size.py at toy size: every subcommand runs, its JSON holds what the tables print, and
the byte counter counts what it should."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_full_size as bench  # noqa: E402

GRID = ["--model", "toy", "--device", "cpu", "--instances", "2", "--mixed_precision", "no"]


def test_live_bytes_counts_storages_once_and_frees_them():
    weight = torch.zeros(256)  # resident: neither it nor its views count
    with bench.LiveBytes([weight]) as counter:
        view = weight[:128]
        a = torch.ones(1024)  # 4 KiB
        b = torch.empty(512)  # 2 KiB: 6 KiB at the peak
        c = b.view(16, 32)  # the same storage
        del a
    assert counter.peak == 6144 and counter.live == 2048
    assert view.numel() == 128 and c.numel() == 512


def test_measured_training_grid(tmp_path):
    out = tmp_path / "train.json"
    result = bench.main(["train", *GRID, "--checkpointing", "on", "--cache", "on", "off", "--warmup", "0",
                         "--steps", "1", "--json", str(out)])
    cells = json.loads(out.read_text())["cells"]
    assert result["complete"] and len(cells) == 2 and {c["cache"] for c in cells} == {True, False}
    for cell in cells:
        assert cell["status"] == "ok" and cell["step_seconds"] > 0 and cell["peak_bytes"] > 0
        assert cell["skipped_updates"] == 0  # random weights still give finite losses: the optimizer ran
    assert result["resident"]["cache_on"]["offloaded"] == []  # nothing to move off the CPU


def test_counted_training_grid():
    result = bench.main(["train", "--count", *GRID, "--checkpointing", "on", "off", "--cache", "on"])
    cells = {c["checkpointing"]: c for c in result["cells"]}
    assert len(cells) == 2
    for c in cells.values():
        assert c["peak_bytes"] == c["weights_bytes"] + c["optimizer_bytes"] + c["step_peak_bytes"]
        assert c["grad_bytes"] * 2 == c["optimizer_bytes"]  # fp32 LoRA gradients; AdamW holds two such moments
    assert cells[True]["step_peak_bytes"] < cells[False]["step_peak_bytes"]
    # Cache on: the VAE encoder's blocks and both image encoders are not counted as resident.
    resident = result["resident"]["cache_on"]
    assert resident["offloaded_bytes"] > 0 and cells[True]["weights_bytes"] == resident["weights_bytes_on_device"]


def test_encoders_report_what_the_cache_takes_off():
    result = bench.main(["encoders", "--model", "toy", "--device", "cpu"])
    assert set(result["modules"]) == {"vae.encoder.blocks", "image_encoder_1", "image_encoder_2"}
    assert result["offload_bytes"] == sum(m["weights_bytes"] for m in result["modules"].values()) > 0


def test_inference_splits_denoising_and_extraction():
    result = bench.main(["infer", "--model", "toy", "--device", "cpu", "--infer_steps", "1", "--depth", "6",
                         "--decoder_queries", "500", "--instances", "1"])
    assert result["denoise_seconds"] > 0 and result["denoise_step_flops"] > 0
    assert set(result["extraction"]) == {"dense", "coarse_to_fine"}
    assert result["extraction"]["dense"]["queries"] == 65**3  # every grid point
    assert result["decoder"]["queries_per_second"] > 0 and result["decoder"]["latent_seconds_per_call"] > 0
    for counts in result["stub_queries"].values():
        assert counts["coarse_to_fine"] < counts["dense"] == 65**3 and counts["dense_decode_calls"] == 1
        assert counts["coarse_to_fine_decode_calls"] > 1  # one per level: each pays the latent self-attention


@pytest.mark.parametrize("precision", ["fp32"])
def test_flops_ratio(precision):
    result = bench.main(["flops", "--model", "toy", "--device", "cpu", "--instances", "2", "--tokens", "16",
                         "--blocks", "1", "--steps", "1", "--matmul_size", "128", "--precisions", precision])
    r = result["precisions"][precision]
    # Forward + backward of one block: at least 6 FLOPs per weight per token (2 forward, 4 backward).
    weights = sum(p.numel() for n, p in bench_blocks(1).named_parameters() if p.ndim == 2)
    assert result["flops_per_step"] >= 6 * weights * 2 * 16 * 0.5
    assert r["achieved_flops"] > 0 and r["ratio"] > 0


def bench_blocks(num_layers: int):
    from midi.models.transformers.triposg_transformer import TripoSGDiTModel

    with torch.device("meta"):
        return TripoSGDiTModel(num_layers=num_layers, width=64, num_attention_heads=4)
