"""train_lora.py end to end on the tiny model: artifacts, resume, export, errors, dry run, cache, and two
CPU processes (gloo, torchrun).

Runs go through ``train_lora.main(argv)`` in-process (one import of diffusers for all tests);
one CLI smoke test uses a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

import train_lora
from midi.training import metrics
from training.conftest import REPO, TINY_YAML, nan_steps, tiny_args


def _reset_accelerate() -> None:
    """A clean accelerate singleton state, as a new process would have."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _main(argv: list[str]) -> int:
    _reset_accelerate()
    return train_lora.main(argv)



def _record_losses(monkeypatch) -> list[float]:
    losses: list[float] = []
    original = train_lora.optimizer_step

    def recording(r, state, batches, meter):
        loss, norm, skipped = original(r, state, batches, meter)
        losses.append(loss)
        return loss, norm, skipped

    monkeypatch.setattr(train_lora, "optimizer_step", recording)
    return losses


def _lora(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


def test_tiny_run_writes_the_promised_artifacts(data_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(data_root, out, "--logging.report_to", "tensorboard", "--validation.preview_every_n_steps", "4",
                     "--checkpointing.checkpoints_total_limit", "1")
    assert _main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best", "checkpoint-4", "config.yaml", "logs", "lora-final", "previews"]
    checkpoint = sorted(p.name for p in (out / "checkpoint-4").iterdir())
    assert checkpoint == ["config.yaml", "lora", "optimizer.bin", "random_states_0.pkl", "scheduler.bin",
                          "trainer_state.json"]
    final = sorted(p.name for p in (out / "lora-final").iterdir())
    assert final == ["adapter_config.json", "adapter_model.safetensors", "config.yaml", "custom_adapter.safetensors",
                     "midi_adapter.json"]
    meta = json.loads((out / "lora-final" / "midi_adapter.json").read_text())
    assert meta["export_check"]["ok"] and meta["export_check"]["max_abs_diff"] <= meta["export_check"]["tolerance"]
    assert meta["mi_blocks"] == ["blocks.3", "blocks.4"] and meta["training"]["global_step"] == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["consumed_batches"] == 4
    assert json.loads((out / "best" / "best.json").read_text())["step"] in (2, 4)
    assert list((out / "previews" / "step-4").glob("*.png"))
    assert list((out / "logs").rglob("events.out.tfevents*"))
    # The final adapter is the last step's weights, and all LoRA keys share one prefix.
    final_weights = _lora(out / "lora-final")
    for key, value in _lora(out / "checkpoint-4" / "lora").items():
        assert torch.equal(final_weights[key], value)
    custom = safetensors.torch.load_file(str(out / "lora-final" / "custom_adapter.safetensors"))
    assert custom and all(k.startswith("transformer.") and ".lora_" in k for k in custom)


def test_exported_adapter_loads_into_a_fresh_pipeline(data_root, tmp_path):
    from midi.lora import load_adapter
    from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline

    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, max_steps=2)) == 0
    meta = json.loads((out / "lora-final" / "midi_adapter.json").read_text())
    upstream_way = tiny_pipeline(0)  # upstream's API: init_custom_adapter + load_custom_adapter
    upstream_way.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True,
                                     transformer_lora_config=meta["lora_configs"]["transformer"])
    upstream_way.load_custom_adapter(out / "lora-final", weight_name="custom_adapter.safetensors")
    ours = tiny_pipeline(0)
    load_adapter(ours, out)  # the run folder resolves to lora-final/
    config = ours.transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.width, config.in_channels, generator=g)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 1, config.cross_attention_dim, generator=g),
                  encoder_hidden_states_2=torch.randn(2, 5, config.cross_attention_2_dim, generator=g),
                  attention_kwargs={"num_instances": 2}, return_dict=False)
    with torch.no_grad():
        a = upstream_way.transformer.eval()(x, torch.full((2,), 300.0), **kwargs)[0]
        b = ours.transformer.eval()(x, torch.full((2,), 300.0), **kwargs)[0]
        base = tiny_pipeline(0)
        base.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, exact_module_names=True)
        c = base.transformer(x, torch.full((2,), 300.0), **kwargs)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # the adapter did learn something


