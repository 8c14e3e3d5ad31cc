"""Linear Datamodeling Score (docs/DESIGN.md, "Evaluation"): file formats, vectorised Spearman, bootstrap.

    pred(q, m) = sum_{i in S_m} score(q, i)                    (scores_QN @ mask_MN^T)
    LDS(q)     = Spearman_m( pred(q, m), -F_m(q) )              (per query, over subsets)
    LDS        = mean_q LDS(q), with a bootstrap 95% interval over queries

Spearman is computed for all queries at once: rank-transform each row (ties share their mean
rank), centre, normalise, one row-wise dot product. ``spearman_slow`` is the plain loop twin.

File formats (users may write their own with numpy; both are plain ``.npz``):

- subsets file: ``mask`` (M, N) bool, row m marks the training rows (in the order of the
  config's ``[data] train``) in subset m; ``seeds`` (M,) int64, the training seed of subset m;
  ``train_uids`` (N,) str; ``alpha`` () float; ``seed`` () int64, the seed that drew the subsets.
- truth file (one per query set): ``F`` (M, Q) float64, the model output of the model trained on
  subset m for query q (lower = the model fits q better); ``query_uids`` (Q,) str, in the order
  of the query split; ``subsets`` (M,) int64, the rows of the subsets file the models belong to.

Legend: Q queries, N training rows, M subsets, C damping values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EvalError

# ----------------------------------------------------------------------------------- subsets


def make_subsets(num_samples: int, num_subsets: int, alpha: float = 0.5, seed: int = 0,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """(M, N) bool masks of random subsets of size round(alpha * N); subset m depends on (seed, m) only.

    With ``labels`` (N,), each subset takes round(alpha * n_c) rows of every class c (stratified).

    Raises:
        EvalError: alpha outside (0, 1), a subset that would be empty, labels of the wrong length.
    """
    if not 0.0 < alpha < 1.0:
        raise EvalError(f"--alpha {alpha}: must be in (0, 1) (the standard LDS uses 0.5)")
    if num_subsets < 2:
        raise EvalError(f"--num {num_subsets}: need at least 2 subsets for a rank correlation "
                       f"(typical: 64 to 256)")
    if labels is not None and len(labels) != num_samples:
        raise EvalError(f"labels have {len(labels)} rows but the training set has {num_samples}; "
                       f"give one label per training row")
    groups = [np.arange(num_samples)] if labels is None else [
        np.flatnonzero(labels == c) for c in np.unique(labels)]
    sizes = [int(round(alpha * len(g))) for g in groups]
    if sum(sizes) == 0:
        raise EvalError(f"alpha = {alpha} of {num_samples} training rows selects nothing; raise alpha")
    mask = np.zeros((num_subsets, num_samples), dtype=bool)
    for m in range(num_subsets):
        rng = np.random.default_rng([seed, m])
        for g, size in zip(groups, sizes, strict=True):
            mask[m, rng.choice(g, size=size, replace=False)] = True
    return mask


def save_subsets(path: str | Path, mask_MN: np.ndarray, seeds_M: np.ndarray, train_uids: list[str],
                 alpha: float, seed: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mask=mask_MN.astype(bool), seeds=np.asarray(seeds_M, dtype=np.int64),
             train_uids=np.asarray(train_uids, dtype=str), alpha=np.float64(alpha),
             seed=np.int64(seed))
    return path


@dataclass
class Subsets:
    mask_MN: np.ndarray
    seeds_M: np.ndarray
    train_uids: list[str]
    alpha: float
    seed: int


def load_subsets(path: str | Path) -> Subsets:
    """Read and check a subsets file (format in the module docstring).

    Raises:
        EvalError: missing file or keys, wrong dtypes or shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"subsets file {str(path)!r} does not exist; write it with `das lds subsets`")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("mask", "seeds", "train_uids") if k not in z]
        if missing:
            raise EvalError(f"subsets file {path} lacks {missing}; it needs mask (M, N) bool, seeds "
                           f"(M,) int and train_uids (N,) str")
        mask, seeds, uids = z["mask"], z["seeds"], [str(u) for u in z["train_uids"]]
        alpha = float(z["alpha"]) if "alpha" in z else float(mask.mean())
        seed = int(z["seed"]) if "seed" in z else -1
    if mask.ndim != 2 or mask.dtype != bool:
        raise EvalError(f"subsets file {path}: mask is {mask.dtype} {mask.shape}; save a 2-D bool "
                       f"array (M subsets, N training rows)")
    if seeds.shape != (mask.shape[0],) or not np.issubdtype(seeds.dtype, np.integer):
        raise EvalError(f"subsets file {path}: seeds is {seeds.dtype} {seeds.shape}; save one integer "
                       f"per subset, shape ({mask.shape[0]},)")
    if len(uids) != mask.shape[1]:
        raise EvalError(f"subsets file {path}: {len(uids)} train_uids for {mask.shape[1]} mask "
                       f"columns; save one uid per training row")
    return Subsets(mask, seeds.astype(np.int64), uids, alpha, seed)


