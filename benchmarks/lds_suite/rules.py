"""Unsupervised damping rules against the best swept damping, on the suite's stores.

    python benchmarks/lds_suite/rules.py --out runs/lds_suite [--members digits128 ...]

Reads the stores and the per-store sweeps that run.py left in --out (no retraining, no new
extraction) and, per cell (member, k, query set, method), reports the report-half LDS of:

- best swept: lambda chosen on the selection half (as run.py);
- default: the `das score` default of the code that runs this script;
- every rule of ``RULES`` below, which sees only the store's features and, for the per-query
  rules, the one query being scored.

A rule's lambda is usually not on the sweep's grid; its LDS is interpolated per query, linearly in
log lambda, between the two grid points around it (the grid has half-decade steps or finer).
Writes rules.json and rules.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from das_pipeline.linalg import Factor

HERE = Path(__file__).resolve().parent
READOUT = {"trak": "loss", "dtrak": "square", "das": "mean"}

# The rules: damping chosen from the features themselves, by generalised cross-validation
# over JL coordinates, or from the spectrum alone.
#
# The base score of query q, phi_q (G + lambda I)^-1 Phi^T, is the ridge regression of the query's
# feature vector on the training rows' feature vectors: w_q = argmin ||phi_q - Phi^T w||^2 +
# lambda ||w||^2 = (Phi Phi^T + lambda I)^-1 Phi phi_q. The k coordinates of phi_q are the
# observations and the N training rows the regressors. Under a JL projection each coordinate is an
# independent random linear functional of the full per-sample gradient, so predicting a held-out
# coordinate is predicting a fresh projection of the unprojected gradient: cross-validation over
# coordinates measures how well the weights w_q carry over from the k-dimensional sketch to the
# gradient itself. Generalised cross-validation (Golub, Heath and Wahba 1979) is its rotation-
# invariant closed form,
#
#     GCV(lambda) = ||phi_q - Phi^T w_q||^2 / (1 - df(lambda) / k)^2,   df = sum_j e_j / (e_j + lambda),
#
# computed for every lambda from the factor's eigenpairs (e_j, v_j) in O(R) per lambda:
# ||phi_q - Phi^T w_q||^2 = sum_j (lambda / (e_j + lambda))^2 (v_j . phi_q)^2 + ||phi_q||^2 -
# sum_j (v_j . phi_q)^2.
#
# Rules (``RULES``: name -> rule(factor, train_feats_NK, query_feats_QK) -> lambda, a float or one
# per query) are what this script measures.

GRID_DECADES = (-9.0, 1.0)
"""The lambdas searched, as decades of trace(G): 10^-9 trace .. 10 trace."""
GRID_POINTS = 201


def lambda_grid(fac: Factor) -> torch.Tensor:
    """The searched lambdas (L,), float64, log-spaced over GRID_DECADES of trace(G)."""
    return fac.trace * torch.logspace(*GRID_DECADES, GRID_POINTS, dtype=torch.float64)


def _nonzero(fac: Factor) -> tuple[torch.Tensor, torch.Tensor]:
    e = fac.eigvals_K.double()
    keep = e > e.max().clamp_min(0) * 1e-12
    return e[keep], fac.eigvecs_KK.double()[:, keep]


def _df(e_R: torch.Tensor, lams_L: torch.Tensor) -> torch.Tensor:
    """Degrees of freedom sum_j e_j / (e_j + lambda) of each lambda, (L,)."""
    return (e_R[None, :] / (e_R[None, :] + lams_L[:, None])).sum(1)


def gcv_curves(fac: Factor, query_feats_QK: torch.Tensor, lams_L: torch.Tensor) -> torch.Tensor:
    """GCV(lambda) of each query's ridge regression on the training rows, (Q, L)."""
    e, v = _nonzero(fac)
    x = query_feats_QK.double()
    c2_QR = (x @ v).pow(2)
    perp_Q = (x.pow(2).sum(1) - c2_QR.sum(1)).clamp_min(0)
    shrink_LR = (lams_L[:, None] / (e[None, :] + lams_L[:, None])).pow(2)
    resid_QL = c2_QR @ shrink_LR.T + perp_Q[:, None]
    return resid_QL / (1.0 - _df(e, lams_L) / fac.dim).clamp_min(1e-12).pow(2)[None, :]


