"""A fault campaign at the store level, in process: build a small store, damage one piece, and
check that every reader refuses it clearly (StoreError) or treats the unit as not done, that
verify reports it, that verify --fix repairs or unmarks it, and that recommitting the unmarked
units restores a store equal to the undamaged one.

Damages: a deleted / truncated / bit-flipped data chunk (each readout, residual, rho,
excluded), marker chunk, claim chunk or cache chunk; empty, short, garbled and stale lock
files; deleted, garbled or altered array metadata; a lost split attribute file; the leftovers
of an interrupted store or split creation.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from das_pipeline import locks
from das_pipeline.errors import DasError
from das_pipeline.store import (
    HOST_ID,
    StopRequested,
    Store,
    StoreError,
    UnitData,
    dead_claims,
)
from das_pipeline.storecheck import verify_store

FP = {"settings": {"k": 5}, "model": {"digest": "m"}, "train": {"digest": "d", "num_samples": 10}}
N, ROWS, DIM, READOUTS = 10, 4, 5, ("loss", "mean")  # 3 units: 4, 4, 2 rows
UNITS = 3


def split_args(**overrides):
    args = dict(source="src", digest="d", uids=[f"u{i}" for i in range(N)], readouts=READOUTS,
                dim=DIM, dtype="float32", rows_per_unit=ROWS,
                row_digests=[f"h{i}" for i in range(N)])
    args.update(overrides)
    return args


def unit_data(unit: int) -> UnitData:
    """Deterministic random data of one unit; unit 1 has its row 2 excluded (NaN features)."""
    rng = np.random.default_rng(unit)
    n = min(N, (unit + 1) * ROWS) - unit * ROWS
    data = UnitData({r: rng.normal(size=(n, DIM)).astype(np.float32) for r in READOUTS},
                    rng.random(n).astype(np.float32), rng.normal(size=n).astype(np.float32),
                    np.zeros(n, dtype=bool))
    if unit == 1:
        data.features["mean"][2] = np.nan
        data.excluded[2] = True
    return data


def build(path: Path) -> Store:
    store = Store.open(path, FP)
    split = store.create_split("train", **split_args())
    for unit in range(UNITS):
        assert split.commit_unit(unit, unit_data(unit))
    return store


def snapshot(path: Path) -> dict[str, np.ndarray]:
    """Every per-sample array of the train split, read back through verified units."""
    split = Store.open_existing(path).split("train")
    units = [split.read_unit(u) for u in range(split.num_units)]
    out = {f"features/{r}": np.concatenate([d.features[r] for d in units]) for r in READOUTS}
    for key in ("residual", "rho", "excluded"):
        out[key] = np.concatenate([getattr(d, key) for d in units])
    out["checksums"] = split.markers()[:, [1] + list(range(5, split.markers().shape[1]))]
    return out


@pytest.fixture
def built(tmp_path):
    path = tmp_path / "s.zarr"
    build(path)
    return path, snapshot(path)


def train(path: Path):
    return Store.open_existing(path).split("train")


def damage(file: Path, how: str) -> None:
    if how == "delete":
        file.unlink()
    elif how == "truncate":
        file.write_bytes(file.read_bytes()[:7])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "flip":
        raw = bytearray(file.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        file.write_bytes(bytes(raw))
    elif how == "garble":
        file.write_bytes(b'{"zarr_format": 3, "node_ty')
    else:
        raise AssertionError(how)


def recommit_and_compare(path: Path, units, reference) -> None:
    split = train(path)
    for unit in units:
        assert split.commit_unit(unit, unit_data(unit))
    report = Store.open_existing(path).verify()
    assert not report.found, report.lines()
    after = snapshot(path)
    for key, value in reference.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


# ----------------------------------------------------------------------------- data chunks

@pytest.mark.parametrize("array", ["features/loss", "features/mean", "residual", "rho", "excluded"])
@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_damaged_data_chunk_is_refused_reported_and_unmarked(built, array, how):
    path, reference = built
    split = train(path)
    damage(split.chunk_file(array, 1), how)
    with pytest.raises(StoreError, match=r"unit 1 of split 'train' (is corrupt|does not match)"):
        split.read_unit(1)
    # A reader of one readout verifies it and the scalars (residual, rho, excluded).
    wanted = (array.split("/")[1],) if array.startswith("features/") else ("loss",)
    with pytest.raises(StoreError):
        split.read_unit(1, wanted)
    for unit in (0, 2):
        split.read_unit(unit)
    if array == "excluded":
        with pytest.raises(StoreError, match="excluded"):
            split.excluded_rows()
    report = Store.open_existing(path).verify()
    assert list(report.splits["train"]) == [1] and report.unresolved
    assert any("unit 1" in line for line in report.lines())
    fixed = Store.open_existing(path).verify(fix=True)
    assert fixed.splits["train"].unmarked == [1] and not fixed.unresolved
    assert train(path).done_units().tolist() == [0, 2]
    recommit_and_compare(path, [1], reference)


def test_missing_rho_never_passes_as_valid(built):
    """The campaign's case: a missing rho chunk reads as NaN; it must not reach a reader."""
    path, _ = built
    split = train(path)
    split.chunk_file("rho", 0).unlink()
    assert np.isnan(split.group["rho"][0:4]).all()  # what zarr gives for a missing chunk
    with pytest.raises(StoreError, match=r"rho \(chunk missing\)"):
        split.read_unit(0, ("mean",))


