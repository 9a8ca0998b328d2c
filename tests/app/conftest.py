"""Fixtures of the app's tests: a tiny studio, LoRAs (a good one, one for another model), input pairs,
and a local server (only for the tests that need Gradio; they skip with the reason when it is absent)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from app_cases import FAST, GRADIO_MISSING, SMALL
from PIL import Image

from midi.app.examples import EXAMPLES_DIR, list_examples
from midi.app.studio import Settings, Studio
from midi.config import TINY_MODEL
from midi.lora import export_lora, lora_config_dict
from midi.tiny import TINY_MI_BLOCKS, tiny_pipeline


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives a headless Chromium through WebDriver (skipped without one)")


@pytest.fixture
def fast() -> Settings:
    """Two steps on a 17^3 grid: a second or two per scene on a CPU."""
    return FAST


@pytest.fixture(scope="session")
def example() -> tuple[Path, Path]:
    pairs = {name: (rgb, seg) for name, rgb, seg in list_examples(EXAMPLES_DIR)}
    return pairs[SMALL]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Path:
    """A runs folder with one training-output-like LoRA (random, non-zero B, so it changes the scene)."""
    root = tmp_path_factory.mktemp("runs")
    pipe = tiny_pipeline(0)
    torch.manual_seed(0)
    config = lora_config_dict(rank=4, alpha=4, init_lora_weights=False)
    pipe.init_custom_adapter(set_self_attn_module_names=TINY_MI_BLOCKS, transformer_lora_config=config,
                             exact_module_names=True)
    export_lora(pipe, root / "tiny-run" / "lora-final", TINY_MI_BLOCKS)
    return root


@pytest.fixture(scope="session")
def lora(runs) -> Path:
    return runs / "tiny-run" / "lora-final"


@pytest.fixture(scope="session")
def foreign_lora(lora, tmp_path_factory) -> Path:
    """The same LoRA, recorded as trained on a wider transformer: a LoRA for another model."""
    folder = tmp_path_factory.mktemp("foreign") / "lora"
    shutil.copytree(lora, folder)
    meta = json.loads((folder / "midi_adapter.json").read_text())
    meta["base_transformer_config"]["width"] = 128
    (folder / "midi_adapter.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def bad_pairs(example, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Inputs the command line refuses: a map of another size, a map without instance."""
    folder = tmp_path_factory.mktemp("bad")
    rgb, seg = example
    small = folder / "small_seg.png"
    Image.open(seg).resize((128, 128), Image.Resampling.NEAREST).save(small)
    empty = folder / "empty_seg.png"
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(empty)
    return {"size": (rgb, small), "empty": (rgb, empty)}


@pytest.fixture(scope="session")
def studio(tmp_path_factory, runs) -> Studio:
    """One tiny studio for the session (tests read its run counters as differences)."""
    work = tmp_path_factory.mktemp("studio")
    return Studio(TINY_MODEL, work / "work", runs=runs, device="cpu", uploads=work / "uploads")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(studio):
    """The page served on a free local port, in this process (so tests can read the studio's counters);
    Gradio keeps its files in the studio's upload folder."""
    pytest.importorskip("gradio", reason=GRADIO_MISSING)
    from midi.app import ui  # optional dependency: only the tests that need it import it

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(studio.uploads))
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        demo = ui.build_demo(studio, list_examples(EXAMPLES_DIR))
        url = ui.launch(demo, "127.0.0.1", free_port(), allowed=[EXAMPLES_DIR], block=False)
        yield url
        demo.close()
