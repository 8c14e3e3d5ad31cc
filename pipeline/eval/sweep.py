"""LDS of stored scores, and of every score variant over a damping grid from one factorisation.

Stored scores (``das lds eval``): read ``scores/<query set>/<method>`` (Q, N), LDS per query.

Damping sweep (``das lds eval --sweep``): per readout one factor G = V diag(e) V^T, then for
each relative damping c (lambda = ``Factor.damping(c)``, the rule ``das score`` uses) and each
variant, streamed over train units:
    base(q, i) = (phi_q V) diag(1 / (e + lambda)) (phi_i V)^T,  h_i = sum (phi_i V)^2 / (e + lambda)
which costs O(Q n k) per unit and lambda; nothing is refactored per lambda. The factor is the
store's reduction when it exists at the evaluated k; otherwise it is computed once here, by the
N x N dual when N < k (exact: train features lie in the span of V, so the null space of G never
enters train scores or leverages), else by the streamed Gram and ``reduce.factor``.

A smaller k than the store's is evaluated by truncation: the projection's column b is a
function of (seed, a, b) only, so the first k columns of a k_store-dim feature times
sqrt(k_store / k) are exactly the k-dim feature (kernels/README.md).

Damping is chosen on the selection half of the queries and reported on the other half.

Legend: Q queries, N train rows, n rows of one unit, M subsets, C damping values, K proj dim,
R rank of the factor (K, or N for the dual).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import METHOD_READOUT
from ..errors import EvalError
from ..kernels import RNG_VERSION
from ..linalg import Factor, dual_factor, factor, gram
from ..reduce import load_factor
from ..scoring import attribution
from ..store import Store, StoreError
from .lds import lds_from_predictions, query_halves, subset_predictions, summarize

DEFAULT_GRID = tuple(float(c) for c in np.logspace(-5, 4, 19))


@dataclass(frozen=True)
class Variant:
    """One scoring rule: a method, its base readout, and for das the LOO exponent and residual."""

    method: str
    gamma: float = 1.0
    residual: str = "r"
    """r (RMS loss residual), rho (signed mean residual) or none."""
    readout: str | None = None
    """Base readout; default the method's own (trak: loss, dtrak: square, das: mean)."""

    @property
    def base_readout(self) -> str:
        return self.readout or METHOD_READOUT[self.method]

    @property
    def name(self) -> str:
        if self.method in ("trak", "dtrak"):
            return self.method
        extra = f" {self.readout}" if self.readout and self.readout != "mean" else ""
        return f"{self.method} g{self.gamma:g} {self.residual}{extra}"


def default_variants(readouts) -> list[Variant]:
    """trak, dtrak, and das / das_signed for gamma in {0, 1} and residual in {r, rho}."""
    out = [Variant(m) for m in ("trak", "dtrak") if METHOD_READOUT[m] in readouts]
    if "mean" in readouts:
        out += [Variant(m, g, r) for m in ("das", "das_signed") for g in (1.0, 0.0)
                for r in ("r", "rho")]
    return out


def _check_variant(v: Variant, readouts) -> None:
    if v.base_readout not in readouts:
        raise EvalError(f"variant {v.name!r} needs readout {v.base_readout!r}, which the store lacks "
                       f"(it has {list(readouts)}); extract it or drop the variant")
    if v.residual not in ("r", "rho", "none"):
        raise EvalError(f"variant residual {v.residual!r}: choose r, rho or none")


def read_split(store: Store, name: str, readouts, dim: int | None = None):
    """(features per readout (n, k) float64, residual (n,), rho (n,), uids) of a complete split,
    truncated to ``dim`` columns (rescaled to the dim-k projection) when given."""
    split = store.split(name)
    markers = split.require_complete()
    k = split.dim if dim is None else dim
    if k > split.dim:
        raise EvalError(f"k = {k} exceeds the store's projection dim {split.dim}; evaluate k <= "
                       f"{split.dim} or extract a larger store")
    scale = math.sqrt(split.dim / k)
    feats = {r: [] for r in readouts}
    res, rho = [], []
    for u in range(split.num_units):
        data = split.read_unit(u, tuple(readouts), markers[u])
        for r in readouts:
            feats[r].append(data.features[r][:, :k].astype(np.float64) * scale)
        res.append(data.residual.astype(np.float64))
        rho.append(data.rho.astype(np.float64))
    return ({r: np.concatenate(v) for r, v in feats.items()}, np.concatenate(res),
            np.concatenate(rho), split.uids())


