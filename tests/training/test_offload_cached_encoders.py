"""With the cache on, the encoders the cached step never runs leave the accelerator (issue 14, item 2).

The offload only acts on one accelerator, which the CI machine lacks; the tests force its gate so
accelerate's hooks run with the CPU as the execution device, the same mechanics as on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType

from midi.config_load import load_config
from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline
from midi.training import build
from training.conftest import TINY_YAML

CPU_ONE_PROCESS = SimpleNamespace(device=torch.device("cpu"), distributed_type=DistributedType.NO)


def _cfg(*extra: str):
    return load_config(TINY_YAML, ["--cache.enabled", "true", *extra])


def test_the_offload_acts_only_on_one_accelerator():
    gpu = torch.device("cuda")
    assert build.offload_applies(SimpleNamespace(device=gpu, distributed_type=DistributedType.NO))
    assert not build.offload_applies(CPU_ONE_PROCESS)
    for kind in (DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.DEEPSPEED):
        assert not build.offload_applies(SimpleNamespace(device=gpu, distributed_type=kind))
    assert build.offload_cached_encoders(tiny_pipeline(), _cfg(), CPU_ONE_PROCESS) == []


def test_image_encoders_stay_when_one_of_them_trains():
    pipe = tiny_pipeline()
    assert set(build.cached_encoders(pipe, _cfg())) >= {"image_encoder_1", "image_encoder_2", "vae.encoder.blocks.0"}
    names = set(build.cached_encoders(pipe, _cfg("--lora.image_encoder_2", "true")))
    assert names == {f"vae.encoder.blocks.{i}" for i in range(len(pipe.vae.encoder.blocks))}


def test_offloaded_encoders_run_on_demand_with_the_same_outputs(monkeypatch):
    pipe = tiny_pipeline()
    pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.ones(2, 1, 32, 32)
    surfaces = torch.rand(2, 512, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = (pipe.encode_image_1(pixels, "cpu")[0], pipe.encode_image_2(pixels, pixels, masks, "cpu")[0],
                  pipe.vae.encode(surfaces, num_tokens=16, seed=0).latent_dist.mean)
    monkeypatch.setattr(build, "offload_applies", lambda accelerator: True)
    names = build.offload_cached_encoders(pipe, _cfg(), CPU_ONE_PROCESS)
    assert "image_encoder_1" in names and "image_encoder_2" in names
    # The weights left the device (meta here, real copies in host memory); what the pipeline reads stays put.
    assert all(p.device.type == "meta" for p in pipe.image_encoder_1.parameters())
    assert all(p.device.type == "meta" for p in pipe.vae.encoder.blocks.parameters())
    assert pipe.vae.device.type == "cpu" and pipe.vae.dtype == torch.float32
    # (``pipe.device`` prefers a component on an accelerator, the transformer on a GPU, so it stays right there;
    # with everything on the CPU, as here, it would name the first component, an offloaded one: not checked.)
    with torch.no_grad():
        after = (pipe.encode_image_1(pixels, "cpu")[0], pipe.encode_image_2(pixels, pixels, masks, "cpu")[0],
                 pipe.vae.encode(surfaces, num_tokens=16, seed=0).latent_dist.mean)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_cached_training_step_with_offloaded_encoders(monkeypatch, data_root, tmp_path):
    """build() with the cache on and the gate forced: the step, its backward and a checkpoint still work."""
    from accelerate.state import AcceleratorState, GradientState

    import train_lora
    from midi.training import metrics, objective
    from midi.training.checkpoints import TrainerState
    from training.conftest import tiny_args

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train_lora.metrics, train_lora.objective = metrics, objective
    monkeypatch.setattr(build, "offload_applies", lambda accelerator: True)
    extra = ["--cache.enabled", "true"]
    cfg = load_config(TINY_YAML, tiny_args(data_root, tmp_path / "out", *extra)[2:])
    run = build.build(cfg, dry_run=False)
    assert hasattr(run.pipe.image_encoder_1, "_hf_hook") and hasattr(run.pipe.vae.encoder.blocks[0], "_hf_hook")
    state = TrainerState()
    loss, grad_norm, skipped = train_lora.optimizer_step(run, state, iter(run.loader()), metrics.ThroughputMeter())
    assert not skipped and torch.isfinite(torch.tensor(loss))
    state.global_step = 1
    assert (run.checkpoints.save(state) / "lora").is_dir()
