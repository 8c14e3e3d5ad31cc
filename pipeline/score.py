"""`das score`: stream training units against preconditioned queries; write scores and top-k.

The formulas are ``scoring.attribution``. Queries are preconditioned once ((K, Q) per readout);
each training unit then costs one (n, K) x (K, Q) product, so neither N x Q nor N x K is ever
held. ``Scorer`` holds what every query needs (factors, lambdas, residual weights, excluded
rows) and is shared by ``das score``, ``das attribute`` and ``das serve``, so a new image is
scored by the same code as a stored query set. Scores go to ``<store>/scores/<query set>/<method>``
(Q, N); the top-k per query goes to the reports folder as CSV (``report.write_topk_csv``), and for
signed methods also the strongest opponents (``<method>_opponents.csv``).

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

SIGNED = ("trak", "dtrak", "das_signed")
"""Methods whose negative scores mean something (opponents); ``das`` is squared."""
KEEP_TRAIN_BYTES = 2 << 30
"""``Scorer(keep_train=True)`` holds the train features in memory only below this size."""


class Best:
    """Running top-k (and, for signed methods, bottom-k) of Q queries over streamed blocks.

    ``top[m]`` / ``bottom[m]``: (values (Q, k) float64, train rows (Q, k) int64); bottom values
    keep their (negative) sign, rank 1 = strongest opponent. Unfilled entries: -inf / row -1.
    """

    def __init__(self, methods, num_queries: int, k: int):
        def empty():
            return (torch.full((num_queries, k), -torch.inf, dtype=torch.float64),
                    torch.full((num_queries, k), -1, dtype=torch.int64))

        self.k = k
        self.top = {m: empty() for m in methods}
        self._neg = {m: empty() for m in methods if m in SIGNED}

    def add(self, method: str, scores_Qn: torch.Tensor, q_lo: int, lo: int) -> None:
        """Merge scores (NaN = excluded) of train rows lo.. for queries q_lo..q_lo+Q."""
        s = scores_Qn.to(torch.float64).nan_to_num(nan=-torch.inf)
        q = slice(q_lo, q_lo + s.shape[0])
        tables = [(self.top[method], s)]
        if method in self._neg:  # opponents: the top-k of the negated scores (NaN stays -inf)
            tables.append((self._neg[method], (-scores_Qn.to(torch.float64)).nan_to_num(nan=-torch.inf)))
        for (val, idx), block in tables:
            val[q], idx[q] = merge_topk(val[q], idx[q], block, lo, self.k)

    @property
    def bottom(self) -> dict:
        return {m: (-v, i) for m, (v, i) in self._neg.items()}


class Scorer:
    """Everything a query needs to be scored against the reduced train split of a store.

    Args:
        keep_train: hold the train units in memory after the first pass (``das serve``), when
            they total less than ``KEEP_TRAIN_BYTES``.

    Raises:
        StoreError: incomplete train split, missing or stale reduction.
    """

    def __init__(self, cfg: Config, store, device: str = "cpu", keep_train: bool = False):
        self.cfg, self.store, self.device = cfg, store, device
        self.train = store.split("train")
        self.markers = self.train.require_complete()
        self.methods = list(cfg.score.methods)
        self.readouts = sorted({METHOD_READOUT[m] for m in self.methods},
                               key=cfg.features.readouts.index)
        self.factors: dict[str, Factor] = {r: load_factor(store, r, device) for r in self.readouts}
        self.lams = {r: f.damping(cfg.score.damping, cfg.score.damping_absolute)
                     for r, f in self.factors.items()}
        self.train_uids = self.train.uids()
        self.dtype = self.train.group["features"][self.readouts[0]].dtype
        # Excluded samples (non-finite features, [features] nonfinite = "exclude") get NaN scores
        # and never enter a top-k.
        self.train_excluded = np.zeros(self.train.num_samples, dtype=bool)
        self.train_excluded[self.train.excluded_rows(self.markers)] = True
        size = self.train.num_samples * self.train.dim * len(self.readouts) * self.dtype.itemsize
        self._kept = [] if keep_train and size < KEEP_TRAIN_BYTES else None

    @property
    def num_train(self) -> int:
        return self.train.num_samples

    def _units(self, desc: str, show_progress: bool):
        """(lo, hi, features per readout (n, K), residual weight (n,), leverage (n,) or None)."""
        if self._kept is not None and len(self._kept) == self.train.num_units:
            yield from self._kept
            return
        kept = []
        for unit in tqdm(range(self.train.num_units), desc=desc, unit="unit",
                         disable=not show_progress):
            data = self.train.read_unit(unit, self.readouts, self.markers[unit])
            lo, hi = self.train.unit_rows(unit)
            feats = {r: torch.from_numpy(data.features[r]).to(self.device) for r in self.readouts}
            # The leverage is needed only by das / das_signed with gamma != 0.
            lev = (self.factors["mean"].leverage(feats["mean"], self.lams["mean"])
                   if "mean" in self.readouts and self.cfg.score.gamma != 0 else None)
            residual = torch.from_numpy(data.rho if self.cfg.score.residual == "rho"
                                        else data.residual).to(self.device)
            item = (lo, hi, feats, residual, lev)
            kept.append(item)
            yield item
        if self._kept is not None:
            self._kept = kept

    def blocks(self, q_feats: dict[str, torch.Tensor], q_excluded: np.ndarray | None = None,
               desc: str = "score", show_progress: bool = False):
        """Yield (lo, hi, scores) per train unit: scores[m] (Q, n) float64 on the CPU, NaN where
        the query or the train row is excluded.

        Args:
            q_feats: query features per readout, (Q, K).
            q_excluded: (Q,) bool, queries left out (NaN rows).
        """
        precond = {r: self.factors[r].solve(q_feats[r].to(self.device).T, self.lams[r])
                   for r in self.readouts}
        Q = next(iter(q_feats.values())).shape[0]
        q_excl = np.zeros(Q, dtype=bool) if q_excluded is None else q_excluded
        for lo, hi, feats, residual, lev in self._units(desc, show_progress):
            block = score_block(feats, precond, residual, lev, self.methods, self.cfg.score.gamma)
            drop = torch.from_numpy(q_excl[:, None] | self.train_excluded[None, lo:hi])
            yield lo, hi, {m: block[m].cpu().masked_fill(drop, torch.nan) for m in self.methods}

    def topk(self, q_feats: dict[str, torch.Tensor], q_excluded: np.ndarray | None = None,
             k: int | None = None) -> Best:
        """Top-k (and opponents) of queries against every train row, nothing written."""
        Q = next(iter(q_feats.values())).shape[0]
        best = Best(self.methods, Q, min(k or self.cfg.score.topk, self.num_train))
        for lo, _, scores in self.blocks(q_feats, q_excluded):
            for m, s in scores.items():
                best.add(m, s, 0, lo)
        return best


def read_queries(qsplit, readouts) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """A complete query split's features per readout (Q, K), its excluded rows (Q,) bool and
    its markers.

    Raises:
        StoreError: the split is incomplete or a unit fails its checksums.
    """
    q_markers = qsplit.require_complete()
    q_feats = {r: [] for r in readouts}
    for u in range(qsplit.num_units):
        data = qsplit.read_unit(u, readouts, q_markers[u])
        for r in readouts:
            q_feats[r].append(data.features[r])
    q_excluded = np.zeros(qsplit.num_samples, dtype=bool)
    q_excluded[qsplit.excluded_rows(q_markers)] = True
    return ({r: torch.from_numpy(np.concatenate(v)) for r, v in q_feats.items()}, q_excluded,
            q_markers)


def run_score(cfg: Config, query_sets: list[str] | None = None, show_progress: bool = True,
              device: str = "cpu", query_block: int = 4096) -> dict:
    """Score every query set against the training set and write scores + top-k CSVs.

    Raises:
        StoreError: another fingerprint, missing/incomplete splits, query data changed since
            extraction, or a stale reduction; nothing is written then.
    """
    store = open_store(cfg)
    scorer = Scorer(cfg, store, device)
    methods, readouts, train = scorer.methods, scorer.readouts, scorer.train
    names = query_sets or list(cfg.data.queries)
    check_query_data(cfg, store, names)  # before anything is written
    summary = {}
    for name in names:
        started = time.perf_counter()
        qsplit = store.split(name)
        q_feats, q_excluded, q_markers = read_queries(qsplit, readouts)
        Q = qsplit.num_samples
        group = store.root.require_group("scores").require_group(name)
        arrays = {m: group.create_array(m, shape=(Q, train.num_samples), dtype=scorer.dtype,
                                        chunks=(min(Q, query_block), train.rows_per_unit),
                                        compressors=[ZstdCodec(), Crc32cCodec()], overwrite=True)
                  for m in methods}
        best = Best(methods, Q, min(cfg.score.topk, train.num_samples))
        for q_lo in range(0, Q, query_block):
            q_hi = min(Q, q_lo + query_block)
            for lo, hi, scores in scorer.blocks({r: f[q_lo:q_hi] for r, f in q_feats.items()},
                                                q_excluded[q_lo:q_hi], f"score {name}",
                                                show_progress):
                for m in methods:
                    arrays[m][q_lo:q_hi, lo:hi] = scores[m].numpy().astype(scorer.dtype)
                    best.add(m, scores[m], q_lo, lo)
        group.attrs.update({
            "methods": methods, "damping": cfg.score.damping,
            "damping_absolute": cfg.score.damping_absolute, "lambda": scorer.lams,
            "damping_rule": "absolute" if cfg.score.damping_absolute else "c * (trace(G) - e_max)",
            "gamma": cfg.score.gamma, "residual": cfg.score.residual,
            "train_digest": markers_digest(scorer.markers),
            "query_digest": markers_digest(q_markers),
            "excluded_train_rows": np.flatnonzero(scorer.train_excluded).tolist()[:1000],
            "excluded_query_rows": np.flatnonzero(q_excluded).tolist()[:1000],
            "fingerprint_hash": store.root.attrs["fingerprint_hash"]})
        skip = np.flatnonzero(q_excluded).tolist()
        paths = write_topk_csv(cfg.reports_dir / name, qsplit.uids(), scorer.train_uids,
                               best.top, skip_queries=skip)
        paths += write_topk_csv(cfg.reports_dir / name, qsplit.uids(), scorer.train_uids,
                                best.bottom, skip_queries=skip, kind="opponents")
        summary[name] = {"seconds": time.perf_counter() - started, "queries": Q,
                         "csv": [str(p) for p in paths]}
    return summary
