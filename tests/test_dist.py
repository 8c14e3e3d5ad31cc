"""Multi-process extraction: the rank plan, real `accelerate launch` / `torchrun` CPU ranks.

A W-process store must equal the 1-process store (float tolerance: thread counts differ) with
every unit marked exactly once, by the rank that owns it. Helpers here are shared by the
preemption and Slurm tests.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from das_pipeline import dist
from das_pipeline.config import load_config
from das_pipeline.store import Store

DAS = [sys.executable, "-m", "das_pipeline.cli"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# float32 features from processes with other thread counts agree to ~1e-6 of their scale (~1).
ATOL = 1e-5

def write_config(path: Path, model: Path, store: Path, rows_per_unit: int = 4) -> Path:
    """The scale tests' tiny config: 40 train rows, 6 queries, 3 readouts, k = 4: N >= k, and
    each of up to 3 ranks has more than 2 k rows, so partial Grams are smaller than the features
    they sum and get written (the partial-Gram path)."""
    return helpers.write_config(path, model, store=store, rows_per_unit=rows_per_unit, dim=4,
                                gamma=0.0)


def das_env(**extra: str) -> dict[str, str]:
    """The environment for a das subprocess: no launcher, array or fault variables inherited."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "ACCELERATE_USE_CPU")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("DAS_", "_DAS_", "SLURM_ARRAY", "SLURM_JOB"))}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=das_env(**env))


def units_written(stdout: str) -> dict[int, int]:
    """{rank: units written} from the `das extract` summary lines."""
    return {int(r): int(n) for r, n in re.findall(r"extract: rank (\d+)/\d+ wrote (\d+) units", stdout)}


def assert_same_store(ref_path: Path, path: Path) -> None:
    """Every split of ``path`` is complete and holds the reference's features and scalars."""
    ref, other = Store.open_existing(ref_path), Store.open_existing(path)
    assert other.fingerprint == ref.fingerprint
    for name in ("train", "val"):
        a, b = ref.split(name), other.split(name)
        b.require_complete()
        assert a.uids() == b.uids()
        for unit in range(b.num_units):
            b.read_unit(unit)  # checksums match the marker
        for key in [f"features/{r}" for r in a.readouts] + ["residual", "rho"]:
            np.testing.assert_allclose(b.group[key][...], a.group[key][...], rtol=0, atol=ATOL,
                                       err_msg=f"{name}/{key} differs from the 1-process store")


def make_reference(tmp_path_factory, tiny_model_dir) -> Path:
    """Config of a 1-process, in-process extract + reduce + score, made once per session."""
    from das_pipeline.extract import run_extract
    from das_pipeline.reduce import run_reduce
    from das_pipeline.score import run_score

    root = tmp_path_factory.getbasetemp() / "scale-reference"
    cfg_path = root / "ref.toml"
    if not (root / "done").exists():
        root.mkdir(exist_ok=True)
        write_config(cfg_path, tiny_model_dir, root / "ref.zarr")
        cfg = load_config(cfg_path)
        run_extract(cfg, rank=dist.RankInfo(0, 1, 0, torch.device("cpu")), show_progress=False)
        run_reduce(cfg, show_progress=False, partials="ignore")
        run_score(cfg, show_progress=False)
        (root / "done").touch()
    return cfg_path


@pytest.fixture
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    return make_reference(tmp_path_factory, tiny_model_dir)


def store_of(cfg_path: Path) -> Path:
    return load_config(cfg_path).store.path


# ---------------------------------------------------------------------------- rank plan (unit)

def _clear_launch_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith(("DAS_", "SLURM_")) or var in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                         "MASTER_ADDR", "ACCELERATE_USE_CPU"):
            monkeypatch.delenv(var)


def test_rank_plan_from_slurm_array_env(monkeypatch):
    _clear_launch_env(monkeypatch)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    info = dist.current("cpu")
    assert (info.rank, info.world, info.local_rank) == (1, 3, 0)
    monkeypatch.setenv("DAS_ARRAY_TASKS", "4")  # the rendered scripts' variables win
    monkeypatch.setenv("DAS_ARRAY_TASK_ID", "3")
    info = dist.current("cpu")
    assert (info.rank, info.world) == (3, 4)
    monkeypatch.setenv("DAS_ARRAY_TASK_ID", "4")
    with pytest.raises(ValueError, match=r"array task id 4 is outside \[0, 4\)"):
        dist.current("cpu")


