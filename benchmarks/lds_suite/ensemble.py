"""LDS of ensembles ([[model]] lists) of 1, 2 and 4 models of the suite's recipe.

    python benchmarks/lds_suite/run.py --out runs/lds_suite --members digits128 digits1024 --until truth
    python benchmarks/lds_suite/ensemble.py --suite runs/lds_suite --members digits128 digits1024

Needs, per member, what run.py leaves in ``<suite>/<member>``: the base model (recipe seed 0),
the generated queries, the LDS subsets, the retrained models and the truth. Then per member:
train 3 more base models with the built-in recipe at seeds 1, 2, 3 (on the member's whole
training set, like the base model) -> one ensemble store of the 4 models at the default settings
(common noise, rademacher, the member's k; `das extract` + `das reduce`) -> `das score` with the
first 1, 2 and 4 members (configs on the same store: member i is members/m<i> whichever prefix is
scored, so nothing is extracted twice) -> per-query LDS of trak, dtrak and das on the val and gen
queries. Reported: the mean over the report half of the queries (analyse.py's seeded halves)
with a 95 % bootstrap interval, and the paired per-query difference 4 members minus 1.

Resumable (models and per-M results in ``<suite>/<member>/ensemble``, configs
``ensemble<M>.toml`` and the store ``stores/ensemble.zarr`` beside run.py's).
Writes ``<suite>/ensemble.json`` and ``ensemble.md``; --markdown also writes this folder's
ENSEMBLE.md (with --date, --machine).
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
import run as suite  # noqa: E402  (run.py of this folder: MEMBERS, COMMON, write_config, das)

SEEDS = (1, 2, 3)
SIZES = (1, 2, 4)
METHODS = ("trak", "dtrak", "das")


def train_extra(out: Path, m: dict, s: dict, seed: int) -> Path:
    """A base model of the member's recipe at ``seed`` (kept when already trained)."""
    from das_pipeline.data import open_dataset
    from das_pipeline.eval.retrain import RECIPE_FILE, train_recipe
    from das_pipeline.recipe import save_pipeline

    recipe = {**m.get("recipe", s["recipe"]), "seed": seed}
    folder = out / "ensemble" / "models" / f"seed{seed}"
    if (folder / RECIPE_FILE).is_file() and json.loads((folder / RECIPE_FILE).read_text()) == recipe:
        return folder
    train = open_dataset("train", m["train"])
    unet, scheduler, _ = train_recipe(recipe, train.load(0, len(train)), seed)
    save_pipeline(unet, scheduler, folder)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    return folder


def ensemble_config(out: Path, m: dict, s: dict, models: list[Path]) -> Path:
    """run.py's common-noise config of the member (the defaults), with a [[model]] list of
    ``models`` and the ensemble store; written into ``out`` (paths relative to it)."""
    import tomllib

    from das_pipeline.config import dump_toml

    base = suite.write_config(out, m, s, "common")  # common.toml: the suite's default store
    raw = tomllib.loads(base.read_text())
    raw["model"] = [{"path": str(p.relative_to(out))} for p in models]
    raw["store"]["path"] = "stores/ensemble.zarr"
    path = out / f"ensemble{len(models)}.toml"
    path.write_text(dump_toml(raw))
    return path


def lds_of_store(cfg_path: Path, subsets: Path, truth_dir: Path, splits) -> dict:
    """Per split and method: per-query LDS (Q,) of the ensemble's stored (mean) scores."""
    from das_pipeline.config import load_config
    from das_pipeline.eval.lds import lds_per_query, load_subsets, load_truth
    from das_pipeline.eval.sweep import match_queries, subsets_for_truth
    from das_pipeline.store import Store

    cfg = load_config(cfg_path)
    store = Store.open_existing(cfg.store.path)
    subs = load_subsets(subsets)
    uids = Store.open_existing(Path(cfg.store.path) / "members" / "m0")
    out = {}
    for split in splits:
        F, t_uids, rows = load_truth(truth_dir / f"{split}.npz")
        mask = subsets_for_truth(subs.mask_MN, rows)
        q_uids = uids.split(split).uids()
        F = match_queries(t_uids, q_uids, F, len(q_uids), split)
        out[split] = {m: lds_per_query(store.root["scores"][split][m][...], mask, F).tolist()
                      for m in METHODS}
    return out


def summaries(per_M: dict) -> dict:
    """Report-half mean LDS [95% bootstrap] per member, split, method and M, and 4 - 1 paired."""
    from das_pipeline.eval.lds import query_halves, summarize

    table = {}
    for name, by_M in per_M.items():
        for split in by_M[str(SIZES[0])]:
            for method in METHODS:
                lds = {M: np.asarray(by_M[str(M)][split][method]) for M in SIZES}
                _, report = query_halves(len(lds[SIZES[0]]), 0)
                row = {str(M): summarize(lds[M][report]).as_dict() for M in SIZES}
                row["4-1"] = summarize((lds[SIZES[-1]] - lds[SIZES[0]])[report]).as_dict()
                table[f"{name}/{split}/{method}"] = row
    return table


