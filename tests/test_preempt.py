"""Crashes, preemption and duplicate workers, with real signals on real `das extract` processes.

- SIGKILL at 10 seeded random fault points (faults.FAULT_POINTS), a rerun after each: no marked
  unit is ever incomplete, a marked unit is never rewritten, and the final store equals the
  uninterrupted one; a kill while writing the partial Grams leaves them unused, not wrong.
- SIGTERM (a real process) / SIGUSR1 (in process): the worker drops or finishes its unit,
  exits 75 (raises Preempted), and the rerun resumes.
- Two workers with the same plan on one store (a requeued job overlapping its predecessor):
  each unit is committed once, by one of them, and the store equals the reference.
- The per-unit commit lock, in process: twins with different floats, held, dead and old locks.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dist import (
    DAS,
    assert_same_store,
    das_env,
    make_reference,
    run,
    store_of,
    units_written,
    write_config,
)

from das_pipeline import dist, faults
from das_pipeline.config import load_config
from das_pipeline.store import HOST_ID, Store, StoreError, UnitData

NUM_UNITS = 20 + 3  # rows_per_unit = 2: 40 train rows, 6 queries


@pytest.fixture
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    return make_reference(tmp_path_factory, tiny_model_dir)


def snapshot(store_path: Path) -> dict[str, np.ndarray]:
    """Markers of every split, after checking each marked unit against its marker."""
    store = Store.open_existing(store_path)
    out = {}
    for name in ("train", "val"):
        split = store.split(name)
        out[name] = split.markers()
        for unit in np.flatnonzero(out[name][:, 0] == 1.0):
            split.read_unit(int(unit), marker=out[name][unit])  # raises if incomplete / mixed
    return out


def assert_marked_once(before: dict, after: dict) -> None:
    """Units marked before are untouched after (same marker: time, pid, checksums)."""
    for name, old in before.items():
        was = old[:, 0] == 1.0
        np.testing.assert_array_equal(after[name][was], old[was],
                                      err_msg=f"a marked unit of {name} was written again")


@pytest.mark.dist
def test_sigkill_at_ten_random_points_then_resume(reference, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "kill.toml", tiny_model_dir, tmp_path / "kill.zarr",
                       rows_per_unit=2)
    rng = random.Random(20261128)
    # Every point one unit of an unconditional model passes (after_cache: text models only).
    points = [p for p in faults.FAULT_POINTS if p not in ("after_cache", "partial")]
    before = None
    for attempt in range(10):
        point, n = rng.choice(points), rng.randint(1, 2)
        done = run([*DAS, "extract", cfg, "--quiet"], DAS_FAULT=f"{point}:{n}")
        assert done.returncode == -signal.SIGKILL, (attempt, point, n, done.stderr[-2000:])
        if not (tmp_path / "kill.zarr" / "val" / "markers" / "zarr.json").exists():
            continue  # killed before the splits existed
        after = snapshot(tmp_path / "kill.zarr")
        if before is not None:
            assert_marked_once(before, after)
        before = after
    left = NUM_UNITS - sum(int((m[:, 0] == 1).sum()) for m in before.values())
    assert 0 < left < NUM_UNITS  # the kills made progress and left work

    # The rerun finishes the work, then is killed while writing its second partial Gram.
    done = run([*DAS, "extract", cfg, "--quiet", "--partial-gram"], DAS_FAULT="partial:2")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    after = snapshot(tmp_path / "kill.zarr")
    assert_marked_once(before, after)
    assert all((m[:, 0] == 1).all() for m in after.values())
    assert_same_store(store_of(reference), tmp_path / "kill.zarr")

    from das_pipeline.reduce import run_reduce

    with pytest.raises(StoreError, match="unfinished"):  # the killed write is never trusted
        run_reduce(load_config(cfg), show_progress=False, partials="require")
    done = run([*DAS, "extract", cfg, "--quiet", "--partial-gram"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert units_written(done.stdout) == {0: 0}
    assert_marked_once(after, snapshot(tmp_path / "kill.zarr"))
    summary = run_reduce(load_config(cfg), show_progress=False, partials="require")
    assert summary["mean"]["source"] == "summed 1 partial Grams of world 1"


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_75_and_rerun_resumes(reference, tmp_path, tiny_model_dir, sig):
    """SIGTERM (Slurm) and SIGINT (Ctrl-C) take the same clean path: no traceback, exit 75."""
    cfg = write_config(tmp_path / "stop.toml", tiny_model_dir, tmp_path / "stop.zarr",
                       rows_per_unit=2)
    proc = subprocess.Popen([*DAS, "extract", str(cfg), "--quiet"], env=das_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_unit(tmp_path / "stop.zarr", proc.poll)
        proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == dist.PREEMPT_EXIT_CODE, err[-2000:]
    assert time.monotonic() - sent < 60
    assert f"preempted: signal {int(sig)}" in err and "rerun to continue" in err
    assert "Traceback" not in err, err[-2000:]
    stopped = snapshot(tmp_path / "stop.zarr")
    done_units = sum(int((m[:, 0] == 1).sum()) for m in stopped.values())
    assert 0 < done_units < NUM_UNITS
    done = run([*DAS, "extract", cfg, "--quiet"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert units_written(done.stdout) == {0: NUM_UNITS - done_units}
    assert_marked_once(stopped, snapshot(tmp_path / "stop.zarr"))
    assert_same_store(store_of(reference), tmp_path / "stop.zarr")


def wait_for_first_unit(store: Path, alive=lambda: None, timeout: float = 240) -> None:
    markers = store / "train" / "markers" / "zarr.json"
    deadline = time.monotonic() + timeout
    while not (markers.exists() and Store.open_existing(store).split("train").done_units().size):
        assert alive() is None and time.monotonic() < deadline, "no unit was ever marked"
        time.sleep(0.05)


def test_sigusr1_in_process_stops_resumes_and_restores_handlers(reference, tmp_path,
                                                                tiny_model_dir):
    """The same path as Slurm's --signal=USR1, inside this process: run_extract raises
    Preempted, the previous signal handlers come back, and a second call finishes the work."""
    from das_pipeline.extract import run_extract

    cfg = load_config(write_config(tmp_path / "usr1.toml", tiny_model_dir, tmp_path / "u.zarr",
                                   rows_per_unit=2))
    rank = dist.RankInfo(0, 1, 0, torch.device("cpu"))
    previous = signal.getsignal(signal.SIGUSR1)

    def stop_after_first_unit():
        wait_for_first_unit(tmp_path / "u.zarr")
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=stop_after_first_unit, daemon=True)
    sender.start()
    with pytest.raises(dist.Preempted, match=f"signal {int(signal.SIGUSR1)}"):
        run_extract(cfg, rank=rank, show_progress=False)
    sender.join(10)
    assert signal.getsignal(signal.SIGUSR1) is previous
    stopped = snapshot(tmp_path / "u.zarr")
    done_units = sum(int((m[:, 0] == 1).sum()) for m in stopped.values())
    assert 0 < done_units < NUM_UNITS
    assert run_extract(cfg, rank=rank, show_progress=False)["units"] == NUM_UNITS - done_units
    assert_marked_once(stopped, snapshot(tmp_path / "u.zarr"))
    assert_same_store(store_of(reference), tmp_path / "u.zarr")


@pytest.mark.dist
def test_duplicate_workers_commit_each_unit_once(reference, tmp_path, tiny_model_dir):
    from das_pipeline.extract import open_splits, prepare

    cfg = write_config(tmp_path / "dup.toml", tiny_model_dir, tmp_path / "dup.zarr",
                       rows_per_unit=2)
    open_splits(prepare(load_config(cfg)), dist.RankInfo(0, 1, 0, torch.device("cpu")))
    twins = [subprocess.Popen([*DAS, "extract", str(cfg), "--quiet"], env=das_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [t.communicate(timeout=300) for t in twins]
    assert [t.returncode for t in twins] == [0, 0], [e[-2000:] for _, e in outs]
    written = [units_written(out)[0] for out, _ in outs]
    assert sum(written) == NUM_UNITS, written  # both planned every unit; each committed once
    assert_same_store(store_of(reference), tmp_path / "dup.zarr")


# ------------------------------------------------------------------ commit lock (in process)

@pytest.fixture
def split(tmp_path):
    store = Store.open(tmp_path / "s.zarr", {"test": 1})
    return store.create_split("train", source="x", digest="d", uids=[str(i) for i in range(6)],
                              readouts=("mean",), dim=3, dtype="float32", rows_per_unit=2)


def unit_data(value: float) -> UnitData:
    return UnitData({"mean": np.full((2, 3), value, np.float32)}, np.full(2, value, np.float32),
                    np.zeros(2, np.float32))


def lock_file(split, unit: int) -> Path:
    arr = split.group["locks"]
    return Path(arr.store.root) / arr.path / arr.metadata.encode_chunk_key((unit, 0))


def hold_lock(split, unit: int, when: float, pid: int, host: float) -> Path:
    path = lock_file(split, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asarray([when, pid, host], "<f8").tobytes())
    os.utime(path, (when, when))  # an old lock is an old file too (locks.py: both must be old)
    return path


def test_twin_with_other_floats_never_overwrites_a_marked_unit(split):
    assert split.commit_unit(1, unit_data(1.0))
    assert not split.commit_unit(1, unit_data(1.0 + 1e-6))  # e.g. the same unit on another GPU
    np.testing.assert_array_equal(split.read_unit(1).features["mean"], 1.0)
    assert not lock_file(split, 1).exists()
    assert split.group["locks"][1].tolist() == [0.0, 0.0, 0.0]  # zarr reads "unlocked"


def test_commit_waits_for_a_live_holder(split):
    path = hold_lock(split, 0, time.time(), os.getpid(), HOST_ID)
    assert split.group["locks"][0].tolist() == [pytest.approx(time.time(), abs=5), os.getpid(),
                                                HOST_ID]
    result = {}
    worker = threading.Thread(target=lambda: result.update(ok=split.commit_unit(0, unit_data(2.0))))
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and not split.is_done(0)
    path.unlink()  # the holder finishes
    worker.join(10)
    assert result == {"ok": True} and split.is_done(0)


def test_dead_or_old_holders_lose_their_lock(split):
    dead = subprocess.Popen(["true"])
    dead.wait()
    hold_lock(split, 0, time.time(), dead.pid, HOST_ID)       # this host, process gone
    hold_lock(split, 1, time.time() - 3600, 1, HOST_ID + 1)   # other host, an hour old
    started = time.monotonic()
    assert split.commit_unit(0, unit_data(3.0)) and split.commit_unit(1, unit_data(4.0))
    assert time.monotonic() - started < 5
    assert split.read_unit(1).features["mean"][0, 0] == 4.0
