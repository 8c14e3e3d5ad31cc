"""LDS benchmark: the tiny DDPM on scikit-learn digits, end to end, through the `das` commands.

    python benchmarks/lds_digits/run.py --out runs/lds_digits [--jobs 2] [--readme]   # ~1 h, 2 cores
    python benchmarks/lds_digits/run.py --out /tmp/lds_mini --mini                     # ~1 min (CI)

Stages (each timed): base model -> generated queries -> `das lds subsets` -> `das lds train`
-> `das lds truth` -> `das extract` of four stores (K in {10, 50} x per-timestep normalisation
off/on, k = 8192 with all three readouts) -> `das lds eval --sweep` at k in {512, 2048, 8192}
(damping chosen on one half of each query set, reported on the other) -> pixel/random baselines
-> defaults chosen on the selection halves -> `das score` with them -> `das counterfactual`
-> plot. Writes results.json, table.md, lds.png and counterfactual/picture.png into --out;
--readme replaces the results section of benchmarks/lds_digits/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

FULL = {
    "train": "digits[0:300]", "val": "digits[1500:1564]", "num_generated": 64, "gen_seed": 1000,
    "recipe": {"widths": [8, 16], "attention": False, "num_train_timesteps": 1000, "steps": 200,
               "batch_size": 64, "lr": 3e-3, "seed": 0},
    "sample_steps": 250, "num_subsets": 64, "truth_timesteps": 100,
    "timesteps": [10, 50], "dims": [512, 2048, 8192], "batch_size": 64, "rows_per_unit": 64,
    "cf_queries": [0, 1, 2], "cf_fraction": 0.1,
}
# The CI miniature: small, yet with enough subsets (32) and queries (20) that the LDS of `das`
# on val is clearly above random (tests/test_lds_pipeline.py asserts it with a margin).
MINI = {
    "train": "digits[0:40]", "val": "digits[1500:1520]", "num_generated": 20, "gen_seed": 1000,
    "recipe": {"widths": [8, 16], "attention": False, "num_train_timesteps": 100, "steps": 40,
               "batch_size": 32, "lr": 3e-3, "seed": 0},
    "sample_steps": 20, "num_subsets": 32, "truth_timesteps": 10,
    "timesteps": [2, 4], "dims": [16, 32, 64], "batch_size": 25, "rows_per_unit": 20,
    "cf_queries": [0], "cf_fraction": 0.1,
}

SPLITS = ("val", "gen")
BASELINES = ("pixel_neg_l2", "pixel_cosine", "random")


def das(argv: list[str]) -> None:
    from das_pipeline.cli import main

    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"`das {' '.join(argv)}` failed with exit code {rc}")


def write_config(out: Path, s: dict, K: int, normalize: bool, damping=0.01, gamma=1.0,
                 residual="r", dim: int | None = None) -> Path:
    """examples/digits.toml with this benchmark's data, K, normalisation, k and score settings."""
    import tomllib

    from das_pipeline.config import dump_toml, merge

    store = f"K{K}_{'norm' if normalize else 'raw'}" + (f"_k{dim}" if dim else "")
    raw = tomllib.loads((HERE.parents[1] / "examples" / "digits.toml").read_text())
    raw["data"]["queries"] = {"val": s["val"], "gen": "gen_png"}
    raw = merge(raw, {
        "data": {"train": s["train"]},
        "features": {"timesteps": K, "normalize": normalize, "batch_size": s["batch_size"]},
        # rademacher: its smaller k are prefixes of the largest (`das lds eval --k`); sjlt's are not
        "projection": {"dim": dim or max(s["dims"]), "kind": "rademacher"},
        "store": {"path": f"stores/{store}.zarr", "rows_per_unit": s["rows_per_unit"]},
        "score": {"damping": damping, "gamma": gamma, "residual": residual}})
    path = out / f"{store}.toml"
    path.write_text(dump_toml(raw))
    return path


def store_complete(cfg_path: Path) -> bool:
    """True when every split of the config's store is fully extracted (extract would do nothing)."""
    from das_pipeline.config import load_config
    from das_pipeline.store import Store, StoreError

    cfg = load_config(cfg_path)
    try:
        store = Store.open_existing(cfg.store.path)
        return all(len(store.split(n).done_units()) == store.split(n).num_units
                   for n in ("train", *cfg.data.queries))
    except StoreError:
        return False


def train_base(out: Path, s: dict) -> None:
    from das_pipeline.data import open_dataset
    from das_pipeline.eval.retrain import RECIPE_FILE, train_recipe
    from das_pipeline.recipe import save_pipeline

    folder = out / "base_model"
    if (folder / RECIPE_FILE).is_file() and json.loads((folder / RECIPE_FILE).read_text()) == s["recipe"]:
        return
    train = open_dataset("train", s["train"])
    unet, scheduler, _ = train_recipe(s["recipe"], train.load(0, len(train)), s["recipe"]["seed"])
    save_pipeline(unet, scheduler, folder)
    (folder / RECIPE_FILE).write_text(json.dumps(s["recipe"]))


