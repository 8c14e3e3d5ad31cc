"""LDS of the factored (Kronecker) extraction engine against dense JL at equal total k (issue 15).

    python benchmarks/lds_suite/run.py --out runs/lds_suite --members digits128 --kinds sjlt \\
        --noise-modes common --no-exact                  # models, truth, the default store
    python benchmarks/lds_suite/engines.py --out runs/lds_suite --members digits128 patches256

Needs, per member, what run.py leaves in ``<out>/<member>`` (subsets, retrained models, truth).
Then per member, common noise, K = 10, every other setting at its default:

- dense: `[projection] engine = "dense"`, kind sjlt (the product's default), store ``common_sjlt``
  (run.py's), and with --seeds the projection seeds 1, 2 (``common_sjlt_seed1`` ...);
- factored: `[projection] engine = "factored"`, kind rademacher (its default), ``common_factored``
  and ``common_factored_seed1`` ...;
- both at --scale times the member's k (``common_sjlt_dim8192``, ``common_factored_dim8192``;
  with --scale-seeds for the same seeds, ``common_factored_dim8192_seed1`` ...).

Seeds other than 0 are extracted for the members of --seed-members only. Each store is extracted
(`das extract`) unless complete and swept once by run.py's `sweep_store`, at its own k only (the
first k columns of a factored or sjlt store are not a smaller extraction of either). The numbers
are analyse.py's `cell_summary`: report-half LDS at the `das score` default damping and at the
damping chosen on the selection half from the `das lds eval --sweep` grid, mean [percentile
bootstrap 95% interval]; factored minus dense paired per report query (seed 0 of each); over
projection seeds, the mean and the standard deviation (ddof 1) of the report-half mean LDS.

Resumable (stores and sweeps beside run.py's). Writes ``<out>/engines.json`` and ``engines.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as suite  # noqa: E402  (run.py of this folder: MEMBERS, COMMON, write_config, sweep_store)
from analyse import METHODS, cell_summary, cells, fmt  # noqa: E402

from das_pipeline.eval.lds import summarize  # noqa: E402

ENGINES = {"dense": "sjlt", "factored": "rademacher"}  # engine -> the kind it resolves to by default
ORDER = ("digits128", "patches256", "digits1024", "digits256w64")


def plan(m: dict, seeds: list[int], scale: int, scale_seeds: bool = False) -> list[dict]:
    """The stores of one member: both engines at its k for every seed, and at scale x k (seed 0,
    or every seed with scale_seeds)."""
    out = [{"engine": e, "dim": m["dim"], "seed": s} for s in seeds for e in ENGINES]
    if scale > 1:
        out += [{"engine": e, "dim": scale * m["dim"], "seed": s}
                for s in (seeds if scale_seeds else [0]) for e in ENGINES]
    return out


def store_config(out: Path, m: dict, s: dict, st: dict) -> Path:
    """run.py's config (common noise) for one planned store; its stem is the store name."""
    return suite.write_config(out, m, s, "common", ENGINES[st["engine"]], dim=st["dim"],
                              engine=st["engine"], seed=st["seed"])


def build(root: Path, members: dict, s: dict, names: list[str], seeds: list[int], seed_members: list[str],
          scale: int, scale_seeds: bool = False) -> dict:
    """Extract and sweep every planned store that is missing; returns {member: [planned store]}."""
    stage = suite.stage_timer(root / "engines_times.json")

    plans = {}
    for name in names:
        m, out = members[name], root / name
        subsets, truth = out / "subsets.npz", out / "truth"
        splits = ["val"] + (["gen"] if m["num_generated"] else [])
        missing = [p for p in [subsets, *(truth / f"{x}.npz" for x in splits)] if not p.is_file()]
        if missing:
            raise SystemExit(f"{name}: {missing[0]} is missing; build the member first with "
                             f"`python benchmarks/lds_suite/run.py --out {root} --members {name} "
                             f"--kinds sjlt --noise-modes common --no-exact`")
        plans[name] = plan(m, seeds if name in seed_members else [0], scale, scale_seeds)
        for st in plans[name]:
            cfg = store_config(out, m, s, st)
            st["store"] = cfg.stem
            if not suite.store_complete(cfg):
                stage(f"{name}/extract {cfg.stem}", suite.das, ["extract", str(cfg), "--quiet"])
            path = out / "sweeps" / f"{cfg.stem}.json"
            if not path.is_file():
                path.parent.mkdir(exist_ok=True)
                path.write_text(json.dumps(stage(f"{name}/sweep {cfg.stem}", suite.sweep_store, cfg,
                                                 subsets, truth, splits, [st["dim"]])))
    return plans


