"""Replays the upstream MIDI-3D code's recorded outputs (tests/fixtures/upstream) on our `midi`.

Tolerances are the fixtures' own: single forwards atol=rtol=1e-5; 3-step pipeline latents
atol=1e-4, rtol=1e-5; scheduler tensors atol=1e-6 with timesteps exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import UPSTREAM, UPSTREAM_CASES, UPSTREAM_PIPELINE

MI_BLOCKS = ["blocks.3", "blocks.4"]


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def run_transformer(pipe, inputs, attention_kwargs):
    with torch.no_grad():
        return pipe.transformer(
            inputs["hidden_states"], inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_hidden_states_2=inputs["encoder_hidden_states_2"],
            attention_kwargs=attention_kwargs, return_dict=False,
        )[0]


@pytest.mark.parametrize(
    "case, mi, kwargs",
    [
        ("transformer_default_b3", False, None),
        ("transformer_mi_b3", True, {"num_instances": 3}),
        ("transformer_mi_cfg6", True, {"num_instances": 3}),
    ],
)
def test_transformer_forward(upstream_pipe, case, mi, kwargs):
    recorded = json.loads((UPSTREAM_CASES / case / "case.json").read_text())
    if mi:
        upstream_pipe.init_custom_adapter(set_self_attn_module_names=MI_BLOCKS)
    names = {k: repr(v) if mi else type(v).__name__ for k, v in upstream_pipe.transformer.attn_processors.items()}
    assert names == recorded["attn_processors"]
    inputs = load_file(UPSTREAM_CASES / case / "inputs.safetensors")
    expected = load_file(UPSTREAM_CASES / case / "outputs.safetensors")["sample"]
    assert_close(run_transformer(upstream_pipe, inputs, kwargs), expected)


def test_vae_decode(upstream_pipe):
    inputs = load_file(UPSTREAM_CASES / "vae_decode" / "inputs.safetensors")
    expected = load_file(UPSTREAM_CASES / "vae_decode" / "outputs.safetensors")
    with torch.no_grad():
        full = upstream_pipe.vae.decode(inputs["latents"], sampled_points=inputs["sampled_points"]).sample
        chunked = upstream_pipe.vae.decode(inputs["latents"], sampled_points=inputs["sampled_points"], num_chunks=128).sample
    assert_close(full, expected["sample"])
    assert_close(chunked, expected["sample_num_chunks_128"])
    assert torch.equal(full, chunked)  # chunking over query points is exact


def test_vae_encode(upstream_pipe):
    case = UPSTREAM_CASES / "vae_encode_n512_t64"
    x = load_file(case / "inputs.safetensors")["x"]
    expected = load_file(case / "outputs.safetensors")
    intermediates = load_file(case / "intermediates.safetensors")
    vae = upstream_pipe.vae
    with torch.no_grad():
        post = vae.encode(x, num_tokens=64, seed=0).latent_dist
        queries = vae.sample_query_points(x, num_tokens=64, seed=0)
    for name in ("parameters", "mean", "logvar", "std", "var"):
        assert_close(getattr(post, name), expected[name])
    assert_close(post.sample(generator=torch.Generator("cpu").manual_seed(123)), expected["sample_generator_123"])
    # The FPS picks themselves (global indices into the flattened (B * 4T) subset).
    subset = x[:, intermediates["choice_indices"]].reshape(-1, 6)
    assert torch.equal(queries.reshape(-1, 6), subset[intermediates["fps_indices"]])


def test_scheduler():
    config = json.loads((UPSTREAM_PIPELINE / "scheduler" / "scheduler_config.json").read_text())
    out = load_file(UPSTREAM_CASES / "scheduler" / "outputs.safetensors")
    from midi.schedulers.scheduling_rectified_flow import RectifiedFlowScheduler

    scheduler = RectifiedFlowScheduler.from_config(config)
    assert torch.equal(scheduler.timesteps, out["init_timesteps"])
    assert_close(scheduler.sigmas, out["init_sigmas"], atol=1e-6)
    scheduler.set_timesteps(10)
    assert torch.equal(scheduler.timesteps, out["timesteps"])
    assert_close(scheduler.sigmas, out["sigmas"], atol=1e-6)
    sample = out["step_samples"][0]
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(out["step_model_outputs"][i], t, sample, return_dict=False)[0]
        assert_close(sample, out["step_samples"][i + 1], atol=1e-6)
    noised = scheduler.scale_noise(out["scale_noise_x0"], out["scale_noise_noise"], out["scale_noise_timesteps"])
    assert_close(noised, out["scale_noise_out"], atol=1e-6)
    three = RectifiedFlowScheduler.from_config(config)
    three.set_timesteps(3)
    assert torch.equal(three.timesteps, out["timesteps_3"])
    assert_close(three.sigmas, out["sigmas_3"], atol=1e-6)


def _pipeline_inputs():
    images = UPSTREAM / "images"
    inst = [Image.open(images / f"instance_{i}.png").convert("RGB") for i in range(3)]
    masks = [Image.open(images / f"mask_{i}.png").convert("L") for i in range(3)]
    scene = Image.open(images / "scene.png").convert("RGB")
    return inst, masks, [scene] * 3


def test_pipeline_call(upstream_pipe):
    case = UPSTREAM_CASES / "pipeline_mi_cfg7"
    intermediates = load_file(case / "intermediates.safetensors")
    expected = load_file(case / "outputs.safetensors")["latents"]
    upstream_pipe.init_custom_adapter(set_self_attn_module_names=MI_BLOCKS)
    inst, masks, scenes = _pipeline_inputs()
    pixels = upstream_pipe.feature_extractor_1(inst, return_tensors="pt").pixel_values
    assert_close(pixels, intermediates["feature_extractor_1_pixel_values"])
    assert_close(upstream_pipe.prepare_image_2_input(inst, scenes, masks), intermediates["image_encoder_2_pixel_values_7ch"])
    seen = []
    hook = upstream_pipe.transformer.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    result = upstream_pipe(
        image=inst, mask=masks, image_scene=scenes, num_inference_steps=3, guidance_scale=7.0,
        generator=torch.Generator("cpu").manual_seed(42), attention_kwargs={"num_instances": 3},
        output_type="latent", return_dict=False,
    )
    hook.remove()
    assert result[1:] == (None, None, None, None)
    for step, out in enumerate(seen):
        assert_close(out, intermediates[f"step{step}_transformer_output"], atol=1e-4)
    assert_close(result[0], expected, atol=1e-4)


def _lora_outputs(pipe):
    case = UPSTREAM_CASES / "lora"
    b3 = load_file(case / "inputs_b3.safetensors")
    cfg6 = load_file(case / "inputs_cfg6.safetensors")
    return {
        "sample_b3_num_instances_3": run_transformer(pipe, b3, {"num_instances": 3}),
        "sample_b3_num_instances_3_scale_0p5": run_transformer(pipe, b3, {"num_instances": 3, "scale": 0.5}),
        "sample_cfg6_num_instances_3": run_transformer(pipe, cfg6, {"num_instances": 3}),
    }


LORA_CONFIG = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "init_lora_weights": False}


@pytest.mark.parametrize("how", ["load_custom_adapter", "same_seed"])
def test_lora_custom_adapter(upstream_pipe, how):
    case = UPSTREAM_CASES / "lora"
    recorded = json.loads((case / "case.json").read_text())
    expected = load_file(case / "outputs.safetensors")
    torch.manual_seed(1800 if how == "same_seed" else 1801)
    upstream_pipe.init_custom_adapter(set_self_attn_module_names=MI_BLOCKS, transformer_lora_config=LORA_CONFIG)
    if how == "load_custom_adapter":
        upstream_pipe.load_custom_adapter(case, weight_name="custom_adapter.safetensors")
    state = upstream_pipe.transformer.state_dict()
    assert [[k, list(v.shape), "float32"] for k, v in state.items()] == recorded["transformer_state_dict_with_lora"]
    for name, out in _lora_outputs(upstream_pipe).items():
        assert_close(out, expected[name])


def test_lora_save_matches_upstream_file(upstream_pipe, tmp_path):
    torch.manual_seed(1800)
    upstream_pipe.init_custom_adapter(set_self_attn_module_names=MI_BLOCKS, transformer_lora_config=LORA_CONFIG)
    path = upstream_pipe.save_custom_adapter(tmp_path, "custom_adapter.safetensors", safe_serialization=True, include_keys=["lora"])
    ours = load_file(path)
    theirs = load_file(UPSTREAM_CASES / "lora" / "custom_adapter.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