def baselines(cfg_path: Path, subsets: Path, truth_dir: Path, halves: dict) -> dict:
    """LDS of pixel-space similarity and random scores on each split's report half."""
    from das_pipeline.config import load_config
    from das_pipeline.data import open_dataset
    from das_pipeline.eval.baselines import baseline_scores
    from das_pipeline.eval.lds import lds_per_query, load_subsets, load_truth, summarize

    cfg = load_config(cfg_path)
    train = open_dataset("train", cfg.data.train)
    x_train = train.load(0, len(train)).numpy()
    mask = load_subsets(subsets).mask_MN
    out = {}
    for split in SPLITS:
        qs = open_dataset(split, cfg.data.queries[split])
        F, _, rows = load_truth(truth_dir / f"{split}.npz")
        report = np.asarray(halves[split]["report"])
        for kind in BASELINES:
            lds = lds_per_query(baseline_scores(kind, qs.load(0, len(qs)).numpy(), x_train), mask[rows], F)
            out.setdefault(split, {})[kind] = summarize(lds[report]).as_dict()
    return out


def choose_defaults(sweeps: dict, dims, timesteps) -> dict:
    """Best (variant, normalisation) and relative damping by the mean selection-half LDS.

    The selection curves are averaged over both query sets, every k and every K (so one default
    serves them all); the report halves never enter the choice.
    """
    curves = {}
    for (_K, norm), by_split in sweeps.items():
        for res in by_split.values():
            for per in res["by_k"].values():
                for v, r in per.items():
                    curves.setdefault((v, norm), []).append(r["select_curve"])
    mean_curve = {key: np.mean(np.asarray(c), axis=0) for key, c in curves.items()}
    grid = next(iter(next(iter(sweeps.values())).values()))["by_k"]
    grid = next(iter(next(iter(grid.values())).values()))["grid"]
    ranking = sorted(mean_curve, key=lambda key: -mean_curve[key].max())
    best = {}
    for key in ranking:
        v, norm = key
        method = v.split()[0]
        if method not in best:
            best[method] = {"variant": v, "normalize": norm,
                            "damping": grid[int(np.argmax(mean_curve[key]))],
                            "select_lds": float(mean_curve[key].max())}
    return {"per_method": best, "ranking": [
        {"variant": v, "normalize": n, "select_lds": float(mean_curve[(v, n)].max()),
         "damping": grid[int(np.argmax(mean_curve[(v, n)]))]} for v, n in ranking]}


