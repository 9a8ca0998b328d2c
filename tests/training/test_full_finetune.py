"""model.finetune: full on the tiny model: every weight trains, resume is bit-exact, the export is a
pipeline folder that loads (MIDIPipeline, load_pipeline, diffusers' own loader) and is a base for LoRA
training, and bad combinations fail before anything loads."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import train_lora
from midi.config_load import load_config
from midi.errors import ConfigError
from training.conftest import tiny_args, tiny_config

FULL = ("--model.finetune", "full")


def _main(argv: list[str]) -> int:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # a clean accelerate singleton, as a new process would have
    GradientState._reset_state()
    return train_lora.main(argv)


def _states(pipe, names=("transformer", "image_encoder_1", "image_encoder_2", "vae")) -> dict[str, dict]:
    return {n: {k: v.detach().clone() for k, v in getattr(pipe, n).state_dict().items()} for n in names}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetuning_trains_every_weight_and_fits_a_fixed_batch(data_root, tmp_path):
    from midi.training import build, objective

    cfg = tiny_config(data_root, tmp_path / "out", *FULL, "--model.train_image_encoders", "true",
                      "--optimizer.weight_decay", "0", "--optimizer.learning_rate", "1e-3",
                      "--optimizer.lr_warmup_steps", "0", "--optimizer.lr_scheduler", "constant",
                      "--objective.condition_drop_prob", "0")
    run = build.build(cfg, dry_run=True)
    pipe, model = run.pipe, run.model
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())  # no adapter in full mode
    assert all(p.requires_grad and p.dtype == torch.float32 for p in pipe.transformer.parameters())
    before = _states(pipe)
    batch = next(iter(run.loader()))

    def loss() -> torch.Tensor:  # the same sigmas, noise and posterior sample every time
        return objective.training_step(model, pipe.vae, pipe.scheduler, batch, cfg.objective, run.num_tokens,
                                       torch.Generator().manual_seed(7)).loss

    model.train()
    first = loss()
    first.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []  # every trained weight gets a gradient (DDP would wait for one that does not)
    run.optimizer.step()
    run.optimizer.zero_grad()
    for _ in range(9):
        loss().backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    assert float(loss().detach()) < 0.9 * float(first.detach())
    after = _states(pipe)
    for name in ("transformer", "image_encoder_1", "image_encoder_2"):
        unchanged = [k for k, v in after[name].items() if torch.equal(v, before[name][k])
                     and k != "embeddings.mask_token"]  # DINOv2's mask token is unused by MIDI: frozen
        if name == "transformer":
            assert unchanged == []
        assert len(unchanged) < len(after[name]) / 10, (name, unchanged[:5])
    assert _equal(after["vae"], before["vae"])


def test_full_resume_continues_exactly(data_root, tmp_path, monkeypatch):
    """4 steps straight == 3 steps, crash, resume from latest, 1 more: losses and all trained weights, bitwise."""
    extra = (*FULL, "--model.train_image_encoders", "true", "--train.gradient_accumulation_steps", "2",
             "--train.batch_size", "1", "--optimizer.lr_warmup_steps", "1", "--checkpointing.every_n_steps", "1",
             "--validation.every_n_steps", "0")
    losses: list[float] = []
    original_step, original_end = train_lora.optimizer_step, train_lora.on_step_end

    def recording(r, state, batches, meter):
        out = original_step(r, state, batches, meter)
        losses.append(out[0])
        return out

    monkeypatch.setattr(train_lora, "optimizer_step", recording)
    assert _main(tiny_args(data_root, tmp_path / "a", *extra)) == 0
    straight, losses[:] = list(losses), []

    def crash_after_step_3(r, state, meter, grad_norm):
        original_end(r, state, meter, grad_norm)
        if state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_lora, "on_step_end", crash_after_step_3)
    assert _main(tiny_args(data_root, tmp_path / "b", *extra)) == 130
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.yaml", "image_encoder_1.safetensors", "image_encoder_2.safetensors", "optimizer.bin",
        "random_states_0.pkl", "scheduler.bin", "trainer_state.json", "transformer.safetensors"]
    monkeypatch.setattr(train_lora, "on_step_end", original_end)
    assert _main(tiny_args(data_root, tmp_path / "b", *extra, "--resume_from_checkpoint", "latest")) == 0
    assert len(losses) == 4 and losses == straight  # bitwise: same data, noise, weights and optimizer state
    for name in ("transformer", "image_encoder_1", "image_encoder_2"):
        a, b = (safetensors.torch.load_file(tmp_path / run / "checkpoint-4" / f"{name}.safetensors") for run in "ab")
        assert _equal(a, b), name


def test_the_export_is_a_pipeline_folder_that_loads_generates_and_takes_a_lora(data_root, tmp_path, caplog):
    from diffusers import DiffusionPipeline
    from PIL import Image

    from midi.pipelines.pipeline_midi import MIDIPipeline
    from midi.tiny import MI_BLOCKS_KEY, TINY_MI_BLOCKS, load_pipeline, mi_blocks_for, tiny_pipeline

    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert _main(tiny_args(data_root, out, *FULL, "--model.train_image_encoders", "true", "--cache.enabled",
                               "true", max_steps=2)) == 0
    assert "embeddings change during training and are not cached" in caplog.text
    assert not (tmp_path / "cache" / "embeds").exists() and list((tmp_path / "cache" / "vae").iterdir())
    final = out / "pipeline-final"
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-2", "config.yaml", "pipeline-final"]
    components = ["feature_extractor_1", "feature_extractor_2", "image_encoder_1", "image_encoder_2", "scheduler",
                  "transformer", "vae"]
    assert sorted(p.name for p in final.iterdir()) == sorted([*components, "config.yaml", "midi_training.json",
                                                              "model_index.json"])
    assert (out / "best" / "best.json").is_file() and (out / "best" / "model_index.json").is_file()
    record = json.loads((final / "midi_training.json").read_text())
    assert record["export_check"]["ok"] and record["trained"] == ["transformer", "image_encoder_1", "image_encoder_2"]
    assert json.loads((final / "transformer" / "config.json").read_text())[MI_BLOCKS_KEY] == list(TINY_MI_BLOCKS)
    assert mi_blocks_for(str(final)) == TINY_MI_BLOCKS

    pipe = MIDIPipeline.from_pretrained(final)
    trained = safetensors.torch.load_file(out / "checkpoint-2" / "transformer.safetensors")
    assert _equal(pipe.transformer.state_dict(), trained)  # the last step's weights
    assert _equal(pipe.vae.state_dict(), tiny_pipeline(0).vae.state_dict())  # the frozen VAE as it was
    assert not _equal(pipe.image_encoder_2.state_dict(), tiny_pipeline(0).image_encoder_2.state_dict())
    pipe.set_progress_bar_config(disable=True)
    pipe.init_custom_adapter(set_self_attn_module_names=list(mi_blocks_for(str(final))), exact_module_names=True)
    scene = Image.new("RGB", (64, 64), "white")
    latents = pipe(image=[scene, scene], mask=[Image.new("L", (64, 64), 255)] * 2, image_scene=[scene] * 2,
                   num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).samples
    assert latents.shape == (2, 64, 8) and torch.isfinite(latents).all()
    generic = DiffusionPipeline.from_pretrained.__func__(MIDIPipeline, str(final))  # how upstream's pipeline loads
    assert _equal(generic.transformer.state_dict(), trained)
    assert _equal(load_pipeline(str(final)).image_encoder_1.state_dict(), pipe.image_encoder_1.state_dict())

    # The folder is a base for LoRA training: its multi-instance blocks come from transformer/config.json.
    lora = tmp_path / "lora-run"
    assert _main(tiny_args(data_root, lora, "--model.pretrained_model_name_or_path", str(final),
                           "--model.mi_blocks", "null", max_steps=2)) == 0
    meta = json.loads((lora / "lora-final" / "midi_adapter.json").read_text())
    assert meta["export_check"]["ok"] and meta["mi_blocks"] == list(TINY_MI_BLOCKS)


def test_bf16_full_run_keeps_trained_weights_fp32_and_exports_the_frozen_ones_unrounded(data_root, tmp_path):
    from midi.pipelines.pipeline_midi import MIDIPipeline
    from midi.tiny import tiny_pipeline

    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, *FULL, "--train.mixed_precision", "bf16", max_steps=2)) == 0
    record = json.loads((out / "pipeline-final" / "midi_training.json").read_text())
    assert record["export_check"]["ok"] and record["trained"] == ["transformer"]
    trained = safetensors.torch.load_file(out / "checkpoint-2" / "transformer.safetensors")
    assert all(v.dtype == torch.float32 for v in trained.values())
    pipe, base = MIDIPipeline.from_pretrained(out / "pipeline-final"), tiny_pipeline(0)
    for name in ("image_encoder_1", "image_encoder_2", "vae"):  # frozen: exported from the base, not the bf16 copies
        assert _equal(getattr(pipe, name).state_dict(), getattr(base, name).state_dict()), name


def _problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_config(None, list(overrides))
    return list(error.value.problems)


def test_bad_full_finetune_combinations_fail_before_anything_loads(data_root, tmp_path, capsys):
    problems = _problems(*FULL, "--lora.rank", "4", "--lora.image_encoder_1", "true", "--checkpointing.verify_exports",
                         "true")
    assert "lora.rank: only used by model.finetune: lora (full finetuning trains the weights themselves); remove it, " \
           "or set model.finetune: lora" in problems
    assert any(p.startswith("lora.image_encoder_1: only used by model.finetune: lora") for p in problems)
    assert any(p.startswith("checkpointing.verify_exports: only checks LoRA checkpoints") for p in problems)
    assert _problems("--model.train_image_encoders", "true") == [
        "model.train_image_encoders: only applies to model.finetune: full; for LoRA adapters on the encoders set "
        "lora.image_encoder_1 / lora.image_encoder_2 instead"]
    assert _problems("--model.finetune", "ful") == ["model.finetune: must be one of lora, full, got 'ful'; did you "
                                                    "mean 'full'?"]
    assert _problems("--model.mi_blocks", "[]")[0].startswith("model.mi_blocks: must name at least one block")
    load_config(str(tiny_args(data_root, tmp_path)[1]), list(FULL))  # a LoRA config with default lora keys switches

    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, *FULL, "--lora.rank", "4")) == 2
    assert "error: " in capsys.readouterr().err and not out.exists()


def test_mode_changes_and_unknown_blocks_are_refused(data_root, tmp_path, capsys):
    from midi.tiny import save_tiny_pipeline
    from midi.training.build import check_model_setup

    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, max_steps=2, )) == 0  # a LoRA run
    assert _main(tiny_args(data_root, out, *FULL, "--resume_from_checkpoint", "latest")) == 2
    assert "cannot resume, the adapter's structure changed (model.finetune: 'lora' -> 'full')" in capsys.readouterr().err
    folder = save_tiny_pipeline(tmp_path / "other")  # a transformer that is not tiny's any more and records no blocks
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_layers": 6}))
    cfg = load_config(None, ["--model.pretrained_model_name_or_path", str(folder), "--model.mi_blocks", "null"])
    with pytest.raises(ConfigError) as error:
        check_model_setup(cfg)
    assert error.value.problems[0].startswith("model.mi_blocks: null (the model's own), but ")
    assert "name them (--mi_blocks / model.mi_blocks)" in error.value.problems[0]
