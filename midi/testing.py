"""Transition (issue 10): the old import path of :mod:`midi.tiny` (tests/test_evaluate_cli.py uses it).

Delete this file once that test imports midi.tiny.
"""

from midi.tiny import TINY_IMAGE_SIZE, TINY_MI_BLOCKS, TINY_TRANSFORMER, TINY_VAE, tiny_pipeline

__all__ = ["TINY_IMAGE_SIZE", "TINY_MI_BLOCKS", "TINY_TRANSFORMER", "TINY_VAE", "tiny_pipeline"]
