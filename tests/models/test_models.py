"""Invariants of the `midi` core beyond the recorded upstream cases."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from midi.models.attention_processor import multi_instance_attention, plan_instance_groups
from tests.conftest import UPSTREAM_PIPELINE


# ----------------------------------------------------------------------------- full-size configs
def test_full_size_transformer_matches_release_layout():
    from midi.models.transformers.triposg_transformer import TripoSGDiTModel

    with torch.device("meta"):
        model = TripoSGDiTModel()
    state = model.state_dict()
    assert len(state) == 743
    assert sum(v.numel() for v in state.values()) == 1_681_911_616
    W = 2048
    expected = {
        "time_proj.linear_1.weight": (4 * W, W), "time_proj.linear_2.weight": (W, 4 * W),
        "proj_in.weight": (W, 64), "proj_out.weight": (64, W), "norm_out.weight": (W,),
        "blocks.0.attn1.to_q.weight": (W, W), "blocks.0.attn1.norm_q.weight": (128,),
        "blocks.0.attn2.to_k.weight": (W, 768), "blocks.0.attn2_2.to_v.weight": (W, 1024),
        "blocks.0.ff.net.0.proj.weight": (4 * W, W), "blocks.0.ff.net.2.weight": (W, 4 * W),
        "blocks.11.skip_linear.weight": (W, 2 * W), "blocks.20.skip_norm.bias": (W,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "blocks.10.skip_linear.weight" not in state and "blocks.0.attn1.to_q.bias" not in state
    assert len(model.attn_processors) == 63


def test_full_size_vae_matches_release_layout():
    from midi.models.autoencoders.autoencoder_kl_triposg import TripoSGVAEModel

    with torch.device("meta"):
        model = TripoSGVAEModel()
    state = model.state_dict()
    assert len(state) == 356
    assert sum(v.numel() for v in state.values()) == 242_662_017
    assert tuple(state["encoder.proj_in.weight"].shape) == (512, 54)
    assert tuple(state["decoder.proj_query.weight"].shape) == (1024, 51)
    assert tuple(state["decoder.blocks.16.attn2.norm_cross.weight"].shape) == (1024,)
    assert tuple(state["quant.weight"].shape) == (128, 512)
    assert "decoder.blocks.16.attn1.to_q.weight" not in state


# ----------------------------------------------------------------------------- multi-instance attention
def naive_mi_attention(q, k, v, counts, per_batch=None):
    """Upstream's formulation: per group, K/V of all instances concatenated and copied per row."""
    rows = []
    start = 0
    counts = counts if isinstance(counts, list) else [counts] * (q.shape[0] // counts)
    while start < q.shape[0]:
        for n in counts:
            kk = torch.cat(list(k[start:start + n]), dim=1)  # (H, n*T, D)
            vv = torch.cat(list(v[start:start + n]), dim=1)
            for r in range(start, start + n):
                w = torch.softmax(q[r] @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
                rows.append(w @ vv)
            start += n
            for r in range(start, start + ((per_batch - n) if per_batch else 0)):
                w = torch.softmax(q[r] @ k[r].transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
                rows.append(w @ v[r])
            start += (per_batch - n) if per_batch else 0
    return torch.stack(rows)


@pytest.mark.parametrize(
    "batch, counts, per_batch",
    [(1, 1, None), (3, 3, None), (6, 3, None), (8, 2, None), (4, 4, None),  # int: scenes / CFG
     (5, [2, 3], None), (10, [2, 3], None), (6, [1, 2, 3], None),  # packed scenes, with CFG repeat
     (8, [3, 1], 4), (16, [3, 1], 4), (5, [5], 5)],  # upstream padded layout
)
def test_mi_attention_matches_naive_reference(batch, counts, per_batch):
    g = torch.Generator().manual_seed(batch)
    q, k, v = (torch.randn(batch, 2, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ours = multi_instance_attention(q, k, v, counts, per_batch)
    torch.testing.assert_close(ours, naive_mi_attention(q, k, v, counts, per_batch), atol=1e-10, rtol=1e-10)


def test_mi_attention_single_instance_is_self_attention():
    q, k, v = (torch.randn(4, 2, 5, 8) for _ in range(3))
    torch.testing.assert_close(multi_instance_attention(q, k, v, 1), torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize(
    "batch, counts, per_batch, message",
    [(5, 3, None, "multiple of num_instances"), (7, [2, 3], None, "expected a multiple of 5"),
     (8, [5, 1], 4, "more instances than num_instances_per_batch"), (4, [0, 4], None, "positive")],
)
def test_mi_attention_rejects_bad_counts(batch, counts, per_batch, message):
    with pytest.raises(ValueError, match=message):
        plan_instance_groups(batch, counts, per_batch)


def test_mi_processor_without_num_instances_raises(tiny_pipe):
    from midi.tiny import TINY_MI_BLOCKS

    tiny_pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS)
    x, ehs, ehs2 = torch.randn(2, 64, 8), torch.randn(2, 1, 16), torch.randn(2, 17, 32)
    with pytest.raises(ValueError, match="no num_instances"):
        tiny_pipe.transformer(x, torch.tensor([10.0, 10.0]), ehs, ehs2)
    with pytest.raises(ValueError, match="multiple of num_instances"):
        tiny_pipe.transformer(x, torch.tensor([10.0, 10.0]), ehs, ehs2, attention_kwargs={"num_instances": 3})


def test_mi_block_selection_prefix_and_exact(tiny_pipe, caplog):
    from midi.loaders.custom_adapter import set_mi_attention

    with caplog.at_level(logging.WARNING):
        chosen = set_mi_attention(tiny_pipe.transformer, ["blocks.1"])
    assert chosen == ["blocks.1.attn1.processor"]  # 5 blocks: no blocks.1x to prefix-match
    assert set_mi_attention(tiny_pipe.transformer, ["blocks.3", "blocks.4"], exact=True) == [
        "blocks.3.attn1.processor", "blocks.4.attn1.processor"]
    with pytest.raises(ValueError, match="selects no transformer block"):
        set_mi_attention(tiny_pipe.transformer, ["blocks.9"])


def test_mi_prefix_match_warns_like_upstream():
    from midi.loaders.custom_adapter import set_mi_attention
    from midi.models.transformers.triposg_transformer import TripoSGDiTModel

    model = TripoSGDiTModel(num_attention_heads=2, width=8, in_channels=4, num_layers=12, cross_attention_dim=4,
                            cross_attention_2_dim=4)
    assert len(set_mi_attention(model, ["blocks.1"])) == 3  # blocks.1, blocks.10, blocks.11 (upstream)
    assert len(set_mi_attention(model, ["blocks.1"], exact=True)) == 1


# ----------------------------------------------------------------------------- transformer behaviour
def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 64, 8, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, 1, 16, generator=g), torch.randn(batch, 17, 32, generator=g))


def test_scalar_timestep_is_broadcast(tiny_pipe):
    x, _, e1, e2 = _inputs()
    with torch.no_grad():
        a = tiny_pipe.transformer(x, 500.0, e1, e2).sample
        b = tiny_pipe.transformer(x, torch.full((3,), 500.0), e1, e2).sample
    assert torch.equal(a, b)


def test_gradient_checkpointing_same_gradients(tiny_pipe):
    x, t, e1, e2 = _inputs()
    model = tiny_pipe.transformer.train()
    calls = []
    feed_forward = model.blocks[0].ff
    original = feed_forward.forward
    # Forward hooks do not fire during checkpoint recomputation; wrapping forward counts it.
    feed_forward.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    grads, forwards = [], []
    for enable in (False, True):
        model.zero_grad()
        calls.clear()
        if enable:
            model.enable_gradient_checkpointing()
        model(x, t, e1, e2).sample.square().mean().backward()
        grads.append(model.proj_in.weight.grad.clone())
        forwards.append(len(calls))
    assert model.is_gradient_checkpointing
    assert forwards == [1, 2]  # with checkpointing the block is recomputed during backward
    torch.testing.assert_close(grads[0], grads[1])


def test_lora_starts_as_identity_and_scale_zero_is_base(tiny_pipe):
    from midi.lora import lora_config_dict
    from midi.tiny import TINY_MI_BLOCKS

    tiny_pipe.init_custom_adapter(TINY_MI_BLOCKS, exact_module_names=True)
    x, t, e1, e2 = _inputs()
    kw = {"num_instances": 3}
    with torch.no_grad():
        base = tiny_pipe.transformer(x, t, e1, e2, attention_kwargs=kw).sample
        tiny_pipe.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=lora_config_dict(4, 4), exact_module_names=True)
        assert torch.equal(tiny_pipe.transformer(x, t, e1, e2, attention_kwargs=kw).sample, base)
        for name, p in tiny_pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_()
        changed = tiny_pipe.transformer(x, t, e1, e2, attention_kwargs=kw).sample
        zero = tiny_pipe.transformer(x, t, e1, e2, attention_kwargs={**kw, "scale": 0.0}).sample
    assert (changed - base).abs().max() > 1e-3
    torch.testing.assert_close(zero, base, atol=1e-6, rtol=0)
    trainable = {n for n, p in tiny_pipe.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_custom_adapter_round_trip_and_strict_errors(tiny_pipe, tmp_path):
    from midi.errors import AdapterError
    from midi.lora import lora_config_dict
    from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

    config = lora_config_dict(4, 8, init_lora_weights=False)
    tiny_pipe.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=config, exact_module_names=True)
    path = tiny_pipe.save_custom_adapter(tmp_path, "adapter.safetensors")
    x, t, e1, e2 = _inputs()
    kw = {"num_instances": 3}
    with torch.no_grad():
        ref = tiny_pipe.transformer(x, t, e1, e2, attention_kwargs=kw).sample
    fresh = tiny_pipeline(0)
    with pytest.raises(AdapterError, match="call init_custom_adapter"):
        fresh.load_custom_adapter(path)
    fresh.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=config, exact_module_names=True)
    fresh.load_custom_adapter(tmp_path, weight_name="adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh.transformer(x, t, e1, e2, attention_kwargs=kw).sample, ref)
    other_rank = tiny_pipeline(0)
    other_rank.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=lora_config_dict(2, 2), exact_module_names=True)
    with pytest.raises(AdapterError, match=r"has shape \(4, 64\) but the model expects \(2, 64\)"):
        other_rank.load_custom_adapter(path)
    # Pickle files load through torch.load(weights_only=True); non-tensor payloads are refused.
    torch.save({"transformer.x": {"not": "a tensor"}}, tmp_path / "bad.bin")
    with pytest.raises(AdapterError, match="bad.bin"):
        fresh.load_custom_adapter(tmp_path / "bad.bin")
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="corrupt.safetensors: cannot read"):
        fresh.load_custom_adapter(tmp_path / "corrupt.safetensors")


