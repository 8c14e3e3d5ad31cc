"""No silently wrong answer in ordinary use: the layouts the README shows, at the default settings.

Each test here reproduces a defect that an earlier version had (the name says which) and asserts
the behaviour a user must get instead. The run is examples/digits.toml with only paths (and, for
speed, the tiny test model) replaced: train and queries as separate arrays or folders.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from das_pipeline.cli import main
from das_pipeline.config import load_config
from das_pipeline.data import digits_array
from das_pipeline.store import Store, read_scores
from helpers import example_config

METHODS = ("trak", "dtrak", "das")


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """Train and held-out query digits as two separate uint8 .npy files (the README layout)."""
    folder = tmp_path_factory.mktemp("arrays")
    digits = digits_array()
    np.save(folder / "train.npy", digits[:64])
    np.save(folder / "val.npy", digits[1500:1532])
    return folder


def default_config(tmp_path, model_dir, arrays, **queries):
    """examples/digits.toml on the arrays: every setting at its default but the paths."""
    queries = queries or {"val": str(arrays / "val.npy")}
    return example_config(tmp_path / "run.toml", "digits", model=str(model_dir),
                          train=str(arrays / "train.npy"), queries=queries,
                          store=str(tmp_path / "run.zarr"))


def cli(capsys, *args):
    code = main([*map(str, args), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_model_dir, arrays):
    """One `das run` at the defaults; tests that change things copy its config first."""
    folder = tmp_path_factory.mktemp("run")
    cfg_path = default_config(folder, tiny_model_dir, arrays)
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    return cfg_path


def test_query_row_j_is_not_attributed_to_train_row_j(default_run):
    """Noise keyed by row index made val row j share train row j's noise: its top-1 proponent
    was train row j for 32 of 32 queries (dtrak). Content keys: at most chance level."""
    cfg = load_config(default_run)
    for method in METHODS:
        same, percentile = same_index_statistics(read_scores(cfg.store.path, "val", method))
        assert same <= 2, f"{method}: {same} of 32 val queries have train row j as top-1"
        assert 0.3 < percentile < 0.7, f"{method}: train row j ranks at {percentile:.2f} on average"


def same_index_statistics(scores_QN):
    """(queries whose top-1 is the same-index train row, mean share of train rows scored above
    the same-index row: about 0.5 when nothing ties row j of both splits together)."""
    Q = scores_QN.shape[0]
    same = int((np.argmax(scores_QN, axis=1) == np.arange(Q)).sum())
    above = [(scores_QN[j] > scores_QN[j, j]).sum() / (scores_QN.shape[1] - 1) for j in range(Q)]
    return same, float(np.mean(above))


def test_row_keyed_noise_would_be_caught(tmp_path, tiny_model_dir, arrays, monkeypatch):
    """The check above can fail: with noise keyed by the row within its unit (the old uid
    keys), same-index collisions come back."""
    import das_pipeline.extract as extract

    monkeypatch.setattr(extract, "noise_keys",
                        lambda mode, pixels, captions=None: [f"row{i}" for i in range(len(pixels))])
    cfg_path = default_config(tmp_path, tiny_model_dir, arrays)
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    same, percentile = same_index_statistics(read_scores(load_config(cfg_path).store.path, "val",
                                                         "trak"))
    assert same > 8 and percentile < 0.1, (same, percentile)


def test_an_image_queried_as_itself_gets_its_training_features(tmp_path, tiny_model_dir, arrays):
    """Content keys: a training image saved as a PNG and queried gets exactly its features."""
    folder = tmp_path / "same_png"
    folder.mkdir()
    for i, img in enumerate(np.load(arrays / "train.npy")[:8]):
        Image.fromarray(img[0]).save(folder / f"q{i:02d}.png")
    cfg_path = default_config(tmp_path, tiny_model_dir, arrays, same=str(folder))
    assert main(["extract", str(cfg_path), "--quiet"]) == 0
    store = Store.open_existing(load_config(cfg_path).store.path)
    train, same = store.split("train"), store.split("same")
    for r in train.readouts:
        want = train.group["features"][r][:8]
        got = same.group["features"][r][:]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(),
                                   err_msg=f"readout {r}")


def _snapshot(cfg_path):
    cfg = load_config(cfg_path)
    scores = {m: read_scores(cfg.store.path, "val", m).copy() for m in METHODS}
    csv = {p.name: p.read_bytes() for p in (cfg.reports_dir / "val").glob("*.csv")}
    return scores, csv


@pytest.mark.parametrize("command", ["score", "reduce", "status", "verify"])
def test_every_stage_refuses_changed_settings(default_run, capsys, command):
    """`das reduce` and `das score` rewrote results from stale features after `timesteps`
    changed. Now every stage refuses, names the field, and leaves the results untouched."""
    before = _snapshot(default_run)
    changed = default_run.with_name(f"changed_{command}.toml")
    changed.write_text(default_run.read_text().replace("timesteps = 10", "timesteps = 5"))
    code, _, err = cli(capsys, command, changed)
    assert code == 2, err
    assert "timesteps" in err and "store has 10, config gives 5" in err, err
    assert "Traceback" not in err
    after = _snapshot(default_run)
    assert after[1] == before[1]
    for m in METHODS:
        np.testing.assert_array_equal(after[0][m], before[0][m])


def test_score_refuses_a_query_set_whose_images_changed(default_run, arrays, capsys, tmp_path):
    before = _snapshot(default_run)
    other = tmp_path / "other_val.npy"
    np.save(other, digits_array()[1600:1632])
    changed = default_run.with_name("other_images.toml")
    changed.write_text(default_run.read_text().replace(str(arrays / "val.npy"), str(other)))
    code, _, err = cli(capsys, "score", changed)
    assert code == 2, err
    assert "query set 'val'" in err and "changed since its features were extracted" in err, err
    assert "--replace-split val" in err
    after = _snapshot(default_run)
    assert after[1] == before[1]
    for m in METHODS:
        np.testing.assert_array_equal(after[0][m], before[0][m])


def test_status_says_whether_reduce_and_scores_are_current(default_run, capsys, tmp_path):
    code, out, err = cli(capsys, "status", default_run)
    assert code == 0, err
    assert "reduce       current" in out and "scores val   current (damping 0.03 relative" in out, out
    other_damping = default_run.with_name("damping.toml")
    other_damping.write_text(default_run.read_text().replace("topk = 10", "topk = 10\ndamping = 0.5"))
    code, out, _ = cli(capsys, "status", other_damping)
    assert code == 0 and "scores val   stale (damping 0.03 in the store, 0.5 in the config)" in out, out


def test_lds_eval_refuses_k_truncation_of_a_sparse_projection(tmp_path, tiny_model_dir, arrays,
                                                              capsys):
    """A prefix of sjlt features is not a smaller sjlt projection (it differed by 125% from a
    real k store), so `--k` below the store's k is refused for it."""
    from das_pipeline.eval.lds import make_subsets, save_subsets, save_truth

    cfg_path = example_config(tmp_path / "sjlt.toml", "digits", model=str(tiny_model_dir),
                              train=str(arrays / "train.npy"),
                              queries={"val": str(arrays / "val.npy")}, kind="sjlt", dim=64,
                              timesteps=2, store=str(tmp_path / "sjlt.zarr"))
    assert main(["extract", str(cfg_path), "--quiet"]) == 0
    subsets = save_subsets(tmp_path / "subsets.npz", make_subsets(64, 4, 0.5, 0), np.zeros(4, int),
                           [str(i) for i in range(64)], 0.5, 0)
    truth = save_truth(tmp_path / "val.npz", np.random.default_rng(0).random((4, 32)),
                       [str(i) for i in range(32)], np.arange(4))
    code, _, err = cli(capsys, "lds", "eval", cfg_path, "--subsets", subsets, "--truth", truth,
                       "--sweep", "--k", "32")
    assert code == 2 and "smaller projection only for the dense" in err, err


