"""`das status`: done/total, per-rank rates, ETA and stale units, from markers and claims."""

from __future__ import annotations

import numpy as np

from das_pipeline.cli import main
from das_pipeline.store import Store, crc

NOW = 1_700_000_000.0  # in the past of any test run


def synthetic_store(path, fingerprint=None):
    """train: 10 units x 4 rows. Rank 0 marked units 0-3 (8 s each: 0.5 samples/s), rank 1
    units 4-5 (4 s each: 1 sample/s); rank 0 works on unit 6 now; rank 2 claimed unit 7 two
    hours ago and died; units 8-9 untouched. val: created, nothing done."""
    store = Store.open(path, fingerprint or {"test": 1})
    uids = [str(i) for i in range(40)]
    train = store.create_split("train", source="x", digest="d", uids=uids, readouts=("mean",),
                               dim=2, dtype="float32", rows_per_unit=4)
    store.create_split("val", source="y", digest="e", uids=uids[:6], readouts=("mean",), dim=2,
                       dtype="float32", rows_per_unit=4)
    t0 = NOW - 100
    for unit, (rank, seconds) in enumerate([(0, 8)] * 4 + [(1, 4)] * 2):
        start = t0 + 10 * unit
        train.group["claims"][unit] = [start, 100 + rank, rank, 0.0]
        # checksums: feature, residual, rho (not read here) and excluded (all zeros, read)
        train.group["markers"][unit] = [1, 4, start + seconds, 100 + rank, rank, 0.0, 0.0, 0.0,
                                        crc(np.zeros(4, np.uint8))]
    train.group["claims"][6] = [NOW - 2, 100, 0, 0.0]
    train.group["claims"][7] = [NOW - 7200, 102, 2, 0.0]
    return store


def test_status_reports_rates_eta_and_stale_units(tmp_path, capsys):
    from das_pipeline.config import load_config
    from das_pipeline.data import open_dataset
    from das_pipeline.fingerprint import fingerprint
    from das_pipeline.launch.status import status_lines

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[model]\npath = "m"\n[data]\ntrain = "digits[0:40]"\n[data.queries]\n'
                   f'val = "digits[0:6]"\n[store]\npath = "{tmp_path / "s.zarr"}"\n')
    train = open_dataset("train", "digits[0:40]")
    synthetic_store(tmp_path / "s.zarr", fingerprint(load_config(cfg), train.digest, len(train)))

    lines = status_lines(load_config(cfg), stale_after=1800, now=NOW)
    assert lines[1] == ("  train        units 6/10  samples 24/40 (60%)  rate 1.5 samples/s "
                        "(2 active ranks)  ETA 11s")
    assert lines[2].split() == ["per", "rank", "(samples/s):", "r0", "0.5,", "r1", "1"]
    assert lines[3].split() == ["in", "progress:", "1", "units"]
    assert ("stale units (claimed over 30m00s ago or by a process that is gone, never marked): "
            "1: [7]") in lines[4]
    assert lines[5].startswith("  val          units 0/2  samples 0/6 (0%)  2 active ranks")
    # The command line, on the real clock (years later): nobody is active, 6 and 7 are stale.
    assert main(["status", str(cfg), "--stale-after", "60"]) == 0
    out = capsys.readouterr().out
    assert "units 6/10  samples 24/40 (60%)  no rank active in the last 1m00s" in out
    assert ("stale units (claimed over 1m00s ago or by a process that is gone, never marked): "
            "2: [6, 7]") in out


def test_rates_use_only_units_a_rank_claimed_and_marked(tmp_path):
    from das_pipeline.launch.status import rank_rates

    store = synthetic_store(tmp_path / "s.zarr")
    train = store.split("train")
    # Unit 0 was re-marked by rank 1 after rank 0's claim (a twin): its time counts for nobody.
    train.group["markers"][0] = [1, 4, NOW - 10, 101, 1] + [0.0] * 4
    rates = rank_rates(train.markers(), train.claims())
    np.testing.assert_allclose([rates[0], rates[1]], [12 / 24, 1.0])


def test_a_claim_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    """After Ctrl-C or a crash, `das status` reported an active rank with an ETA for 30 minutes
    although nothing ran: a claim whose process is gone is stale at once."""
    import subprocess
    import sys

    from das_pipeline.launch.status import split_lines
    from das_pipeline.store import HOST_ID

    store = synthetic_store(tmp_path / "s.zarr")
    train = store.split("train")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    train.group["claims"][6] = [NOW - 2, int(gone.stdout), 0, HOST_ID]
    lines = split_lines(train, NOW, 1800, active={0, 1})
    assert not any("in progress" in line for line in lines), lines
    assert any("never marked): 2: [6, 7]" in line for line in lines), lines