def gcv_query(fac: Factor, train_feats_NK: torch.Tensor, query_feats_QK: torch.Tensor) -> torch.Tensor:
    """Per query, the lambda of smallest GCV of its own regression (Q,): depends on the store and
    that query only."""
    lams = lambda_grid(fac)
    return lams[gcv_curves(fac, query_feats_QK, lams).argmin(1)]


def gcv_pooled(fac: Factor, train_feats_NK: torch.Tensor, query_feats_QK: torch.Tensor) -> float:
    """One lambda for the query set: smallest summed GCV (depends on which queries are scored)."""
    lams = lambda_grid(fac)
    curves = gcv_curves(fac, query_feats_QK, lams)
    return float(lams[(curves / curves.mean(1, keepdim=True)).sum(0).argmin()])


def gcv_train(fac: Factor, train_feats_NK: torch.Tensor, query_feats_QK=None, max_rows: int = 1024) -> float:
    """One lambda from the store alone: each training row regressed on the OTHER rows (leave one
    row out, ridge lambda), GCV over coordinates, averaged over (up to max_rows) rows.

    With K = Phi Phi^T + lambda I and B = K^-1 (from the factor: B = U diag(1/(e+lambda)) U^T +
    (I - U U^T) / lambda, U = Phi V diag(e)^-1/2): the ridge objective of row i on the others is
    1 / B_ii - lambda and its weights are -B_{-i,i} / B_ii.
    """
    e, v = _nonzero(fac)
    phi = train_feats_NK.double()[:max_rows]
    u2 = ((phi @ v) / e.sqrt()).pow(2)
    rest = (1.0 - u2.sum(1)).clamp_min(0)
    lams = lambda_grid(fac)
    df_L = _df(e, lams)
    best, best_val = float(lams[0]), float("inf")
    for lam, df_all in zip(lams.tolist(), df_L.tolist(), strict=True):
        b_ii = (u2 / (e + lam)).sum(1) + rest / lam
        b_col2 = (u2 / (e + lam).pow(2)).sum(1) + rest / lam**2
        objective = 1.0 / b_ii - lam
        w2 = (b_col2 - b_ii.pow(2)).clamp_min(0) / b_ii.pow(2)
        resid = (objective - lam * w2).clamp_min(0)
        lev = (u2 * (e / (e + lam))).sum(1)
        df = df_all - lev
        val = float((resid / (1.0 - df / fac.dim).clamp_min(1e-12).pow(2)).mean())
        if val < best_val:
            best, best_val = lam, val
    return best


def effective_dim(fac: Factor, fraction: float) -> float:
    """The lambda at which df(lambda) = fraction * rank (a spectrum-only rule)."""
    e, _ = _nonzero(fac)
    lams = lambda_grid(fac)
    return float(lams[int((_df(e, lams) - fraction * e.numel()).abs().argmin())])


RULES = {
    "gcv query": gcv_query,
    "gcv pooled": gcv_pooled,
    "gcv train": gcv_train,
    "df 0.03": lambda fac, t, q, f=0.03: effective_dim(fac, f),
    "df 0.05": lambda fac, t, q, f=0.05: effective_dim(fac, f),
    "df 0.1": lambda fac, t, q, f=0.1: effective_dim(fac, f),
    "df 0.2": lambda fac, t, q, f=0.2: effective_dim(fac, f),
    "df 0.3": lambda fac, t, q, f=0.3: effective_dim(fac, f),
}


def interp_lds(lam_C: np.ndarray, lds_CQ: np.ndarray, lam_Q: np.ndarray) -> np.ndarray:
    """Per query q, its LDS curve at lam_Q[q] (log-linear between grid points, clamped)."""
    x = np.log(lam_C)
    return np.array([np.interp(np.log(lam_Q[q]), x, lds_CQ[:, q]) for q in range(lds_CQ.shape[1])])