def table(results: dict, s: dict) -> str:
    cols = [(K, k) for K in s["timesteps"] for k in s["dims"]]
    head = "| method | norm | " + " | ".join(f"K={K} k={k}" for K, k in cols) + " |"
    sep = "|" + "---|" * (len(cols) + 2)
    lines = []
    for split in SPLITS:
        n_rep = len(results["halves"][split]["report"])
        n_sel = len(results["halves"][split]["select"])
        lines += [f"**{split}** queries: LDS x 100 on the {n_rep} report queries, mean [bootstrap "
                  f"95% interval]; damping chosen per cell on the other {n_sel}.", "", head, sep]
        variants = list(next(iter(results["sweeps"].values()))[split]["by_k"][str(s["dims"][0])])
        for v in variants:
            for norm in (False, True):
                cells = []
                for K, k in cols:
                    r = results["sweeps"][f"K{K}_{'norm' if norm else 'raw'}"][split]["by_k"][str(k)][v]
                    rep = r["report"]
                    cells.append(f"{rep['mean'] * 100:.1f} [{rep['lo'] * 100:.1f}, {rep['hi'] * 100:.1f}]")
                lines.append(f"| {v} | {'on' if norm else 'off'} | " + " | ".join(cells) + " |")
        for kind in BASELINES:
            rep = results["baselines"][split][kind]
            cell = f"{rep['mean'] * 100:.1f} [{rep['lo'] * 100:.1f}, {rep['hi'] * 100:.1f}]"
            lines.append(f"| {kind} | - | {cell} | " + " | ".join(["(same)"] * (len(cols) - 1)) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/lds_digits", help="output folder (resumable)")
    ap.add_argument("--mini", action="store_true", help="the one-minute CI miniature")
    ap.add_argument("--jobs", type=int, default=2, help="retraining processes (default 2)")
    ap.add_argument("--readme", action="store_true", help="rewrite the README's results section")
    args = ap.parse_args(argv)
    import torch
    from plot import plot_lds

    from das_pipeline.eval.counterfactual import generate_queries

    s = MINI if args.mini else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    times: dict[str, float] = {}
    # A rerun reuses finished stages; their wall time is the one measured when they ran.
    previous = out / "results.json"
    prev_times = json.loads(previous.read_text()).get("times", {}) if previous.is_file() else {}
    reused: list[str] = []
    t0 = time.perf_counter()

    def stage(name, fn, *a, reuse=False):
        started = time.perf_counter()
        result = fn(*a) if fn else None
        took = time.perf_counter() - started
        if reuse and name in prev_times:
            times[name] = prev_times[name]
            reused.append(name)
        else:
            times[name] = times.get(name, 0.0) + took
        print(f"[{time.perf_counter() - t0:7.1f} s] {name}: {took:.1f} s{' (reused)' if reuse else ''}",
              flush=True)
        return result

    q = ["--quiet"]
    stamp = out / "base_model" / "das_recipe.json"
    stage("train base model", train_base, out, s,
          reuse=stamp.is_file() and json.loads(stamp.read_text()) == s["recipe"])
    seeds = list(range(s["gen_seed"], s["gen_seed"] + s["num_generated"]))
    done = (out / "gen_png" / "generation.json").is_file()
    stage("generate queries", None if done else generate_queries, out / "base_model", out / "gen_png",
          seeds, s["sample_steps"], reuse=done)
    base_cfg = write_config(out, s, s["timesteps"][0], False)
    subsets, models, truth = out / "subsets.npz", out / "models", out / "truth"
    stage("lds subsets", das, ["lds", "subsets", str(base_cfg), "--num", str(s["num_subsets"]),
                               "--out", str(subsets), *q])
    markers = sorted(models.glob("*/das_subset.json"))
    stage("lds train", das, ["lds", "train", str(base_cfg), "--subsets", str(subsets), "--out",
                             str(models), "--jobs", str(args.jobs), *q],
          reuse=len(markers) == s["num_subsets"])
    markers = sorted(models.glob("*/das_subset.json"))
    newest = max(p.stat().st_mtime for p in markers)
    done = all((truth / f"{x}.npz").is_file() and (truth / f"{x}.npz").stat().st_mtime > newest
               for x in SPLITS)
    stage("lds truth", None if done else das, ["lds", "truth", str(base_cfg), "--subsets", str(subsets),
                                               "--models", str(models), "--out", str(truth),
                                               "--timesteps", str(s["truth_timesteps"]), *q], reuse=done)
    sweeps = {}
    for K in s["timesteps"]:
        for norm in (False, True):
            cfg = write_config(out, s, K, norm)
            stage(f"extract K={K} norm={'on' if norm else 'off'}", das, ["extract", str(cfg), *q],
                  reuse=store_complete(cfg))
            report = out / "sweeps" / f"{cfg.stem}.json"
            stage("lds eval --sweep", das, ["lds", "eval", str(cfg), "--subsets", str(subsets),
                                            "--truth", str(truth), "--sweep", "--json", str(report),
                                            *sum((["--k", str(k)] for k in s["dims"]), []), *q])
            sweeps[(K, norm)] = json.loads(report.read_text())
    halves = {split: {"select": sweeps[(s["timesteps"][0], False)][split]["select"],
                      "report": sweeps[(s["timesteps"][0], False)][split]["report"]} for split in SPLITS}
    base_lds = stage("baselines", baselines, base_cfg, subsets, truth, halves)
    defaults = choose_defaults(sweeps, s["dims"], s["timesteps"])
    d = defaults["per_method"]["das"]
    gamma, residual = float(d["variant"].split()[1][1:]), d["variant"].split()[2]
    # A store at the middle k for `das reduce` + `das score`: its eigendecomposition is cheap.
    score_cfg = write_config(out, s, s["timesteps"][0], d["normalize"], d["damping"], gamma, residual,
                             dim=s["dims"][len(s["dims"]) // 2])
    stage("extract + reduce + score (defaults)", das, ["run", str(score_cfg), *q])
    cache = out / "counterfactual" / "cache"
    cached = set(cache.glob("*.npz")) if cache.is_dir() else set()
    stage("counterfactual", das, ["counterfactual", str(score_cfg), "--query-set", "gen", "--queries",
                                  *map(str, s["cf_queries"]), "--method", "das", "--method", "dtrak",
                                  "--method", "trak", "--fraction", str(s["cf_fraction"]), "--out",
                                  str(out / "counterfactual"), "--jobs", str(args.jobs), *q],
          reuse=bool(cached) and set(cache.glob("*.npz")) == cached)
    results = {"settings": s, "halves": halves, "baselines": base_lds, "defaults": defaults,
               "sweeps": {f"K{K}_{'norm' if n else 'raw'}": v for (K, n), v in sweeps.items()},
               "counterfactual": json.loads((out / "counterfactual" / "results.json").read_text())}
    stage("plot", plot_lds, results, s, out / "lds.png")
    times["total"] = sum(times.values())
    results["times"] = times
    results["reused_stage_times"] = reused
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = table(results, s)
    (out / "table.md").write_text(md)
    print(md)
    print("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    if args.readme:
        import shutil

        from report import update_readme

        shutil.copyfile(out / "lds.png", HERE / "lds.png")
        shutil.copyfile(out / "counterfactual" / "picture.png", HERE / "counterfactual.png")
        update_readme(HERE / "README.md", results, md, s)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
