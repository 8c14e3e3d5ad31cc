"""Exact-kernel reference of an LDS suite member: unprojected float64 features, scores in kernel form.

Features: for a store's config (its model, data and [features] settings: noise mode, seed, K
timesteps, S draws), every row's phi_R = 1/(K S) sum_{t,s} grad_theta R, computed by
``features.per_sample_gradients`` in float64 without a projection (the same keyed noise, x_t and
readouts as the store; only the JL projection and float32 are left out).

Scores in kernel form (push-through identity Phi (Phi^T Phi + lam I)^-1 = (Phi Phi^T + lam I)^-1 Phi):
    base_R(q, i) = phi_q (Phi^T Phi + lam I)^-1 phi_i^T = [C_QN (K_NN + lam I)^-1]_(q, i)
    K_NN = Phi Phi^T = U diag(e) U^T (one eigh serves every lam),  C_QN = phi_Q Phi^T
    lam = c (trace(K) - e_max(K))   (G = Phi^T Phi has K's non-zero spectrum, so this is
                                     ``linalg.Factor.damping_scale`` of the exact Gram)
    h_i = [K (K + lam I)^-1]_ii = sum_j U_ij^2 e_j / (e_j + lam)   (leverage)
then ``scoring.attribution`` (the one implementation of trak / dtrak / das) on base_R.

Legend: A all rows (train then each query set), N train rows, Q queries, P attributed
parameters, R readouts, C damping values, M subsets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from das_pipeline.config import METHOD_READOUT
from das_pipeline.errors import ConfigError, EvalError
from das_pipeline.scoring import attribution

# Relative dampings c (lambda = c (trace - e_max)) swept for the exact kernel: half decades
# 1e-7 .. 1e2, wider than every optimum the projected stores showed in these units.
EXACT_GRID = tuple(float(c) for c in 10.0 ** (np.arange(-14, 5) / 2))
FORMAT = 1


def damping_scale(kern_NN: np.ndarray) -> float:
    """trace(K) - e_max(K): lambda of relative damping 1 for the exact Gram (Factor.damping_scale).

    Raises:
        ConfigError: the kernel has rank < 2 (the scale is 0), as Factor.damping_scale does.
    """
    e = np.linalg.eigvalsh(0.5 * (kern_NN + kern_NN.T))
    scale = float(np.trace(kern_NN) - e.max())
    if not scale > 0:
        raise ConfigError(f"[score] damping: relative damping needs a Gram of rank >= 2 (trace "
                          f"{np.trace(kern_NN):.3g}, top eigenvalue {e.max():.3g}); set [score] "
                          f"damping_absolute = true and give lambda itself")
    return scale


def kernel_scores(kern_NN: np.ndarray, cross_QN: np.ndarray, lams, method: str,
                  weight_N: np.ndarray | None = None, gamma: float = 0.0) -> np.ndarray:
    """(C, Q, N) float64 scores of ``method`` at each lambda, from the train kernel and cross kernel.

    Args:
        kern_NN: Phi Phi^T of the method's readout (float64, symmetric PSD).
        cross_QN: phi_Q Phi^T of the same readout.
        lams: (C,) absolute dampings, each > 0.
        weight_N: das / das_signed residual weight (r_i or rho_i).
        gamma: das leave-one-out exponent; the leverage is computed only when it is not 0.
    """
    e, u = np.linalg.eigh(0.5 * (kern_NN + kern_NN.T))
    e = np.clip(e, 0.0, None)  # round-off negatives, as linalg.factor clamps them
    lams = np.asarray(lams, dtype=np.float64)
    assert (lams > 0).all(), lams
    inv_CN = 1.0 / (e[None, :] + lams[:, None])
    cu_QN = cross_QN @ u
    base_CQN = np.einsum("qj,cj,nj->cqn", cu_QN, inv_CN, u, optimize=True)
    weight = None if weight_N is None else torch.from_numpy(np.asarray(weight_N, np.float64))
    lev = None
    if gamma != 0:
        lev = torch.from_numpy(np.einsum("nj,cj->cn", u ** 2, e[None, :] * inv_CN))[:, None, :]
    return attribution(method, torch.from_numpy(base_CQN), weight, lev, gamma).numpy()


def exact_features(cfg_path: Path, path: Path, batch_size: int = 16, log=print) -> dict:
    """Write every row's float64 features (R, A, P) to the .npy memmap ``path``; returns the row
    layout {"splits": {name: [lo, hi]}, "uids", "readouts", "residual" (A,), "rho" (A,)}.

    Rows follow the store: train, then each query set in config order, each in dataset order.
    Raises EvalError for text-conditioned models (not needed by the suite).
    """
    from das_pipeline.config import load_config
    from das_pipeline.extract import feature_spec, prepare
    from das_pipeline.features import noise_keys, per_sample_gradients

    cfg = load_config(cfg_path)
    job = prepare(cfg)
    if job.model.conditional:
        raise EvalError(f"{cfg_path}: the exact-kernel reference supports unconditional pixel "
                        f"models only; drop the exact stage for this member")
    spec = dataclasses.replace(feature_spec(cfg), dtype=torch.float64)
    unet = torch.nn.Module.to(job.model.unet, "cpu", torch.float64)
    shapes = dict(unet.named_parameters())
    P = sum(shapes[n].numel() for n in job.param_names)
    layout, uids, lo = {}, {}, 0
    for name, ds in job.datasets.items():
        layout[name], lo = [lo, lo + len(ds)], lo + len(ds)
        uids[name] = list(ds.uids)
    R, A = len(spec.readouts), lo
    feats_RAP = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(R, A, P))
    residual, rho = np.zeros(A), np.zeros(A)
    started = time.perf_counter()
    for name, ds in job.datasets.items():
        base = layout[name][0]
        for b in range(0, len(ds), batch_size):
            pixels = ds.load(b, min(len(ds), b + batch_size))
            keys = noise_keys(cfg.features.noise, pixels)
            out = per_sample_gradients(unet, job.model.scheduler, pixels, keys, spec,
                                       param_names=job.param_names)
            rows = slice(base + b, base + b + len(keys))
            feats_RAP[:, rows] = out.grads_RBP.numpy()
            residual[rows], rho[rows] = out.residual_B.numpy(), out.rho_B.numpy()
            done = base + b + len(keys)
            rate = done / (time.perf_counter() - started)
            log(f"exact features {name}: {done}/{A} rows, {rate:.2f} rows/s, ETA {(A - done) / rate:.0f} s")
    feats_RAP.flush()
    return {"splits": layout, "uids": uids, "readouts": list(spec.readouts), "num_params": P,
            "residual": residual, "rho": rho}


def exact_kernels(cfg_path: Path, out_path: Path, block_rows: int = 256, log=print) -> dict:
    """The all-rows kernels Phi_A Phi_A^T (R, A, A) float64 of the exact features, cached in
    ``out_path`` (.npz) with the store fingerprint they belong to; reused when it matches."""
    from das_pipeline.config import load_config
    from das_pipeline.data import open_dataset
    from das_pipeline.fingerprint import data_options, fingerprint

    cfg = load_config(cfg_path)
    train = open_dataset("train", cfg.data.train, data_options(cfg))
    ident = json.dumps({"format": FORMAT, "fingerprint": fingerprint(cfg, train.digest, len(train))},
                       sort_keys=True)
    if out_path.is_file():
        cached = load_kernels(out_path)
        if cached["identity"] == ident:
            return cached
        log(f"{out_path} belongs to other settings; recomputing")
    tmp = out_path.with_suffix(".feats.npy")
    meta = exact_features(cfg_path, tmp, log=log)
    feats_RAP = np.load(tmp, mmap_mode="r")
    R, A, _ = feats_RAP.shape
    kern_RAA = np.zeros((R, A, A))
    for r in range(R):
        for lo in range(0, A, block_rows):
            kern_RAA[r, lo:lo + block_rows] = feats_RAP[r, lo:lo + block_rows] @ feats_RAP[r].T
    del feats_RAP
    np.savez(out_path, kern_RAA=kern_RAA, residual=meta["residual"], rho=meta["rho"],
             meta=json.dumps({k: meta[k] for k in ("splits", "uids", "readouts", "num_params")}),
             identity=ident)
    tmp.unlink()
    return load_kernels(out_path)


def load_kernels(path: Path) -> dict:
    """{"kern_RAA", "residual", "rho", "identity", and the layout of ``exact_features``}."""
    with np.load(path, allow_pickle=False) as z:
        out = {"kern_RAA": z["kern_RAA"], "residual": z["residual"], "rho": z["rho"],
               "identity": str(z["identity"])}
        out.update(json.loads(str(z["meta"])))
    return out


def sweep_exact(kern: dict, subsets: Path, truth_dir: Path, splits, methods=("trak", "dtrak", "das"),
                grid=EXACT_GRID, default: float | None = None) -> dict:
    """Per split and method: per-query LDS (C, Q) at lambda = c (trace - e_max) for c in ``grid``
    plus the `das score` default c; the same shape of record as run.sweep_store's per k."""
    from das_pipeline.config import ScoreConfig
    from das_pipeline.eval.lds import lds_from_predictions, load_subsets, load_truth
    from das_pipeline.eval.sweep import match_queries, subsets_for_truth

    default = ScoreConfig.damping if default is None else default
    if ScoreConfig.damping_absolute:
        raise EvalError("the default damping is absolute; the exact sweep assumes the relative rule")
    mask = load_subsets(subsets).mask_MN
    lo, hi = kern["splits"]["train"]
    train = np.arange(lo, hi)
    residual_N = kern["residual"][train]
    rel = np.asarray(sorted(set(grid) | {default}))
    out = {"scales": {}, "splits": {}, "grid": list(grid), "default_c": default,
           "num_params": kern["num_params"]}
    for split in splits:
        F, t_uids, rows = load_truth(truth_dir / f"{split}.npz")
        q_lo, q_hi = kern["splits"][split]
        F = match_queries(t_uids, kern["uids"][split], F, q_hi - q_lo, split)
        mask_MN = subsets_for_truth(mask, rows)
        res = {}
        for method in methods:
            r = kern["readouts"].index(METHOD_READOUT[method])
            kern_NN = kern["kern_RAA"][r][np.ix_(train, train)]
            scale = damping_scale(kern_NN)
            out["scales"][METHOD_READOUT[method]] = {"trace-top": scale, "trace": float(np.trace(kern_NN))}
            lams = rel * scale
            s_CQN = kernel_scores(kern_NN, kern["kern_RAA"][r][q_lo:q_hi, lo:hi], lams, method,
                                  residual_N if method.startswith("das") else None)
            lds_CQ = np.stack([lds_from_predictions(s_CQN[c] @ mask_MN.T.astype(np.float64), F)
                               for c in range(len(lams))])
            res[method] = {"lam": lams.tolist(), "c": rel.tolist(), "lds": lds_CQ.tolist(),
                           "default": default * scale}
        out["splits"][split] = res
    return out