def check_truncatable(fingerprint: dict) -> None:
    """Refuse ``--k`` below the store's k unless a prefix of the features is a smaller projection
    of the same kind: true for the dense kinds of our Philox matrix (column b depends on (seed, a,
    b) only), false for sjlt (each input coordinate hits s of all k columns, so a prefix is not an
    sjlt matrix), fast-jl (its own matrix) and any structured (factored) projection.
    """
    proj = fingerprint.get("settings", {}).get("projection", {})
    if proj.get("kind") in ("rademacher", "gaussian") and proj.get("rng") == RNG_VERSION \
            and proj.get("engine", "dense") == "dense":
        return
    raise EvalError(f"--k below the store's k = {proj.get('dim')} evaluates a prefix of its "
                    f"features, which is a smaller projection only for the dense rademacher and "
                    f"gaussian kinds; this store's projection is {proj}: extract a store at each k "
                    f"instead, or one with [projection] kind = \"rademacher\" at the largest k "
                    f"(or drop --k)")


def store_factor(store: Store, readout: str, train_feats_NK: np.ndarray, store_dim: int) -> Factor:
    """The store's reduction at full dim if present, else one factorisation of these features."""
    k = train_feats_NK.shape[1]
    if k == store_dim:
        try:
            return load_factor(store, readout)
        except StoreError:
            pass
    if train_feats_NK.shape[0] < k:
        return dual_factor(train_feats_NK)
    return factor(gram([train_feats_NK], k), train_feats_NK.shape[0])


def sweep_predictions(train_feats: dict[str, np.ndarray], residual_N: np.ndarray, rho_N: np.ndarray,
                      query_feats: dict[str, np.ndarray], factors: dict[str, Factor],
                      grid, variants: list[Variant], mask_MN: np.ndarray,
                      unit_rows: int = 256) -> dict[str, np.ndarray]:
    """(C, Q, M) subset predictions per variant name, for every relative damping c in ``grid``.

    Streams the training rows in blocks of ``unit_rows`` so memory is O(C Q (M + unit_rows)).
    """
    grid = np.asarray(grid, dtype=np.float64)
    N = mask_MN.shape[1]
    Q = next(iter(query_feats.values())).shape[0]
    lam = {r: np.array([f.damping(c) for c in grid]) for r, f in factors.items()}
    inv = {r: 1.0 / (f.eigvals_K.numpy()[None, :] + lam[r][:, None]) for r, f in factors.items()}
    vecs = {r: f.eigvecs_KK.numpy() for r, f in factors.items()}
    cq = {r: query_feats[r] @ vecs[r] for r in factors}
    pred = {v.name: np.zeros((len(grid), Q, mask_MN.shape[0])) for v in variants}
    maskf = mask_MN.astype(np.float64)
    for lo in range(0, N, unit_rows):
        hi = min(N, lo + unit_rows)
        ct = {r: train_feats[r][lo:hi] @ vecs[r] for r in factors}
        base = {r: np.einsum("qr,cr,nr->cqn", cq[r], inv[r], ct[r], optimize=True) for r in factors}
        lev = {r: np.einsum("nr,cr->cn", ct[r] ** 2, inv[r]) for r in factors}
        for v in variants:
            w = {"r": residual_N, "rho": rho_N, "none": np.ones(N)}[v.residual][lo:hi]
            s = attribution(v.method, torch.from_numpy(base[v.base_readout]), torch.from_numpy(w),
                            torch.from_numpy(lev[v.base_readout])[:, None, :], v.gamma).numpy()
            pred[v.name] += s @ maskf[:, lo:hi].T
    return pred


@dataclass
class SweepResult:
    variant: str
    grid: list[float]
    select_curve: list[float]
    """Mean LDS on the selection half for each damping value."""
    chosen: float
    report: dict
    """Summary (mean, lo, hi, queries) on the report half at the chosen damping."""
    report_curve: list[float]
    """Mean LDS on the report half for each damping (shown, never used to choose)."""


def choose_damping(pred_CQM: np.ndarray, F_MQ: np.ndarray, grid, select: np.ndarray,
                   report: np.ndarray, name: str = "") -> SweepResult:
    """Pick c maximising the mean LDS on the ``select`` queries; summarise on ``report``."""
    curves = []
    for c in range(len(grid)):
        lds_Q = lds_from_predictions(pred_CQM[c], F_MQ)
        curves.append((np.nanmean(lds_Q[select]) if np.isfinite(lds_Q[select]).any() else -np.inf,
                       lds_Q))
    best = int(np.argmax([c[0] for c in curves]))
    return SweepResult(name, [float(g) for g in grid], [float(c[0]) for c in curves], float(grid[best]),
                       summarize(curves[best][1][report]).as_dict(),
                       [float(np.nanmean(c[1][report])) for c in curves])