def store_rules(cfg_path: Path, sweep: dict, splits) -> dict:
    """Per k, split and method: lambda per query of every rule, and the cell's LDS under it."""
    from analyse import cell_summary

    from das_pipeline.config import ScoreConfig, load_config
    from das_pipeline.eval.lds import query_halves
    from das_pipeline.eval.sweep import read_split, store_factor
    from das_pipeline.fingerprint import open_store

    store = open_store(load_config(cfg_path))
    readouts = sorted(set(READOUT.values()))
    out = {}
    for k, by in sweep.items():
        k = int(k)
        tr, _, _, _ = read_split(store, "train", readouts, k)
        dim = store.split("train").dim
        facs = {r: store_factor(store, r, tr[r], dim) for r in readouts}
        cell_k = {}
        for split in splits:
            qf, _, _, _ = read_split(store, split, readouts, k)
            for method, cell in by["splits"][split].items():
                r = READOUT[method]
                lam_C, lds_CQ = np.asarray(cell["lam"]), np.asarray(cell["lds"])
                Q = lds_CQ.shape[1]
                _, report = query_halves(Q, 0)
                best = cell_summary(lam_C, lds_CQ, by["scales"][r], ())["best_lam"]
                default = facs[r].damping(ScoreConfig.damping)
                rows = {"best swept": np.full(Q, best), "default": np.full(Q, default)}
                feats_t = torch.from_numpy(tr[r])
                for name, rule in RULES.items():
                    lam = rule(facs[r], feats_t, torch.from_numpy(qf[r]))
                    rows[name] = np.broadcast_to(np.asarray(lam, dtype=np.float64), (Q,)).copy()
                res = {}
                for name, lam_Q in rows.items():
                    lds_Q = interp_lds(lam_C, lds_CQ, lam_Q)[report]
                    res[name] = {"lds": float(np.nanmean(lds_Q)), "lds_Q": lds_Q.tolist(),
                                 "log10_lam_over_default": float(np.median(np.log10(lam_Q / default)))}
                cell_k.setdefault(split, {})[method] = res
        out[str(k)] = cell_k
    return out


def markdown(results: dict) -> str:
    """One table: every cell, each rule's report-half LDS x 100 and its shortfall vs best swept."""
    names = None
    lines, worst, within = [], {}, {}
    for member, by_store in results.items():
        for store, by_k in by_store.items():
            for k, by_split in by_k.items():
                for split, by_method in by_split.items():
                    for method, res in by_method.items():
                        if names is None:
                            names = list(res)
                            lines += ["| member | store | k | queries | method | " + " | ".join(names) + " |",
                                      "|" + "---|" * (5 + len(names))]
                        best = res["best swept"]["lds"]
                        cells = []
                        for n in names:
                            d = res[n]["lds"] - best
                            worst[n] = min(worst.get(n, 0.0), d)
                            within[n] = within.get(n, 0) + (d >= -0.02)
                            cells.append(f"{100 * res[n]['lds']:.1f} ({100 * d:+.1f}; "
                                         f"{res[n]['log10_lam_over_default']:+.1f})")
                        lines.append(f"| {member} | {store} | {k} | {split} | {method} | "
                                     + " | ".join(cells) + " |")
    total = len(lines) - 2
    head = ["Report-half LDS x 100 (shortfall against best swept; log10 of the rule's median lambda "
            "over the default's).", "",
            "| rule | worst shortfall | cells within 2 points |", "|---|---|---|"]
    head += [f"| {n} | {100 * worst[n]:+.1f} | {within[n]} / {total} |" for n in names or []]
    return "\n".join(head + [""] + lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/lds_suite")
    ap.add_argument("--members", nargs="*")
    ap.add_argument("--stores", nargs="*", default=["common_sjlt"], help="store names (sweeps/<name>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = Path(args.out).resolve()
    members = args.members or sorted(p.name for p in root.iterdir() if (p / "sweeps").is_dir())
    results = {}
    for member in members:
        for store in args.stores:
            sweep_path = root / member / "sweeps" / f"{store}.json"
            if not sweep_path.is_file():
                continue
            sweep = json.loads(sweep_path.read_text())
            splits = list(next(iter(sweep.values()))["splits"])
            results.setdefault(member, {})[store] = store_rules(root / member / f"{store}.toml", sweep,
                                                                splits)
            print(f"{member}/{store} done", flush=True)
    (root / "rules.json").write_text(json.dumps(results))
    md = markdown(results)
    (root / "rules.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