def test_dinov2_channel_expansion_clone_and_zero(tiny_pipe):
    from transformers import Dinov2Config, Dinov2Model

    from midi.loaders.custom_adapter import PATCH_PROJECTION_KEY, expand_patch_projection

    w = torch.randn(32, 3, 8, 8)
    cloned = expand_patch_projection(w, 7, "clone")
    assert torch.equal(cloned, w[:, [0, 1, 2, 0, 1, 2, 0]])
    assert torch.equal(expand_patch_projection(w, 7, "zero")[:, 3:], torch.zeros(32, 4, 8, 8))
    rgb = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                                   patch_size=8, num_channels=3))
    tiny_pipe.register_modules(image_encoder_2=rgb)
    tiny_pipe.init_custom_adapter(["blocks.3"])
    assert tiny_pipe.image_encoder_2.config.num_channels == 7
    new = tiny_pipe.image_encoder_2.state_dict()[PATCH_PROJECTION_KEY]
    assert torch.equal(new, rgb.state_dict()[PATCH_PROJECTION_KEY][:, [0, 1, 2, 0, 1, 2, 0]])


# ----------------------------------------------------------------------------- loading / saving
def test_save_pretrained_round_trip(upstream_pipe, tmp_path):
    from midi.pipelines.pipeline_midi import MIDIPipeline

    upstream_pipe.save_pretrained(tmp_path / "saved")
    ours = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    theirs = json.loads((UPSTREAM_PIPELINE / "model_index.json").read_text())
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == {k: v for k, v in theirs.items() if not k.startswith("_")}
    again = MIDIPipeline.from_pretrained(tmp_path / "saved")
    for name in ("transformer", "vae", "image_encoder_1", "image_encoder_2"):
        a, b = getattr(upstream_pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def pipeline_copy(tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(UPSTREAM_PIPELINE, folder)
    return folder


def test_load_errors_name_the_component(pipeline_copy):
    from midi.errors import ModelError
    from midi.pipelines.pipeline_midi import MIDIPipeline

    shutil.rmtree(pipeline_copy / "vae")
    with pytest.raises(ModelError, match="component 'vae' is listed in model_index.json but vae/ is missing"):
        MIDIPipeline.from_pretrained(pipeline_copy)


def test_load_errors_wrong_shape(pipeline_copy):
    from midi.errors import ModelError
    from midi.pipelines.pipeline_midi import MIDIPipeline

    file = pipeline_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["blocks.2.attn1.to_q.weight"] = torch.zeros(32, 64)
    save_file(state, str(file))
    with pytest.raises(ModelError, match=r"'transformer' key 'blocks.2.attn1.to_q.weight' expected shape \(64, 64\) \(from config.json\), found \(32, 64\)"):
        MIDIPipeline.from_pretrained(pipeline_copy)
    del state["blocks.2.attn1.to_q.weight"]
    save_file(state, str(file))
    with pytest.raises(ModelError, match="1 missing"):
        MIDIPipeline.from_pretrained(pipeline_copy)


def test_load_errors_unknown_class(pipeline_copy):
    from midi.errors import ModelError
    from midi.pipelines.pipeline_midi import MIDIPipeline

    index = json.loads((pipeline_copy / "model_index.json").read_text())
    index["image_encoder_2"] = ["transformers", "ViTModel"]
    (pipeline_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="'image_encoder_2' is \\['transformers', 'ViTModel'\\]"):
        MIDIPipeline.from_pretrained(pipeline_copy)


def test_load_errors_image_encoder_weights(pipeline_copy):
    from midi.errors import ModelError
    from midi.pipelines.pipeline_midi import MIDIPipeline

    config = json.loads((pipeline_copy / "image_encoder_2" / "config.json").read_text())
    config["hidden_size"] = 48
    (pipeline_copy / "image_encoder_2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"component .image_encoder_2. key .embeddings.cls_token. expected shape \(1, 1, 48\) \(from config.json\), found \(1, 1, 32\)"):
        MIDIPipeline.from_pretrained(pipeline_copy)


# ----------------------------------------------------------------------------- pipeline / decoding
def test_pipeline_defaults_num_instances_and_checks_inputs(tiny_pipe):
    from PIL import Image

    from midi.tiny import TINY_MI_BLOCKS

    tiny_pipe.init_custom_adapter(TINY_MI_BLOCKS)
    img = [Image.new("RGB", (40, 40), c) for c in ("red", "green")]
    masks = [Image.new("L", (40, 40), 255)] * 2
    kwargs = dict(image=img, mask=masks, image_scene=img, num_inference_steps=2, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    implicit = tiny_pipe(**kwargs).samples
    explicit = tiny_pipe(**kwargs | {"attention_kwargs": {"num_instances": 2}, "generator": torch.Generator().manual_seed(0)}).samples
    assert torch.equal(implicit, explicit)
    with pytest.raises(ValueError, match="one entry per instance"):
        tiny_pipe(image=img, mask=masks[:1], image_scene=img, num_inference_steps=1)
    with pytest.raises(ValueError, match="does not divide"):
        tiny_pipe(**kwargs | {"attention_kwargs": {"num_instances": 3}})


def test_decode_latents_dense_and_progressive(tiny_pipe):
    latents = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(3))
    out, grid_sizes, sizes, mins, maxs = tiny_pipe.decode_latents(latents, octree_depth=3)
    assert out.shape == (2, 9**3, 1) and grid_sizes == [[9, 9, 9]] and len(mins) == 1
    np.testing.assert_allclose(sizes[0], [2.01] * 3)
    out_p, grid_sizes_p, _, mins_p, maxs_p = tiny_pipe.decode_latents(latents, decode_progressive=True, octree_depth=3)
    assert out_p.shape == (2, 9**3, 1) and len(grid_sizes_p) == 2
    points = torch.from_numpy(np.stack(np.meshgrid(*[np.linspace(-1.005, 1.005, 9, dtype=np.float32)] * 3, indexing="ij"), -1).reshape(-1, 3))
    for i in range(2):
        selected = points[out[i, :, 0] <= 0]
        if len(selected):
            np.testing.assert_allclose(mins_p[i], selected.min(0).values.numpy() - 0.05, rtol=1e-6)
            np.testing.assert_allclose(maxs_p[i], selected.max(0).values.numpy() + 0.05, rtol=1e-6)


def test_vae_fps_is_deterministic_and_spread():
    from midi.models.autoencoders.autoencoder_kl_triposg import farthest_point_sampling

    pts = torch.rand(2, 500, 3, generator=torch.Generator().manual_seed(0))
    idx = farthest_point_sampling(pts, 20)
    assert torch.equal(idx, farthest_point_sampling(pts, 20)) and (idx[:, 0] == 0).all()
    for b in range(2):
        chosen = pts[b, idx[b]]
        assert len(set(idx[b].tolist())) == 20
        # FPS picks are spread: their minimum pairwise distance beats random picks'.
        d = torch.cdist(chosen, chosen) + torch.eye(20) * 10
        rnd = pts[b, :20]
        d_rnd = torch.cdist(rnd, rnd) + torch.eye(20) * 10
        assert d.min() > d_rnd.min()


def test_num_images_per_prompt_keeps_scene_groups(tiny_pipe):
    from PIL import Image

    from midi.tiny import TINY_MI_BLOCKS

    img = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    masks = [Image.new("L", (32, 32), 255)] * 3
    e1, _ = tiny_pipe.encode_image_1(img, "cpu", 2)
    assert torch.equal(e1[1], e1[0]) and not torch.equal(e1[1], e1[2])  # upstream: interleaved copies
    tiny_pipe.init_custom_adapter(TINY_MI_BLOCKS)
    e1, _ = tiny_pipe.encode_image_1(img, "cpu", 2)
    assert torch.equal(e1[3], e1[0]) and not torch.equal(e1[1], e1[0])  # MI: copy-major scene groups
    out = tiny_pipe(image=img, mask=masks, image_scene=img, num_inference_steps=1, num_images_per_prompt=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).samples
    assert out.shape == (6, 64, 8)


def test_per_component_dtype():
    from midi.errors import ModelError
    from midi.pipelines.pipeline_midi import MIDIPipeline

    pipe = MIDIPipeline.from_pretrained(UPSTREAM_PIPELINE, torch_dtype={"vae": torch.float32, "default": torch.bfloat16})
    assert pipe.vae.dtype == torch.float32 and pipe.transformer.dtype == torch.bfloat16
    assert next(pipe.image_encoder_2.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="unknown component"):
        MIDIPipeline.from_pretrained(UPSTREAM_PIPELINE, torch_dtype={"vea": torch.float32})


def test_read_lora_errors_are_one_line(tmp_path):
    from midi.errors import AdapterError
    from midi.lora import export_lora, lora_config_dict, read_lora
    from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

    with pytest.raises(AdapterError, match="does not exist"):
        read_lora(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no LoRA found"):
        read_lora(tmp_path / "empty")
    pipe = tiny_pipeline(0)
    pipe.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=lora_config_dict(2, 2), exact_module_names=True)
    adapter = export_lora(pipe, tmp_path / "run" / "lora-final", TINY_MI_BLOCKS)
    (tmp_path / "run" / "checkpoint-old" / "lora").mkdir(parents=True)  # a stray folder is ignored
    assert read_lora(tmp_path / "run").source == adapter
    (adapter / "midi_adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="midi_adapter.json: unreadable adapter metadata"):
        read_lora(adapter)


# ----------------------------------------------------------------------------- interop
def _fixed_forward(transformer) -> torch.Tensor:
    """The tiny transformer on a fixed batch of one 2-instance scene: (2, 64, 8)."""
    g = torch.Generator().manual_seed(5)
    x, e1, e2 = torch.randn(2, 64, 8, generator=g), torch.randn(2, 1, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return transformer(x, torch.full((2,), 500.0), encoder_hidden_states=e1, encoder_hidden_states_2=e2,
                           attention_kwargs={"num_instances": [2]}, return_dict=False)[0]


def test_tiny_pipeline_saved_in_release_layout_loads_back(tmp_path):
    from PIL import Image

    from midi import tiny
    from midi.pipelines.loading import COMPONENTS
    from midi.pipelines.pipeline_midi import MIDIPipeline

    tiny.main(["save", str(tmp_path / "tiny"), "--seed", "2"])
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted([*COMPONENTS, "model_index.json"])
    pipes = [MIDIPipeline.from_pretrained(tmp_path / "tiny"), tiny.tiny_pipeline(2)]
    img = [Image.new("RGB", (40, 40), c) for c in ("red", "green")]
    masks = [Image.new("L", (40, 40), 255)] * 2
    out = []
    for pipe in pipes:
        pipe.init_custom_adapter(tiny.TINY_MI_BLOCKS, exact_module_names=True)
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe(image=img, mask=masks, image_scene=img, num_inference_steps=2, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).samples)
    assert torch.equal(out[0], out[1])
    assert not torch.equal(pipes[1].transformer.proj_in.weight, tiny.tiny_pipeline(0).transformer.proj_in.weight)


def test_exported_adapter_loads_with_peft_and_diffusers_own_loaders(tmp_path):
    """PEFT's PeftModel.from_pretrained and diffusers' load_lora_adapter change the output exactly as ours."""
    from peft import PeftModel

    from midi.inference.generation import ModelOptions, build_pipeline
    from midi.lora import export_lora, lora_config_dict, read_lora
    from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

    def fresh_transformer():
        pipe = tiny_pipeline(0)
        pipe.init_custom_adapter(TINY_MI_BLOCKS, exact_module_names=True)
        return pipe.transformer

    trained = tiny_pipeline(0)
    torch.manual_seed(1)
    config = lora_config_dict(rank=4, alpha=8, init_lora_weights=False)  # alpha != rank: the scaling must travel
    trained.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=config, exact_module_names=True)
    folder = export_lora(trained, tmp_path / "lora", TINY_MI_BLOCKS)
    ours = _fixed_forward(build_pipeline(ModelOptions("tiny", lora_path=folder)).pipe.transformer)
    assert (ours - _fixed_forward(fresh_transformer())).abs().max() > 1e-3
    peft_model = PeftModel.from_pretrained(fresh_transformer(), str(folder)).eval()
    torch.testing.assert_close(_fixed_forward(peft_model), ours, rtol=0, atol=1e-6)
    transformer = fresh_transformer()
    transformer.load_lora_adapter(str(folder), weight_name="adapter_model.safetensors", prefix="base_model.model")
    torch.testing.assert_close(_fixed_forward(transformer.eval()), ours, rtol=0, atol=1e-6)
    # Our reader reads both the PEFT keys and the older unprefixed files.
    state = load_file(folder / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in state)
    save_file({k.removeprefix("base_model.model."): v for k, v in state.items()}, folder / "adapter_model.safetensors")
    assert set(read_lora(folder).weights["transformer"]) == {k.removeprefix("base_model.model.") for k in state}


def test_load_adapter_installs_or_loads_into_existing_modules_strictly(tmp_path):
    """The one strict loader: a fresh pipeline (install) and a resume (install=False) reproduce the
    trained transformer; a different rank or a pipeline without LoRA modules is refused in words."""
    from midi.errors import AdapterError
    from midi.lora import export_lora, load_adapter, lora_config_dict
    from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

    def with_lora(rank: int):
        pipe = tiny_pipeline(0)
        pipe.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=lora_config_dict(rank, 8),
                                 exact_module_names=True)
        return pipe

    trained = tiny_pipeline(0)
    torch.manual_seed(1)
    trained.init_custom_adapter(TINY_MI_BLOCKS, transformer_lora_config=lora_config_dict(4, 8, init_lora_weights=False),
                                exact_module_names=True)
    folder = export_lora(trained, tmp_path / "lora", TINY_MI_BLOCKS)
    reference = _fixed_forward(trained.transformer)
    fresh = tiny_pipeline(0)
    assert load_adapter(fresh, folder).mi_blocks == list(TINY_MI_BLOCKS)
    resumed = with_lora(4)
    load_adapter(resumed, folder, install=False)
    for pipe in (fresh, resumed):
        assert torch.equal(_fixed_forward(pipe.transformer), reference)
    with pytest.raises(AdapterError, match=r"has shape \(4, 64\) but the model expects \(2, 64\)"):
        load_adapter(with_lora(2), folder, install=False)
    with pytest.raises(AdapterError, match="transformer has no LoRA modules to load into"):
        load_adapter(tiny_pipeline(0), folder, install=False)
    state = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "to_q" not in k}, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"transformer keys do not match the model \(\d+ missing, 0 unexpected"):
        load_adapter(with_lora(4), folder, install=False)
