"""LDS math, file formats and `das lds eval` against independent computations (scipy, loops)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from das_pipeline.cli import main
from das_pipeline.eval.lds import (
    EvalError,
    lds_per_query,
    load_subsets,
    load_truth,
    make_subsets,
    query_halves,
    rank_rows,
    save_subsets,
    save_truth,
    spearman_rows,
    spearman_slow,
    summarize,
)


def _synthetic(Q=40, N=60, M=32, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((Q, N))
    mask = make_subsets(N, M, 0.5, seed=seed)
    return scores, mask


def test_exact_linear_datamodel_gives_one_and_reversed_gives_minus_one():
    scores, mask = _synthetic()
    pred_MQ = mask.astype(float) @ scores.T
    # F is lower when the datamodel predicts more support: the exact linear datamodel.
    np.testing.assert_allclose(lds_per_query(scores, mask, -pred_MQ + 3.0), 1.0, atol=1e-12)
    np.testing.assert_allclose(lds_per_query(scores, mask, pred_MQ), -1.0, atol=1e-12)
    # Any strictly increasing transform of the linear output keeps LDS = 1 (rank correlation).
    np.testing.assert_allclose(lds_per_query(scores, mask, -np.tanh(pred_MQ / 10)), 1.0, atol=1e-12)


def test_random_scores_give_about_zero():
    scores, mask = _synthetic(Q=400, N=80, M=64, seed=1)
    truth = np.random.default_rng(2).standard_normal((64, 400))
    lds = lds_per_query(scores, mask, truth)
    # Each LDS(q) has sd ~ 1/sqrt(63); the mean over 400 queries has sd ~ 0.0063.
    assert abs(lds.mean()) < 0.03, lds.mean()
    assert 0.08 < lds.std() < 0.18, lds.std()


def test_rank_rows_matches_scipy_with_ties():
    x = np.random.default_rng(0).integers(0, 5, size=(30, 17)).astype(float)
    np.testing.assert_array_equal(rank_rows(x), rankdata(x, axis=1) - 1)


def test_vectorised_spearman_matches_slow_loop_and_scipy():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, size=(25, 21)).astype(float)  # many ties
    b = rng.standard_normal((25, 21)) + 0.3 * a
    fast = spearman_rows(a, b)
    slow = np.array([spearman_slow(a[q].tolist(), b[q].tolist()) for q in range(25)])
    ref = np.array([spearmanr(a[q], b[q]).statistic for q in range(25)])
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)


def test_constant_rows_are_undefined_and_counted():
    a = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    b = np.array([[1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    r = spearman_rows(a, b)
    assert r[0] == pytest.approx(0.5) and np.isnan(r[1])
    s = summarize(r)
    assert (s.num_queries, s.num_undefined, s.mean) == (1, 1, pytest.approx(0.5))


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    lds = np.random.default_rng(4).normal(0.3, 0.2, size=50)
    s1, s2 = summarize(lds, seed=7), summarize(lds, seed=7)
    assert s1 == s2
    assert s1.lo < s1.mean < s1.hi
    # The percentile interval of a mean of 50 values with sd 0.2 is about +-1.96 * 0.2 / sqrt(50).
    assert 0.08 < s1.hi - s1.lo < 0.14, (s1.lo, s1.hi)


def test_subsets_are_seeded_sized_and_independent_of_their_number():
    m8, m4 = make_subsets(101, 8, 0.5, seed=3), make_subsets(101, 4, 0.5, seed=3)
    np.testing.assert_array_equal(m8[:4], m4)
    assert (m8.sum(1) == 50).all()  # round(0.5 * 101) = 50 (banker's rounding)
    assert len({m.tobytes() for m in m8}) == 8
    assert not np.array_equal(make_subsets(101, 4, 0.5, seed=4), m4)


def test_stratified_subsets_take_half_of_every_class():
    labels = np.repeat(np.arange(5), [10, 20, 30, 4, 6])
    mask = make_subsets(len(labels), 6, 0.5, seed=0, labels=labels)
    for c, n in zip(range(5), [10, 20, 30, 4, 6], strict=True):
        assert (mask[:, labels == c].sum(1) == n // 2).all()


def test_subsets_and_truth_round_trip_and_errors(tmp_path):
    mask = make_subsets(10, 3, 0.5, seed=0)
    path = save_subsets(tmp_path / "s.npz", mask, np.array([0, 0, 0]), [f"u{i}" for i in range(10)],
                        0.5, 0)
    s = load_subsets(path)
    np.testing.assert_array_equal(s.mask_MN, mask)
    assert s.train_uids[3] == "u3"
    np.savez(tmp_path / "bad.npz", mask=mask.astype(int), seeds=np.zeros(3, int),
             train_uids=np.array(["a"] * 10))
    with pytest.raises(EvalError, match="save a 2-D bool"):
        load_subsets(tmp_path / "bad.npz")
    with pytest.raises(EvalError, match="alpha"):
        make_subsets(10, 3, 1.5)
    F = np.random.default_rng(0).standard_normal((3, 4))
    save_truth(tmp_path / "t.npz", F, ["a", "b", "c", "d"], np.arange(3))
    F2, uids, rows = load_truth(tmp_path / "t.npz")
    np.testing.assert_array_equal(F2, F)
    assert uids == ["a", "b", "c", "d"] and rows.tolist() == [0, 1, 2]
    np.savez(tmp_path / "nan.npz", F=np.full((3, 4), np.nan))
    with pytest.raises(EvalError, match="non-finite"):
        load_truth(tmp_path / "nan.npz")


def test_query_halves_partition_the_queries():
    sel, rep = query_halves(11, seed=0)
    assert len(sel) == 5 and len(rep) == 6
    assert sorted(np.concatenate([sel, rep]).tolist()) == list(range(11))
    np.testing.assert_array_equal(query_halves(11, seed=0)[0], sel)


def test_cli_eval_on_a_foreign_store_matches_scipy(tmp_path):
    """`das lds eval` on a store, subsets and truth written by hand in the documented formats."""
    import zarr

    Q, N, M = 7, 30, 16
    rng = np.random.default_rng(5)
    root = zarr.open_group(tmp_path / "store.zarr", mode="w")
    scores = {m: rng.standard_normal((Q, N)).astype(np.float32) for m in ("trak", "das")}
    for m, s in scores.items():
        root.require_group("scores").require_group("val").create_array(
            m, shape=s.shape, dtype="float32")[...] = s
    mask = rng.random((M, N)) < 0.5
    np.savez(tmp_path / "subsets.npz", mask=mask, seeds=np.zeros(M, dtype=np.int64),
             train_uids=np.array([str(i) for i in range(N)]))
    F = rng.standard_normal((M, Q)) - 0.05 * (mask @ scores["das"].T)  # das carries some signal
    np.savez(tmp_path / "val.npz", F=F, query_uids=np.array([f"q{j}" for j in range(Q)]))
    assert main(["lds", "eval", str(tmp_path / "store.zarr"), "--subsets", str(tmp_path / "subsets.npz"),
                 "--truth", str(tmp_path / "val.npz"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["val"]
    for m, s in scores.items():
        pred = s.astype(np.float64) @ mask.T.astype(np.float64)
        ref = [spearmanr(pred[q], -F[:, q]).statistic for q in range(Q)]
        np.testing.assert_allclose(report[m]["per_query"], ref, atol=1e-12)
        assert report[m]["summary"]["mean"] == pytest.approx(np.mean(ref), abs=1e-12)


def test_cli_eval_refuses_mismatched_subsets(tmp_path, capsys):
    import zarr

    root = zarr.open_group(tmp_path / "store.zarr", mode="w")
    root.require_group("scores").require_group("val").create_array(
        "trak", shape=(3, 10), dtype="float32")[...] = np.ones((3, 10), np.float32)
    np.savez(tmp_path / "subsets.npz", mask=np.ones((4, 12), bool), seeds=np.zeros(4, np.int64),
             train_uids=np.array([str(i) for i in range(12)]))
    np.savez(tmp_path / "val.npz", F=np.zeros((4, 3)))
    assert main(["lds", "eval", str(tmp_path / "store.zarr"), "--subsets", str(tmp_path / "subsets.npz"),
                 "--truth", str(tmp_path / "val.npz")]) == 2
    assert "10 training columns but the subsets cover 12 rows" in capsys.readouterr().err


def test_cli_subsets_stratified_by_digit_labels(make_config, tmp_path):
    from das_pipeline.data import digits_labels

    out = tmp_path / "s.npz"
    assert main(["lds", "subsets", str(make_config()), "--num", "4", "--labels", "digits",
                 "--seed-per-subset", "--train-seed", "10", "--out", str(out)]) == 0
    s = load_subsets(out)
    labels = digits_labels()[:40]
    assert s.mask_MN.shape == (4, 40) and s.seeds_M.tolist() == [10, 11, 12, 13]
    for c in np.unique(labels):
        assert (s.mask_MN[:, labels == c].sum(1) == round(0.5 * (labels == c).sum())).all()
