"""--check --vae: every object through the model's VAE and back, scored, the poor ones flagged and shown."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from midi.config import TINY_MODEL
from midi.data import vae_check
from midi.data.check import check_dataset
from midi.data.dataset import open_dataset
from midi.data.surface_io import load_surface
from midi.errors import ModelError
from tests.data.helpers import synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae") / "data"
    synthetic(root, 2, seed=3, image_size=32, num_samples=2048)
    return root


def _round_trip(**kwargs):
    return lambda records: vae_check.vae_round_trip(records, TINY_MODEL, num_points=2048, device="cpu", **kwargs)


def test_tiny_round_trip_scores_every_object(dataset, tmp_path):
    report = check_dataset(dataset, tmp_path, round_trip=_round_trip())
    vae = report.to_json()["vae"]
    names = [(r.scene_id, n) for r in open_dataset(dataset) for n in r.object_names]
    assert [(s["scene"], s["name"]) for s in vae["objects_scored"]] == names
    for s in vae["objects_scored"]:
        assert 0.0 <= s["fscore"] <= 1.0 and s["fscore"] == min(s["scene_fscore"], s["object_fscore"])
    # A random tiny VAE reconstructs nothing well: every object is flagged, and shown on the sheet.
    flagged = [p for p in report.warnings if p.kind == "poor_vae_reconstruction"]
    assert vae["flagged"] == len(flagged) == len(names) and vae["fscore_mean"] < 0.9
    plain = check_dataset(dataset, tmp_path / "plain")
    rows = np.asarray(Image.open(report.files["contact_sheet"])).shape[0]
    assert rows > np.asarray(Image.open(plain.files["contact_sheet"])).shape[0]


def test_a_faithful_round_trip_flags_nothing_and_a_shifted_one_is_flagged(dataset, monkeypatch):
    def faithful(vae, points, normals, num_tokens, config, num_points):
        return points.astype(np.float64) + np.random.default_rng(0).normal(0, 1e-3, points.shape)

    monkeypatch.setattr(vae_check, "reconstruct", faithful)
    good = check_dataset(dataset, write=False, round_trip=_round_trip())
    assert good.vae["flagged"] == 0 and good.vae["fscore_min"] > 0.99

    first = open_dataset(dataset)[0]
    target = load_surface(first.surface_paths[0])[0]

    def shifted(vae, points, normals, num_tokens, config, num_points):  # the first object lands 0.3 off
        moved = np.array_equal(points, target)
        return points.astype(np.float64) + (0.3 if moved else 0.0)

    monkeypatch.setattr(vae_check, "reconstruct", shifted)
    bad = check_dataset(dataset, write=False, round_trip=_round_trip())
    assert bad.vae["flagged"] == 1
    (problem,) = [p for p in bad.warnings if p.kind == "poor_vae_reconstruction"]
    assert problem.scene == first.scene_id and problem.detail.startswith(first.object_names[0])


def test_no_surface_counts_as_zero(dataset, monkeypatch):
    monkeypatch.setattr(vae_check, "reconstruct", lambda *args: None)
    report = check_dataset(dataset, write=False, round_trip=_round_trip())
    assert report.vae["fscore_mean"] == 0.0
    assert all("decodes to no surface" in p.detail for p in report.warnings if p.kind == "poor_vae_reconstruction")


def test_a_folder_that_is_no_pipeline_is_one_error(dataset, tmp_path):
    with pytest.raises(ModelError):
        check_dataset(dataset, write=False, round_trip=lambda r: vae_check.vae_round_trip(r, str(tmp_path)))