def read_labels(source: str, train_uids: list[str], column: str | None = None) -> np.ndarray:
    """Labels for stratified subsets: `digits`, a .npy (N,) array, or a CSV with ``column``.

    A CSV with a ``uid`` column is matched to the training uids; otherwise rows are in order.
    """
    if source == "digits":
        from ..data import digits_labels

        return digits_labels()[[int(u) for u in train_uids]]
    path = Path(source)
    if not path.is_file():
        raise EvalError(f"--labels {source!r}: no such file; give `digits`, a .npy or a .csv")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix != ".csv":
        raise EvalError(f"--labels {source!r}: unsupported type {path.suffix!r}; use .npy or .csv")
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or column not in rows[0]:
        have = list(rows[0]) if rows else []
        raise EvalError(f"--label-column {column!r} is not a column of {path} (columns: {have}); "
                       f"pass --label-column NAME")
    if "uid" in rows[0]:
        by_uid = {r["uid"]: r[column] for r in rows}
        missing = [u for u in train_uids if u not in by_uid]
        if missing:
            raise EvalError(f"{path} has no row for training uids {missing[:5]}; add them")
        return np.asarray([by_uid[u] for u in train_uids])
    return np.asarray([r[column] for r in rows])


# ------------------------------------------------------------------------------------- truth


def save_truth(path: str | Path, F_MQ: np.ndarray, query_uids: list[str],
               subsets_M: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, F=np.asarray(F_MQ, dtype=np.float64), query_uids=np.asarray(query_uids, dtype=str),
             subsets=np.asarray(subsets_M, dtype=np.int64))
    return path


def load_truth(path: str | Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(F (M, Q) float64, query uids, subset rows (M,)) from a truth file.

    Raises:
        EvalError: missing file or keys, shapes that disagree, non-finite outputs.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"truth file {str(path)!r} does not exist; write it with `das lds truth`")
    with np.load(path, allow_pickle=False) as z:
        if "F" not in z:
            raise EvalError(f"truth file {path} lacks F; save F (M, Q) float64 and query_uids (Q,)")
        F = z["F"].astype(np.float64)
        uids = [str(u) for u in z["query_uids"]] if "query_uids" in z else None
        subsets = z["subsets"].astype(np.int64) if "subsets" in z else np.arange(F.shape[0])
    if F.ndim != 2:
        raise EvalError(f"truth file {path}: F has shape {F.shape}; save (M subsets, Q queries)")
    if uids is not None and len(uids) != F.shape[1]:
        raise EvalError(f"truth file {path}: {len(uids)} query_uids for {F.shape[1]} columns of F")
    if subsets.shape != (F.shape[0],):
        raise EvalError(f"truth file {path}: subsets {subsets.shape} does not match F's {F.shape[0]} rows")
    if not np.isfinite(F).all():
        raise EvalError(f"truth file {path}: F holds non-finite values (a diverged model?); retrain "
                       f"those subsets")
    return F, uids, subsets


# -------------------------------------------------------------------------------------- math


