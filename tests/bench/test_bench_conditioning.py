"""bench/bench_conditioning.py on the tiny model: the three conditionings are measured on the same noise."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_conditioning as bench  # noqa: E402

from midi.config import TINY_MODEL  # noqa: E402

TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"


def test_the_bench_measures_own_shuffled_and_no_conditions(data_root, capsys):
    means = bench.main(["--config", str(TINY_YAML), "--data", str(data_root), "--split", "train", "--model", TINY_MODEL,
                        "--scenes", "2", "--sigmas", "0.5", "0.9", "--data.image_size", "64",
                        "--data.num_surface_points", "512", "--data.synthetic_if_missing", "0"])
    assert set(means) == {"own", "shuffled", "none"} and all(len(v) == 2 for v in means.values())
    assert all(x > 0 for v in means.values() for x in v)
    # The random tiny model reads its conditions, so other conditions give other losses.
    assert means["own"] != means["shuffled"] and means["own"] != means["none"]
    out = capsys.readouterr().out
    assert "on 2 scenes" in out and "shuffled/own" in out and "mean" in out