def results(root: Path, plans: dict) -> dict:
    """Per (member, k, split, method): per store the report-half default and best swept LDS, the
    paired factored - dense differences (seed 0) and the mean / std over seeds per engine."""
    out = {"cells": {}, "seeds": {}}
    for name, stores in plans.items():
        per = {}  # (k, split, method) -> {(engine, seed): cell_summary}
        for st in stores:
            for _, k, split, method, lam, lds, sc, _ in cells(root, [name], st["store"]):
                per.setdefault((k, split, method), {})[(st["engine"], st["seed"])] = \
                    cell_summary(lam, lds, sc, suite.CANDIDATES)
        for (k, split, method), by in per.items():
            key = f"{name}|{k}|{split}|{method}"
            row = {}
            for (engine, seed), c in by.items():
                row[f"{engine}|{seed}"] = {"default": summarize(c["default_report_Q"]).as_dict(),
                                           "best": summarize(c["best_report_Q"]).as_dict(),
                                           "best_c": c["best_c_trace_k"]}
            if ("dense", 0) in by and ("factored", 0) in by:
                d, f = by[("dense", 0)], by[("factored", 0)]
                row["factored-dense"] = {
                    w: summarize(f[f"{w}_report_Q"] - d[f"{w}_report_Q"]).as_dict()
                    for w in ("default", "best")}
            out["cells"][key] = row
            for engine in ENGINES:
                seeds = sorted(s for e, s in by if e == engine)
                if len(seeds) < 2:
                    continue
                means = {w: [row[f"{engine}|{s}"][w]["mean"] for s in seeds] for w in ("default", "best")}
                out["seeds"][f"{key}|{engine}"] = {
                    "seeds": seeds, **{f"{w}_means": v for w, v in means.items()},
                    **{f"{w}_mean": float(np.mean(v)) for w, v in means.items()},
                    **{f"{w}_std": float(np.std(v, ddof=1)) for w, v in means.items()}}
    return out


def markdown(res: dict, members: dict, names: list[str]) -> str:
    """Per member: one table of both engines at each k (seed 0), then the seeds table."""
    def key_order(key):
        name, k, split, method = key.split("|")
        return names.index(name), int(k), split != "val", METHODS.index(method)

    lines = []
    keys = sorted(res["cells"], key=key_order)
    for name in names:
        mine = [k for k in keys if k.startswith(name + "|")]
        if not mine:
            continue
        lines += [f"#### {name} (k = {members[name]['dim']}; seed 0 of each engine)", "",
                  "| k | queries | method | dense sjlt, default | dense sjlt, best swept (c) | "
                  "factored, default | factored, best swept (c) | factored - dense, default | "
                  "factored - dense, best |", "|---" * 9 + "|"]
        for key in mine:
            row = res["cells"][key]
            _, k, split, method = key.split("|")
            cols = []
            for e in ENGINES:
                r = row.get(f"{e}|0")
                cols += (["-", "-"] if r is None
                         else [fmt(r["default"]), f"{fmt(r['best'])} ({r['best_c']:.2g})"])
            diff = row.get("factored-dense")
            cols += ["-", "-"] if diff is None else [fmt(diff["default"]), fmt(diff["best"])]
            lines.append(f"| {k} | {split} | {method} | " + " | ".join(cols) + " |")
        lines.append("")
        seeded = [k for k in mine if all(f"{k}|{e}" in res["seeds"] for e in ENGINES)]
        if seeded:
            sd = res["seeds"][f"{seeded[0]}|dense"]["seeds"]
            lines += [f"Over projection seeds {', '.join(map(str, sd))} (report-half mean LDS x 100: "
                      "mean +- std over seeds; the seeds' means in brackets):", "",
                      "| k | queries | method | dense, default | factored, default | dense, best swept | "
                      "factored, best swept | std ratio factored / dense (default, best) |",
                      "|---" * 8 + "|"]
            for key in seeded:
                _, k, split, method = key.split("|")
                d, f = res["seeds"][f"{key}|dense"], res["seeds"][f"{key}|factored"]
                cols = [f"{x[w + '_mean'] * 100:.1f} +- {x[w + '_std'] * 100:.1f} "
                        f"({', '.join(f'{v * 100:.1f}' for v in x[w + '_means'])})"
                        for w in ("default",) for x in (d, f)]
                cols += [f"{x['best_mean'] * 100:.1f} +- {x['best_std'] * 100:.1f} "
                         f"({', '.join(f'{v * 100:.1f}' for v in x['best_means'])})" for x in (d, f)]
                ratio = [f["default_std"] / d["default_std"] if d["default_std"] > 0 else float("inf"),
                         f["best_std"] / d["best_std"] if d["best_std"] > 0 else float("inf")]
                lines.append(f"| {k} | {split} | {method} | " + " | ".join(cols)
                             + f" | {ratio[0]:.1f}, {ratio[1]:.1f} |")
            lines.append("")
    return "\n".join(lines)


