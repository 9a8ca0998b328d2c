"""Evaluation of generated scenes against ground truth: scene/object Chamfer distance, F-score and
bounding-box IoU as MIDI-3D defines them, with a declared protocol (numpy + scipy, no torch).

- :mod:`midi.evaluation.metrics`: :func:`score_points`, the scoring of one scene (cheap and
  importable, e.g. from a training loop);
- :mod:`midi.evaluation.predictions`: ground truth from a dataset, predictions from scene files
  or another dataset, matched per instance;
- :mod:`midi.evaluation.generation`: generating the predictions of a split (``--generate``);
- :mod:`midi.evaluation.report`: bootstrap intervals, tables, CSV, renders, paired comparison.
"""

from __future__ import annotations

from midi.evaluation.metrics import ALIGNMENTS, MAX_OBJECT_CD, METRIC_KEYS, higher_is_better, score_points

__all__ = ["ALIGNMENTS", "MAX_OBJECT_CD", "METRIC_KEYS", "higher_is_better", "score_points"]
