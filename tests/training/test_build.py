"""The shipped accelerate configs parse, use valid values and are self-consistent (most cannot run here)."""

from __future__ import annotations

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from training.conftest import REPO, TINY_YAML

CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {"single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml", "fsdp.yaml"}


def test_the_promised_configs_exist():
    assert EXPECTED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_accelerate(path):
    data = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank",
                "mixed_precision"):
        assert key in data, f"{path.name}: missing {key}"
    assert data["distributed_type"] in {d.value for d in DistributedType}
    assert data["mixed_precision"] == "no", "precision is set by train.mixed_precision"
    processes, machines = data["num_processes"], data["num_machines"]
    assert processes >= machines >= 1 and processes % machines == 0
    assert 0 <= data["machine_rank"] < machines
    if data["distributed_type"] == "NO":
        assert processes == 1
    else:
        assert processes >= 2
    if machines > 1:
        assert data.get("main_process_ip") and data.get("main_process_port")
    if data["distributed_type"] == "DEEPSPEED":
        assert data["deepspeed_config"]["zero_stage"] in (0, 1, 2, 3)
    if data["distributed_type"] == "FSDP":
        fsdp = data["fsdp_config"]
        assert fsdp["fsdp_sharding_strategy"] in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "DiTBlock"  # the DiT's block class
        assert fsdp["fsdp_use_orig_params"] is True
    text = path.read_text()
    assert text.startswith("#") and "accelerate launch --config_file configs/accelerate/" in text
    ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader accepts every key


def test_fsdp_wrap_class_exists():
    from midi.models.transformers.triposg_transformer import DiTBlock

    assert DiTBlock.__name__ == "DiTBlock"


def test_deepspeed_gets_the_batch_settings_accelerate_cannot_infer():
    """prepare() gets no dataloader, so train_micro_batch_size_per_gpu must be filled in (else accelerate refuses)."""
    from types import SimpleNamespace

    from midi.config_load import load_config
    from midi.training.build import configure_deepspeed

    path = next(p for p in CONFIGS if p.name == "deepspeed_zero2.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] == DistributedType.DEEPSPEED.value
    # What accelerate's DeepSpeedPlugin makes of a config without a config file: batch settings "auto".
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
          "zero_optimization": {"stage": data["deepspeed_config"]["zero_stage"]}}
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
    cfg = load_config(str(TINY_YAML), ["--train.batch_size", "3", "--train.gradient_accumulation_steps", "2"])
    configure_deepspeed(acc, cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert "train_batch_size" not in ds
    configure_deepspeed(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, state=None), cfg)  # no-op


def test_fsdp_keeps_one_weight_dtype():
    """FSDP1 flat parameters need one dtype: the frozen base stays float32 (FSDP's policy casts for compute)."""
    import torch

    from midi.training.build import weight_dtype_for

    assert weight_dtype_for("bf16") == torch.bfloat16
    assert weight_dtype_for("bf16", fsdp=True) == torch.float32
    assert weight_dtype_for("fp16", fsdp=True) == torch.float32


# ----------------------------------------------------------------------------- model checks of the config
def test_tiny_config_passes_the_model_checks():
    from midi.config_load import load_config
    from midi.training.build import check_model_setup

    check_model_setup(load_config(REPO / "configs" / "train" / "tiny.yaml"))  # raises on any problem


def test_model_structure_checks():
    from midi.config_load import load_config
    from midi.errors import ConfigError
    from midi.training.build import check_model_setup
    from training.conftest import UPSTREAM_PIPELINE

    cfg = load_config(None, ["--model.mi_blocks", "[blocks.3, blocks.9]", "--lora.target_modules", "[to_q, to_qq]",
                             "--lora.image_encoder_1", "true", "--lora.image_encoder_1_target_modules", "q_proj,qproj",
                             "--data.max_tokens_per_batch", "10"])
    with pytest.raises(ConfigError) as error:
        check_model_setup(cfg)
    assert list(error.value.problems) == [
        "model.mi_blocks: 'blocks.9' does not exist; the transformer has blocks.0 ... blocks.4 (upstream MIDI uses "
        "blocks.8-12 of 21)",
        "lora.target_modules: 'to_qq' matches no Linear module; did you mean 'to_q'?",
        "lora.image_encoder_1_target_modules: 'qproj' matches no Linear module; did you mean 'q_proj'?",
        "data.max_tokens_per_batch: must be >= the latent tokens of one instance (64), got 10",
    ]
    # A real pipeline folder: the transformer is built on the meta device from its config.json.
    cfg = load_config(None, ["--model.pretrained_model_name_or_path", str(UPSTREAM_PIPELINE),
                             "--model.mi_blocks", "[blocks.3]", "--lora.target_modules", "[nothing]"])
    with pytest.raises(ConfigError) as error:
        check_model_setup(cfg)
    assert error.value.problems[0].startswith("lora.target_modules: 'nothing' matches no Linear module")
