"""`das score`: stream training units against preconditioned queries; write scores and top-k.

The formulas are ``scoring.attribution``. Queries are preconditioned once ((K, Q) per readout);
each training unit then costs one (n, K) x (K, Q) product, so neither N x Q nor N x K is ever
held. Scores go to ``<store>/scores/<query set>/<method>`` (Q, N); the top-k per query goes to
the reports folder as CSV (``report.write_topk_csv``).

Legend: N train rows, n rows of one unit, Q queries, K projection dim.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm
from zarr.codecs import Crc32cCodec, ZstdCodec

from .config import METHOD_READOUT, Config
from .fingerprint import check_query_data, open_store
from .linalg import Factor
from .reduce import load_factor, markers_digest
from .report import write_topk_csv
from .scoring import merge_topk, score_block


def run_score(cfg: Config, query_sets: list[str] | None = None, show_progress: bool = True,
              device: str = "cpu", query_block: int = 4096) -> dict:
    """Score every query set against the training set and write scores + top-k CSVs.

    Raises:
        StoreError: another fingerprint, missing/incomplete splits, query data changed since
            extraction, or a stale reduction; nothing is written then.
    """
    store = open_store(cfg)
    train = store.split("train")
    train_markers = train.require_complete()
    methods = list(cfg.score.methods)
    readouts = sorted({METHOD_READOUT[m] for m in methods}, key=cfg.features.readouts.index)
    factors: dict[str, Factor] = {r: load_factor(store, r, device) for r in readouts}
    lams = {r: f.damping(cfg.score.damping, cfg.score.damping_absolute) for r, f in factors.items()}
    names = query_sets or list(cfg.data.queries)
    check_query_data(cfg, store, names)  # before anything is written
    train_uids = train.uids()
    dtype = train.group["features"][readouts[0]].dtype
    # Excluded samples (non-finite features, [features] nonfinite = "exclude") get NaN scores
    # and never enter a top-k.
    train_excluded = np.zeros(train.num_samples, dtype=bool)
    train_excluded[train.excluded_rows(train_markers)] = True
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
        q_excluded = np.zeros(Q, dtype=bool)
        q_excluded[qsplit.excluded_rows(q_markers)] = True
        group = store.root.require_group("scores").require_group(name)
        arrays = {m: group.create_array(m, shape=(Q, train.num_samples), dtype=dtype,
                                        chunks=(min(Q, query_block), train.rows_per_unit),
                                        compressors=[ZstdCodec(), Crc32cCodec()], overwrite=True)
                  for m in methods}
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
                # The leverage is needed only by das / das_signed with gamma != 0.
                lev = (factors["mean"].leverage(feats["mean"], lams["mean"])
                       if "mean" in readouts and cfg.score.gamma != 0 else None)
                residual = torch.from_numpy(data.rho if cfg.score.residual == "rho"
                                            else data.residual).to(device)
                block = score_block(feats, precond, residual, lev, methods, cfg.score.gamma)
                drop = torch.from_numpy(q_excluded[q_lo:q_hi, None] | train_excluded[None, lo:hi])
                for m in methods:
                    scores = block[m].cpu().masked_fill(drop, torch.nan)
                    arrays[m][q_lo:q_hi, lo:hi] = scores.numpy().astype(dtype)
                    val, idx = best[m]
                    val[q_lo:q_hi], idx[q_lo:q_hi] = merge_topk(
                        val[q_lo:q_hi], idx[q_lo:q_hi],
                        scores.to(torch.float64).nan_to_num(nan=-torch.inf), lo, topk)
        group.attrs.update({
            "methods": methods, "damping": cfg.score.damping,
            "damping_absolute": cfg.score.damping_absolute, "lambda": lams,
            "gamma": cfg.score.gamma, "residual": cfg.score.residual,
            "train_digest": markers_digest(train_markers),
            "query_digest": markers_digest(q_markers),
            "excluded_train_rows": np.flatnonzero(train_excluded).tolist()[:1000],
            "excluded_query_rows": np.flatnonzero(q_excluded).tolist()[:1000],
            "fingerprint_hash": store.root.attrs["fingerprint_hash"]})
        paths = write_topk_csv(cfg.reports_dir / name, qsplit.uids(), train_uids, best,
                               skip_queries=np.flatnonzero(q_excluded).tolist())
        summary[name] = {"seconds": time.perf_counter() - started, "queries": Q,
                         "csv": [str(p) for p in paths]}
    return summary
