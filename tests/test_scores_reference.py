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


CASES = {
    # N < k with a small damping and the leave-one-out correction on: the thin-factor path
    "N<k": dict(train="digits[0:24]", dim=32, damping=0.01, gamma=1.0),
    # N >= k at the default score settings (relative damping 1.0, gamma 0): the k x k path
    "N>=k, defaults": dict(train="digits[0:40]", dim=16, damping=None, gamma=None),
    # the non-default noise mode (the default is common random numbers)
    "N<k, content noise": dict(train="digits[0:24]", dim=32, damping=0.01, gamma=1.0, noise="content"),
    # the dense matrix kinds (the default kind is sjlt for the dense engine)
    "N<k, rademacher": dict(train="digits[0:24]", dim=32, damping=0.01, gamma=1.0, kind="rademacher"),
    # the other timestep grid
    "N<k, centered grid": dict(train="digits[0:24]", dim=32, damping=0.01, gamma=1.0,
                               timestep_grid="centered"),
}
_BRUTE: dict = {}


def brute(tiny_model_dir, case: str, noise: str, kind: str):
    """Brute-force scores of one case (queries digits[100:104], K = 2): a for-loop of
    backward() per sample and item, a dense float64 projection, dense float64 solves."""
    if (case, noise, kind) in _BRUTE:
        return _BRUTE[case, noise, kind]
    from das_pipeline.config import ScoreConfig
    from das_pipeline.features import FeatureSpec, noise_keys

    c = CASES[case]
    model = load_model(tiny_model_dir)
    unet = model.unet.double()
    spec = FeatureSpec(("loss", "square", "mean"), timesteps=2, noise_draws=1, seed=0,
                       normalize=False, dtype=torch.float64, grid=c.get("timestep_grid", "uniform"))
    train, queries = open_dataset("train", c["train"]), open_dataset("q", "digits[100:104]")
    x_train, x_query = train.load(0, len(train)), queries.load(0, 4)
    g_train, r_train = loop_gradients(unet, model.scheduler, x_train, noise_keys(noise, x_train),
                                      spec)
    g_query, _ = loop_gradients(unet, model.scheduler, x_query, noise_keys(noise, x_query), spec)
    proj = dense_projection(g_train.shape[2], c["dim"], 0, kind)
    feats = {r: g_train[i] @ proj for i, r in enumerate(spec.readouts)}
    qfeats = {r: g_query[i] @ proj for i, r in enumerate(spec.readouts)}
    damping = ScoreConfig.damping if c["damping"] is None else c["damping"]
    gamma = ScoreConfig.gamma if c["gamma"] is None else c["gamma"]
    _BRUTE[case, noise, kind] = brute_scores(feats, qfeats, r_train, damping=damping, gamma=gamma)
    return _BRUTE[case, noise, kind]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-6), ("float32", 1e-4)])
def test_pipeline_scores_equal_brute_force(make_config, tiny_model_dir, case, dtype, tolerance):
    c = CASES[case]
    overrides = {k: c[k] for k in ("damping", "gamma", "noise", "kind", "timestep_grid")
                 if c.get(k) is not None}
    path = make_config(train=c["train"], queries={"q": "digits[100:104]"}, timesteps=2,
                       dim=c["dim"], rows_per_unit=8, batch_size=5, dtype=dtype, methods=METHODS,
                       **overrides)
    if c["damping"] is None:  # the defaults: drop the test helper's damping and gamma
        text = path.read_text()
        path.write_text("\n".join(line for line in text.splitlines()
                                  if not line.startswith(("damping =", "gamma ="))) + "\n")
    cfg = load_config(path)
    assert feature_spec(cfg).dtype == getattr(torch, dtype)
    run_extract(cfg, show_progress=False)
    run_reduce(cfg, show_progress=False)
    run_score(cfg, show_progress=False)
    want_all = brute(tiny_model_dir, case, cfg.features.noise, cfg.projection.kind)
    for method in METHODS:
        got = torch.from_numpy(read_scores(cfg.store.path, "q", method).astype(np.float64))
        want = want_all[method]
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < tolerance, f"{method} ({case}, {dtype}): relative error {rel:.2e} >= {tolerance:g}"