def rank_rows(x_QM: np.ndarray) -> np.ndarray:
    """Ranks 0..M-1 along each row, float64; tied values share their mean rank."""
    x = np.asarray(x_QM, dtype=np.float64)
    Q, M = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    sorted_ = np.take_along_axis(x, order, axis=1)
    new_group = np.ones((Q, M), dtype=bool)
    new_group[:, 1:] = sorted_[:, 1:] != sorted_[:, :-1]
    group = np.cumsum(new_group, axis=1) - 1 + (np.arange(Q) * M)[:, None]  # unique over rows
    pos = np.broadcast_to(np.arange(M, dtype=np.float64), (Q, M)).ravel()
    sums = np.bincount(group.ravel(), weights=pos, minlength=Q * M)
    counts = np.bincount(group.ravel(), minlength=Q * M)
    mean_rank = (sums / np.maximum(counts, 1))[group]
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, mean_rank, axis=1)
    return ranks


def spearman_rows(a_QM: np.ndarray, b_QM: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation of a[q] and b[q]; NaN where either row is constant."""
    ra, rb = rank_rows(a_QM), rank_rows(b_QM)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    num = (ra * rb).sum(1)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman_slow(a: list[float], b: list[float]) -> float:
    """Spearman of two sequences by a plain loop (the twin of ``spearman_rows``)."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(list(a)), ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den > 0 else float("nan")


def subset_predictions(scores_QN: np.ndarray, mask_MN: np.ndarray) -> np.ndarray:
    """(Q, M) float64: the datamodel's prediction sum_{i in S_m} score(q, i)."""
    return np.asarray(scores_QN, dtype=np.float64) @ mask_MN.astype(np.float64).T


def lds_from_predictions(pred_QM: np.ndarray, F_MQ: np.ndarray) -> np.ndarray:
    """(Q,) LDS per query: Spearman over subsets of the prediction and -F (lower loss = larger)."""
    if pred_QM.shape != F_MQ.T.shape:
        raise EvalError(f"predictions {pred_QM.shape} (Q, M) do not match truth F {F_MQ.shape} (M, Q)")
    return spearman_rows(pred_QM, -F_MQ.T)


def lds_per_query(scores_QN: np.ndarray, mask_MN: np.ndarray, F_MQ: np.ndarray) -> np.ndarray:
    """(Q,) LDS of a score matrix against subsets (M, N) and truth F (M, Q)."""
    if scores_QN.shape[1] != mask_MN.shape[1]:
        raise EvalError(f"scores have {scores_QN.shape[1]} training columns but the subsets mask has "
                       f"{mask_MN.shape[1]}; use the subsets drawn for this training set")
    return lds_from_predictions(subset_predictions(scores_QN, mask_MN), F_MQ)


@dataclass
class Summary:
    mean: float
    lo: float
    hi: float
    num_queries: int
    num_undefined: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "queries": self.num_queries,
                "undefined": self.num_undefined}


def summarize(lds_Q: np.ndarray, num_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Summary:
    """Mean LDS over queries and a percentile bootstrap interval (queries resampled, seeded).

    Queries whose LDS is undefined (a constant prediction or truth row) are left out and counted.
    """
    valid = lds_Q[np.isfinite(lds_Q)]
    undefined = len(lds_Q) - len(valid)
    if len(valid) == 0:
        return Summary(float("nan"), float("nan"), float("nan"), 0, undefined)
    idx = np.random.default_rng(seed).integers(0, len(valid), size=(num_boot, len(valid)))
    boot = valid[idx].mean(1)
    tail = (1.0 - level) / 2
    return Summary(float(valid.mean()), float(np.quantile(boot, tail)),
                   float(np.quantile(boot, 1 - tail)), len(valid), undefined)


def query_halves(num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of query rows into (select, report) halves: tune on one, report the other."""
    if num_queries < 2:
        raise EvalError(f"{num_queries} queries cannot be split into a selection and a report half; "
                       f"use at least 2 (typical: 50 or more)")
    perm = np.random.default_rng([seed, num_queries]).permutation(num_queries)
    half = num_queries // 2
    return np.sort(perm[:half]), np.sort(perm[half:])
