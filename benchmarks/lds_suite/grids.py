"""Timestep grids at equal cost: `uniform` (t_j = j (T // K), the default) against `centered`
(t_j = floor((j + 1/2) T / K)) on one member of the LDS suite.

    python benchmarks/lds_suite/grids.py --member runs/lds_suite/digits128

Needs a member folder that `run.py` has finished (common.toml, subsets.npz, truth/). Writes
common_centered.toml beside common.toml (the same settings but `[features] timestep_grid`),
extracts its store, and for both stores runs `das score` + `das lds eval` at the default damping
and `das lds eval --sweep` over the sweep grid (the best damping chosen on the selection half).
Every figure is on the report half of the queries (the sweep's seeded halves), mean LDS x 100
[bootstrap 95% interval]; "centered - uniform" is the paired per-query difference at the default
damping. Writes <member>/grids.json and grids.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import das  # noqa: E402

METHODS = ("trak", "dtrak", "das")


def centered_config(member: Path) -> Path:
    """common.toml with timestep_grid = "centered" and its own store."""
    import tomllib

    from das_pipeline.config import dump_toml

    raw = tomllib.loads((member / "common.toml").read_text())
    raw["features"]["timestep_grid"] = "centered"
    raw["store"]["path"] = "stores/common_centered.zarr"
    path = member / "common_centered.toml"
    path.write_text(dump_toml(raw))
    return path


def evaluate(cfg: Path, member: Path, splits) -> dict:
    """Per split: per-query LDS at the default damping, and the sweep's best (report half)."""
    q = ["--quiet"]
    das(["extract", str(cfg), *q])
    das(["reduce", str(cfg), *q])
    das(["score", str(cfg), *q])
    out = {}
    for split in splits:
        common = ["--subsets", str(member / "subsets.npz"), "--truth", str(member / "truth" / f"{split}.npz")]
        default = member / f"{cfg.stem}_{split}_default.json"
        sweep = member / f"{cfg.stem}_{split}_sweep.json"
        das(["lds", "eval", str(cfg), *common, "--json", str(default), *q])
        das(["lds", "eval", str(cfg), *common, "--sweep", *[a for m in METHODS for a in ("--method", m)],
             "--gamma", "0", "--residual", "r", "--json", str(sweep), *q])
        d, s = json.loads(default.read_text())[split], json.loads(sweep.read_text())[split]
        by = next(iter(s["by_k"].values()))
        out[split] = {"report": s["report"],
                      **{m: {"per_query": d[m]["per_query"],
                             "best": by[m if m != "das" else "das g0 r"]["report"],
                             "chosen": by[m if m != "das" else "das g0 r"]["chosen"]} for m in METHODS}}
    return out


def main(argv=None) -> int:
    from das_pipeline.eval.lds import summarize

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--member", required=True, help="a finished suite member folder")
    ap.add_argument("--splits", nargs="*", default=["val", "gen"])
    args = ap.parse_args(argv)
    member = Path(args.member).resolve()
    res = {"uniform": evaluate(member / "common.toml", member, args.splits),
           "centered": evaluate(centered_config(member), member, args.splits)}

    def f(x):
        return f"{100 * x['mean']:.1f} [{100 * x['lo']:.1f}, {100 * x['hi']:.1f}]"

    lines = [f"{member.name}: uniform vs centered timestep grid (K = 10; LDS x 100, report half)", "",
             "| queries | method | uniform default | centered default | centered - uniform (paired) "
             "| uniform best (c) | centered best (c) |", "|---|---|---|---|---|---|---|"]
    for split in args.splits:
        report = np.asarray(res["uniform"][split]["report"])
        for m in METHODS:
            u, c = res["uniform"][split][m], res["centered"][split][m]
            pu, pc = (np.asarray(x["per_query"], dtype=np.float64)[report] for x in (u, c))
            lines.append(f"| {split} | {m} | {f(summarize(pu).as_dict())} | {f(summarize(pc).as_dict())} | "
                         f"{f(summarize(pc - pu).as_dict())} | {f(u['best'])} ({u['chosen']:.2g}) | "
                         f"{f(c['best'])} ({c['chosen']:.2g}) |")
    md = "\n".join(lines) + "\n"
    (member / "grids.json").write_text(json.dumps(res, indent=1))
    (member / "grids.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
