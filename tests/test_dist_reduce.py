"""Partial Grams (in process): summed only when one world's partials cover every unit exactly
once and match the store; otherwise streamed (auto, with a warning) or refused (require)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_dist import make_reference, write_config

from das_pipeline.config import load_config
from das_pipeline.reduce import run_reduce, stored_gram, write_partial
from das_pipeline.store import Store, StoreError

NUM_TRAIN_UNITS = 10  # 40 rows, 4 per unit


@pytest.fixture
def copy(tmp_path_factory, tiny_model_dir, tmp_path):
    """(config, store) of a private copy of the reference store, without partials."""
    ref = load_config(make_reference(tmp_path_factory, tiny_model_dir))
    shutil.copytree(ref.store.path, tmp_path / "s.zarr")
    cfg = load_config(write_config(tmp_path / "s.toml", tiny_model_dir, tmp_path / "s.zarr"))
    return cfg, Store.open_existing(cfg.store.path)


def emit(store: Store, world: int, ranks=None, readouts=("loss", "square", "mean")) -> None:
    train = store.split("train")
    for rank in range(world) if ranks is None else ranks:
        for r in readouts:
            write_partial(store, train, r, range(rank, NUM_TRAIN_UNITS, world), rank, world)


def grams(store: Store) -> dict[str, np.ndarray]:
    return {r: stored_gram(store, r) for r in ("loss", "square", "mean")}


def test_exact_cover_is_summed_and_equals_streaming(copy):
    cfg, store = copy
    streamed = grams(store)  # the reference reduce streamed the store
    emit(store, world=3)
    summary = run_reduce(cfg, show_progress=False, partials="require")
    assert {s["source"] for s in summary.values()} == {"summed 3 partial Grams of world 3"}
    for r, g in grams(store).items():
        np.testing.assert_allclose(g, streamed[r], rtol=1e-12, atol=1e-12 * np.abs(g).max())


def test_missing_rank_streams_with_a_warning_or_is_refused(copy):
    cfg, store = copy
    emit(store, world=2, ranks=[0])
    with pytest.raises(StoreError, match=r"world 2: 1 partials miss units \[1, 3, 5, 7, 9\]"):
        run_reduce(cfg, show_progress=False, partials="require")
    with pytest.warns(UserWarning, match=r"not used .*miss units \[1, 3, 5, 7, 9\]"):
        summary = run_reduce(cfg, show_progress=False, force=True)  # the copy's factor is current
    assert summary["loss"]["source"] == "streamed the store"


def test_leftovers_of_another_world_do_not_block_an_exact_one(copy):
    cfg, store = copy
    emit(store, world=4, ranks=[0, 2])  # an earlier, abandoned plan
    emit(store, world=2)
    emit(store, world=5, ranks=[0, 1, 2, 3, 4, 0])  # rank 0 written twice: still once
    summary = run_reduce(cfg, show_progress=False, partials="require")
    assert summary["mean"]["source"] == "summed 2 partial Grams of world 2"


def test_stale_unfinished_and_corrupt_partials(copy):
    cfg, store = copy
    emit(store, world=1)
    part = store.root["partials"]["loss"]["r0-w1"]
    digest = part.attrs["digest"]
    part.attrs["digest"] = "0" * 64  # as if its units were re-extracted with other data
    with pytest.raises(StoreError, match=r"r0-w1 \(stale"):
        run_reduce(cfg, show_progress=False, partials="require")
    part.attrs["digest"] = digest
    part[0, 0] += 1.0  # bytes changed after the checksum was written
    with pytest.raises(StoreError, match="does not match its checksum"):
        run_reduce(cfg, show_progress=False, partials="require")
    arr = store.root["partials"]["loss"].create_array("r0-w1", shape=(32, 32), dtype="float64",
                                                      overwrite=True)  # killed before its attrs
    assert "checksum" not in arr.attrs
    with pytest.raises(StoreError, match=r"r0-w1 \(unfinished\)"):
        run_reduce(cfg, show_progress=False, partials="require")


def test_ignore_always_streams(copy):
    cfg, store = copy
    emit(store, world=1)
    summary = run_reduce(cfg, show_progress=False, partials="ignore")
    assert summary["loss"]["source"] == "streamed the store"


def test_partials_group_is_not_a_split(copy):
    _, store = copy
    emit(store, world=1, readouts=("loss",))
    assert sorted(store.split_names()) == ["train", "val"]
    assert Path(store.path / "partials" / "loss" / "r0-w1" / "zarr.json").exists()


def test_fewer_rows_than_k_writes_no_partials_and_streams_the_thin_factor(tmp_path, tiny_model_dir):
    from das_pipeline.extract import run_extract
    from helpers import write_config as write_tiny

    cfg = load_config(write_tiny(tmp_path / "thin.toml", tiny_model_dir, dim=64, rows_per_unit=4,
                                 store=tmp_path / "thin.zarr"))  # N = 40 < k = 64
    summary = run_extract(cfg, show_progress=False, partial_gram=True)
    assert summary["partials"] == []
    store = Store.open_existing(cfg.store.path)
    assert "partials" not in store.root
    emit(store, world=1)  # even when present, auto does not use them for N < k
    reduced = run_reduce(cfg, show_progress=False)
    assert reduced["loss"]["source"].startswith("streamed the store (N = 40 < k")
    assert reduced["loss"]["factor"] == "N x N kernel eigh (N = 40 < k = 64)"
    assert "gram" not in store.root["reduce"]["loss"]
    summed = store.root["partials"]["loss"]["r0-w1"][...]
    np.testing.assert_allclose(stored_gram(store, "loss"), summed, rtol=0,
                               atol=1e-12 * np.abs(summed).max())
    required = run_reduce(cfg, show_progress=False, partials="require")
    assert required["loss"]["source"] == "summed 1 partial Grams of world 1"
