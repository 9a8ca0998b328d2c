"""Invariants of the training setup: LoRA starts as the identity, only LoRA weights move, and
scenes packed into one batch do not see each other."""

from __future__ import annotations

import torch

from midi.training.batches import TrainBatch
from midi.training.build import build_pipeline, count_trainable, trainable_parameters
from midi.training.objective import FlowMatchingModel
from training.conftest import tiny_config


def _inputs(config, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, config.width, config.in_channels, generator=g), torch.full((rows,), 420.0),
            torch.randn(rows, 1, config.cross_attention_dim, generator=g),
            torch.randn(rows, 4, config.cross_attention_2_dim, generator=g))


def test_lora_starts_as_the_base_model(tmp_path):
    from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

    cfg = tiny_config(tmp_path, tmp_path / "out")
    pipe = build_pipeline(cfg, torch.float32, "cpu")
    base = tiny_pipeline(cfg.model.tiny_seed)
    base.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True)
    x, t, e1, e2 = _inputs(pipe.transformer.config)
    kwargs = dict(encoder_hidden_states=e1, encoder_hidden_states_2=e2, attention_kwargs={"num_instances": [3]},
                  return_dict=False)
    with torch.no_grad():
        ours = pipe.transformer.eval()(x, t, **kwargs)[0]
        reference = base.transformer(x, t, **kwargs)[0]
    assert torch.equal(ours, reference)
    assert count_trainable(pipe) == {"transformer": sum(p.numel() for p in trainable_parameters(pipe))}
    assert all(p.dtype == torch.float32 for p in trainable_parameters(pipe))


def test_a_training_step_changes_only_lora_weights(data_root, tmp_path, monkeypatch):
    import train_lora
    from midi.training import build, metrics, objective
    from midi.training.checkpoints import TrainerState

    # The modules train_lora.main imports after its config check (the loop is called here without main).
    for module in (metrics, objective):
        monkeypatch.setattr(train_lora, module.__name__.rsplit(".", 1)[1], module, raising=False)
    cfg = tiny_config(data_root, tmp_path / "out", "--optimizer.lr_warmup_steps", "0")
    run = build.build(cfg, dry_run=True)
    models = {n: getattr(run.pipe, n) for n in ("transformer", "vae", "image_encoder_1", "image_encoder_2")}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    run.model.train()
    train_lora.optimizer_step(run, TrainerState(), iter(run.loader()), metrics.ThroughputMeter())
    changed = []
    for name, model in models.items():
        for key, value in model.state_dict().items():
            if not torch.equal(value, before[name][key]):
                changed.append(f"{name}.{key}")
    assert changed, "the step changed nothing"
    assert all(".lora_" in key for key in changed), [k for k in changed if ".lora_" not in k][:5]
    assert any("lora_B" in key for key in changed)


def test_packed_scenes_do_not_attend_to_each_other(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "out", "--lora.init_lora_weights", "gaussian")
    pipe = build_pipeline(cfg, torch.float32, "cpu")
    model = FlowMatchingModel(pipe).eval()
    x, t, e1, e2 = _inputs(pipe.transformer.config, rows=5)

    def run(rows: slice, counts: list[int], per_batch: int | None = None) -> torch.Tensor:
        batch = TrainBatch(["s"] * len(counts), counts, [per_batch or c for c in counts], per_batch,
                           embeds_1=e1[rows], embeds_2=e2[rows])
        with torch.no_grad():
            return model(x[rows], t[rows], batch, torch.zeros(x[rows].shape[0], dtype=torch.bool))

    packed = run(slice(0, 5), [2, 3])
    torch.testing.assert_close(packed[:2], run(slice(0, 2), [2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[2:], run(slice(2, 5), [3]), atol=1e-5, rtol=1e-5)
    # Upstream's padded layout: a scene of 2 instances in 3 rows (the third a padding row) gives
    # the real rows the same output as the scene alone.
    padded = run(slice(0, 3), [2], per_batch=3)
    torch.testing.assert_close(padded[:2], packed[:2], atol=1e-5, rtol=1e-5)
    # ...while a single scene of all 5 rows differs (MI attention does mix instances of a scene).
    assert not torch.allclose(run(slice(0, 5), [5])[:2], packed[:2], atol=1e-4)
