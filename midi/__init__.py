"""MIDI-3D / TripoSG core: models, scheduler, pipeline, LoRA helpers, data and training step.

The heavy modules (torch, diffusers, transformers) are imported lazily, so that
``import midi.data`` stays cheap for the data tools. ``from midi import MIDIPipeline`` imports
the three model modules first, which is what diffusers needs to resolve the custom module paths
named in a released ``model_index.json``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "TripoSGDiTModel": "midi.models.transformers.triposg_transformer",
    "TripoSGVAEModel": "midi.models.autoencoders.autoencoder_kl_triposg",
    "RectifiedFlowScheduler": "midi.schedulers.scheduling_rectified_flow",
    "MIDIPipeline": "midi.pipelines.pipeline_midi",
    "MIDIPipelineOutput": "midi.pipelines.pipeline_midi",
    "TripoSGAttnProcessor2_0": "midi.models.attention_processor",
    "MIAttnProcessor2_0": "midi.models.attention_processor",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'midi' has no attribute {name!r}")
