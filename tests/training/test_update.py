"""``train_lora.apply_update``: skipped steps under an fp16 gradient scaler, and the normal path."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import train_lora


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # earlier tests may have left one in this process
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _run(scaler: bool):
    from accelerate import Accelerator

    from midi.config import TrainingConfig

    acc = Accelerator(cpu=True, mixed_precision="fp16" if scaler else "no")
    if scaler:  # accelerate makes no scaler on CPU; give it the one CUDA fp16 runs get (torch's GradScaler)
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**10), True
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, sched = acc.prepare(model, optimizer, sched)
    cfg = TrainingConfig()
    return SimpleNamespace(accelerator=acc, cfg=cfg, model=model, optimizer=optimizer, lr_scheduler=sched,
                           params=list(model.parameters()))


def _backward(r, value: float = 1.0) -> None:
    loss = r.model(torch.ones(1, 3)).sum() * value
    r.accelerator.backward(loss)


@pytest.mark.parametrize("scaler", [True, False], ids=["fp16-scaler", "no-scaler"])
def test_a_skipped_step_does_not_break_the_next_one(scaler):
    r = _run(scaler)
    weight = r.model.weight.detach().clone()
    _backward(r)
    norm, skipped = train_lora.apply_update(r, bad=True)  # e.g. a non-finite loss on another micro-step
    assert skipped and math.isnan(norm)
    assert torch.equal(r.model.weight.detach(), weight), "a skipped step must not update"
    assert r.model.weight.grad is None
    if scaler:
        assert r.accelerator.scaler.get_scale() == 2.0**9, "the scale backs off after a skipped step"
    _backward(r)
    norm, skipped = train_lora.apply_update(
        r, bad=False
    )  # raised 'unscale_() has already been called' before
    assert not skipped and math.isfinite(norm)
    assert not torch.equal(r.model.weight.detach(), weight)


def test_inf_gradients_under_the_scaler_count_as_skipped():
    r = _run(scaler=True)
    weight = r.model.weight.detach().clone()
    _backward(r, float("inf"))
    _, skipped = train_lora.apply_update(r, bad=False)
    assert skipped
    assert torch.equal(r.model.weight.detach(), weight)


def test_a_pretrained_vae_is_loaded_in_float32(monkeypatch):
    """The VAE is read in float32 (per-component torch_dtype), not loaded in bf16 and upcast."""
    from midi.config import TrainingConfig
    from midi.pipelines.pipeline_midi import MIDIPipeline
    from midi.tiny import load_pipeline

    seen = {}

    class Stop(Exception):
        pass

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(MIDIPipeline, "from_pretrained", staticmethod(fake))
    model_cfg = TrainingConfig().model
    model_cfg.pretrained_model_name_or_path = "/some/folder"
    with pytest.raises(Stop):
        load_pipeline(model_cfg.pretrained_model_name_or_path, torch.bfloat16)
    assert seen["torch_dtype"] == {"vae": torch.float32, "default": torch.bfloat16}


def test_dynamic_shifting_schedulers_are_rejected(tmp_path):
    from midi.config import TrainingConfig
    from midi.training.build import scheduler_problems

    model_cfg = TrainingConfig().model
    model_cfg.pretrained_model_name_or_path = str(tmp_path)
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text('{"shift": 1.0, "use_dynamic_shifting": false}')
    assert scheduler_problems(model_cfg) == []
    path.write_text('{"shift": 1.0, "use_dynamic_shifting": true}')
    (problem,) = scheduler_problems(model_cfg)
    assert "use_dynamic_shifting" in problem and str(path) in problem