def test_resume_continues_exactly(data_root, tmp_path, monkeypatch):
    """4 steps straight == 3 steps, crash, resume from latest, 1 more (losses and weights).

    With 4 training scenes, batch 1 and 2 accumulation micro-steps, the crash falls in the middle
    of the second epoch, so the data position inside the epoch must be restored too.
    """
    extra = ("--train.gradient_accumulation_steps", "2", "--train.batch_size", "1", "--optimizer.lr_warmup_steps",
             "1", "--checkpointing.every_n_steps", "1")
    losses = _record_losses(monkeypatch)
    assert _main(tiny_args(data_root, tmp_path / "a", *extra)) == 0
    straight = list(losses)

    losses.clear()
    original = train_lora.on_step_end

    def crash_after_step_3(r, state, meter, grad_norm):
        original(r, state, meter, grad_norm)
        if state.global_step == 3:
            assert r.sampler.locate(state.consumed_batches) == (1, 2)  # mid-epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(train_lora, "on_step_end", crash_after_step_3)
    assert _main(tiny_args(data_root, tmp_path / "b", *extra)) == 130  # Ctrl-C: run_cli's exit code, no traceback
    monkeypatch.setattr(train_lora, "on_step_end", original)
    assert _main(tiny_args(data_root, tmp_path / "b", *extra, "--resume_from_checkpoint", "latest")) == 0
    assert len(losses) == 4
    assert losses == straight  # bitwise: the same data, noise, dropout and optimizer state
    a, b = _lora(tmp_path / "a" / "lora-final"), _lora(tmp_path / "b" / "lora-final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_guards(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest", max_steps=2)) == 0
    assert (out / "checkpoint-2").is_dir()  # 'latest' without a checkpoint starts a new run
    assert _main(tiny_args(data_root, out, max_steps=2)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", str(tmp_path / "nope"))) == 2
    assert "checkpointing.resume_from_checkpoint" in capsys.readouterr().err
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest", "--lora.rank", "4")) == 2
    assert "lora.rank: 16 -> 4" in capsys.readouterr().err
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest", "--lora.alpha", "3")) == 2
    assert "lora.alpha" in capsys.readouterr().err  # alpha scales the adapter: structural
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text("{not json")
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest")) == 2
    assert f"error: {state}: unreadable trainer state" in capsys.readouterr().err
    config = out / "checkpoint-2" / "config.yaml"
    config.write_text("train: [unclosed")
    assert _main(tiny_args(data_root, out, "--resume_from_checkpoint", "latest")) == 2
    assert f"error: {config}: unreadable checkpoint config" in capsys.readouterr().err


def test_an_unusable_output_folder_is_one_error_line(data_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _main(tiny_args(data_root, blocker / "run", max_steps=1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and "Traceback" not in err




def test_a_nonfinite_step_is_skipped_and_counted(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr("midi.training.objective.training_step", nan_steps({2}))
    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, "--optimizer.lr_warmup_steps", "0")) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1 and state["consecutive_nonfinite"] == 0


def test_repeated_nonfinite_steps_stop_with_an_emergency_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("midi.training.objective.training_step", nan_steps({1, 2, 3, 4}))
    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, "--train.max_consecutive_nonfinite", "2")) == 1  # a failed run, not bad input
    err = capsys.readouterr().err
    assert "2 non-finite steps in a row" in err and "emergency-2" in err
    assert (out / "emergency-2" / "lora" / "adapter_model.safetensors").is_file()
    assert not (out / "lora-final").exists()


def test_bad_input_fails_before_anything_is_written(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = _main(tiny_args(data_root, out, "--train.batch_size", "0", "--lora.rank_typo", "3",
                                     "--data.root", str(tmp_path / "missing")))
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert f"error: {TINY_YAML}: train.batch_size: must be >= 1, got 0" in err
    assert f"error: {TINY_YAML}: lora.rank_typo: unknown key; did you mean lora.rank?" in err
    assert any("data.root:" in line and "does not exist" in line for line in err)
    assert not out.exists()
    assert _main(tiny_args(data_root, out, "--lora.target_modules", "[to_q, to_kk]")) == 2
    assert "lora.target_modules: 'to_kk' matches no Linear module; did you mean 'to_k'?" in capsys.readouterr().err
    assert not out.exists()


def test_bf16_run_exports_a_verified_adapter(data_root, tmp_path):
    """Mixed precision on the CPU: bf16 frozen weights, fp32 LoRA; the inference path (load_adapter) keeps
    LoRA weights in float32 too, so the reloaded adapter reproduces the training model exactly."""
    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, "--train.mixed_precision", "bf16", max_steps=2)) == 0
    check = json.loads((out / "lora-final" / "midi_adapter.json").read_text())["export_check"]
    assert check["ok"] and check["dtype"] == "bfloat16" and check["max_abs_diff"] == 0.0


