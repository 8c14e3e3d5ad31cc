"""End-to-end scores against a float64 brute-force computation of the DESIGN.md formulas."""

import numpy as np
import pytest
import torch

from das_pipeline.config import load_config
from das_pipeline.data import open_dataset
from das_pipeline.extract import feature_spec, run_extract
from das_pipeline.models import load_model
from das_pipeline.reduce import run_reduce
from das_pipeline.score import run_score
from das_pipeline.store import read_scores
from helpers import brute_scores, dense_projection, loop_gradients

METHODS = ("trak", "dtrak", "das", "das_signed")


@pytest.fixture(scope="module")
def brute(tiny_model_dir):
    """Brute-force scores for train digits[0:24], queries digits[100:104], K=2, k=32."""
    model = load_model(tiny_model_dir)
    unet = model.unet.double()
    spec_cfg = dict(readouts=("loss", "square", "mean"), timesteps=2, noise_draws=1, seed=0,
                    normalize=False)
    from das_pipeline.features import FeatureSpec

    spec = FeatureSpec(**spec_cfg, dtype=torch.float64)
    train, queries = open_dataset("train", "digits[0:24]"), open_dataset("q", "digits[100:104]")
    g_train, r_train = loop_gradients(unet, model.scheduler, train.load(0, 24), None, spec)
    g_query, _ = loop_gradients(unet, model.scheduler, queries.load(0, 4), None, spec)
    proj = dense_projection(g_train.shape[2], 32, 0)
    names = spec.readouts
    feats = {r: g_train[i] @ proj for i, r in enumerate(names)}
    qfeats = {r: g_query[i] @ proj for i, r in enumerate(names)}
    return brute_scores(feats, qfeats, r_train, damping=0.01)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-6), ("float32", 1e-4)])
def test_pipeline_scores_equal_brute_force(make_config, brute, dtype, tolerance):
    cfg = load_config(make_config(train="digits[0:24]", queries={"q": "digits[100:104]"},
                                  timesteps=2, dim=32, rows_per_unit=8, batch_size=5,
                                  dtype=dtype, methods=METHODS))
    assert feature_spec(cfg).dtype == getattr(torch, dtype)
    run_extract(cfg, show_progress=False)
    run_reduce(cfg, show_progress=False)
    run_score(cfg, show_progress=False)
    for method in METHODS:
        got = torch.from_numpy(read_scores(cfg.store.path, "q", method).astype(np.float64))
        want = brute[method]
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < tolerance, f"{method} ({dtype}): relative error {rel:.2e} >= {tolerance:g}"
