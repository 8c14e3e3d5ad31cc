"""D-TRAK and TRAK through MadryLab's `traker` (PyPI 0.3.2), the way its users must write them.

traker has no diffusion support (trak#37): a user writes an ``AbstractModelOutput`` whose
``get_output`` reads one sample's model output, returns ones from ``get_out_to_loss_grad`` (the
D-TRAK kernel has no out-to-loss term), and, since traker has no per-sample noise hook, passes
every sample's noised inputs (x_t, t, eps for its I = K*S items) as batch tensors. We draw those
inputs from das-pipeline's keyed noise so both tools see identical inputs; only the projection
matrices differ.

What traker computes (traker.py, score_computers.py, 0.3.2), with phi_i = P^T g_i / sqrt(p)
(P: Gaussian p x k on CPU, fast-jl Rademacher on CUDA):
    finalize_features:  F = Phi (Phi^T Phi + lambda_reg I)^-1 / mean|(Phi^T Phi + lambda_reg I)^-1|
    finalize_scores:    scores (N, Q) = F phi_q^T * out_to_loss (= 1 here)
so its score is ours, ``phi_q (G + lambda I)^-1 phi_i``, times a positive constant per run.
``lambda_reg`` is absolute and fixed when finalize runs; we map a relative damping c to
``lambda_reg = c * (trace(Phi^T Phi) - e_max(Phi^T Phi))`` after featurisation (our relative
damping, linalg.Factor.damping_scale; the user has to do the same), and
sweep damping by resetting the finalized flag, because a second ``finalize_features`` is skipped.

Legend: B samples, I (timestep, draw) items per sample, N train rows, Q queries, K proj dim.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from trak import TRAKer
from trak.modelout_functions import AbstractModelOutput

from das_pipeline.features import FeatureSpec, math_attention, noise_keys, noised_items

READOUT_OF = {"trak": "loss", "dtrak": "square"}


class DiffusionReadout(AbstractModelOutput):
    """traker model output: one readout of eps_theta averaged over a sample's I noised items."""

    def __init__(self, readout: str) -> None:
        if readout not in ("loss", "square"):
            raise ValueError(f"readout {readout!r}: traker runs `loss` (TRAK) or `square` (D-TRAK)")
        self.readout = readout

    def get_output(self, model, weights, buffers, xt_ICHW, t_I, eps_ICHW):
        pred = torch.func.functional_call(model, (weights, buffers), (xt_ICHW, t_I)).sample
        value = pred - eps_ICHW if self.readout == "loss" else pred
        return value.pow(2).flatten(1).mean(1).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.ones(batch[0].shape[0], 1, device=batch[0].device)


def noised_inputs(x_BCHW: torch.Tensor, uids: list[str], scheduler, spec: FeatureSpec,
                  noise: str = "content"):
    """Per-sample (x_t (B, I, C, H, W), t (B, I), eps (B, I, C, H, W)) from das-pipeline's keyed
    noise (``features.noise_keys`` of the ``[features] noise`` mode, ``features.noised_items``):
    the very items das-pipeline's features use. ``uids`` only fixes the batch size (the noise is
    never keyed by a name)."""
    assert len(uids) == len(x_BCHW)
    xt_BI, ts_I, eps_BI = noised_items(scheduler, x_BCHW, noise_keys(noise, x_BCHW), spec)
    return xt_BI, ts_I.repeat(len(uids), 1), eps_BI


def make_traker(unet, method: str, num_train: int, save_dir: Path, dim: int, proj_seed: int,
                device: str = "cpu", half: bool = False, projector=None,
                grad_wrt: list[str] | None = None) -> TRAKer:
    """A TRAKer for ``method`` (trak or dtrak), resuming ``save_dir``.

    ``projector`` None: traker's own choice (Gaussian BasicProjector on CPU, fast-jl on CUDA).
    ``grad_wrt``: attributed parameter names (default: all).
    """
    return TRAKer(model=unet, task=DiffusionReadout(READOUT_OF[method]), train_set_size=num_train,
                  save_dir=str(save_dir), device=device, proj_dim=dim, projector_seed=proj_seed,
                  use_half_precision=half, logging_level=logging.ERROR, projector=projector,
                  grad_wrt=grad_wrt)


def featurize(traker: TRAKer, unet, scheduler, x_NCHW, uids, spec: FeatureSpec, batch: int,
              device: str = "cpu", noise: str = "content") -> None:
    """Project the training gradients of every row into traker's store (model id 0)."""
    traker.load_checkpoint(unet.state_dict(), model_id=0)
    for lo in range(0, len(uids), batch):
        hi = min(len(uids), lo + batch)
        inputs = [t.to(device) for t in noised_inputs(x_NCHW[lo:hi], uids[lo:hi], scheduler, spec,
                                                         noise)]
        with math_attention():
            traker.featurize(batch=inputs, num_samples=hi - lo)


def absolute_damping(traker: TRAKer, c: float) -> float:
    """lambda_reg = c * (trace - top eigenvalue) of Phi^T Phi from traker's stored training
    features: our relative damping (linalg.Factor.damping_scale)."""
    traker.saver.load_current_store(0)
    grads = np.asarray(traker.saver.current_store["grads"], dtype=np.float64)
    small = grads @ grads.T if grads.shape[0] < grads.shape[1] else grads.T @ grads
    return float(c) * float(np.trace(small) - np.linalg.eigvalsh(small).max())


def finalize(traker: TRAKer, lam: float) -> None:
    """(Re)compute traker's finalized features with ``lambda_reg = lam`` (absolute)."""
    traker.score_computer.lambda_reg = lam
    traker.saver.model_ids[0]["is_finalized"] = 0  # traker skips a second finalize otherwise
    proj = traker.projector
    if hasattr(proj, "proj_matrix_available") and not hasattr(proj, "proj_matrix"):
        proj.proj_matrix = None  # finalize_features frees it again: `del` would raise AttributeError
    traker.finalize_features(model_ids=[0])


def featurize_queries(traker: TRAKer, unet, scheduler, name: str, x_QCHW, uids, spec: FeatureSpec,
                      batch: int, device: str = "cpu", noise: str = "content") -> None:
    """Query features of one query set (traker requires finalized training features first)."""
    traker.start_scoring_checkpoint(exp_name=name, checkpoint=unet.state_dict(), model_id=0,
                                    num_targets=len(uids))
    for lo in range(0, len(uids), batch):
        hi = min(len(uids), lo + batch)
        inputs = [t.to(device) for t in noised_inputs(x_QCHW[lo:hi], uids[lo:hi], scheduler, spec,
                                                         noise)]
        with math_attention():
            traker.score(batch=inputs, num_samples=hi - lo)


def scores(traker: TRAKer, name: str) -> np.ndarray:
    """(Q, N) float32 scores of one query set with the current finalized features."""
    return np.asarray(traker.finalize_scores(exp_name=name, model_ids=[0]), dtype=np.float32).T.copy()