def test_dry_run_reports_and_writes_nothing(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(tiny_args(data_root, out, "--dry_run")) == 0
    report = capsys.readouterr().out
    for text in ("trainable parameters: 110,080", "adapter size:", "step time", "peak memory", "estimate:"):
        assert text in report
    assert not out.exists()


def test_an_out_of_memory_dry_run_reports_oom(data_root, tmp_path, capsys, monkeypatch):
    """The wizard reads the JSON status; a dry run that does not fit exits 1 with one line, no traceback."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("midi.training.objective.training_step", out_of_memory)
    out, report = tmp_path / "run", tmp_path / "dry.json"
    assert _main(tiny_args(data_root, out, "--dry_run", "--dry_run_json", str(report))) == 1
    data = json.loads(report.read_text())
    assert data["status"] == "oom" and data["batch_size"] == 2 and "peak_memory_gib" in data
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: batch size 2 does not fit" in err and not out.exists()


@pytest.mark.parametrize("extra", [
    ("--data.batching", "padded", "--data.num_instances_per_batch", "5"),
    ("--data.bucket_by_instances", "true", "--data.max_tokens_per_batch", "320", "--train.batch_size", "3"),
])
def test_batching_modes_train(data_root, tmp_path, extra, capsys, monkeypatch):
    from midi.training import objective as training

    real, seen = training.training_step, []

    def recording(model, vae, scheduler, batch, *args, **kwargs):
        seen.append((list(batch.num_instances), list(batch.rows_per_scene), batch.num_instances_per_batch))
        return real(model, vae, scheduler, batch, *args, **kwargs)

    monkeypatch.setattr(training, "training_step", recording)
    assert _main(tiny_args(data_root, tmp_path / "run", "--dry_run", *extra)) == 0
    assert "step time" in capsys.readouterr().out
    assert len(seen) == metrics.DRY_RUN_WARMUP_STEPS + metrics.DRY_RUN_TIMED_STEPS  # real batches, each step
    for counts, rows, fixed in seen:
        if "padded" in extra:  # every scene padded (or capped) to exactly 5 rows
            assert fixed == 5 and rows == [5] * len(counts)
        else:  # packed: a scene's rows are its instances; <= 3 scenes and <= 320 tokens (5 rows of 64)
            assert fixed is None and rows == counts and len(counts) <= 3 and sum(rows) * 64 <= 320


def test_cache_and_image_encoder_lora(data_root, tmp_path, caplog):
    args = tiny_args(data_root, tmp_path / "run", "--cache.enabled", "true", "--lora.image_encoder_1", "true",
                     "--lora.image_encoder_2", "true", max_steps=2)
    with caplog.at_level("INFO"):
        assert _main(args) == 0
    assert "embeddings change during training and are not cached" in caplog.text
    cache = tmp_path / "cache"
    assert list((cache / "vae").glob("*.safetensors")) and not (cache / "embeds").exists()
    meta = json.loads((tmp_path / "run" / "lora-final" / "midi_adapter.json").read_text())
    assert meta["export_check"]["compared"] == ["image_encoder_1", "image_encoder_2", "transformer"]
    assert (tmp_path / "run" / "lora-final" / "image_encoder_1" / "adapter_model.safetensors").is_file()
    for name in ("image_encoder_1", "image_encoder_2"):  # trained: the B matrices (zero at init) moved
        weights = safetensors.torch.load_file(tmp_path / "run" / "lora-final" / name / "adapter_model.safetensors")
        b = [v for k, v in weights.items() if "lora_B" in k]
        assert b and any(float(v.abs().max()) > 0 for v in b), name


def test_cache_is_built_once_and_reused(data_root, tmp_path):
    assert _main(tiny_args(data_root, tmp_path / "a", "--cache.enabled", "true", max_steps=2)) == 0
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert any(p.parent.name == "embeds" for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert _main(tiny_args(data_root, tmp_path / "b", "--cache.enabled", "true", max_steps=2)) == 0
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == files


def test_cli_smoke(data_root, tmp_path):
    """The script as users run it: --help, then a short real run in a subprocess."""
    help_text = subprocess.run([sys.executable, "train_lora.py", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout
    assert "--resume_from_checkpoint" in help_text and "--dry_run" in help_text
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train_lora.py", *tiny_args(data_root, out, max_steps=2)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "lora-final" / "midi_adapter.json").is_file()


# ----------------------------------------------------------------------------- two processes
# Identical LoRA weights on both ranks, one set of checkpoints, each rank on its own share of the batches.
DISTRIBUTED_WRAPPER = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch
import train_lora
from midi.lora import lora_state_dicts

original = train_lora.finish

def finish(r, state):  # dump this rank's LoRA weights before the export
    path = os.path.join(os.environ["DUMP_DIR"], f"rank{r.accelerator.process_index}.pt")
    torch.save({"weights": lora_state_dicts(r.pipe), "world": r.accelerator.num_processes}, path)
    original(r, state)

train_lora.finish = finish
sys.exit(train_lora.main(sys.argv[1:]))
"""


def test_two_processes_keep_identical_weights_and_write_one_run(data_root, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(textwrap.dedent(DISTRIBUTED_WRAPPER))
    out = tmp_path / "run"
    env = {**os.environ, "DUMP_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(wrapper), *tiny_args(data_root, out, "--validation.preview_every_n_steps", "4")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    a, b = ranks[0]["weights"]["transformer"], ranks[1]["weights"]["transformer"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-2", "checkpoint-4", "config.yaml",
                                                     "lora-final", "previews"]
    checkpoint = out / "checkpoint-4"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["consumed_batches"] == 8  # 4 steps x 2 processes, each with its own batches
    assert json.loads((out / "lora-final" / "midi_adapter.json").read_text())["export_check"]["ok"]
    assert "2 process(es)" in result.stderr
