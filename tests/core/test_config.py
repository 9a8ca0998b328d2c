"""The training config: shipped YAMLs validate, errors name the key and the fix, all at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from midi.config import TrainingConfig, all_keys, config_to_dict, config_to_yaml, key_doc
from midi.config_load import load_config
from midi.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


def _problems(*overrides: str, path: Path | None = None, environment: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), environment=environment)
    return info.value.problems


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainingConfig)
    text = path.read_text()
    assert text.startswith("#") and "python train_lora.py --config" in text  # self-documenting header
    assert set(yaml.safe_load(text)) <= set(config_to_dict(cfg))


def test_shipped_defaults_are_the_documented_ones():
    cfg = load_config(REPO / "configs" / "train" / "lora_finetune.yaml")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 16.0, 0.1)
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.model.mi_blocks == [f"blocks.{i}" for i in range(8, 13)]
    assert cfg.train.batch_size == 4 and cfg.train.mixed_precision == "auto"
    assert (cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.lr_scheduler) == ("adamw", 1e-4, "cosine")
    assert cfg.optimizer.lr_warmup_steps > 0


def test_override_syntax():
    cfg = load_config(None, ["--train.batch_size", "2", "--lora.rank=8", "--optimizer.learning_rate", "3e-5",
                             "--lora.target_modules", "to_q,to_v", "--model.mi_blocks=[blocks.1, blocks.2]",
                             "--train.max_steps", "null", "--data.max_tokens_per_batch", "none",
                             "--data.background", "[0.5, 0.5, 0.5]", "--logging.progress_bar", "false"])
    assert cfg.train.batch_size == 2 and cfg.lora.rank == 8 and cfg.optimizer.learning_rate == 3e-5
    assert cfg.lora.target_modules == ["to_q", "to_v"] and cfg.model.mi_blocks == ["blocks.1", "blocks.2"]
    assert cfg.train.max_steps is None and cfg.data.max_tokens_per_batch is None
    assert cfg.data.background == [0.5, 0.5, 0.5] and cfg.logging.progress_bar is False


def test_messages_name_the_key_and_the_fix():
    problems = _problems("--train.batch_size", "0", "--lora.rank_typo", "3", "--train.learning_rate", "1e-3",
                         "--bogus.key", "1", "--optimizer.lr_scheduler", "cosin", "--lora.dropout", "high",
                         "--train.mixed_precision", "fp8", "stray")
    assert "train.batch_size: must be >= 1, got 0" in problems
    assert "lora.rank_typo: unknown key; did you mean lora.rank?" in problems
    assert "train.learning_rate: unknown key; did you mean optimizer.learning_rate?" in problems
    assert any(p.startswith("bogus.key: unknown section 'bogus'") for p in problems)
    assert any(p.startswith("optimizer.lr_scheduler: must be one of") and "did you mean 'cosine'?" in p for p in problems)
    assert "lora.dropout: must be a number, got 'high'" in problems
    assert "train.mixed_precision: must be one of 'auto', 'no', 'bf16', 'fp16', got 'fp8'" in problems
    assert any(p.startswith("stray: expected an override --section.key value") for p in problems)
    assert len(problems) == 8  # all at once, each once


def test_yaml_file_problems_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 0\n  rnak: 4\ntrian:\n  seed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    lines = str(info.value).splitlines()
    assert f"{bad}: lora.rank: must be >= 1, got 0" in lines
    assert f"{bad}: lora.rnak: unknown key; did you mean lora.rank?" in lines
    assert f"{bad}: trian: unknown section; did you mean train?" in lines
    (tmp_path / "broken.yaml").write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_impossible_combinations():
    problems = _problems("--lora.transformer", "false", "--data.batching", "padded", "--data.num_instances_per_batch",
                         "4", "--data.bucket_by_instances", "true", "--validation.sigmas", "[0.0, 0.5]",
                         "--lora.init_lora_weights", "pissa")
    assert any(p.startswith("lora: lora.transformer, lora.image_encoder_1 and lora.image_encoder_2 are all false")
               for p in problems)
    assert any(p.startswith("data.num_instances_per_batch: must be >= data.max_num_instances (10)") for p in problems)
    assert any(p.startswith("data.bucket_by_instances: only applies to data.batching: packed") for p in problems)
    assert "validation.sigmas: every sigma must be in (0, 1], got 0.0" in problems
    assert "lora.init_lora_weights: must be true or 'gaussian', got 'pissa'" in problems


def test_environment_checks(tmp_path):
    problems = _problems("--train.mixed_precision", "fp16", "--optimizer.name", "adamw_8bit", "--logging.report_to",
                         "wandb", "--data.root", str(tmp_path / "none"), "--model.pretrained_model_name_or_path",
                         str(tmp_path / "weights"), "--checkpointing.resume_from_checkpoint", str(tmp_path / "ckpt"),
                         environment=True)
    text = "\n".join(problems)
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        assert "train.mixed_precision: fp16 needs a CUDA GPU and none is available; use auto, no or bf16" in problems
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "optimizer.name: adamw_8bit needs the bitsandbytes package" in text
    if importlib.util.find_spec("wandb") is None:
        assert "logging.report_to: wandb needs the wandb package (pip install wandb); or use tensorboard" in problems
    assert "data.root:" in text and "prepare_data.py" in text and "synthetic_if_missing" in text
    assert f"model.pretrained_model_name_or_path: {tmp_path / 'weights'}: model folder not found" in text
    assert "checkpointing.resume_from_checkpoint:" in text


def test_round_trip_and_docs(tmp_path):
    cfg = load_config(REPO / "configs" / "train" / "tiny.yaml", ["--lora.rank", "4"])
    (saved := tmp_path / "saved.yaml").write_text(config_to_yaml(cfg))
    assert load_config(saved) == cfg
    commented = config_to_yaml(cfg, comments=True)
    assert all(key_doc(k) for k in all_keys())
    assert "rank: 4  # LoRA rank r" in commented


def test_every_key_is_explained_in_the_training_readme():
    readme = (REPO / "TRAINING_README.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in readme]
    assert not missing, f"TRAINING_README.md does not explain: {missing}"


def test_bad_config_fails_fast_from_the_command_line():
    """A bad config exits with code 2 before torch/diffusers are imported (well under a second of work)."""
    code = ("import sys, train_lora; rc = train_lora.main(['--config', 'configs/train/tiny.yaml', "
            "'--train.batch_size', '0']); heavy = [m for m in ('torch', 'diffusers', 'transformers') "
            "if m in sys.modules]; print(rc, heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "2 []"
    assert "error: configs/train/tiny.yaml: train.batch_size: must be >= 1, got 0" in result.stderr


def test_print_config(capsys):
    import train_lora

    assert train_lora.main(["--config", str(REPO / "configs" / "train" / "tiny.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "pretrained_model_name_or_path: tiny  #" in out and out.count("\n") == len(all_keys()) + 10


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_numbers_are_refused(value):
    assert _problems("--optimizer.learning_rate", value) == [f"optimizer.learning_rate: must be a finite number, got "
                                                            f"{yaml.safe_load(value)!r}"]


def test_a_mistyped_data_root_gets_no_synthetic_set(tmp_path, monkeypatch):
    """tiny.yaml's synthetic_if_missing belongs to its own data.root; another root must exist or ask again."""
    tiny = REPO / "configs" / "train" / "tiny.yaml"
    monkeypatch.chdir(tmp_path)  # tiny.yaml's own root (outputs/tiny-data) is missing here: the demo still works
    assert load_config(tiny, environment=True).data.synthetic_if_missing == 8
    (line,) = [p for p in _problems("--data.root", str(tmp_path / "typo"), path=tiny, environment=True)
               if p.startswith("data.root")]
    assert "does not exist" in line and "--data.synthetic_if_missing" in line
    asked = load_config(tiny, ["--data.root", "mine", "--data.synthetic_if_missing", "3"], environment=True)
    assert (asked.data.root, asked.data.synthetic_if_missing) == ("mine", 3)


