"""`das score`: stream training units against preconditioned queries; write scores and top-k.

For readout R with factor (G_R + lambda I):
    base_R(q, i) = phi_R(q) (G_R + lambda I)^-1 phi_R(i)^T
    trak = base_loss,  dtrak = base_square
    das_signed(q, i) = base_mean(q, i) * w_i / (1 - h_i)^gamma,  das = das_signed^2
    w_i = r_i (RMS loss residual) or rho_i (signed mean residual), per [score] residual
Positive scores are proponents. Queries are preconditioned once ((K, Q) per readout); each
training unit then costs one (n, K) x (K, Q) product, so neither N x Q nor N x K is ever held.

Legend: N train rows, n rows of one unit, Q queries, K projection dim.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import METHOD_READOUT, Config
from .reduce import Factor, load_factor, markers_digest
from .store import Store, StoreError

LEVERAGE_FLOOR = 1e-12  # 1 - h_i is clamped here; exact arithmetic keeps h_i < 1 when lambda > 0


def score_block(feats_nK: dict[str, torch.Tensor], precond_KQ: dict[str, torch.Tensor],
                residual_n: torch.Tensor | None, leverage_n: torch.Tensor | None,
                methods, gamma: float) -> dict[str, torch.Tensor]:
    """Scores (Q, n) of one block of training rows for each method (float64 math).

    Args:
        feats_nK: train features per readout, (n, K).
        precond_KQ: (G_R + lambda I)^-1 phi_R(queries)^T per readout, (K, Q).
        residual_n, leverage_n: the residual weight (r_i or rho_i) and h_i (needed by das,
            das_signed).
    """
    base = {r: (f.to(torch.float64) @ precond_KQ[r]).T for r, f in feats_nK.items()}
    out = {}
    for m in methods:
        if m in ("trak", "dtrak"):
            out[m] = base[METHOD_READOUT[m]]
        else:
            loo = (1.0 - leverage_n).clamp_min(LEVERAGE_FLOOR).pow(gamma)
            signed = base["mean"] * (residual_n.to(torch.float64) / loo)[None, :]
            out[m] = signed if m == "das_signed" else signed.pow(2)
    return out


def _merge_topk(best_val, best_idx, block_QN, offset, k):
    vals = torch.cat([best_val, block_QN], dim=1)
    idx = torch.cat([best_idx, torch.arange(block_QN.shape[1]).add(offset).expand_as(block_QN)], 1)
    top = torch.topk(vals, k, dim=1)
    return top.values, torch.gather(idx, 1, top.indices)


def run_score(cfg: Config, query_sets: list[str] | None = None, show_progress: bool = True,
              device: str = "cpu", query_block: int = 4096) -> dict:
    """Score every query set against the training set and write scores + top-k CSVs.

    Raises:
        StoreError: missing/incomplete splits or a stale reduction.
    """
    store = Store.open_existing(cfg.store.path)
    train = store.split("train")
    train_markers = train.require_complete()
    methods = list(cfg.score.methods)
    readouts = sorted({METHOD_READOUT[m] for m in methods}, key=cfg.features.readouts.index)
    factors: dict[str, Factor] = {r: load_factor(store, r, device) for r in readouts}
    lams = {r: f.damping(cfg.score.damping, cfg.score.damping_absolute) for r, f in factors.items()}
    names = query_sets or list(cfg.data.queries)
    train_uids = train.uids()
    dtype = train.group["features"][readouts[0]].dtype
    summary = {}
    for name in names:
        started = time.perf_counter()
        qsplit = store.split(name)
        q_markers = qsplit.require_complete()
        q_feats = {r: [] for r in readouts}
        for u in range(qsplit.num_units):
            data = qsplit.read_unit(u, readouts, q_markers[u])
            for r in readouts:
                q_feats[r].append(data.features[r])
        q_feats = {r: torch.from_numpy(np.concatenate(v)) for r, v in q_feats.items()}
        Q = qsplit.num_samples
        group = store.root.require_group("scores").require_group(name)
        arrays = {m: group.create_array(m, shape=(Q, train.num_samples), dtype=dtype,
                                        chunks=(min(Q, query_block), train.rows_per_unit),
                                        overwrite=True) for m in methods}
        topk = min(cfg.score.topk, train.num_samples)
        best = {m: (torch.full((Q, topk), -torch.inf, dtype=torch.float64),
                    torch.full((Q, topk), -1, dtype=torch.int64)) for m in methods}
        for q_lo in range(0, Q, query_block):
            q_hi = min(Q, q_lo + query_block)
            precond = {r: factors[r].solve(q_feats[r][q_lo:q_hi].to(device).T, lams[r])
                       for r in readouts}
            for unit in tqdm(range(train.num_units), desc=f"score {name}", unit="unit",
                             disable=not show_progress):
                data = train.read_unit(unit, readouts, train_markers[unit])
                lo, hi = train.unit_rows(unit)
                feats = {r: torch.from_numpy(data.features[r]).to(device) for r in readouts}
                lev = (factors["mean"].leverage(feats["mean"], lams["mean"])
                       if "mean" in readouts else None)
                residual = torch.from_numpy(data.rho if cfg.score.residual == "rho"
                                            else data.residual).to(device)
                block = score_block(feats, precond, residual, lev, methods, cfg.score.gamma)
                for m in methods:
                    scores = block[m].cpu()
                    arrays[m][q_lo:q_hi, lo:hi] = scores.numpy().astype(dtype)
                    val, idx = best[m]
                    val[q_lo:q_hi], idx[q_lo:q_hi] = _merge_topk(
                        val[q_lo:q_hi], idx[q_lo:q_hi], scores.to(torch.float64), lo, topk)
        group.attrs.update({
            "methods": methods, "damping": cfg.score.damping,
            "damping_absolute": cfg.score.damping_absolute, "lambda": lams,
            "gamma": cfg.score.gamma, "residual": cfg.score.residual,
            "train_digest": markers_digest(train_markers),
            "query_digest": markers_digest(q_markers),
            "fingerprint_hash": store.root.attrs["fingerprint_hash"]})
        paths = write_topk_csv(cfg.reports_dir / name, qsplit.uids(), train_uids, best)
        summary[name] = {"seconds": time.perf_counter() - started, "queries": Q,
                         "csv": [str(p) for p in paths]}
    return summary


def write_topk_csv(folder: Path, query_uids: list[str], train_uids: list[str], best) -> list[Path]:
    """One CSV per method: query_row, query_uid, rank, train_row, train_uid, score."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for method, (vals, idx) in best.items():
        path = folder / f"{method}_topk.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["query_row", "query_uid", "rank", "train_row", "train_uid", "score"])
            for q in range(vals.shape[0]):
                for rank in range(vals.shape[1]):
                    i = int(idx[q, rank])
                    w.writerow([q, query_uids[q], rank + 1, i, train_uids[i],
                                f"{float(vals[q, rank]):.9g}"])
        paths.append(path)
    return paths


def read_scores(cfg: Config, query_set: str, method: str) -> np.ndarray:
    """The (Q, N) score matrix of one method, as written by ``run_score``."""
    store = Store.open_existing(cfg.store.path)
    try:
        return store.root["scores"][query_set][method][...]
    except KeyError:
        raise StoreError(f"no scores for {query_set!r}/{method!r} in {store.path}; run "
                         f"`das score CONFIG`") from None