def overview(res: dict, members: dict) -> str:
    """Counts over every (member, query set, method) cell, per k (the member's, or a multiple of
    it) and damping: factored's mean inside dense's 95% interval, the paired factored - dense
    interval below / across / above 0, the mean paired difference, and the seed std ratio."""
    groups = {}
    for key, row in res["cells"].items():
        name, k = key.split("|")[:2]
        if "factored-dense" not in row:
            continue
        scale = int(k) // members[name]["dim"]
        for w in ("default", "best"):
            d, f, diff = row["dense|0"][w], row["factored|0"][w], row["factored-dense"][w]
            g = groups.setdefault((scale, w), {"cells": 0, "inside": 0, "below": 0, "across": 0,
                                               "above": 0, "diffs": [], "ratios": []})
            g["cells"] += 1
            g["inside"] += int(d["lo"] <= f["mean"] <= d["hi"])
            g["below" if diff["hi"] < 0 else "above" if diff["lo"] > 0 else "across"] += 1
            g["diffs"].append(diff["mean"])
            sd, sf = res["seeds"].get(f"{key}|dense"), res["seeds"].get(f"{key}|factored")
            if sd and sf and sd[f"{w}_std"] > 0:
                g["ratios"].append(sf[f"{w}_std"] / sd[f"{w}_std"])
    lines = ["| k | damping | cells | factored mean inside dense's interval | paired factored - dense: "
             "interval below 0 / across 0 / above 0 | mean paired difference (min, max) | seed std "
             "ratio factored / dense: median (min, max; cells) |", "|---" * 7 + "|"]
    for (scale, w), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "default")):
        r = g["ratios"]
        ratio = (f"{np.median(r):.1f} ({min(r):.1f}, {max(r):.1f}; {len(r)})" if r else "-")
        label = "member's k" if scale == 1 else f"{scale} x member's k"
        lines.append(f"| {label} | {w} | {g['cells']} | {g['inside']}/{g['cells']} | {g['below']} / "
                     f"{g['across']} / {g['above']} | {np.mean(g['diffs']) * 100:+.1f} "
                     f"({min(g['diffs']) * 100:+.1f}, {max(g['diffs']) * 100:+.1f}) | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/lds_suite", help="run.py's output folder (resumable)")
    ap.add_argument("--mini", action="store_true", help="run.py --mini's members (a smoke run)")
    ap.add_argument("--members", nargs="*", help="default: all, small first")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="projection seeds of both engines at the member's k (default 0 1 2)")
    ap.add_argument("--seed-members", nargs="*", default=["digits128", "patches256"],
                    help="members that get the seeds other than 0 (default digits128 patches256)")
    ap.add_argument("--scale", type=int, default=4, help="also both engines at scale x k (1: skip)")
    ap.add_argument("--scale-seeds", action="store_true",
                    help="the seeds of --seed-members at scale x k too (default: seed 0 there)")
    ap.add_argument("--analyse-only", action="store_true", help="only the tables, from what is on disk")
    args = ap.parse_args(argv)
    if 0 not in args.seeds:
        raise SystemExit(f"--seeds {args.seeds}: include 0 (the default stores, the paired reference)")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = Path(args.out).resolve()
    members, s = (suite.MINI_MEMBERS, suite.MINI_COMMON) if args.mini else (suite.MEMBERS, suite.COMMON)
    order = list(members) if args.mini else ORDER
    unknown = sorted(set(args.members or []) - set(members))
    if unknown:
        raise SystemExit(f"--members {' '.join(unknown)}: unknown; choose from {', '.join(order)}")
    names = [n for n in order if n in (args.members or order)]
    seed_members = names if args.mini else args.seed_members
    if args.analyse_only:
        plans = {n: [{**st, "store": store_config(root / n, members[n], s, st).stem}
                     for st in plan(members[n], args.seeds if n in seed_members else [0], args.scale,
                                    args.scale_seeds)]
                 for n in names if (root / n / "truth").is_dir()}
    else:
        plans = build(root, members, s, names, args.seeds, seed_members, args.scale, args.scale_seeds)
    res = results(root, plans)
    md = markdown(res, members, names) + "\n#### Over all cells (LDS x 100)\n\n" + overview(res, members)
    (root / "engines.json").write_text(json.dumps(res, indent=1))
    (root / "engines.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