# ------------------------------------------------------------------------------- markers

@pytest.mark.parametrize("how", ["truncate", "flip", "empty"])
def test_damaged_marker_means_not_done_never_a_crash(built, how):
    path, reference = built
    damage(train(path).chunk_file("markers", 1), how)
    split = train(path)
    with pytest.warns(UserWarning, match=r"split 'train': the completion markers of units \[1\]"):
        assert split.done_units().tolist() == [0, 2]
    with pytest.warns(UserWarning, match="unit 1"):
        assert not split.is_done(1)
    with pytest.raises(StoreError, match="unit 1 of split 'train' is not complete"):
        split.read_unit(1)
    with pytest.warns(UserWarning), pytest.raises(StoreError, match="1 of 3 units not extracted"):
        split.require_complete()
    report = Store.open_existing(path).verify(fix=True)  # reports instead of warning
    assert report.splits["train"].unmarked == [1]
    assert report.splits["train"].damaged == {1: "its completion marker is unreadable"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(path).done_units().tolist() == [0, 2]
    recommit_and_compare(path, [1], reference)


def test_commit_over_a_damaged_marker_redoes_the_unit(built):
    """A worker that finds an unreadable marker (not done) commits the unit again."""
    path, reference = built
    damage(train(path).chunk_file("markers", 2), "flip")
    with pytest.warns(UserWarning):
        recommit_and_compare(path, [2], reference)


def test_damaged_claim_reads_as_unclaimed_and_fix_clears_it(built):
    path, _ = built
    split = train(path)
    split.claim(0, rank=3)
    split.claim(1, rank=3)
    damage(split.chunk_file("claims", 1), "flip")
    with pytest.warns(UserWarning, match=r"claims of units \[1\]"):
        claims = split.claims()
    assert claims[0, 2] == 3 and claims[0, 3] == HOST_ID and (claims[1] == 0).all()
    report = Store.open_existing(path).verify(fix=True)
    assert report.splits["train"].claims_cleared == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(path).claims()


# --------------------------------------------------------------------------------- locks

def lock_file(split, unit: int) -> Path:
    return split.chunk_file("locks", unit)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage!" * 3, b"\xff" * 24])
def test_garbled_lock_is_held_then_times_out_without_spinning(built, content):
    """A crash leaves an empty/short/garbled lock: held while fresh, waited for with sleeps,
    and the wait ends with a StoreError naming the unit, the file and the fix."""
    path, _ = built
    split = train(path)
    split.chunk_file("markers", 1).unlink()  # unit 1 needs a commit
    lock = lock_file(split, 1)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(content)
    started, cpu = time.monotonic(), time.process_time()
    with pytest.raises(StoreError) as err:
        split.commit_unit(1, unit_data(1), lock_timeout_s=1.0)
    assert time.monotonic() - started < 5
    assert time.process_time() - cpu < 0.5, "the lock wait spins instead of sleeping"
    text = str(err.value)
    assert "unit 1 of split 'train'" in text and str(lock) in text and "garbled" in text
    assert "delete that file" in text
    assert not split.is_done(1)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage!" * 3])
def test_garbled_lock_is_broken_when_stale_by_mtime(built, content):
    path, reference = built
    split = train(path)
    split.chunk_file("markers", 1).unlink()
    lock = lock_file(split, 1)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(content)
    old = time.time() - locks.LOCK_STALE_S - 10
    os.utime(lock, (old, old))
    started = time.monotonic()
    assert split.commit_unit(1, unit_data(1))
    assert time.monotonic() - started < 2
    assert not lock.exists()
    np.testing.assert_array_equal(snapshot(path)["rho"], reference["rho"])


def test_lock_wait_honours_should_stop(built):
    path, _ = built
    split = train(path)
    split.chunk_file("markers", 0).unlink()
    lock = lock_file(split, 0)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(np.asarray([time.time(), os.getpid(), HOST_ID], "<f8").tobytes())  # live
    deadline = time.monotonic() + 0.5
    started = time.monotonic()
    with pytest.raises(StopRequested) as err:
        split.commit_unit(0, unit_data(0), should_stop=lambda: time.monotonic() > deadline)
    assert not isinstance(err.value, DasError)  # the caller maps it to preemption
    assert time.monotonic() - started < 3
    assert not split.is_done(0) and lock.exists()  # the holder's lock is left alone


def test_release_keeps_only_the_holders_inode(built):
    """A holder whose lock was broken (and retaken by another) does not remove the new one."""
    path, _ = built
    split = train(path)
    lock = lock_file(split, 0)
    with split.unit_lock(0):
        lock.unlink()  # broken as stale by someone else...
        lock.write_bytes(np.asarray([time.time(), 1, HOST_ID + 1], "<f8").tobytes())  # ...retaken
    assert lock.exists()


# ------------------------------------------------------------------------- metadata files

METADATA = ["features/mean", "features/loss", "features", "markers", "residual", "rho",
            "excluded", "claims", "locks", "uids", "content"]


@pytest.mark.parametrize("node", METADATA)
@pytest.mark.parametrize("how", ["delete", "garble"])
def test_damaged_array_metadata_is_refused_and_repaired_without_losing_data(built, node, how):
    path, reference = built
    store = Store.open_existing(path)
    damage(path / "train" / node / "zarr.json", how)
    with pytest.raises(StoreError, match=rf"split 'train' in .* is damaged \({node}/zarr.json "
                                         rf".*\): run `das verify CONFIG --fix`"):
        store.split("train")
    # extract must refuse too (never "wrote 0 units", never recreate and wipe the split)
    with pytest.raises(StoreError, match="is damaged"):
        store.create_split("train", **split_args())
    with pytest.raises(StoreError, match="is damaged"):
        store.create_split("train", **split_args(), create=False, wait_s=0.5)
    assert (path / "train" / "rho" / "c" / "0").exists()
    report = store.verify()
    assert report.unresolved and node in report.splits["train"].metadata
    fixed = store.verify(fix=True)
    assert node in fixed.splits["train"].repaired and not fixed.unresolved
    assert fixed.splits["train"].checked == UNITS and not fixed.splits["train"].unmarked
    after = snapshot(path)  # the old chunks are readable again and pass their checksums
    for key, value in reference.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_metadata_with_another_layout_is_damage(built):
    path, reference = built
    meta = path / "train" / "features" / "mean" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [N, DIM + 1]
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"features/mean/zarr.json differs .*\(shape\)"):
        Store.open_existing(path).split("train")
    assert not Store.open_existing(path).verify(fix=True).unresolved
    np.testing.assert_array_equal(snapshot(path)["features/mean"], reference["features/mean"])