def match_queries(truth_uids: list[str] | None, split_uids: list[str] | None, F_MQ: np.ndarray,
                  num_rows: int, what: str) -> np.ndarray:
    """Reorder truth columns to the query split's row order (by uid); refuse other queries."""
    if F_MQ.shape[1] != num_rows:
        raise EvalError(f"{what}: the truth has {F_MQ.shape[1]} queries but the scores have "
                       f"{num_rows}; compute the truth for this query set")
    if truth_uids is None or split_uids is None or truth_uids == split_uids:
        return F_MQ
    pos = {u: j for j, u in enumerate(truth_uids)}
    if set(pos) != set(split_uids):
        raise EvalError(f"{what}: the truth's query uids differ from the store's (e.g. "
                       f"{sorted(set(split_uids) - set(pos))[:3]}); compute the truth for this set")
    return F_MQ[:, [pos[u] for u in split_uids]]


def subsets_for_truth(mask_MN: np.ndarray, truth_subsets_M: np.ndarray) -> np.ndarray:
    if truth_subsets_M.max(initial=-1) >= len(mask_MN) or truth_subsets_M.min(initial=0) < 0:
        raise EvalError(f"the truth refers to subset rows up to {truth_subsets_M.max()} but the "
                       f"subsets file has {len(mask_MN)}; pass the subsets file it was made with")
    return mask_MN[truth_subsets_M]


def eval_stored_scores(store: Store, query_set: str, methods, mask_MN, F_MQ, truth_uids,
                       train_uids: list[str], column_block: int = 65536) -> dict[str, dict]:
    """LDS summary and per-query values of each stored method's scores, read in column blocks."""
    if "scores" not in store.root or query_set not in store.root["scores"]:
        raise EvalError(f"store {store.path} has no scores for query set {query_set!r}; run "
                       f"`das score CONFIG` (or write scores/{query_set}/<method> (Q, N))")
    group = store.root["scores"][query_set]
    methods = list(methods or sorted(group.array_keys()))
    split_uids = store.split(query_set).uids() if query_set in store.split_names() else None
    if "train" in store.split_names() and store.split("train").uids() != train_uids:
        raise EvalError(f"the subsets file's train_uids differ from store {store.path}'s training "
                       f"rows; draw the subsets for this training set")
    out = {}
    for m in methods:
        if m not in group:
            raise EvalError(f"store {store.path} has no scores for method {m!r} of {query_set!r} "
                           f"(it has {sorted(group.array_keys())}); score it or drop it")
        scores = group[m]
        F = match_queries(truth_uids, split_uids, F_MQ, scores.shape[0], f"query set {query_set!r}")
        if scores.shape[1] != mask_MN.shape[1]:
            raise EvalError(f"scores/{query_set}/{m} has {scores.shape[1]} training columns but the "
                           f"subsets cover {mask_MN.shape[1]} rows; use matching subsets")
        pred_QM = np.zeros((scores.shape[0], mask_MN.shape[0]))
        for lo in range(0, scores.shape[1], column_block):  # never holds Q x N
            hi = min(scores.shape[1], lo + column_block)
            pred_QM += subset_predictions(scores[:, lo:hi], mask_MN[:, lo:hi])
        lds_Q = lds_from_predictions(pred_QM, F)
        out[m] = {"summary": summarize(lds_Q).as_dict(), "per_query": lds_Q.tolist()}
    return out


def eval_sweep(store: Store, query_set: str, variants: list[Variant] | None, mask_MN, F_MQ,
               truth_uids, dims=None, grid=DEFAULT_GRID, halves_seed: int = 0) -> dict:
    """Damping sweep of every variant at each k in ``dims`` (default: the store's k).

    Returns {k: {variant name: SweepResult as dict}} plus the query halves used.
    """
    train = store.split("train")
    q_split = store.split(query_set)
    readouts = train.readouts
    variants = variants or default_variants(readouts)
    for v in variants:
        _check_variant(v, readouts)
    needed = sorted({v.base_readout for v in variants}, key=readouts.index)
    dims = list(dims or [train.dim])
    if any(k != train.dim for k in dims):
        check_truncatable(store.fingerprint)
    select, report = query_halves(q_split.num_samples, halves_seed)
    out = {"select": select.tolist(), "report": report.tolist(), "by_k": {}}
    for k in dims:
        tr, res, rho, _ = read_split(store, "train", needed, k)
        qf, _, _, q_uids = read_split(store, query_set, needed, k)
        F = match_queries(truth_uids, q_uids, F_MQ, len(q_uids), f"query set {query_set!r}")
        facs = {r: store_factor(store, r, tr[r], train.dim) for r in needed}
        pred = sweep_predictions(tr, res, rho, qf, facs, grid, variants, mask_MN)
        out["by_k"][k] = {v.name: choose_damping(pred[v.name], F, grid, select, report, v.name).__dict__
                          for v in variants}
    return out
