"""The factor maths of the reduce: tensors in, tensors out (no files, ranks or configs).

    G = Phi^T Phi = sum_i phi_i phi_i^T                (k x k, float64)
    G = V diag(e) V^T                                   (eigh, once)
    (G + lambda I)^-1 x = V diag(1 / (e + lambda)) V^T x (any lambda in O(k^2))
    lambda = c * (trace(G) - e_max) (relative: ``damping_scale``) or c (absolute)
    h_i = phi_i (G + lambda I)^-1 phi_i^T               (leverage)

When N < k the Gram has rank <= N and the factor comes from the N x N kernel
Phi Phi^T = U diag(e) U^T, with V = Phi^T U diag(e)^-1/2 (k x R, R = numerical rank):
(G + lambda I)^-1 x = V diag(1 / (e + lambda)) V^T x + (x - V V^T x) / lambda, exactly, for
O(N^2 k + N^3) instead of O(k^3) (docs/DESIGN.md, "Reduction").

Legend: N train rows, Q queries, K projection dim, R rank of the factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass
class Factor:
    """Eigendecomposition of one readout's Gram: G = V diag(e) V^T, V (K, R) orthonormal.

    R = K for the full factor; R < K for the thin factor of the N < K case, whose remaining
    eigenvalues are 0 (``solve`` and ``leverage`` account for that complement exactly).
    """

    eigvals_K: torch.Tensor
    eigvecs_KK: torch.Tensor
    trace: float
    num_samples: int
    num_dims: int = 0
    """k, the projection dimension; 0 means eigvecs are square (R = k)."""

    @property
    def dim(self) -> int:
        return self.num_dims or self.eigvecs_KK.shape[0]

    @property
    def thin(self) -> bool:
        return self.eigvecs_KK.shape[1] < self.dim

    @property
    def damping_scale(self) -> float:
        """lambda of relative damping 1: trace(G) minus its largest eigenvalue, the one definition
        of relative damping (``das score`` and the LDS sweep both use it; docs/DESIGN.md,
        "Reduction").

        Why not trace(G) / k: the top eigenvalue of G is a direction shared by all samples and
        carries 40% (loss readout) to over 99% (mean readout) of the trace, so trace / k measures
        that one direction and damps the readouts' spectra very differently; and it changes with k
        while the best lambda does not (JL keeps the trace, benchmarks/lds_suite). Raises
        ``ConfigError`` (a user error: too few distinct training samples) for a Gram of rank < 2,
        where the scale is 0.
        """
        scale = self.trace - float(self.eigvals_K.max())
        if not scale > 0:
            raise ConfigError(f"[score] damping: relative damping needs a Gram of rank >= 2 "
                              f"(trace {self.trace:.3g}, top eigenvalue "
                              f"{float(self.eigvals_K.max()):.3g}); set [score] damping_absolute "
                              f"= true and give lambda itself")
        return scale

    def damping(self, c: float, absolute: bool = False) -> float:
        """lambda = c * damping_scale (relative), or c itself when ``absolute``."""
        return float(c) if absolute else float(c) * self.damping_scale

    def solve(self, x_KQ: torch.Tensor, lam: float) -> torch.Tensor:
        """(G + lam I)^-1 x for x of shape (K, Q), float64."""
        v = self.eigvecs_KK
        x = x_KQ.to(v.dtype)
        coords = v.T @ x
        out = v @ (coords / (self.eigvals_K + lam)[:, None])
        if self.thin:
            out += (x - v @ coords) / lam
        return out

    def leverage(self, feats_NK: torch.Tensor, lam: float) -> torch.Tensor:
        """h_i = phi_i (G + lam I)^-1 phi_i^T, float64 (N,)."""
        feats = feats_NK.to(self.eigvecs_KK.dtype)
        coords_NR = feats @ self.eigvecs_KK
        h = (coords_NR.pow(2) / (self.eigvals_K + lam)).sum(1)
        if self.thin:
            h += (feats.pow(2).sum(1) - coords_NR.pow(2).sum(1)).clamp_min(0) / lam
        return h


def gram(feature_blocks, dim: int, device="cpu") -> torch.Tensor:
    """Sum of phi^T phi over an iterable of (n, K) blocks, accumulated in float64."""
    gram_KK = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for block in feature_blocks:
        f = torch.as_tensor(block).to(device, torch.float64)
        gram_KK.addmm_(f.T, f)
    return gram_KK


def factor(gram_KK: torch.Tensor, num_samples: int) -> Factor:
    """Eigendecomposition of a symmetric PSD Gram; round-off negatives are clamped to 0."""
    gram_KK = 0.5 * (gram_KK + gram_KK.T)
    eigvals, eigvecs = torch.linalg.eigh(gram_KK)
    return Factor(eigvals.clamp_min(0.0), eigvecs, float(torch.trace(gram_KK)), num_samples)


def dual_factor(feats_NK) -> Factor:
    """Thin factor of G = Phi^T Phi from the N x N kernel Phi Phi^T (exact; for N < K).

    Args:
        feats_NK: train features (N, K), tensor or array.
    """
    phi = torch.as_tensor(feats_NK).to(torch.float64)
    kern_NN = phi @ phi.T
    e, u = torch.linalg.eigh(0.5 * (kern_NN + kern_NN.T))
    keep = e > e.max().clamp_min(0) * 1e-12
    e, u = e[keep], u[:, keep]
    v_KR = (phi.T @ u) / e.sqrt()
    return Factor(e, v_KR, float(phi.pow(2).sum()), phi.shape[0], num_dims=phi.shape[1])