def test_lost_split_attributes_are_refused_and_replace_split_recovers(built):
    path, _ = built
    (path / "train" / "zarr.json").unlink()
    store = Store.open_existing(path)
    with pytest.raises(StoreError, match=r"damaged beyond repair .*--replace-split train"):
        store.split("train")
    with pytest.raises(StoreError, match="beyond repair"):
        store.create_split("train", **split_args())
    report = store.verify(fix=True)
    assert report.unresolved and "--replace-split train" in "\n".join(report.lines())
    assert store.replace_split("train") == ["train"]
    build_again = store.create_split("train", **split_args())
    assert build_again.done_units().tolist() == []


def test_interrupted_split_creation_is_created_again(tmp_path):
    """A kill during create_split leaves arrays but no markers metadata and no unit data."""
    store = Store.open(tmp_path / "s.zarr", FP)
    store.create_split("train", **split_args())
    for node in ("markers", "claims"):  # created last: as if killed before them
        for f in sorted((tmp_path / "s.zarr" / "train" / node).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    with pytest.raises(StoreError, match="is not in store"):
        store.split("train")
    split = store.create_split("train", **split_args())
    assert split.done_units().tolist() == [] and not store.verify().found


# ------------------------------------------------------------------------- store creation

def test_partial_root_leftover_is_cleaned_up(tmp_path):
    path = tmp_path / "s.zarr"
    path.mkdir()
    (path / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b'{"zarr_fo')
    with pytest.raises(StoreError, match="no feature store"):
        Store.open_existing(path)
    report = verify_store(path)
    assert "interrupted" in report.problems[0]
    store = Store.open(path, FP)
    assert store.fingerprint == FP and [p.name for p in path.iterdir()] == ["zarr.json"]


def test_path_with_other_content_is_still_refused(tmp_path):
    path = tmp_path / "s.zarr"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a zarr store"):
        Store.open(path, FP)
    assert (path / "notes.txt").exists()


def test_stage_check_fails_at_once_without_a_store(tmp_path):
    started = time.monotonic()
    with pytest.raises(StoreError, match="no feature store at .*run `das extract CONFIG` first"):
        Store.open(tmp_path / "none.zarr", FP, create=False, wait_s=0)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("how", ["delete", "garble"])
def test_lost_root_metadata_is_reported_with_the_way_forward(built, how):
    path, _ = built
    damage(path / "zarr.json", how)
    with pytest.raises(StoreError, match="no feature store" if how == "delete" else "unreadable"):
        Store.open_existing(path)
    with pytest.raises(StoreError):
        Store.open(path, FP)  # never created over the old splits
    assert (path / "train" / "rho" / "c" / "0").exists()
    report = verify_store(path, fix=True)
    text = "\n".join(report.lines())
    assert report.unresolved and "fingerprint" in text and "fresh store" in text


def test_old_format_is_refused(built):
    path, _ = built
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="has format 1, this version reads format 2"):
        Store.open_existing(path)


