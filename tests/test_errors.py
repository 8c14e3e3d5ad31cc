"""Bad input gets a clear error before any work, and existing data stays intact."""

import shutil

import numpy as np
import pytest

from das_pipeline.cli import main
from das_pipeline.config import load_config
from das_pipeline.extract import run_extract
from das_pipeline.recipe import save_pipeline, tiny_unet
from das_pipeline.store import Store


def run_cli(capsys, *args):
    code = main([*map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def test_missing_model_folder(make_config, capsys, tmp_path):
    code, err = run_cli(capsys, "extract", make_config(model=tmp_path / "no_model"))
    assert code == 2
    assert "[model] path" in err and "no_model" in err and "is not a folder" in err
    assert not (tmp_path / "store.zarr").exists()


def test_missing_data_path(make_config, capsys, tmp_path):
    code, err = run_cli(capsys, "extract", make_config(train=str(tmp_path / "nope.npy")))
    assert code == 2 and "nope.npy" in err and "does not exist" in err


@pytest.mark.parametrize("shape, words", [
    ((4, 1, 16, 16), ["16x16 images but the model takes 8x8"]),
    ((4, 3, 8, 8), ["3 channels but the model takes 1"]),
    ((4, 8, 8), ["is not (N, C, H, W)"]),
])
def test_wrong_image_shape(make_config, capsys, tmp_path, shape, words):
    np.save(tmp_path / "bad.npy", np.zeros(shape, dtype=np.uint8))
    code, err = run_cli(capsys, "extract", make_config(queries={"q": str(tmp_path / "bad.npy")}))
    assert code == 2
    for word in words:
        assert word in err
    assert not (tmp_path / "store.zarr").exists(), "the store was created before the check"


def test_float_values_outside_unit_range(make_config, capsys, tmp_path):
    np.save(tmp_path / "raw.npy", np.full((3, 1, 8, 8), 200.0, dtype=np.float32))
    code, err = run_cli(capsys, "extract", make_config(train=str(tmp_path / "raw.npy")))
    assert code == 2 and "not [-1, 1]" in err and "127.5" in err


@pytest.mark.parametrize("source", ["digits[5:5]", "EMPTY_NPY", "EMPTY_DIR"])
def test_empty_dataset(make_config, capsys, tmp_path, source):
    if source == "EMPTY_NPY":
        source = str(tmp_path / "empty.npy")
        np.save(source, np.zeros((0, 1, 8, 8), dtype=np.uint8))
    elif source == "EMPTY_DIR":
        (tmp_path / "empty_dir").mkdir()
        source = str(tmp_path / "empty_dir")
    code, err = run_cli(capsys, "extract", make_config(train=source))
    assert code == 2 and ("no samples" in err or "holds no" in err), err


def test_projection_dim_below_one(make_config, capsys):
    code, err = run_cli(capsys, "extract", make_config(dim=0))
    assert code == 2 and "[projection] dim = 0" in err


def test_unknown_readout_and_method(make_config, capsys):
    code, err = run_cli(capsys, "run", make_config(readouts=("loss", "hessian")))
    assert code == 2 and "'hessian'" in err
    code, err = run_cli(capsys, "run", make_config(methods=("trak", "influence")))
    assert code == 2 and "'influence'" in err


def _snapshot(path):
    split = Store.open_existing(path).split("train")
    return split.markers().copy(), split.group["features"]["loss"][...].copy()


def test_store_from_another_config_is_refused_and_left_intact(make_config, capsys):
    cfg = load_config(make_config(train="digits[0:16]", queries={}))
    run_extract(cfg, show_progress=False)
    before = _snapshot(cfg.store.path)
    code, err = run_cli(capsys, "extract", make_config(train="digits[0:16]", queries={},
                                                        timesteps=5))
    assert code == 2
    assert "settings.timesteps: store has 4, config gives 5" in err
    after = _snapshot(cfg.store.path)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_store_from_another_model_is_refused(make_config, capsys, tmp_path, tiny_model_dir):
    cfg = load_config(make_config(train="digits[0:16]", queries={}))
    run_extract(cfg, show_progress=False)
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    from das_pipeline.recipe import ddpm_scheduler

    save_pipeline(tiny_unet(8, 1, (8, 16), attention=True, seed=99), ddpm_scheduler(100), other)
    code, err = run_cli(capsys, "extract", make_config(train="digits[0:16]", queries={},
                                                        model=other))
    assert code == 2 and "model.digest" in err


def test_query_set_with_changed_data_is_refused(make_config, capsys):
    cfg = load_config(make_config(train="digits[0:16]", queries={"q": "digits[100:104]"}))
    run_extract(cfg, show_progress=False)
    code, err = run_cli(capsys, "extract", make_config(train="digits[0:16]",
                                                        queries={"q": "digits[200:204]"}))
    assert code == 2 and "split 'q'" in err and "other data" in err


def test_reduce_and_score_refuse_an_incomplete_store(make_config, capsys):
    cfg_path = make_config(train="digits[0:32]", queries={})
    code, err = run_cli(capsys, "reduce", cfg_path)
    assert code == 2 and "run `das extract CONFIG` first" in err
    cfg = load_config(cfg_path)
    run_extract(cfg, show_progress=False)
    Store.open_existing(cfg.store.path).split("train").group["markers"][1] = 0.0
    code, err = run_cli(capsys, "reduce", cfg_path)
    assert code == 2 and "1 of 2 units not extracted" in err


def test_corrupt_unit_is_refused_and_verify_unmarks_it(make_config, capsys):
    cfg_path = make_config(train="digits[0:32]", queries={})
    cfg = load_config(cfg_path)
    run_extract(cfg, show_progress=False)
    chunk = cfg.store.path / "train" / "features" / "mean" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, err = run_cli(capsys, "reduce", cfg_path)
    assert code == 2 and "unit 1 of split 'train' is corrupt" in err
    assert main(["verify", str(cfg_path), "--fix"]) == 0
    assert Store.open_existing(cfg.store.path).split("train").done_units().tolist() == [0]
    run_extract(cfg, show_progress=False)  # redoes unit 1 only
    assert main(["reduce", str(cfg_path), "--quiet"]) == 0


@pytest.mark.parametrize("device, words", [("cuda:7", "cuda"), ("tpu", "choose cpu, cuda or cuda:N")])
def test_reduce_and_score_device_is_checked_before_any_work(make_config, capsys, device, words):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    cfg = make_config()
    for command in ("reduce", "score"):
        code, err = run_cli(capsys, command, cfg, "--device", device)
        assert code == 2 and f"--device {device}" in err.replace("'", "") and words in err, err
        assert "Traceback" not in err
