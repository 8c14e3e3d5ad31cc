"""The one implementation of the attribution formulas and of the streamed top-k merge.

For readout R with damped factor (G_R + lambda I) (``linalg.Factor``):
    base_R(q, i)   = phi_R(q) (G_R + lambda I)^-1 phi_R(i)^T
    trak           = base_loss,  dtrak = base_square
    das_signed(q, i) = base_mean(q, i) * w_i / (1 - h_i)^gamma,  das = das_signed^2
    w_i = r_i (RMS loss residual) or rho_i (signed mean residual), h_i the leverage
Positive scores are proponents. ``das score`` (``score``) and the LDS damping sweep
(``eval.sweep``) both call ``attribution``; nothing else writes these formulas.

Legend: n train rows of one block, Q queries, K projection dim, C damping values.
"""

from __future__ import annotations

import torch

from .config import METHOD_READOUT

LEVERAGE_FLOOR = 1e-12  # 1 - h_i is clamped here; exact arithmetic keeps h_i < 1 when lambda > 0


def attribution(method: str, base: torch.Tensor, weight: torch.Tensor | None = None,
                leverage: torch.Tensor | None = None, gamma: float = 0.0) -> torch.Tensor:
    """Scores of ``method`` from the base scores of its readout (float64 math).

    Args:
        base: (..., n) base_R(q, i), any leading dims (queries, damping values).
        weight: w_i broadcastable to ``base`` (das, das_signed only).
        leverage: h_i broadcastable to ``base``; unused (may be None) when gamma is 0.
        gamma: exponent of the leave-one-out correction (1 - h_i)^gamma.
    """
    if method in ("trak", "dtrak"):
        return base
    assert method in ("das", "das_signed"), method
    signed = base * weight
    if gamma != 0:
        signed = signed / (1.0 - leverage).clamp_min(LEVERAGE_FLOOR).pow(gamma)
    return signed if method == "das_signed" else signed.square()


def score_block(feats_nK: dict[str, torch.Tensor], precond_KQ: dict[str, torch.Tensor],
                residual_n: torch.Tensor | None, leverage_n: torch.Tensor | None,
                methods, gamma: float) -> dict[str, torch.Tensor]:
    """Scores (Q, n) of one block of training rows for each method (float64 math).

    Args:
        feats_nK: train features per readout, (n, K).
        precond_KQ: (G_R + lambda I)^-1 phi_R(queries)^T per readout, (K, Q).
        residual_n: the residual weight (r_i or rho_i) of das / das_signed.
        leverage_n: h_i, needed by das / das_signed only when gamma != 0.
    """
    base = {r: (f.to(torch.float64) @ precond_KQ[r]).T for r, f in feats_nK.items()}
    weight = None if residual_n is None else residual_n.to(torch.float64)[None, :]
    lev = None if leverage_n is None else leverage_n[None, :]
    return {m: attribution(m, base[METHOD_READOUT[m]], weight, lev, gamma) for m in methods}


def merge_topk(best_val_Qk: torch.Tensor, best_idx_Qk: torch.Tensor, block_Qn: torch.Tensor,
               offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block of scores (columns offset..offset+n) into the running top-k per query."""
    vals = torch.cat([best_val_Qk, block_Qn], dim=1)
    idx = torch.cat([best_idx_Qk, torch.arange(block_Qn.shape[1]).add(offset).expand_as(block_Qn)], 1)
    top = torch.topk(vals, k, dim=1)
    return top.values, torch.gather(idx, 1, top.indices)