def test_fingerprint_refusal_names_fields_and_changed_training_rows(built):
    path, _ = built
    other = json.loads(json.dumps(FP))
    other["settings"]["k"] = 6
    with pytest.raises(StoreError, match=r"settings.k: store has 5, config gives 6[\s\S]*new "
                                         r"\[store\] path"):
        Store.open(path, other)
    new_train = {**FP, "train": {"digest": "d2", "num_samples": 10}}
    digests = [f"h{i}" for i in range(N)]
    digests[3] = digests[7] = "changed"
    with pytest.raises(StoreError) as err:
        Store.open(path, new_train, train_row_digests=digests)
    text = str(err.value)
    assert "train.digest: store has 'd', config gives 'd2'" in text
    assert "2 rows changed (uids u3, u7)" in text and "--replace-split train" in text


# ---------------------------------------------------------------------- content identity

def test_query_set_with_changed_rows_names_them_and_replace_split_recomputes(tmp_path):
    store = Store.open(tmp_path / "s.zarr", FP)
    uids = [f"q{i}" for i in range(6)]
    store.create_split("val", **split_args(uids=uids, digest="e", row_digests=list("abcdef")))
    store.root.require_group("scores").require_group("val").create_array(
        "das", shape=(6, N), dtype="float32")
    new = list("abXdeY")
    with pytest.raises(StoreError) as err:
        store.create_split("val", **split_args(uids=uids, digest="e2", row_digests=new))
    text = str(err.value)
    assert "split 'val'" in text and "other data" in text
    assert "2 rows changed (uids q2, q5)" in text
    assert "das extract CONFIG --replace-split val" in text
    assert store.split("val").changed_rows(new) == [2, 5]
    assert store.split("val").changed_rows(list("abcdefg")) == [6]
    assert store.replace_split("val") == ["val", "scores/val"]
    split = store.create_split("val", **split_args(uids=uids, digest="e2", row_digests=new))
    assert split.attrs["dataset_digest"] == "e2" and not (tmp_path / "s.zarr" / ".trash").exists()