def nan_row_config(tmp_path, tiny_model_dir, arrays):
    """The digits example with a NaN in training row 5 (train and val as separate arrays)."""
    x = np.load(arrays / "train.npy").astype(np.float32) / 127.5 - 1
    x[5, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    return example_config(tmp_path / "nan.toml", "digits", model=str(tiny_model_dir),
                          train=str(tmp_path / "nan.npy"), queries={"val": str(arrays / "val.npy")},
                          store=str(tmp_path / "nan.zarr"), timesteps=2, dim=64)


def test_a_nan_training_row_is_named_and_the_rerun_ends_the_same_way(tmp_path, tiny_model_dir,
                                                                    arrays, capsys):
    """Non-finite features were committed and marked, and every later read said "run
    `das verify --fix`", which re-extracted the same NaN: the user looped."""
    import time

    cfg_path = nan_row_config(tmp_path, tiny_model_dir, arrays)
    for _ in range(2):
        started = time.monotonic()
        code, _, err = cli(capsys, "extract", cfg_path)
        assert code == 2 and "'5'" in err and "nonfinite" in err, err
        assert "Traceback" not in err
        assert time.monotonic() - started < 60


def test_excluded_samples_are_listed_and_left_out_of_the_scores(tmp_path, tiny_model_dir, arrays,
                                                                 capsys):
    cfg_path = nan_row_config(tmp_path, tiny_model_dir, arrays)
    cfg_path.write_text(cfg_path.read_text().replace("[features]", '[features]\nnonfinite = "exclude"'))
    code, _, err = cli(capsys, "run", cfg_path)
    assert code == 0, err
    code, out, _ = cli(capsys, "status", cfg_path)
    assert "excluded (non-finite features): 1 samples: 5" in out, out
    cfg = load_config(cfg_path)
    for method in METHODS:
        scores = read_scores(cfg.store.path, "val", method)
        assert np.isnan(scores[:, 5]).all() and np.isfinite(np.delete(scores, 5, axis=1)).all()
        csv = (cfg.reports_dir / "val" / f"{method}_topk.csv").read_text().splitlines()[1:]
        assert csv and all(line.split(",")[3] != "5" for line in csv)


def test_changed_training_images_are_named_and_replace_split_recovers(tmp_path, tiny_model_dir,
                                                                      capsys):
    """A folder's identity was file names + sizes: swapping two same-size PNGs' contents was not
    noticed and the old features were reused."""
    folder = tmp_path / "train_png"
    folder.mkdir()
    for i, img in enumerate(digits_array()[:32]):
        Image.fromarray(img[0]).save(folder / f"t{i:02d}.png")
    cfg_path = example_config(tmp_path / "png.toml", "digits", model=str(tiny_model_dir),
                              train=str(folder), queries={"val": "digits[1500:1508]"},
                              store=str(tmp_path / "png.zarr"), timesteps=2, dim=64)
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    sizes = {}
    for p in sorted(folder.glob("*.png")):
        sizes.setdefault(p.stat().st_size, []).append(p)
    a, b = next(v for v in sizes.values() if len(v) >= 2 and v[0].read_bytes() != v[1].read_bytes())[:2]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    code, _, err = cli(capsys, "score", cfg_path)
    assert code == 2 and a.name in err and b.name in err and "--replace-split train" in err, err
    code, _, err = cli(capsys, "extract", cfg_path, "--replace-split", "train")
    assert code == 0, err
    assert main(["run", str(cfg_path), "--quiet"]) == 0
