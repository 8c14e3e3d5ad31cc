"""Ensembles ([[model]] lists): the scores are the mean of the members' single-model scores.

Two tiny DDPMs of one recipe trained from different seeds (conftest's model, seed 0, and one
more at seed 1), examples/digits.toml at the default settings with train and queries as
separate arrays. Every single-model reference is an ordinary single-model store of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

from das_pipeline.cli import main
from das_pipeline.config import dump_toml, load_config
from das_pipeline.data import digits_array
from das_pipeline.store import Store, read_scores
from helpers import EXAMPLES

METHODS = ("trak", "dtrak", "das")


def train_member(folder: Path, seed: int, widths=(8, 16)) -> Path:
    """conftest's recipe (tiny attention UNet, 60 steps on 64 digits) at another seed."""
    from das_pipeline.data import open_dataset
    from das_pipeline.recipe import ddpm_scheduler, save_pipeline, tiny_unet, train_ddpm

    unet = tiny_unet(8, 1, widths, attention=True, seed=seed)
    scheduler = ddpm_scheduler(100)
    data = open_dataset("train", "digits[0:64]")
    train_ddpm(unet, scheduler, data.load(0, 64), steps=60, seed=seed, batch_size=32,
               show_progress=False)
    return save_pipeline(unet, scheduler, folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """(folder, train/val arrays folder, model A (seed 0), model B (seed 1))."""
    folder = tmp_path_factory.mktemp("ensemble")
    digits = digits_array()
    np.save(folder / "train.npy", digits[:64])
    np.save(folder / "val.npy", digits[1500:1532])
    return folder, tiny_model_dir, train_member(folder / "model_b", seed=1)


def write(path: Path, folder: Path, models, store: Path) -> Path:
    """examples/digits.toml at its defaults on the arrays; ``models``: one path (a single
    [model] table) or a list of paths (a [[model]] array of tables)."""
    raw = tomllib.loads((EXAMPLES / "digits.toml").read_text())
    raw["model"] = ({"path": str(models)} if isinstance(models, Path)
                    else [{"path": str(m)} for m in models])
    raw["data"]["train"] = str(folder / "train.npy")
    raw["data"]["queries"] = {"val": str(folder / "val.npy")}
    raw["store"]["path"] = str(store)
    path.write_text(dump_toml(raw))
    return path


def cli(capsys, *args):
    code = main([*map(str, args), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def das(*args, env=None):
    return subprocess.run([sys.executable, "-m", "das_pipeline.cli", *map(str, args), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)


def single_scores(data: Path, out: Path, model: Path, name: str) -> dict[str, np.ndarray]:
    """`das run` of one model (a single [model] table) into its own ordinary store in ``out``;
    its scores per method."""
    cfg = write(out / f"{name}.toml", data, model, out / f"{name}.zarr")
    assert main(["run", str(cfg), "--quiet"]) == 0
    return {m: read_scores(out / f"{name}.zarr", "val", m).astype(np.float64) for m in METHODS}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def singles(setup):
    """Single-model scores of A and B (ordinary stores), computed once."""
    folder, a, b = setup
    return single_scores(folder, folder, a, "single_a"), single_scores(folder, folder, b, "single_b")


def test_ensemble_scores_are_the_mean_of_the_single_model_scores(setup, singles, capsys, tmp_path):
    folder, a, b = setup
    cfg = write(tmp_path / "ens.toml", folder, [a, b], tmp_path / "ens.zarr")
    code, out, err = cli(capsys, "run", cfg)
    assert code == 0, err
    assert "mean of 2 members" in out and "report: 1 pages" in out, out
    index = (load_config(cfg).reports_dir / "index.html").read_text()
    assert "ensemble of 2 models" in index
    single_a, single_b = singles
    for m in METHODS:
        ens = read_scores(tmp_path / "ens.zarr", "val", m).astype(np.float64)
        mean = (single_a[m] + single_b[m]) / 2
        assert relative_error(ens, mean) < 1e-6, (m, relative_error(ens, mean))
        # the members differ, so the mean is not either member's score
        assert relative_error(single_a[m], mean) > 1e-2 and relative_error(single_b[m], mean) > 1e-2
        # the top-k CSV ranks the ensemble's scores
        rows = np.loadtxt(load_config(cfg).reports_dir / "val" / f"{m}_topk.csv", delimiter=",",
                          skiprows=1, usecols=(0, 2, 3), dtype=np.int64)
        top1 = rows[rows[:, 1] == 1]
        assert (top1[:, 2] == np.argmax(ens, axis=1)[top1[:, 0]]).mean() > 0.95, m
    # every member has its own fingerprint (its model's digest) in one store
    fps = [Store.open_existing(tmp_path / "ens.zarr" / "members" / f"m{i}").fingerprint
           for i in range(2)]
    assert fps[0]["model"] != fps[1]["model"] and fps[0]["settings"] == fps[1]["settings"]
    assert fps[0] == Store.open_existing(folder / "single_a.zarr").fingerprint
    code, out, _ = cli(capsys, "status", cfg)
    assert code == 0 and "member 1" in out and "ensemble scores val: current (2 members)" in out, out
    code, out, _ = cli(capsys, "verify", cfg)
    assert code == 0 and "member 0" in out and "member 1" in out, out


def test_one_member_list_equals_the_single_table(setup, singles, capsys, tmp_path):
    folder, a, _ = setup
    cfg = write(tmp_path / "one.toml", folder, [a], tmp_path / "one.zarr")
    code, _, err = cli(capsys, "run", cfg)
    assert code == 0, err
    for m in METHODS:
        one = read_scores(tmp_path / "one.zarr", "val", m).astype(np.float64)
        assert relative_error(one, singles[0][m]) < 1e-6, m


def test_a_changed_member_is_refused_then_replaced_and_resumed_alone(setup, singles, capsys,
                                                                    tmp_path):
    """Member 1's weights change: every stage refuses it (naming it); `--replace-member 1`
    extracts it again, killed after its first unit and resumed; member 0 is never redone; the
    scores equal the mean of single-model runs of A and the changed B."""
    import torch

    from das_pipeline.recipe import ddpm_scheduler, save_pipeline

    folder, a, b = setup
    b_copy = shutil.copytree(b, tmp_path / "member_b")
    cfg = write(tmp_path / "ens.toml", folder, [a, b_copy], tmp_path / "ens.zarr")
    code, _, err = cli(capsys, "run", cfg)
    assert code == 0, err
    members = tmp_path / "ens.zarr" / "members"
    markers_0 = Store.open_existing(members / "m0").split("train").markers()

    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(b_copy / "unet")
    with torch.no_grad():
        next(unet.parameters()).add_(0.05)
    save_pipeline(unet, ddpm_scheduler(100), b_copy)
    for command in ("extract", "reduce", "score"):
        code, _, err = cli(capsys, command, cfg)
        assert code == 2 and "member 1" in err and str(b_copy) in err, (command, err)
    assert "--replace-member 1" in err

    killed = das("extract", cfg, "--replace-member", "1", env={"DAS_FAULT": "after_unit:1"})
    assert killed.returncode == -9, killed.stderr
    done_1 = Store.open_existing(members / "m1").split("train").markers()
    assert done_1[:, 0].sum() == 1  # its one train unit; the val unit not yet
    resumed = das("extract", cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert "member 0: rank 0/1 wrote 0 units" in resumed.stdout, resumed.stdout
    assert "member 1: rank 0/1 wrote 1 units" in resumed.stdout, resumed.stdout
    np.testing.assert_array_equal(Store.open_existing(members / "m0").split("train").markers(),
                                  markers_0)
    np.testing.assert_array_equal(Store.open_existing(members / "m1").split("train").markers(),
                                  done_1)
    code, _, err = cli(capsys, "run", cfg)
    assert code == 0, err
    changed = single_scores(folder, tmp_path, b_copy, "single_b_changed")
    for m in METHODS:
        ens = read_scores(tmp_path / "ens.zarr", "val", m).astype(np.float64)
        mean = (singles[0][m] + changed[m]) / 2
        assert relative_error(ens, mean) < 1e-6, m
        assert relative_error(changed[m], singles[1][m]) > 1e-3, m  # the change mattered


def test_config_errors_name_the_member_and_exit_2(setup, capsys, tmp_path):
    folder, a, _ = setup
    from das_pipeline.recipe import ddpm_scheduler, save_pipeline, tiny_unet
    from tiny_sd import build_pipeline

    narrow = save_pipeline(tiny_unet(8, 1, (8, 8), attention=True), ddpm_scheduler(100),
                           tmp_path / "narrow")
    sd = build_pipeline(tmp_path / "sd")
    capsys.readouterr()  # the builders' progress bars
    cases = {
        "missing": ([a, tmp_path / "nowhere"], "member 1", "nowhere"),
        "other kind": ([a, sd], "StableDiffusionPipeline", "member 1"),
        "other shapes": ([narrow, a], "differ in shape", "member 1"),
    }
    for name, (models, *needles) in cases.items():
        cfg = write(tmp_path / f"{name}.toml", folder, models, tmp_path / f"{name}.zarr")
        for command in ("extract", "run", "score"):
            code, _, err = cli(capsys, command, cfg)
            assert code == 2 and len(err.strip().splitlines()) == 1, (name, command, err)
            assert all(n in err for n in needles), (name, err)
        assert not (tmp_path / f"{name}.zarr").exists(), name  # nothing written
    raw = tomllib.loads(write(tmp_path / "x.toml", folder, [a], tmp_path / "x.zarr").read_text())
    raw["model"] = [{"path": str(a)}, {"lora": "w.safetensors"}]
    (tmp_path / "nopath.toml").write_text(dump_toml(raw))
    code, _, err = cli(capsys, "extract", tmp_path / "nopath.toml")
    assert code == 2 and "[[model]] member 1: path is missing" in err, err


def test_single_model_commands_refuse_an_ensemble(setup, capsys, tmp_path):
    folder, a, b = setup
    cfg = write(tmp_path / "ens.toml", folder, [a, b], tmp_path / "ens.zarr")
    for args in (("attribute", cfg, folder / "x.png"), ("serve", cfg),
                 ("submit", cfg, "--array-tasks", "2", "--gpus-per-task", "1", "--dry-run"),
                 ("counterfactual", cfg, "--query-set", "val", "--out", tmp_path / "cf")):
        code, _, err = cli(capsys, *args)
        assert code == 2 and "an ensemble" in err and f"das {args[0]}" in err, (args, err)
        assert len(err.strip().splitlines()) == 1
