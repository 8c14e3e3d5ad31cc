"""Choose the suite's damping constants and noise mode from the per-store sweeps; write the tables.

A cell is (member, k, query set, method). Every choice below is made on the selection half of
each query set; the report half only ever enters the printed numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from das_pipeline.eval.lds import query_halves, summarize
from das_pipeline.eval.sweep import DEFAULT_GRID

NOISE_MODES = ("content", "common")
NORMALISATIONS = ("trace/k", "trace/min(N,k)", "median eig", "geomean eig", "trace", "trace-top")
METHODS = ("trak", "dtrak", "das")
TODAY = ("trace/k", 1.0)
TOLERANCE = 0.02


def scales(fac, num_rows: int) -> dict[str, float]:
    """lambda per unit c of each normalisation, for one factor (eigenvalues above 1e-12 of the
    largest count as non-zero)."""
    e = fac.eigvals_K.double()
    nonzero = e[e > e.max().clamp_min(0) * 1e-12]
    return {"trace/k": fac.trace / fac.dim,
            "trace/min(N,k)": fac.trace / min(num_rows, fac.dim),
            "median eig": float(nonzero.median()),
            "geomean eig": float(nonzero.log().mean().exp()),
            "trace": fac.trace,
            "trace-top": fac.trace - float(e.max())}


def _index(lams: np.ndarray, lam: float) -> int:
    i = int(np.argmin(np.abs(np.log(lams) - np.log(lam))))
    assert np.isclose(lams[i], lam, rtol=1e-9), (lams[i], lam)
    return i


def cells(root: Path, names, store: str):
    """Yield (member, k, split, method, lam (C,), lds (C, Q), scales, collisions) of one store name."""
    for name in names:
        path = root / name / "sweeps" / f"{store}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for k, by in data.items():
            for split, per in by["splits"].items():
                for method, r in per.items():
                    readout = {"trak": "loss", "dtrak": "square", "das": "mean"}[method]
                    yield (name, int(k), split, method, np.asarray(r["lam"]), np.asarray(r["lds"]),
                           by["scales"][readout] | {"default": r.get("default")}, r.get("collisions"))


def cell_summary(lam, lds_CQ, sc, candidates) -> dict:
    """Selection-half curves and report-half per-query LDS of one cell."""
    Q = lds_CQ.shape[1]
    select, report = query_halves(Q, 0)
    sel = np.nanmean(lds_CQ[:, select], axis=1)
    grid_idx = [_index(lam, g * sc["trace/k"]) for g in DEFAULT_GRID]
    best = grid_idx[int(np.argmax(sel[grid_idx]))]
    out = {"best_select": float(sel[best]), "best_lam": float(lam[best]),
           "best_c_trace_k": float(lam[best] / sc["trace/k"]),
           "best_report_Q": lds_CQ[best, report], "oracle_report": float(np.nanmax(
               np.nanmean(lds_CQ[grid_idx][:, report], axis=1))),
           "norm": {}}
    for n in NORMALISATIONS:
        idx = [_index(lam, c * sc[n]) for c in candidates]
        out["norm"][n] = {"select": sel[idx], "report_Q": lds_CQ[idx][:, report]}
    out["today_report_Q"] = lds_CQ[_index(lam, TODAY[1] * sc["trace/k"]), report]
    if sc.get("default") is not None:  # the `das score` default of the code that swept
        out["default_report_Q"] = lds_CQ[_index(lam, sc["default"]), report]
    return out


def choose_constant(summaries: list[dict], n: str, candidates) -> dict:
    """The c of normalisation n with the smallest worst selection-half shortfall over the cells."""
    short = np.stack([s["best_select"] - s["norm"][n]["select"] for s in summaries])  # (cells, C)
    worst, mean = short.max(0), short.mean(0)
    order = np.lexsort((mean, np.round(worst, 4)))
    i = int(order[0])
    return {"c": float(candidates[i]), "index": i, "worst_select_shortfall": float(worst[i]),
            "mean_select_shortfall": float(mean[i])}


def fmt(s: dict) -> str:
    return f"{s['mean'] * 100:.1f} [{s['lo'] * 100:.1f}, {s['hi'] * 100:.1f}]"


def analyse(root: Path, members: dict, names, kinds, candidates) -> dict:
    candidates = np.asarray(candidates)
    stores = list(NOISE_MODES) + [f"common_{k}" for k in kinds if k != "rademacher"]
    summ = {st: {(m, k, sp, me): cell_summary(lam, lds, sc, candidates) | {"collisions": col,
                                                                          "scales": sc}
                 for m, k, sp, me, lam, lds, sc, col in cells(root, names, st)} for st in stores}
    results = {"constants": {}, "cells": {}, "noise": {}, "within": {}, "best_c": {}}
    for st in stores:  # where each cell's selection-half best c lies, per normalisation and method
        for n in NORMALISATIONS:
            for me in METHODS:
                cs = [float(candidates[int(np.argmax(s["norm"][n]["select"]))])
                      for key, s in summ[st].items() if key[3] == me]
                if cs:
                    results["best_c"][f"{st}|{n}|{me}"] = [min(cs), max(cs)]
    for st in NOISE_MODES:  # a noise mode without stores (run.py --noise-modes) has no constants
        if summ[st]:
            results["constants"][st] = {n: choose_constant(list(summ[st].values()), n, candidates)
                                        for n in NORMALISATIONS}
    for st in [st for st in stores if summ[st]]:
        mode = "common" if st.startswith("common") else st
        if mode not in results["constants"]:  # e.g. --kinds sjlt alone: no rademacher common store
            mode = st
            results["constants"][st] = {n: choose_constant(list(summ[st].values()), n, candidates)
                                        for n in NORMALISATIONS}
        consts = results["constants"][mode]
        for key, s in summ[st].items():
            row = {"best": summarize(s["best_report_Q"]).as_dict(), "best_c": s["best_c_trace_k"],
                   "oracle_report": s["oracle_report"], "today": summarize(s["today_report_Q"]).as_dict(),
                   "scales": s["scales"], "norm": {}}
            if "default_report_Q" in s:
                row["default"] = summarize(s["default_report_Q"]).as_dict()
                row["default"]["minus_best"] = summarize(s["default_report_Q"]
                                                         - s["best_report_Q"]).as_dict()
            for n in NORMALISATIONS:
                i = consts[n]["index"]
                row["norm"][n] = summarize(s["norm"][n]["report_Q"][i]).as_dict()
                diff = s["norm"][n]["report_Q"][i] - s["best_report_Q"]
                row["norm"][n]["minus_best"] = summarize(diff).as_dict()
            if s["collisions"] is not None:
                g = list(DEFAULT_GRID)
                row["collisions_at_c1"] = s["collisions"][g.index(min(g, key=lambda x: abs(x - 1.0)))]
                row["collisions_max"] = max(s["collisions"])
            results["cells"][f"{st}|{'|'.join(map(str, key))}"] = row
    # Noise: paired per-query difference common - content at each cell's best swept damping.
    for key in summ["content"]:
        if key in summ["common"]:
            d = summ["common"][key]["best_report_Q"] - summ["content"][key]["best_report_Q"]
            results["noise"]["|".join(map(str, key))] = summarize(d).as_dict()
    for st in [st for st in stores if summ[st]]:
        rows = [r for c, r in results["cells"].items() if c.startswith(st + "|")]
        short = [r["best"]["mean"] - r["today"]["mean"] for r in rows]
        dshort = [r["best"]["mean"] - r["default"]["mean"] for r in rows if "default" in r]
        if dshort:
            results["within"][f"{st}|new default"] = {
                "worst_report_shortfall": float(max(dshort)),
                "cells_within": int(sum(x <= TOLERANCE for x in dshort)), "cells": len(dshort)}
        results["within"][f"{st}|today: trace/k c=1"] = {
            "worst_report_shortfall": float(max(short, default=0)),
            "cells_within": int(sum(x <= TOLERANCE for x in short)), "cells": len(short)}
        for n in NORMALISATIONS:
            rows = [r for c, r in results["cells"].items() if c.startswith(st + "|")]
            short = [r["best"]["mean"] - r["norm"][n]["mean"] for r in rows]
            results["within"][f"{st}|{n}"] = {"worst_report_shortfall": float(max(short, default=0)),
                                             "cells_within": int(sum(x <= TOLERANCE for x in short)),
                                             "cells": len(short)}
    return results


def summary(results: dict, settings: dict) -> list[str]:
    """One row per cell: old defaults (content, c = 1 trace/k), best swept, the new default."""
    def delta(row, what):
        return f"{fmt(row[what])} ({(row[what]['mean'] - row['best']['mean']) * 100:+.1f})"

    keys = sorted({tuple(c.split("|")[1:]) for c in results["cells"]
                   if c.split("|")[0] in ("common", "common_sjlt")},
                  key=lambda t: (list(settings["members"]).index(t[0]), -int(t[1]), t[2] != "val",
                                 METHODS.index(t[3])))
    lines = ["| member | k | queries | method | content, c=1 trace/k (old defaults) | content, best "
             "swept | common, best swept | common, c=1 trace/k | common, new default (minus best) | "
             "sjlt common, best swept | sjlt common, new default |", "|---" * 11 + "|"]
    for key in keys:
        j = "|".join(key)
        co, ct = results["cells"].get("common|" + j), results["cells"].get("content|" + j)
        sj = results["cells"].get("common_sjlt|" + j)
        lines.append(f"| {' | '.join(key)} | {fmt(ct['today']) if ct else '-'} | "
                     f"{fmt(ct['best']) if ct else '-'} | {fmt(co['best']) if co else '-'} | "
                     f"{fmt(co['today']) if co else '-'} | "
                     f"{delta(co, 'default') if co and 'default' in co else '-'} | "
                     f"{fmt(sj['best']) if sj else '-'} | "
                     f"{delta(sj, 'default') if sj and 'default' in sj else '-'} |")
    return lines


def markdown(results: dict, settings: dict) -> str:
    lines = ["### Summary (LDS x 100 on the report halves, mean [95% interval])", "",
             *summary(results, settings), "", "### Every normalisation", ""]
    for st, consts in results["constants"].items():
        lines.append(f"Constants chosen on the selection halves ({st} noise): " + "; ".join(
            f"{n}: c = {v['c']:.3g} (worst selection shortfall {v['worst_select_shortfall'] * 100:.1f})"
            for n, v in consts.items()))
        lines.append("")
    keys = sorted({tuple(c.split("|")[1:]) for c in results["cells"]},
                  key=lambda t: (list(settings["members"]).index(t[0]), -int(t[1]), t[2],
                                 METHODS.index(t[3])))
    stores = sorted({c.split("|")[0] for c in results["cells"]},
                    key=lambda s: (s != "content", s != "common", s))
    # the header's constants: the rademacher common store's, else (no such store) the first chosen
    head_consts = results["constants"].get("common") or next(iter(results["constants"].values()))
    for member in dict.fromkeys(k[0] for k in keys):
        m = settings["members"][member]
        lines += [f"#### {member}: train {m['train']}, val {m['val']}"
                  + (f", gen {m['num_generated']} generated" if m["num_generated"] else ""), ""]
        head = ("| k | queries | method | store | best swept (c) | today c=1 trace/k | new default | "
                + " | ".join(f"{n} c={head_consts[n]['c']:.3g}"
                             for n in NORMALISATIONS) + " | top-1 same row |")
        lines += [head, "|" + "---|" * (8 + len(NORMALISATIONS))]
        for key in keys:
            if key[0] != member:
                continue
            for st in stores:
                row = results["cells"].get(f"{st}|{'|'.join(key)}")
                if row is None:
                    continue
                cells = [f"{fmt(row['norm'][n])} "
                         f"({(row['norm'][n]['mean'] - row['best']['mean']) * 100:+.1f})"
                         for n in NORMALISATIONS]
                col = row.get("collisions_at_c1")
                d = row.get("default")
                dflt = "-" if d is None else f"{fmt(d)} ({(d['mean'] - row['best']['mean']) * 100:+.1f})"
                lines.append(f"| {key[1]} | {key[2]} | {key[3]} | {st} | {fmt(row['best'])} "
                             f"({row['best_c']:.2g}) | {fmt(row['today'])} | {dflt} | " + " | ".join(cells)
                             + f" | {'-' if col is None else f'{col:.2f}'} |")
        lines.append("")
    lines += ["Noise: common minus content, paired over the report queries, each at its best swept "
              "damping (LDS x 100, mean [95% interval]):", "",
              "| member | k | queries | method | common - content |", "|---|---|---|---|---|"]
    for key, s in results["noise"].items():
        lines.append(f"| {' | '.join(key.split('|'))} | {fmt(s)} |")
    lines += ["", "Worst report-half shortfall of each normalisation's default against the best "
              "swept damping, over every cell (LDS x 100):", "",
              "| store | normalisation | worst shortfall | cells within 2 points |", "|---|---|---|---|"]
    for key, w in results["within"].items():
        st, n = key.split("|")
        lines.append(f"| {st} | {n} | {w['worst_report_shortfall'] * 100:.1f} | "
                     f"{w['cells_within']}/{w['cells']} |")
    lines += ["", "Range over the cells of each cell's own best constant (selection halves, from the "
              "candidates), per normalisation and method: a normalisation transfers when the ranges "
              "are narrow and overlap across methods:", "",
              "| store | normalisation | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for st in stores:
        for n in NORMALISATIONS:
            cells = [results["best_c"].get(f"{st}|{n}|{me}") for me in METHODS]
            if any(c is None for c in cells):
                continue
            lines.append(f"| {st} | {n} | " + " | ".join(f"{lo:.2g} .. {hi:.2g}" for lo, hi in cells) + " |")
    return "\n".join(lines) + "\n"


def ks_results(root: Path, names, stores: dict[str, str], candidates) -> dict:
    """K x S at equal cost. stores: cell label ("5x2") -> store name; the first is the reference.

    Per (label, member, k, split, method): report-half LDS at the `das score` default damping and
    at the best swept damping (chosen on the selection half), and, against the reference cell, the
    paired per-query differences at each.
    """
    candidates = np.asarray(candidates)
    summ = {label: {(m, k, sp, me): cell_summary(lam, lds, sc, candidates)
                    for m, k, sp, me, lam, lds, sc, _ in cells(root, names, st)}
            for label, st in stores.items()}
    ref = next(iter(stores))
    out = {"reference": ref, "labels": list(stores), "cells": {}}
    for label, by in summ.items():
        for key, s in by.items():
            row = {"default": summarize(s["default_report_Q"]).as_dict(),
                   "best": summarize(s["best_report_Q"]).as_dict(), "best_c": s["best_c_trace_k"]}
            r = summ[ref].get(key)
            if label != ref and r is not None:
                row["default_minus_ref"] = summarize(s["default_report_Q"] - r["default_report_Q"]).as_dict()
                row["best_minus_ref"] = summarize(s["best_report_Q"] - r["best_report_Q"]).as_dict()
            out["cells"][f"{label}|{'|'.join(map(str, key))}"] = row
    return out


def ks_markdown(ks: dict, settings: dict) -> str:
    """One table per member and k: rows (queries, method), columns per K x S cell."""
    labels, ref = ks["labels"], ks["reference"]
    keys = sorted({tuple(c.split("|")[1:]) for c in ks["cells"]},
                  key=lambda t: (list(settings["members"]).index(t[0]), -int(t[1]), t[2] != "val",
                                 METHODS.index(t[3])))
    lines = []
    for member, k in dict.fromkeys((t[0], t[1]) for t in keys):
        others = [x for x in labels if x != ref]
        lines += [f"#### {member}, k = {k}", "",
                  "| queries | method | " + " | ".join(f"{x} default | {x} best (c)" for x in labels)
                  + "".join(f" | {x} - {ref} default | {x} - {ref} best" for x in others) + " |",
                  "|---|---|" + "---|" * (2 * len(labels) + 2 * len(others))]
        for t in keys:
            if (t[0], t[1]) != (member, k):
                continue
            cols = []
            for x in labels:
                row = ks["cells"].get(f"{x}|{'|'.join(t)}")
                cols += ["-", "-"] if row is None else [fmt(row["default"]),
                                                       f"{fmt(row['best'])} ({row['best_c']:.2g})"]
            for x in others:
                row = ks["cells"].get(f"{x}|{'|'.join(t)}")
                cols += (["-", "-"] if row is None or "default_minus_ref" not in row
                         else [fmt(row["default_minus_ref"]), fmt(row["best_minus_ref"])])
            lines.append(f"| {t[2]} | {t[3]} | " + " | ".join(cols) + " |")
        lines.append("")
    return "\n".join(lines)
