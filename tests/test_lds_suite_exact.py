"""The LDS suite's exact-kernel reference (benchmarks/lds_suite/exact.py) against the pipeline.

- kernel-form scores (N x N train kernel, Q x N cross kernel, push-through identity) equal
  pipeline/scoring.py through linalg's k x k factor on an identity projection (float64);
- kernel-form scores of a real store's features equal what `das score`'s Scorer computes from
  that store (k = 512 >> N = 40, float64 blocks);
- the exact float64 features, projected with the store's JL matrix, equal the store's features
  (same keyed noise, timesteps and readouts; float32 extraction).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "lds_suite"))

from exact import damping_scale, exact_features, kernel_scores  # noqa: E402

from das_pipeline.errors import ConfigError  # noqa: E402
from das_pipeline.linalg import factor, gram  # noqa: E402
from das_pipeline.scoring import score_block  # noqa: E402

METHODS = ("trak", "dtrak", "das", "das_signed")
READOUT = {"trak": "loss", "dtrak": "square", "das": "mean", "das_signed": "mean"}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def kernel_form(train_NP: dict, query_QP: dict, residual_N, c: float, gamma: float) -> dict:
    out = {}
    for m in METHODS:
        phi, q = train_NP[READOUT[m]], query_QP[READOUT[m]]
        kern = phi @ phi.T
        lam = c * damping_scale(kern)
        out[m] = kernel_scores(kern, q @ phi.T, [lam], m, residual_N, gamma)[0]
    return out


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_kernel_form_equals_scoring_on_an_identity_projection(gamma):
    rng = np.random.default_rng(0)
    N, Q, P = 13, 5, 41  # the identity projection: k = P >> N
    # a shared direction carrying most of the trace, as the real readouts have
    shared = rng.normal(size=P)
    train = {r: rng.normal(size=(N, P)) + 4.0 * shared for r in ("loss", "square", "mean")}
    query = {r: rng.normal(size=(Q, P)) + 4.0 * shared for r in train}
    residual = rng.uniform(0.5, 1.5, size=N)
    got = kernel_form(train, query, residual, 0.03, gamma)
    for m in METHODS:
        r = READOUT[m]
        fac = factor(gram([train[r]], P), N)  # the full k x k factor das reduce computes at N >= k
        kern_scale = damping_scale(train[r] @ train[r].T)
        assert abs(kern_scale - fac.damping_scale) <= 1e-10 * fac.damping_scale, kern_scale
        lam = fac.damping(0.03)
        feats = torch.from_numpy(train[r])
        want = score_block({r: feats}, {r: fac.solve(torch.from_numpy(query[r]).T, lam)},
                           torch.from_numpy(residual), fac.leverage(feats, lam), [m], gamma)[m]
        err = rel_err(got[m], want.numpy())
        assert err < 1e-8, f"{m} gamma {gamma}: kernel form vs scoring.py rel. error {err:.2e} (want < 1e-8)"


def test_damping_scale_of_a_rank_one_kernel_is_refused():
    phi = np.ones((4, 3))
    with pytest.raises(ConfigError, match="rank >= 2"):
        damping_scale(phi @ phi.T)


@pytest.fixture
def extracted(make_config, tmp_path):
    """A real store (tiny trained UNet, digits, common noise, k = 512 >> N = 40), reduced."""
    from das_pipeline.cli import main

    cfg = make_config(dim=512, noise="common", damping=0.03, gamma=0.0,
                      methods=["trak", "dtrak", "das"])
    assert main(["extract", str(cfg), "--quiet"]) == 0
    assert main(["reduce", str(cfg), "--quiet"]) == 0
    return cfg


def test_kernel_form_equals_das_score_on_a_real_store(extracted):
    from das_pipeline.config import load_config
    from das_pipeline.eval.sweep import read_split
    from das_pipeline.fingerprint import open_store
    from das_pipeline.score import Scorer

    cfg = load_config(extracted)
    store = open_store(cfg)
    train, residual, _, _ = read_split(store, "train", ["loss", "square", "mean"])
    query, _, _, _ = read_split(store, "val", ["loss", "square", "mean"])
    scorer = Scorer(cfg, store)
    want = {m: np.zeros((6, 40)) for m in ("trak", "dtrak", "das")}
    for lo, hi, block in scorer.blocks({r: torch.from_numpy(v) for r, v in query.items()}):
        for m, s in block.items():
            want[m][:, lo:hi] = s.numpy()
    for m in want:
        phi, q = train[READOUT[m]], query[READOUT[m]]
        kern = phi @ phi.T
        got = kernel_scores(kern, q @ phi.T, [0.03 * damping_scale(kern)], m,
                            residual if m == "das" else None)[0]
        err = rel_err(got, want[m])
        assert err < 1e-8, f"{m}: kernel form vs das score rel. error {err:.2e} (want < 1e-8)"


def test_exact_features_projected_equal_the_store_features(extracted, tmp_path):
    from das_pipeline.config import load_config
    from das_pipeline.eval.sweep import read_split
    from das_pipeline.fingerprint import open_store
    from das_pipeline.kernels import project

    cfg = load_config(extracted)
    meta = exact_features(extracted, tmp_path / "feats.npy", log=lambda *_: None)
    feats_RAP = np.load(tmp_path / "feats.npy")
    assert feats_RAP.dtype == np.float64 and meta["splits"] == {"train": [0, 40], "val": [40, 46]}
    store = open_store(cfg)
    for split, (lo, hi) in meta["splits"].items():
        stored, residual, _, _ = read_split(store, split, meta["readouts"])
        for r, readout in enumerate(meta["readouts"]):
            proj = project(torch.from_numpy(feats_RAP[r, lo:hi]), 512, cfg.projection.seed,
                           cfg.projection.kind, backend="reference").numpy()
            err = rel_err(stored[readout], proj)
            assert err < 1e-4, f"{split} {readout}: store vs projected exact features rel. error {err:.2e}"
        err = rel_err(residual, meta["residual"][lo:hi])
        assert err < 1e-5, f"{split}: residual rel. error {err:.2e}"
    # the exact kernel is close to the JL kernel at k = 512 (a loose sanity check, not exactness)
    phi = feats_RAP[0, :40]
    jl = read_split(store, "train", ["loss"])[0]["loss"]
    assert rel_err(jl @ jl.T, phi @ phi.T) < 0.5
