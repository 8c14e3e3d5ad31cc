"""A killed extraction, rerun, equals an uninterrupted one; no unit is lost or written twice."""

import os
import subprocess
import sys

import numpy as np
import pytest

from das_pipeline.config import load_config
from das_pipeline.extract import run_extract
from das_pipeline.store import Store
from helpers import write_config


def das(*args, env=None):
    return subprocess.run([sys.executable, "-m", "das_pipeline.cli", *args, "--quiet"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)


def read_split(path, name):
    split = Store.open_existing(path).split(name)
    markers = split.markers()
    feats = {r: split.group["features"][r][...] for r in split.readouts}
    return markers, feats, split.group["residual"][...]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted extraction of the same config into another store."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_config(folder / "ref.toml", tiny_model_dir, store=folder / "ref.zarr"))
    run_extract(cfg, show_progress=False)
    return cfg.store.path


@pytest.mark.parametrize("fault, marked_before", [
    ("after_unit:2", 2),    # killed right after the 2nd marker
    ("before_write:2", 1),  # killed with unit 2 computed, nothing written
    ("before_marker:3", 2),  # killed with unit 3's chunks written but not its marker
])
def test_killed_extraction_resumes_to_the_same_store(make_config, reference, fault, marked_before):
    cfg_path = make_config()
    killed = das("extract", str(cfg_path), env={"DAS_FAULT": fault})
    assert killed.returncode == -9, killed.stderr[-2000:]
    store_path = load_config(cfg_path).store.path
    markers, _, _ = read_split(store_path, "train")
    assert int((markers[:, 0] == 1).sum()) == marked_before
    first_times = markers[markers[:, 0] == 1, 2].copy()

    rerun = das("extract", str(cfg_path))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for split in ("train", "val"):
        markers, feats, residual = read_split(store_path, split)
        ref_markers, ref_feats, ref_residual = read_split(reference, split)
        assert (markers[:, 0] == 1).all(), f"{split}: unmarked units after the rerun"
        for r in feats:
            np.testing.assert_allclose(feats[r], ref_feats[r], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(residual, ref_residual, rtol=1e-6)
    # units marked before the kill were not recomputed (their markers are untouched)
    markers, _, _ = read_split(store_path, "train")
    np.testing.assert_array_equal(markers[:marked_before, 2], first_times)


def test_status_reports_units_done(make_config):
    cfg_path = make_config()
    killed = das("extract", str(cfg_path), env={"DAS_FAULT": "after_unit:1"})
    assert killed.returncode == -9
    out = das("status", str(cfg_path))
    assert out.returncode == 0, out.stderr
    assert "train        units 1/3" in out.stdout
    assert "val          units 0/1" in out.stdout