def render_key_tables(cfg: TrainingConfig) -> str:
    """TRAINING_README's key tables (Markdown): every key with its value in ``cfg`` and its doc.

    The README shows them for :data:`midi.config.DEFAULT_CONFIG` and the test below keeps them equal,
    so the schema docs and the default config are the one source of both (on a failure, paste
    ``render_key_tables(load_config(DEFAULT_CONFIG))`` between the README's markers).
    """

    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:g}"
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        return text if value is None or isinstance(value, bool | int) else f"`{text}`"

    out = []
    for section, body in config_to_dict(cfg).items():
        out += [f"### {section}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        out += [f"| `{section}.{k}` | {show(v)} | {key_doc(f'{section}.{k}')} |" for k, v in body.items()] + [""]
    return "\n".join(out)


def test_readme_key_tables_are_the_rendered_default_config(capsys):
    """TRAINING_README's tables are rendered from the schema with the config a plain run loads,
    and ``--help`` names that config."""
    import train_lora
    from midi.config import DEFAULT_CONFIG

    readme = (REPO / "TRAINING_README.md").read_text()
    shown = readme.split("<!-- key tables: begin -->\n")[1].split("<!-- key tables: end -->")[0]
    assert shown == render_key_tables(load_config(REPO / DEFAULT_CONFIG))
    assert "| `model.pretrained_model_name_or_path` | `pretrained_weights/MIDI-3D` |" in shown
    with pytest.raises(SystemExit):
        train_lora.parse_args(["--help"])
    assert f"default {DEFAULT_CONFIG}" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("key, value, message", [
    ("train.batch_size", "0", "train.batch_size: must be >= 1, got 0"),
    ("lora.alpha", "0", "lora.alpha: must be > 0, got 0.0"),
    ("lora.dropout", "1.5", "lora.dropout: must be in [0, 0.99], got 1.5"),
    ("validation.octree_depth", "11", "validation.octree_depth: must be in [2, 10], got 11"),
    ("optimizer.lr_scheduler", "cosin", "optimizer.lr_scheduler: must be one of constant, constant_with_warmup, linear, "
                                        "cosine, cosine_with_restarts, polynomial, got 'cosin'; did you mean 'cosine'?"),
    ("data.train_split", "tran", "data.train_split: must be one of train, val, test, all, got 'tran'; did you mean "
                                 "'train'?"),
])
def test_schema_rules_give_one_message_each(key, value, message):
    """The ``_field(..., ge=/gt=/le=/choices=)`` rules of the schema, one per kind of message."""
    assert message in _problems(f"--{key}", value)


def test_optional_fields_accept_null_and_num_epochs_counts_only_without_max_steps():
    from midi.config import LoraSection, TrainingConfig
    from midi.config_load import validate

    assert "lora.rank: must be set" in validate(TrainingConfig(lora=LoraSection(rank=None)))  # built in code
    assert load_config(None, ["--train.max_steps", "null", "--checkpointing.checkpoints_total_limit", "null"])
    assert load_config(None, ["--train.max_steps", "3", "--train.num_epochs", "0"]).train.num_epochs == 0
    assert _problems("--train.max_steps", "null", "--train.num_epochs", "0") == ["train.num_epochs: must be >= 1, got 0"]
