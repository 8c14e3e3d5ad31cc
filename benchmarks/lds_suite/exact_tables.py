"""Per-benchmark tables against the exact kernel: default vs best swept damping at each k, the
exact-kernel reference, the methods' ordering with intervals, and the verdict against the goals.

Sources of one member (all common noise, rademacher, the same K, model, data and truth):
``k=<k>`` the common store at each evaluated k (``sweeps/common.json``, ``sweeps/common_dim*.json``)
and ``exact`` the unprojected float64 kernel (``sweeps/exact.json``, exact.py). Per source, query
set and method: "default" is the report-half LDS at the `das score` default damping (0.03 (trace
- e_max) of that source's own Gram), "best" at the damping chosen on the selection half from the
source's sweep grid (stores: c = 1e-5 .. 1e4 trace/k; exact: c = 1e-7 .. 1e2 (trace - e_max)),
c given in trace - e_max units for both. Differences are paired per report query; every
interval is the percentile bootstrap 95% interval of summarize (2000 resamples, seed 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from analyse import METHODS, _index, fmt
from exact import EXACT_GRID

from das_pipeline.eval.lds import query_halves, summarize
from das_pipeline.eval.sweep import DEFAULT_GRID

READOUT = {"trak": "loss", "dtrak": "square", "das": "mean"}
GOAL_DEFAULT, GOAL_K, GOAL_EXTERNAL = 0.02, 0.02, 0.03


def _pick(lam, lds_CQ, grid_lams, default_lam, scale) -> dict:
    """Report-half per-query LDS at the default and at the selection-half best of the grid."""
    lam, lds_CQ = np.asarray(lam), np.asarray(lds_CQ)
    select, report = query_halves(lds_CQ.shape[1], 0)
    idx = [_index(lam, g) for g in grid_lams]
    best = idx[int(np.argmax(np.nanmean(lds_CQ[idx][:, select], axis=1)))]
    return {"default_Q": lds_CQ[_index(lam, default_lam), report], "best_Q": lds_CQ[best, report],
            "best_c": float(lam[best] / scale)}


def member_sources(root: Path, member: str) -> dict:
    """{label: {(split, method): _pick}} of every source found for ``member`` (k descending, exact last)."""
    folder = root / member / "sweeps"
    out = {}
    for path in [folder / "common.json", *sorted(folder.glob("common_dim*.json"))]:
        if not path.is_file():
            continue
        for k, by in json.loads(path.read_text()).items():
            cells = {}
            for split, per in by["splits"].items():
                for method, r in per.items():
                    sc = by["scales"][READOUT[method]]
                    cells[(split, method)] = _pick(r["lam"], r["lds"], [g * sc["trace/k"] for g in
                                                                          DEFAULT_GRID],
                                                   r["default"], sc["trace-top"])
            out[f"k={k}"] = cells
    out = dict(sorted(out.items(), key=lambda kv: -int(kv[0][2:])))
    path = folder / "exact.json"
    if path.is_file():
        data = json.loads(path.read_text())
        cells = {}
        for split, per in data["splits"].items():
            for method, r in per.items():
                scale = data["scales"][READOUT[method]]["trace-top"]
                cells[(split, method)] = _pick(r["lam"], r["lds"], [c * scale for c in EXACT_GRID],
                                               r["default"], scale)
        out["exact"] = cells
    return out


def member_results(root: Path, member: str, k0: int) -> dict:
    """Summaries of every source, the differences to the exact kernel, orderings and verdicts."""
    src = member_sources(root, member)
    rows, order = {}, {}
    for label, cells in src.items():
        for (split, method), c in cells.items():
            row = {"default": summarize(c["default_Q"]).as_dict(), "best": summarize(c["best_Q"]).as_dict(),
                   "best_c": c["best_c"],
                   "default_minus_best": summarize(c["default_Q"] - c["best_Q"]).as_dict()}
            ex = src.get("exact", {}).get((split, method))
            if ex is not None and label != "exact":
                row["default_minus_exact"] = summarize(c["default_Q"] - ex["default_Q"]).as_dict()
                row["best_minus_exact"] = summarize(c["best_Q"] - ex["best_Q"]).as_dict()
            rows[f"{label}|{split}|{method}"] = row
    pairs = (("das", "dtrak"), ("dtrak", "trak"), ("das", "trak"))
    for label in [x for x in ("exact", f"k={k0}") if x in src]:
        for at in ("default", "best"):
            for split in sorted({sp for sp, _ in src[label]}, key=lambda x: x != "val"):
                q = {m: src[label][(split, m)][f"{at}_Q"] for m in METHODS if (split, m) in src[label]}
                if len(q) < 3:
                    continue
                order[f"{label}|{at}|{split}"] = {
                    f"{a} - {b}": summarize(q[a] - q[b]).as_dict() for a, b in pairs}
    return {"sources": list(src), "rows": rows, "order": order, "verdict": verdict(rows, order, k0)}


def ordering(diffs: dict) -> str:
    """'das > dtrak > trak' style: '>' where the paired interval lies above 0, '<' below, '~' across."""
    def rel(a, b):
        d = diffs[f"{a} - {b}"]
        return ">" if d["lo"] > 0 else "<" if d["hi"] < 0 else "~"
    return f"das {rel('das', 'dtrak')} dtrak {rel('dtrak', 'trak')} trak (das {rel('das', 'trak')} trak)"


def verdict(rows: dict, order: dict, k0: int) -> dict:
    """Numbers against the three goals; None where a source is missing."""
    def gaps(prefix, key, tol):
        vals = {c: r[key]["mean"] for c, r in rows.items() if c.startswith(prefix) and key in r}
        if not vals:
            return None
        return {"worst": float(max(abs(v) for v in vals.values())) if key != "default_minus_best"
                else float(-min(vals.values())),
                "within": int(sum((abs(v) if key != "default_minus_best" else -v) <= tol
                                  for v in vals.values())), "cells": len(vals)}
    out = {"default_vs_best": {}, "exact_default": order.get("exact|default|val") is not None}
    for label in sorted({c.split("|")[0] for c in rows}):
        out["default_vs_best"][label] = gaps(label + "|", "default_minus_best", GOAL_DEFAULT)
    out["k8192_vs_exact"] = gaps("k=8192|", "default_minus_exact", GOAL_K)
    out["k8192_best_vs_exact_best"] = gaps("k=8192|", "best_minus_exact", GOAL_K)
    out["k0_vs_exact"] = gaps(f"k={k0}|", "default_minus_exact", GOAL_EXTERNAL)
    out["exact_order"] = {sp: ordering(order[f"exact|default|{sp}"]) for sp in ("val", "gen")
                          if f"exact|default|{sp}" in order}
    return out


def member_markdown(member: str, res: dict, k0: int) -> str:
    """One member's table, its ordering table and its verdict lines."""
    labels = res["sources"]
    stores = [x for x in labels if x != "exact"]
    head = ["queries", "method"]
    for x in labels:
        head += [f"{x} default (minus best)", f"{x} best (c)"]
    head += [f"{x} default - exact default" for x in stores if "exact" in labels]
    lines = [f"#### {member}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for split in ("val", "gen"):
        for m in METHODS:
            cols = []
            for x in labels:
                r = res["rows"].get(f"{x}|{split}|{m}")
                cols += (["-", "-"] if r is None else
                         [f"{fmt(r['default'])} ({r['default_minus_best']['mean'] * 100:+.1f})",
                          f"{fmt(r['best'])} ({r['best_c']:.2g})"])
            if "exact" in labels:
                cols += [fmt(res["rows"][f"{x}|{split}|{m}"]["default_minus_exact"])
                         if f"{x}|{split}|{m}" in res["rows"] else "-" for x in stores]
            if f"{labels[0]}|{split}|{m}" in res["rows"]:
                lines.append(f"| {split} | {m} | " + " | ".join(cols) + " |")
    lines += ["", "| source | damping | queries | das - dtrak | dtrak - trak | das - trak | ordering |",
              "|---|---|---|---|---|---|---|"]
    for key, d in res["order"].items():
        label, at, split = key.split("|")
        lines.append(f"| {label} | {at} | {split} | {fmt(d['das - dtrak'])} | {fmt(d['dtrak - trak'])} "
                     f"| {fmt(d['das - trak'])} | {ordering(d)} |")
    v = res["verdict"]
    lines += ["", "Against the goals (LDS x 100; a cell is (query set, method)):", ""]
    for label, g in v["default_vs_best"].items():
        if g:
            lines.append(f"- {label}: default within {GOAL_DEFAULT * 100:.0f} of its best swept damping on "
                         f"{g['within']}/{g['cells']} cells (largest shortfall {g['worst'] * 100:.1f})")
    for key, what, tol in (("k8192_vs_exact", "k = 8192 default vs exact default", GOAL_K),
                           ("k8192_best_vs_exact_best", "k = 8192 best vs exact best", GOAL_K),
                           ("k0_vs_exact", f"k = {k0} default vs exact default", GOAL_EXTERNAL)):
        g = v[key]
        if g:
            lines.append(f"- {what}: within {tol * 100:.0f} on {g['within']}/{g['cells']} cells "
                         f"(largest |difference| {g['worst'] * 100:.1f})")
    for sp, o in v["exact_order"].items():
        lines.append(f"- exact kernel at the default damping, {sp}: {o}")
    return "\n".join(lines) + "\n"


def exact_results(root: Path, members: dict, names) -> dict:
    """member_results of every member that has sweeps."""
    return {n: member_results(root, n, members[n]["dim"]) for n in names
            if (root / n / "sweeps" / "common.json").is_file()}


def exact_markdown(res: dict, members: dict) -> str:
    """Every member's tables (exact_results)."""
    return "\n".join(member_markdown(n, r, members[n]["dim"]) for n, r in res.items())