def fmt(s: dict) -> str:
    return f"{s['mean'] * 100:.1f} [{s['lo'] * 100:.1f}, {s['hi'] * 100:.1f}]"


def markdown(table: dict, settings: dict, times: dict) -> str:
    lines = ["| member | queries | method | 1 model | 2 models | 4 models | 4 minus 1 (paired) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, row in table.items():
        name, split, method = key.split("/")
        lines.append(f"| {name} | {split} | {method} | " + " | ".join(fmt(row[str(M)]) for M in SIZES)
                     + f" | {fmt(row['4-1'])} |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), "",
              f"Settings: {json.dumps(settings)}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="runs/lds_suite", help="run.py's --out folder")
    ap.add_argument("--members", nargs="*", default=["digits128", "digits1024"])
    ap.add_argument("--mini", action="store_true", help="run.py --mini's member (a smoke run)")
    ap.add_argument("--markdown", action="store_true", help="write this folder's ENSEMBLE.md")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--machine", default="")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = Path(args.suite).resolve()
    members, s = (suite.MINI_MEMBERS, suite.MINI_COMMON) if args.mini else (suite.MEMBERS, suite.COMMON)
    names = list(members) if args.mini else args.members
    per_M, times = {}, {}
    for name in names:
        m, out = members[name], root / name
        splits = ["val"] + (["gen"] if m["num_generated"] else [])
        needed = [out / "base_model", out / "subsets.npz", *(out / "truth" / f"{x}.npz" for x in splits)]
        if not all(p.exists() for p in needed):
            raise SystemExit(f"{name}: run `python benchmarks/lds_suite/run.py --out {args.suite} "
                             f"--members {name} --until truth` first ({needed[0].parent} lacks "
                             f"some of {[p.name for p in needed]})")
        t0 = time.perf_counter()
        models = [out / "base_model", *(train_extra(out, m, s, seed) for seed in SEEDS)]
        times[f"{name} train 3 models"] = time.perf_counter() - t0
        configs = {M: ensemble_config(out, m, s, models[:M]) for M in SIZES}
        t0 = time.perf_counter()
        suite.das(["extract", str(configs[SIZES[-1]]), "--quiet"])
        suite.das(["reduce", str(configs[SIZES[-1]]), "--quiet"])
        times[f"{name} extract+reduce {SIZES[-1]} members"] = time.perf_counter() - t0
        per_M[name] = {}
        for M in SIZES:
            path = out / "ensemble" / f"lds{M}.json"
            if not path.is_file():
                t0 = time.perf_counter()
                suite.das(["score", str(configs[M]), "--quiet"])
                times[f"{name} score {M}"] = time.perf_counter() - t0
                path.write_text(json.dumps(lds_of_store(configs[M], out / "subsets.npz",
                                                        out / "truth", splits)))
            per_M[name][str(M)] = json.loads(path.read_text())
        print(f"{name}: done", flush=True)
    table = summaries(per_M)
    settings = {"members": {n: members[n] for n in names}, "common": s,
                "extra_seeds": list(SEEDS), "sizes": list(SIZES)}
    md = markdown(table, settings, times)
    (root / "ensemble.json").write_text(json.dumps({"table": table, "per_query": per_M,
                                                    "settings": settings, "times": times}, indent=1))
    (root / "ensemble.md").write_text(md)
    print(md)
    if args.markdown:
        (HERE / "ENSEMBLE.md").write_text(
            f"# LDS of ensembles (1, 2, 4 models of the recipe)\n\nMeasured {args.date} on "
            f"{args.machine or 'this machine'} with\n\n```bash\n"
            f"python benchmarks/lds_suite/ensemble.py --suite {args.suite} --members "
            f"{' '.join(names)} --markdown\n```\n\n"
            "after `python benchmarks/lds_suite/run.py --out runs/lds_suite --members "
            f"{' '.join(names)} --until truth` (the suite's subsets, retrained models and truth). "
            "Each member's ensemble: the suite's base model (recipe seed 0) and 3 more trained "
            "with the same recipe at seeds 1, 2, 3 on the same training set; one [[model]] "
            "store at the default settings (common noise, rademacher, the member's k, damping "
            "0.03 relative, gamma 0); 1, 2, 4 = the first that many members scored from that "
            "store. LDS x 100 on the report half of each query set (the suite's seeded halves), "
            "mean [95% bootstrap interval over queries]; the last column is the per-query "
            "difference 4 models minus 1 on the same queries, with its bootstrap interval.\n\n"
            + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
