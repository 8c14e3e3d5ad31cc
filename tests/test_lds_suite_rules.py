"""The damping rules of benchmarks/lds_suite/rules.py against brute-force ridge regressions.

- the per-query GCV curve from the factor's eigenpairs equals solving each query's ridge
  regression on the training rows directly (float64), for N < k (thin factor) and N > k;
- the leave-one-row-out quantities of gcv_train (objective 1 / B_ii - lambda, weights
  -B_{-i,i} / B_ii) equal fitting each row on the other rows explicitly;
- effective_dim hits the requested df fraction.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "lds_suite"))

from rules import effective_dim, gcv_curves, interp_lds, lambda_grid  # noqa: E402

from das_pipeline.linalg import dual_factor, factor, gram  # noqa: E402


def features(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, k, dtype=torch.float64)  # a decaying spectrum, like real features
    return torch.randn(n, k, generator=g, dtype=torch.float64) * scale


def make_factor(phi: torch.Tensor):
    n, k = phi.shape
    return dual_factor(phi) if n < k else factor(gram([phi], k), n)


@pytest.mark.parametrize("n,k", [(12, 40), (60, 20)])
def test_gcv_curve_equals_direct_ridge(n, k):
    phi, q = features(n, k, 0), features(5, k, 1)
    fac = make_factor(phi)
    lams = fac.trace * torch.tensor([1e-6, 1e-3, 1e-1, 1.0], dtype=torch.float64)
    got = gcv_curves(fac, q, lams)
    for j, lam in enumerate(lams.tolist()):
        kern = phi @ phi.T + lam * torch.eye(n, dtype=torch.float64)
        w = torch.linalg.solve(kern, phi @ q.T)                      # (N, Q) ridge weights
        resid = (q.T - phi.T @ w).pow(2).sum(0)
        df = torch.trace(torch.linalg.solve(kern, phi @ phi.T))
        want = resid / (1 - df / k) ** 2
        assert torch.allclose(got[:, j], want, rtol=1e-8), (got[:, j], want)


@pytest.mark.parametrize("n,k", [(12, 40), (60, 20)])
def test_leave_one_row_out_closed_form(n, k):
    phi = features(n, k, 2)
    fac = make_factor(phi)
    e = fac.eigvals_K[fac.eigvals_K > fac.eigvals_K.max() * 1e-12]
    v = fac.eigvecs_KK[:, fac.eigvals_K > fac.eigvals_K.max() * 1e-12]
    u2 = ((phi @ v) / e.sqrt()).pow(2)
    rest = (1 - u2.sum(1)).clamp_min(0)
    lam = 0.01 * fac.trace
    b_ii = (u2 / (e + lam)).sum(1) + rest / lam
    b_col2 = (u2 / (e + lam).pow(2)).sum(1) + rest / lam**2
    for i in (0, n // 2, n - 1):
        others = torch.cat([phi[:i], phi[i + 1:]])
        w = torch.linalg.solve(others @ others.T + lam * torch.eye(n - 1, dtype=torch.float64),
                               others @ phi[i])
        resid = (phi[i] - others.T @ w).pow(2).sum()
        objective = resid + lam * w.pow(2).sum()
        assert float(1 / b_ii[i] - lam) == pytest.approx(float(objective), rel=1e-8)
        w2 = (b_col2[i] - b_ii[i] ** 2) / b_ii[i] ** 2
        assert float(w2) == pytest.approx(float(w.pow(2).sum()), rel=1e-6)


def test_effective_dim_and_interpolation():
    phi = features(30, 50, 3)
    fac = make_factor(phi)
    e = fac.eigvals_K
    for f in (0.05, 0.3):
        lam = effective_dim(fac, f)
        assert float((e / (e + lam)).sum()) / e.numel() == pytest.approx(f, abs=0.02)
    assert lambda_grid(fac)[0] == pytest.approx(fac.trace * 1e-9)
    lam_C = np.array([1.0, 10.0, 100.0])
    lds_CQ = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert interp_lds(lam_C, lds_CQ, np.array([np.sqrt(10.0), 1000.0])) == pytest.approx([0.5, 0.0])
