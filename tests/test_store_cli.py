"""The store's fault handling end to end: `das extract` on the tiny config, damage, repair,
`das extract` again, and the features equal those of the undamaged run."""

from __future__ import annotations

import numpy as np

from das_pipeline.cli import main
from das_pipeline.config import load_config
from das_pipeline.store import Store


def das(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def arrays(store_path) -> dict[str, np.ndarray]:
    split = Store.open_existing(store_path).split("train")
    keys = [f"features/{r}" for r in split.readouts] + ["residual", "rho", "excluded"]
    return {key: split.group[key][...] for key in keys}


def assert_same(after: dict, before: dict) -> None:
    for key, value in before.items():
        np.testing.assert_allclose(after[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_missing_rho_chunk_is_caught_unmarked_and_redone(make_config, capsys):
    cfg_path = make_config(train="digits[0:32]")
    store_path = load_config(cfg_path).store.path
    assert das(capsys, "extract", cfg_path)[0] == 0
    before = arrays(store_path)
    Store.open_existing(store_path).split("train").chunk_file("rho", 1).unlink()

    code, _, err = das(capsys, "reduce", cfg_path)
    assert code == 2 and "unit 1 of split 'train' does not match its marker (rho (chunk missing))" in err
    code, out, _ = das(capsys, "verify", cfg_path)
    assert code == 1 and "1 corrupt: [1]" in out
    assert das(capsys, "verify", cfg_path, "--fix")[0] == 0
    code, out, _ = das(capsys, "extract", cfg_path)
    assert code == 0 and "wrote 1 units" in out
    assert_same(arrays(store_path), before)
    assert das(capsys, "reduce", cfg_path)[0] == 0
    assert das(capsys, "score", cfg_path)[0] == 0
    report = Store.open_existing(store_path).verify()  # real reductions and scores pass
    assert not report.found and set(report.splits) == {"train", "val"}, report.lines()


def test_missing_array_metadata_is_refused_everywhere_then_repaired(make_config, capsys):
    cfg_path = make_config(train="digits[0:32]", queries={})
    store_path = load_config(cfg_path).store.path
    assert das(capsys, "extract", cfg_path)[0] == 0
    before = arrays(store_path)
    (store_path / "train" / "features" / "loss" / "zarr.json").unlink()

    for command in ("extract", "reduce", "score"):
        code, out, err = das(capsys, command, cfg_path)
        assert code == 2, (command, out, err)
        assert "split 'train' in" in err and "is damaged (features/loss/zarr.json missing)" in err
        assert "wrote 0 units" not in out
    report = Store.open_existing(store_path).verify(fix=True)  # what `das verify --fix` runs
    assert report.splits["train"].repaired == ["features/loss"] and not report.unresolved
    code, out, _ = das(capsys, "extract", cfg_path)
    assert code == 0 and "wrote 0 units" in out  # the data chunks were kept and pass
    assert_same(arrays(store_path), before)