def test_replace_train_takes_dependents_and_updates_the_fingerprint(built):
    path, _ = built
    store = Store.open_existing(path)
    store.create_split("val", **split_args(digest="e"))
    for group in ("reduce", "scores", "partials"):
        store.root.require_group(group).require_group("mean")
    new = {**FP, "train": {"digest": "d2", "num_samples": 10}}
    with pytest.raises(StoreError, match="differs in model, train"):
        store.replace_split("train", {**new, "model": {"digest": "other"}})
    removed = store.replace_split("train", new)
    assert removed == ["train", "reduce", "scores", "partials"]
    assert store.split_names() == ["val"]
    reopened = Store.open(path, new)  # the new fingerprint is the store's now
    assert reopened.split("val").num_samples == N


# ------------------------------------------------------------------------ claims and hosts

def test_claims_know_their_host_and_dead_processes(built):
    import subprocess

    path, _ = built
    split = train(path)
    split.claim(0, rank=2)
    claims = split.claims()
    assert claims.shape == (UNITS, 4)
    assert claims[0, 1:].tolist() == [os.getpid(), 2, HOST_ID]
    dead = subprocess.Popen(["true"])
    dead.wait()
    claims[1] = [time.time(), dead.pid, 1, HOST_ID]        # this host, process gone
    claims[2] = [time.time(), dead.pid, 1, HOST_ID + 1]    # another host: unknown, not dead
    assert dead_claims(claims).tolist() == [False, True, False]
    old = claims.copy()
    old[0, 0] = 1.0  # this pid, but claimed before this process started: a reused pid
    assert dead_claims(old)[0]
    split.release(0)
    assert (split.claims()[0] == 0).all()
    split.group["claims"][1] = [time.time(), 1, 0, HOST_ID]  # someone else's claim
    split.release(1)
    assert split.claims()[1, 1] == 1


# ---------------------------------------------------------------------------- exclusions

def test_excluded_rows_are_stored_as_zeros_and_listed(built):
    path, _ = built
    split = train(path)
    data = split.read_unit(1)
    assert data.excluded.tolist() == [False, False, True, False]
    assert (data.features["mean"][2] == 0).all() and (data.features["loss"][2] == 0).all()
    assert data.residual[2] == 0 and data.rho[2] == 0
    assert split.excluded_rows().tolist() == [6]
    assert split.excluded_rows(np.zeros_like(split.markers())).tolist() == []  # marked only


def test_non_finite_rows_that_are_not_excluded_are_refused(tmp_path):
    store = Store.open(tmp_path / "s.zarr", FP)
    split = store.create_split("train", **split_args())
    data = unit_data(0)
    data.rho[1] = np.inf
    with pytest.raises(StoreError, match=r"rows \[1\] .* non-finite"):
        split.commit_unit(0, data)
    assert not split.is_done(0)


