"""Shared fixtures: the upstream conformance pipeline, the in-process tiny pipeline, seeding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).parent
UPSTREAM = TESTS / "fixtures" / "upstream"
UPSTREAM_PIPELINE = UPSTREAM / "tiny_pipeline"
UPSTREAM_CASES = UPSTREAM / "cases" / "tiny_pipeline"
DATA = TESTS / "data"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def upstream_pipe():
    """A fresh load of the upstream-written tiny pipeline folder (every case starts from one)."""
    from midi.pipelines.pipeline_midi import MIDIPipeline

    pipe = MIDIPipeline.from_pretrained(UPSTREAM_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe():
    from midi.tiny import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: extra threads only add contention on small shared CPUs. Session-wide, so that
    module-scoped fixtures and tests compute with the same thread count (bitwise comparisons)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A small synthetic midi-scenes dataset, shared by a test module."""
    from training.conftest import tiny_dataset

    return tiny_dataset(tmp_path_factory.getbasetemp())
