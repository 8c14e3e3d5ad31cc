"""DAS variants on the suite's default stores: rescoring only, no new extraction.

    python benchmarks/lds_suite/variants.py --out runs/lds_suite --members digits128 patches256

Needs run.py's ``common_sjlt`` store (the product's defaults: dense engine, sjlt, common noise)
and truth per member. Scores, with run.py's `sweep_store` (the same lambda grid and LDS), the
`eval.sweep.Variant`s on the store's `mean` readout:

- ``das``: gamma 0, residual r (the product's default, ScoreConfig);
- ``das rho``: gamma 0, residual rho (signed mean residual);
- ``das_signed``: gamma 0, residual r, the signed score (not squared);
- ``das g1``: gamma 1, residual r (leave-one-out correction (1 - h_i)^1).

Per (member, split, variant), analyse.py's `cell_summary`: report-half LDS at the `das score`
default damping and at the damping chosen on the selection half, mean [percentile bootstrap 95%
interval], and the variant minus ``das`` paired per report query at each. Resumable (one sweep
file per member, ``sweeps/variants_common_sjlt.json``). Writes ``<out>/variants.json`` and
``variants.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as suite  # noqa: E402  (run.py of this folder: MEMBERS, write_config, sweep_store)
from analyse import cell_summary, fmt  # noqa: E402

from das_pipeline.eval.lds import summarize  # noqa: E402
from das_pipeline.eval.sweep import Variant  # noqa: E402

VARIANTS = {"das": Variant("das", 0.0, "r"), "das rho": Variant("das", 0.0, "rho"),
            "das_signed": Variant("das_signed", 0.0, "r"), "das g1": Variant("das", 1.0, "r")}
REFERENCE = "das"
STORE = "common_sjlt"
ORDER = ("digits128", "patches256", "digits1024", "digits256w64")


def sweep(root: Path, name: str) -> Path:
    """The variants' sweep of one member's default store (kept when already on disk)."""
    m, out = suite.MEMBERS[name], root / name
    cfg = suite.write_config(out, m, suite.COMMON, "common", "sjlt")
    path = out / "sweeps" / f"variants_{STORE}.json"
    if path.is_file():
        return path
    if not suite.store_complete(cfg):
        raise SystemExit(f"{name}: the store of {cfg} is not complete; run `python benchmarks/"
                         f"lds_suite/run.py --out {root} --members {name} --kinds sjlt "
                         "--noise-modes common --no-exact` first")
    splits = ["val"] + (["gen"] if m["num_generated"] else [])
    started = time.perf_counter()
    data = suite.sweep_store(cfg, out / "subsets.npz", out / "truth", splits, [m["dim"]], VARIANTS)
    path.write_text(json.dumps(data))
    print(f"{name}/sweep variants: {time.perf_counter() - started:.1f} s", flush=True)
    return path


def results(root: Path, names) -> dict:
    """{member|split|variant: default, best (report half), best_c, minus das at each}."""
    out = {}
    for name in names:
        path = root / name / "sweeps" / f"variants_{STORE}.json"
        if not path.is_file():
            continue
        for k, by in json.loads(path.read_text()).items():
            sc = by["scales"]["mean"]
            for split, per in by["splits"].items():
                summ = {label: cell_summary(np.asarray(r["lam"]), np.asarray(r["lds"]),
                                            sc | {"default": r["default"]}, suite.CANDIDATES)
                        for label, r in per.items()}
                ref = summ[REFERENCE]
                for label, s in summ.items():
                    row = {"k": int(k), "default": summarize(s["default_report_Q"]).as_dict(),
                           "best": summarize(s["best_report_Q"]).as_dict(), "best_c": s["best_c_trace_k"]}
                    if label != REFERENCE:
                        row["minus_ref"] = {w: summarize(s[f"{w}_report_Q"] - ref[f"{w}_report_Q"]).as_dict()
                                            for w in ("default", "best")}
                    out[f"{name}|{split}|{label}"] = row
    return out


def markdown(res: dict, names) -> str:
    lines = ["| member | k | queries | variant | default damping | best swept (c) | minus das, default "
             "| minus das, best |", "|---" * 8 + "|"]
    for name in names:
        for split in ("val", "gen"):
            for label in VARIANTS:
                row = res.get(f"{name}|{split}|{label}")
                if row is None:
                    continue
                d = row.get("minus_ref")
                lines.append(f"| {name} | {row['k']} | {split} | {label} | {fmt(row['default'])} | "
                             f"{fmt(row['best'])} ({row['best_c']:.2g}) | "
                             + ("- | - |" if d is None else f"{fmt(d['default'])} | {fmt(d['best'])} |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/lds_suite", help="run.py's output folder")
    ap.add_argument("--members", nargs="*", help="default: all, small first")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.members or []) - set(suite.MEMBERS))
    if unknown:
        raise SystemExit(f"--members {' '.join(unknown)}: unknown; choose from {', '.join(ORDER)}")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = Path(args.out).resolve()
    names = [n for n in ORDER if n in (args.members or ORDER)]
    for name in names:
        sweep(root, name)
    res = results(root, names)
    md = markdown(res, names)
    (root / "variants.json").write_text(json.dumps(res, indent=1))
    (root / "variants.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