@pytest.mark.parametrize("world", [1, 2, 3, 7, 13])
def test_owned_units_partition_the_units(world):
    num_units = 11
    owned = [dist.owned_units(num_units, dist.RankInfo(r, world, 0, torch.device("cpu")))
             for r in range(world)]
    flat = sorted(u for units in owned for u in units)
    assert flat == list(range(num_units))
    assert all(u % world == r for r, units in enumerate(owned) for u in units)


def test_single_process_cpu_launch_is_refused(monkeypatch):
    _clear_launch_env(monkeypatch)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")    # --num_processes 2` sets, in ONE process
    with pytest.raises(ValueError, match=r"started a single process.*--multi_gpu --num_processes N"):
        dist.current()


# ------------------------------------------------------------------------ real launchers (dist)

@pytest.mark.dist
def test_accelerate_cpu_flag_with_two_processes_exits_with_the_fix(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "cfg.toml", tiny_model_dir, tmp_path / "s.zarr")
    done = run([*ACCELERATE, "--cpu", "--num_processes", "2", "--main_process_port", free_port(),
                "-m", "das_pipeline.cli", "extract", cfg, "--quiet"])
    assert done.returncode != 0
    assert "accelerate launch --multi_gpu --num_processes N" in done.stderr
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.dist
def test_accelerate_two_cpu_processes_equal_one_process(reference, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "w2.toml", tiny_model_dir, tmp_path / "w2.zarr")
    done = run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port",
                free_port(), "-m", "das_pipeline.cli", "extract", cfg, "--quiet"])
    assert done.returncode == 0, done.stderr[-3000:]
    written = units_written(done.stdout)
    assert sorted(written) == [0, 1], done.stdout  # two real ranks, not two rank-0-of-1
    assert sum(written.values()) == 10 + 2         # every unit written once
    assert_same_store(store_of(reference), tmp_path / "w2.zarr")
    store = Store.open_existing(tmp_path / "w2.zarr")
    for name in ("train", "val"):
        markers = store.split(name).markers()
        np.testing.assert_array_equal(markers[:, 4], np.arange(len(markers)) % 2)


@pytest.mark.dist
def test_torchrun_three_processes_with_partial_grams(reference, tmp_path, tiny_model_dir):
    from das_pipeline.launch.status import status_lines
    from das_pipeline.reduce import run_reduce, stored_gram

    cfg_path = write_config(tmp_path / "w3.toml", tiny_model_dir, tmp_path / "w3.zarr")
    done = run([*TORCHRUN, "--nproc_per_node", "3", "--master_port", free_port(), "-m",
                "das_pipeline.cli", "extract", cfg_path, "--quiet", "--partial-gram"])
    assert done.returncode == 0, done.stderr[-3000:]
    written = units_written(done.stdout)
    assert written == {0: 4 + 1, 1: 3 + 1, 2: 3}  # 10 train units and 2 val units, u mod 3
    assert_same_store(store_of(reference), tmp_path / "w3.zarr")
    cfg = load_config(cfg_path)
    assert "  partial Grams loss: 3 finished (world [3])" in status_lines(cfg)
    summed = run_reduce(cfg, show_progress=False, partials="require")
    assert all(s["source"] == "summed 3 partial Grams of world 3" for s in summed.values())
    store = Store.open_existing(cfg.store.path)
    from_partials = {r: stored_gram(store, r) for r in summed}
    run_reduce(cfg, show_progress=False, partials="ignore")
    ref = Store.open_existing(store_of(reference))
    for r, gram in from_partials.items():
        streamed = stored_gram(store, r)
        np.testing.assert_allclose(gram, streamed, rtol=1e-12, atol=1e-12 * np.abs(streamed).max())
        np.testing.assert_allclose(gram, stored_gram(ref, r), rtol=0,
                                   atol=1e-4 * np.abs(streamed).max())
