"""Data tools for MIDI-3D finetuning: preparing, checking and reading "midi-scenes" datasets.

Importing this package is cheap (no torch, no trimesh). The public names are resolved lazily:

- reading (numpy/PIL only): :func:`open_dataset`, :func:`load_scene_sample`, :class:`SceneRecord`,
  :class:`SceneSample`, :func:`load_surface`, :func:`save_surface`;
- writing (imports trimesh): :func:`prepare_dataset`, :func:`write_synthetic_dataset`,
  :func:`check_dataset`.

See ``prepare_data.py`` for the command line and ``midi/data/layout.py`` for the on-disk layout.
"""

from __future__ import annotations

import importlib
from typing import Any

from midi.errors import DataError, UsageError

_LAZY = {
    "open_dataset": "midi.data.dataset",
    "load_scene_sample": "midi.data.dataset",
    "SceneRecord": "midi.data.dataset",
    "SceneSample": "midi.data.dataset",
    "load_surface": "midi.data.surface_io",
    "save_surface": "midi.data.surface_io",
    "prepare_dataset": "midi.data.prepare",
    "PrepareOptions": "midi.data.jobs",
    "write_synthetic_dataset": "midi.data.synthetic",
    "make_synthetic_scene": "midi.data.synthetic",
    "check_dataset": "midi.data.check",
}

__all__ = [
    "DataError",
    "PrepareOptions",
    "SceneRecord",
    "SceneSample",
    "UsageError",
    "check_dataset",
    "load_scene_sample",
    "load_surface",
    "make_synthetic_scene",
    "open_dataset",
    "prepare_dataset",
    "save_surface",
    "write_synthetic_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'midi.data' has no attribute {name!r}")
