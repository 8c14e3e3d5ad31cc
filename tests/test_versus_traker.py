"""traker (MadryLab, PyPI 0.3.2) and das-pipeline compute the same TRAK / D-TRAK scores.

Through benchmarks/traker_adapter.py (the comparison benchmark's traker side) on a tiny model:
1. with *our* projection matrix plugged into traker, its scores are ours times one positive
   constant (same inputs, readouts, damping mapping and kernel form);
2. with traker's own Gaussian projection, the per-query rank correlation with ours exceeds 0.95.
   Two independent k-dim projections agree only as far as JL noise allows: about
   sqrt(k) x (spread of the gradients' cosines) must be large. On the full UNet the gradients
   are nearly collinear (cosines 0.93 +- 0.07), so this needs k in the tens of thousands; on the
   output convolution alone (73 parameters) k = 2048 suffices, which keeps the test fast.
Skipped when traker is not installed (`pip install traker==0.3.2`, part of the dev extra).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trak", reason="traker is not installed (pip install -c constraints.txt traker==0.3.2)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trak.projectors import AbstractProjector  # noqa: E402
from trak.utils import vectorize  # noqa: E402
from traker_adapter import (  # noqa: E402
    absolute_damping,
    featurize,
    featurize_queries,
    finalize,
    make_traker,
    scores,
)

from das_pipeline.data import open_dataset  # noqa: E402
from das_pipeline.eval.lds import spearman_rows  # noqa: E402
from das_pipeline.features import FeatureSpec, content_keys, per_sample_gradients  # noqa: E402
from das_pipeline.kernels import project  # noqa: E402
from das_pipeline.linalg import factor, gram  # noqa: E402
from das_pipeline.models import load_model  # noqa: E402

NUM_TRAIN, TIMESTEPS, DAMPING = 48, 2, 1.0


class OurProjector(AbstractProjector):
    """das-pipeline's Rademacher matrix behind traker's projector interface."""

    def __init__(self, grad_dim: int, dim: int, seed: int) -> None:
        super().__init__(grad_dim, dim, seed, "rademacher", "cpu")

    def project(self, grads, model_id: int) -> torch.Tensor:
        if isinstance(grads, dict):
            grads = vectorize(grads, device="cpu")
        return project(grads, self.proj_dim, self.seed)


@pytest.fixture(scope="module")
def setting(tiny_model_dir):
    model = load_model(tiny_model_dir)
    train = open_dataset("train", f"digits[0:{NUM_TRAIN}]")
    queries = open_dataset("val", "digits[1700:1706]")
    return model, train, queries


def both_scores(setting, method: str, dim: int, params=None, same_projection: bool = False):
    """(Q, N) scores of ``method`` from traker and from das-pipeline's math at relative DAMPING."""
    model, train, queries = setting
    readout = {"trak": "loss", "dtrak": "square"}[method]
    spec = FeatureSpec((readout,), TIMESTEPS, 1, seed=0)
    x_train, x_query = train.load(0, len(train)), queries.load(0, len(queries))
    # ours: per-sample gradients -> projection -> float64 Gram factor -> (G + lambda I)^-1
    g_train = per_sample_gradients(model.unet, model.scheduler, x_train, content_keys(x_train), spec,
                                   params)
    g_query = per_sample_gradients(model.unet, model.scheduler, x_query, content_keys(x_query), spec,
                                   params)
    phi_train = project(g_train.grads_RBP[0], dim, 0)
    phi_query = project(g_query.grads_RBP[0], dim, 0)
    fac = factor(gram([phi_train], dim), len(train))
    ours = (fac.solve(phi_query.T, fac.damping(DAMPING)).T @ phi_train.to(torch.float64).T).numpy()
    # traker: the adapter the benchmark uses
    num_params = g_train.grads_RBP.shape[2]
    projector = OurProjector(num_params, dim, 0) if same_projection else None
    with tempfile.TemporaryDirectory() as folder:
        traker = make_traker(model.unet, method, len(train), Path(folder), dim, 0, projector=projector,
                             grad_wrt=params)
        featurize(traker, model.unet, model.scheduler, x_train, train.uids, spec, batch=32)
        finalize(traker, absolute_damping(traker, DAMPING))
        featurize_queries(traker, model.unet, model.scheduler, "q", x_query, queries.uids, spec, 32)
        theirs = scores(traker, "q").astype(np.float64)
    return ours, theirs


@pytest.mark.parametrize("method", ["trak", "dtrak"])
def test_same_projection_same_scores(setting, method):
    ours, theirs = both_scores(setting, method, dim=256, same_projection=True)
    scale = (theirs * ours).sum() / (ours * ours).sum()
    assert scale > 0
    rel = np.abs(theirs - scale * ours).max() / np.abs(theirs).max()
    assert rel < 2e-3, f"traker's {method} scores are not ours times a constant (max rel. error {rel:.2e})"
    rho = spearman_rows(ours, theirs)
    assert rho.min() > 0.999, f"per-query Spearman {rho.round(4)} (want > 0.999 with one matrix)"


@pytest.mark.parametrize("method", ["trak", "dtrak"])
def test_own_projections_rank_correlate(setting, method):
    ours, theirs = both_scores(setting, method, dim=2048, params=["conv_out.weight", "conv_out.bias"])
    rho = spearman_rows(ours, theirs)
    assert rho.min() > 0.95, (f"per-query Spearman between traker's and our {method} scores "
                              f"{rho.round(3)} (want > 0.95 per query)")