# --------------------------------------------------------------------------------- cache

@pytest.fixture
def cached(tmp_path):
    store = Store.open(tmp_path / "c.zarr", FP)
    split = store.create_split("train", **split_args(), cache_shapes={"latents": (2, 3),
                                                                       "text": (4,)})
    values = {}
    for unit in range(UNITS):
        lo, hi = split.unit_rows(unit)
        rng = np.random.default_rng(10 + unit)
        values[unit] = {"latents": rng.normal(size=(hi - lo, 2, 3)),
                        "text": rng.normal(size=(hi - lo, 4))}
        split.write_cache(unit, values[unit])
    return tmp_path / "c.zarr", values


@pytest.mark.parametrize("how", ["delete", "flip"])
def test_damaged_cache_is_refused_and_unmarked(cached, how):
    path, values = cached
    split = train(path)
    np.testing.assert_array_equal(split.read_cache(2)["text"], values[2]["text"].astype(np.float32))
    damage(split.chunk_file("cache/latents", 1), how)
    with pytest.raises(StoreError, match="cache/latents chunk of unit 1"):
        split.read_cache(1)
    report = Store.open_existing(path).verify(fix=True)
    assert report.splits["train"].cache_unmarked == [1]
    assert not train(path).cache_done(1) and train(path).cache_done(0)
    train(path).write_cache(1, values[1])
    assert not Store.open_existing(path).verify().found


def test_damaged_cache_marker_means_not_cached(cached):
    path, _ = cached
    damage(train(path).chunk_file("cache/markers", 0), "flip")
    with pytest.warns(UserWarning, match="cache marker of unit 0"):
        assert not train(path).cache_done(0)


# ------------------------------------------------------------------- identity arrays, products

def test_damaged_uids_are_rewritten_by_extract(built):
    path, _ = built
    damage(train(path).chunk_file("uids", 0), "flip")
    with pytest.raises(StoreError, match="uids array of split 'train'"):
        train(path).uids()
    report = Store.open_existing(path).verify(fix=True)
    assert "uids array is damaged" in report.splits["train"].unrepairable[0]
    with pytest.warns(UserWarning, match="rewritten from the dataset"):
        Store.open_existing(path).create_split("train", **split_args())
    assert train(path).uids() == split_args()["uids"]
    assert not Store.open_existing(path).verify().found


def test_damaged_reduction_scores_and_partials_are_reported_and_deleted(built):
    path, _ = built
    store = Store.open_existing(path)
    red = store.root.require_group("reduce").require_group("mean")
    for name, shape in (("eigvals", (DIM,)), ("eigvecs", (DIM, DIM))):
        red.create_array(name, shape=shape, dtype="float64", chunks=shape)[...] = np.ones(shape)
    red.attrs.update({"train_digest": "x", "trace": 1.0, "num_samples": N, "dim": DIM})
    scores = store.root.require_group("scores").require_group("val")
    scores.create_array("das", shape=(2, N), dtype="float32")  # attrs never written: unfinished
    part = store.root.require_group("partials").require_group("mean").create_array(
        "r0-w1", shape=(DIM, DIM), dtype="float64", chunks=(DIM, DIM))
    part[...] = np.eye(DIM)
    part.attrs.update({"checksum": float(DIM) + 1.0})  # does not match
    # zstd without a checksum (reduce.write_rows today): a truncated chunk fails to decode
    damage(path / "reduce" / "mean" / "eigvecs" / "c" / "0" / "0", "truncate")
    report = store.verify()
    problems = "\n".join(report.problems)
    assert "reduce/mean: eigvecs unreadable" in problems
    assert "scores/val: unfinished" in problems
    assert "partials/mean/r0-w1: does not match its checksum" in problems
    fixed = store.verify(fix=True)
    assert not fixed.unresolved and len(fixed.repaired) == 3
    assert not any((path / p).exists() for p in ("reduce/mean", "scores/val",
                                                  "partials/mean/r0-w1"))
    assert not store.verify().found
