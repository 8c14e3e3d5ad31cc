"""LDS suite: the noise-mode and damping-normalisation defaults measured on several benchmark shapes.

    python benchmarks/lds_suite/run.py --out runs/lds_suite [--members digits128 digits1024]
    python benchmarks/lds_suite/run.py --out /tmp/lds_suite_mini --mini      # seconds (smoke)
    python benchmarks/lds_suite/run.py --out runs/lds_suite --ks 10x1 5x2 2x5  # K x S at equal cost
    python benchmarks/lds_suite/run.py --out runs/lds_suite --members digits128 patches256 --jobs 2

Per member (a training set, query sets, a store k): base model -> generated queries (optional)
-> `das lds subsets` -> `das lds train` -> `das lds truth` -> per noise mode (content, common) and
projection kind: `das extract` at the defaults except that setting -> one damping sweep of trak,
dtrak and das over a lambda grid that holds every normalisation's candidate constants. Then:

- best swept: lambda chosen on the selection half of each query set from the `das lds eval
  --sweep` grid (c in 1e-5 .. 1e4, lambda = c trace(G) / k), reported on the report half;
- per normalisation s in {trace/k, trace/min(N,k), median non-zero eigenvalue} one constant c for
  the whole suite, chosen on the selection halves (the c whose worst shortfall against the best
  swept selection-half LDS, over every member, split and method, is smallest), reported on the
  report halves at lambda = c * s.

With --ks K1xS1 K2xS2 ... (one K*S for all cells): per member, one more common-noise store per
cell with `[features] timesteps = K, noise_draws = S` (else the same config as the common store,
which is the suite's own K x 1 cell), swept the same way; ks.json / ks.md hold, per cell, the
report-half LDS at the `das score` default damping and at the best swept damping, and the paired
per-query differences against the first cell.

Exact-kernel reference (exact.py; skipped with --no-exact): per member, the unprojected float64
per-sample gradient features of the common store's config (same model, data, keyed noise and K)
for every row, their kernels, and the same sweep in kernel form (sweeps/exact.json). A member's
"extra_dims" adds common stores at those k (e.g. 8192 > N), swept at that k only; exact_tables.py
writes one table per member against the exact kernel (results.md, "Against the exact kernel").

Members: digits (scikit-learn's 8 x 8 digits) and patches256, RGB 16 x 16 crops of scikit-learn's
two sample photographs (make_patches; train and val from disjoint regions, gen sampled from the
member's base model).

Stages are resumable (models, truth, stores and per-store sweeps are kept in --out). Writes
results.json and results.md into --out; --readme replaces the results section of this folder's
README.md. Reuses benchmarks/lds_digits/run.py for the `das` calls and the base model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _lds_digits():
    """benchmarks/lds_digits/run.py as a module (its `das` wrapper, base model and store check)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lds_digits_run", HERE.parent / "lds_digits" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_digits = _lds_digits()
sys.path.insert(0, str(HERE))
from analyse import (  # noqa: E402
    NORMALISATIONS,
    analyse,
    ks_markdown,
    ks_results,
    markdown,
    scales,
    summary,
)
from exact import exact_kernels, sweep_exact  # noqa: E402
from exact_tables import exact_markdown, exact_results  # noqa: E402

das, store_complete, train_base = _digits.das, _digits.store_complete, _digits.train_base

RECIPE = {"widths": [8, 16], "attention": False, "num_train_timesteps": 1000, "steps": 200,
          "batch_size": 64, "lr": 3e-3, "seed": 0}
MEMBERS = {
    "digits128": {"train": "digits[0:128]", "val": "digits[1500:1564]", "num_generated": 64,
                  "dim": 2048, "eval_dims": [2048, 512], "extra_dims": [8192]},
    "digits1024": {"train": "digits[0:1024]", "val": "digits[1500:1564]", "num_generated": 64,
                   "dim": 1024, "eval_dims": [1024, 512]},
    "digits256w64": {"train": "digits[0:256]", "val": "digits[1500:1564]", "num_generated": 64,
                     "dim": 2048, "eval_dims": [2048], "recipe": {**RECIPE, "widths": [32, 64]},
                     "extra_dims": [8192]},
    # RGB 16x16 patches of scikit-learn's two sample photographs (make_patches); paths are
    # relative to the member's folder
    "patches256": {"train": "data/train.npy", "val": "data/val.npy", "num_generated": 64,
                   "dim": 2048, "eval_dims": [2048, 512], "patches": {"train": 256, "val": 64},
                   "extra_dims": [8192]},
}
COMMON = {"recipe": RECIPE, "gen_seed": 1000, "sample_steps": 100, "num_subsets": 32,
          "truth_timesteps": 100, "timesteps": 10, "batch_size": 64, "rows_per_unit": 64}
MINI_MEMBERS = {
    "mini40": {"train": "digits[0:40]", "val": "digits[1500:1510]", "num_generated": 6,
               "dim": 64, "eval_dims": [64, 16], "extra_dims": [128]},
    "minipatch": {"train": "data/train.npy", "val": "data/val.npy", "num_generated": 6,
                  "dim": 64, "eval_dims": [64], "patches": {"train": 24, "val": 8}},
}
MINI_COMMON = {"recipe": {**RECIPE, "num_train_timesteps": 100, "steps": 15, "batch_size": 32},
               "gen_seed": 1000, "sample_steps": 10, "num_subsets": 8, "truth_timesteps": 10,
               "timesteps": 2, "batch_size": 25, "rows_per_unit": 20}

NOISE_MODES = ("content", "common")
METHODS = ("trak", "dtrak", "das")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
EXACT_BEGIN, EXACT_END = "<!-- exact:begin -->", "<!-- exact:end -->"
CANDIDATES = tuple(float(c) for c in 10.0 ** (np.arange(-20, 13) / 4))  # 1e-5 .. 1e3, quarter decades


def ks_name(ks: tuple[int, int] | None, s: dict) -> str:
    """Store-name suffix of a K x S cell ("" for the suite's own K x 1)."""
    return "" if ks is None or tuple(ks) == (s["timesteps"], 1) else f"_k{ks[0]}s{ks[1]}"


def parse_ks(cells: list[str]) -> list[tuple[int, int]]:
    """["10x1", "5x2"] -> [(10, 1), (5, 2)]; every cell must have the same K*S (equal cost)."""
    out = []
    for c in cells:
        k, _, s = c.lower().partition("x")
        if not (k.isdigit() and s.isdigit() and int(k) >= 1 and int(s) >= 1):
            raise SystemExit(f"--ks {c}: expected KxS with positive integers, e.g. 5x2")
        out.append((int(k), int(s)))
    if len({k * s for k, s in out}) > 1:
        raise SystemExit(f"--ks {' '.join(cells)}: the cells must share one K*S (equal cost)")
    return out


def make_patches(folder: Path, num_train: int, num_val: int, size: int = 16, downscale: int = 2,
                 seed: int = 0) -> None:
    """train.npy / val.npy (n, 3, size, size) uint8: random crops of scikit-learn's two sample
    photographs (china.jpg, flower.jpg, 427 x 640 RGB) downscaled by ``downscale``, half of each
    set from each photograph. Train crops lie in the left 5/8 of a photograph, validation crops in
    its right 5/16 (disjoint regions, a gap between). Seeded; the same arrays on every run."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if (folder / "train.npy").is_file() and (folder / "val.npy").is_file():
        return
    rng = np.random.default_rng(seed)
    sets = {"train": [], "val": []}
    for photo in load_sample_images().images:
        h, w = photo.shape[0] // downscale, photo.shape[1] // downscale
        small = np.asarray(Image.fromarray(photo).resize((w, h), Image.BOX))
        regions = {"train": (0, w * 5 // 8), "val": (w * 11 // 16, w)}
        for name, num in (("train", num_train), ("val", num_val)):
            lo, hi = regions[name]
            for _ in range(num // 2):
                y, x = rng.integers(0, h - size + 1), rng.integers(lo, hi - size + 1)
                sets[name].append(small[y:y + size, x:x + size].transpose(2, 0, 1))
    folder.mkdir(parents=True, exist_ok=True)
    for name, crops in sets.items():
        np.save(folder / f"{name}.npy", np.stack(crops).astype(np.uint8))


def write_config(folder: Path, m: dict, s: dict, noise: str, kind: str = "rademacher",
                 ks: tuple[int, int] | None = None, dim: int | None = None, engine: str = "dense",
                 seed: int = 0) -> Path:
    """examples/digits.toml with this member's data and k, at the defaults except noise and kind
    (and, with ks = (K, S), [features] timesteps = K, noise_draws = S; with dim, that k; with
    engine, that [projection] engine; with seed, that projection seed).

    Store names: noise, then "_<kind>" for a dense kind other than rademacher or "_factored" for
    the factored engine (its kind is rademacher), the K x S suffix, "_dim<k>" off the member's k,
    "_seed<s>" off seed 0 (e.g. common_sjlt, common_factored_seed1, common_factored_dim8192).
    """
    import tomllib

    from das_pipeline.config import dump_toml, merge

    if engine == "factored" and kind != "rademacher":
        raise ValueError(f"write_config: engine = factored with kind = {kind!r}; the suite's "
                         "factored stores are rademacher")
    dim = dim or m["dim"]
    tag = "_factored" if engine == "factored" else ("" if kind == "rademacher" else f"_{kind}")
    name = (f"{noise}{tag}" + ks_name(ks, s) + ("" if dim == m["dim"] else f"_dim{dim}")
            + ("" if seed == 0 else f"_seed{seed}"))
    K, S = ks if ks is not None else (s["timesteps"], 1)
    raw = tomllib.loads((HERE.parents[1] / "examples" / "digits.toml").read_text())
    queries = {"val": m["val"], **({"gen": "gen_png"} if m["num_generated"] else {})}
    raw["data"]["queries"] = queries
    raw["model"]["path"] = "base_model"
    raw = merge(raw, {
        "data": {"train": m["train"]},
        "features": {"timesteps": K, "noise_draws": S, "noise": noise, "batch_size": s["batch_size"]},
        "projection": {"dim": dim, "kind": kind, "seed": seed,
                       **({"engine": engine} if engine != "dense" else {})},
        "store": {"path": f"stores/{name}.zarr", "rows_per_unit": s["rows_per_unit"]}})
    path = folder / f"{name}.toml"
    path.write_text(dump_toml(raw))
    return path


def collisions(train_feats, residual_N, query_feats, fac, variant, lams) -> list[float]:
    """Fraction of queries whose top-1 proponent is the training row of the same index, per lambda."""
    import torch

    from das_pipeline.scoring import attribution

    r = variant.base_readout
    vecs = fac.eigvecs_KK.numpy()
    cq_QR, ct_NR = query_feats[r] @ vecs, train_feats[r] @ vecs
    Q, N = cq_QR.shape[0], ct_NR.shape[0]
    same = np.arange(Q) < N
    out = []
    for lam in lams:
        base_QN = (cq_QR / (fac.eigvals_K.numpy() + lam)) @ ct_NR.T
        s = attribution(variant.method, torch.from_numpy(base_QN),
                        torch.from_numpy(residual_N)[None, :]).numpy()
        out.append(float(np.mean(np.argmax(s, 1)[same] == np.arange(Q)[same])) if same.any() else 0.0)
    return out


def sweep_store(cfg_path: Path, subsets: Path, truth_dir: Path, splits, dims, variants=None) -> dict:
    """Per k and split: per-query LDS (C, Q) of trak, dtrak, das at every lambda of the union grid.

    The grid is the `das lds eval --sweep` grid (relative to trace/k) plus every normalisation's
    candidate constants, all expressed as lambdas of this store's factor. ``variants`` (label ->
    eval.sweep.Variant) replaces the default {trak, dtrak, das (gamma 0, residual r)}; results
    are keyed by label.
    """
    from das_pipeline.config import ScoreConfig, load_config
    from das_pipeline.eval.lds import lds_from_predictions, load_subsets, load_truth
    from das_pipeline.eval.sweep import (
        DEFAULT_GRID,
        Variant,
        match_queries,
        read_split,
        store_factor,
        subsets_for_truth,
        sweep_predictions,
    )
    from das_pipeline.fingerprint import open_store

    cfg = load_config(cfg_path)
    store = open_store(cfg)
    subs = load_subsets(subsets)
    if variants is None:
        variants = {"trak": Variant("trak"), "dtrak": Variant("dtrak"), "das": Variant("das", 0.0, "r")}
    needed = list(dict.fromkeys(v.base_readout for v in variants.values()))
    train = store.split("train")
    out = {}
    for k in dims:
        tr, res, rho, _ = read_split(store, "train", needed, k)
        facs = {r: store_factor(store, r, tr[r], train.dim) for r in needed}
        sc = {r: scales(facs[r], tr[r].shape[0]) for r in needed}
        by = {"scales": sc, "splits": {}}
        for split in splits:
            F, t_uids, rows = load_truth(truth_dir / f"{split}.npz")
            mask = subsets_for_truth(subs.mask_MN, rows)
            qf, _, _, q_uids = read_split(store, split, needed, k)
            F = match_queries(t_uids, q_uids, F, len(q_uids), split)
            res_split = {}
            for label, v in variants.items():
                r = v.base_readout
                lam_per_k = sc[r]["trace/k"]
                default = facs[r].damping(ScoreConfig.damping, ScoreConfig.damping_absolute)
                lams = np.asarray(sorted({g * lam_per_k for g in DEFAULT_GRID} | {default}
                                         | {c * sc[r][n] for n in NORMALISATIONS for c in CANDIDATES}))
                # sweep_predictions takes damping relative to the library's own unit (Factor.damping)
                rel = lams / facs[r].damping(1.0)
                pred = sweep_predictions(tr, res, rho, qf, {r: facs[r]}, rel, [v], mask)[v.name]
                lds_CQ = np.stack([lds_from_predictions(pred[c], F) for c in range(len(rel))])
                res_split[label] = {"lam": lams.tolist(), "lds": lds_CQ.tolist(), "default": default,
                                       "collisions": collisions(tr, res, qf, facs[r], v,
                                                                np.asarray(DEFAULT_GRID) * lam_per_k)}
            by["splits"][split] = res_split
        out[str(k)] = by
    return out


def stage_timer(times_path: Path, keep_first: bool = False):
    """``stage(key, fn, *args)``: runs ``fn(*args)``, prints the elapsed time and records it under
    ``key`` in the JSON file ``times_path`` (kept across resumed runs: a key's time is replaced
    only by a run that took over a second, i.e. did the work; with ``keep_first`` never).
    ``stage.times`` is the dict."""
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    t0 = time.perf_counter()

    def stage(key, fn, *a):
        started = time.perf_counter()
        result = fn(*a)
        took = time.perf_counter() - started
        if key not in times or (took > 1.0 and not keep_first):
            times[key] = took
        times_path.write_text(json.dumps(times, indent=1))
        print(f"[{time.perf_counter() - t0:7.1f} s] {key}: {took:.1f} s", flush=True)
        return result

    stage.times = times
    return stage


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/lds_suite", help="output folder (resumable)")
    ap.add_argument("--mini", action="store_true", help="a seconds-long smoke run")
    ap.add_argument("--members", nargs="*", help="members to run (default: all)")
    ap.add_argument("--kinds", nargs="*", default=["rademacher"], help="projection kinds")
    ap.add_argument("--ks", nargs="*", default=[], metavar="KxS",
                    help="K timesteps x S noise draws cells at one K*S (common noise, rademacher, "
                         "else defaults), e.g. 10x1 5x2 2x5; the suite's own K x 1 is the common store")
    ap.add_argument("--noise-modes", nargs="+", choices=NOISE_MODES, default=list(NOISE_MODES),
                    help="noise modes of the rademacher stores (default: content common)")
    ap.add_argument("--jobs", type=int, default=1, help="retraining processes (default 1)")
    ap.add_argument("--until", choices=["train", "truth", "extract", "sweep"], default="sweep")
    ap.add_argument("--no-exact", dest="exact", action="store_false",
                    help="skip the exact-kernel reference (unprojected float64 features)")
    ap.add_argument("--readme", nargs="?", const="all", choices=["all", "exact"],
                    help="rewrite the README's results section and its exact-kernel section "
                         "(all), or only the latter (exact: members not rerun keep their results)")
    args = ap.parse_args(argv)
    import torch

    from das_pipeline.eval.counterfactual import generate_queries

    members, s = (MINI_MEMBERS, MINI_COMMON) if args.mini else (MEMBERS, COMMON)
    ks_cells = parse_ks(args.ks)
    names = args.members or list(members)
    root = Path(args.out).resolve()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root.mkdir(parents=True, exist_ok=True)
    stage = stage_timer(root / "times.json")
    times = stage.times

    q = ["--quiet"]
    for name in names:
        m = members[name]
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        if "patches" in m:
            stage(f"{name}/make patches", make_patches, out / "data", m["patches"]["train"],
                  m["patches"]["val"])
        stage(f"{name}/train base model", train_base, out,
              {"train": str(out / m["train"]) if "patches" in m else m["train"],
               "recipe": m.get("recipe", s["recipe"])})
        splits = ["val"] + (["gen"] if m["num_generated"] else [])
        if m["num_generated"] and not (out / "gen_png" / "generation.json").is_file():
            seeds = list(range(s["gen_seed"], s["gen_seed"] + m["num_generated"]))
            stage(f"{name}/generate queries", generate_queries, out / "base_model", out / "gen_png",
                  seeds, s["sample_steps"])
        base_cfg = write_config(out, m, s, "content")
        subsets, models, truth = out / "subsets.npz", out / "models", out / "truth"
        stage(f"{name}/lds subsets", das, ["lds", "subsets", str(base_cfg), "--num",
                                           str(s["num_subsets"]), "--out", str(subsets), *q])
        stage(f"{name}/lds train", das, ["lds", "train", str(base_cfg), "--subsets", str(subsets),
                                         "--out", str(models), "--jobs", str(args.jobs), *q])
        if args.until == "train":
            continue
        newest = max(p.stat().st_mtime for p in models.glob("*/das_subset.json"))
        if not all((truth / f"{x}.npz").is_file() and (truth / f"{x}.npz").stat().st_mtime > newest
                   for x in splits):
            stage(f"{name}/lds truth", das, ["lds", "truth", str(base_cfg), "--subsets", str(subsets),
                                             "--models", str(models), "--out", str(truth),
                                             "--timesteps", str(s["truth_timesteps"]), *q])
        if args.until == "truth":
            continue
        jobs = [(write_config(out, m, s, noise, kind), m["eval_dims"] if kind != "sjlt" else [m["dim"]])
                for kind in args.kinds
                for noise in (args.noise_modes if kind == "rademacher" else ("common",))]
        # K x S at equal cost: common noise, rademacher, the member's k (10 x 1 is the common store)
        jobs += [(write_config(out, m, s, "common", ks=ks), m["eval_dims"]) for ks in ks_cells
                 if ks_name(ks, s)]
        # a larger k than the member's (N < k), against the exact kernel: swept at that k only
        jobs += [(write_config(out, m, s, "common", dim=d), [d]) for d in m.get("extra_dims", [])]
        for cfg, dims in jobs:  # extract each store unless complete, then sweep it once
            if not store_complete(cfg):
                stage(f"{name}/extract {cfg.stem}", das, ["extract", str(cfg), *q])
            path = out / "sweeps" / f"{cfg.stem}.json"
            if args.until == "extract" or path.is_file():
                continue
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(stage(f"{name}/sweep {cfg.stem}", sweep_store, cfg, subsets,
                                             truth, splits, dims)))
        exact_sweep = out / "sweeps" / "exact.json"
        if args.exact and args.until == "sweep" and not exact_sweep.is_file():
            # the exact kernel of the common store's features (same noise, K, model, data)
            (out / "exact").mkdir(exist_ok=True)
            kern = stage(f"{name}/exact kernels", exact_kernels, write_config(out, m, s, "common"),
                         out / "exact" / "common.npz")
            exact_sweep.write_text(json.dumps(stage(f"{name}/sweep exact", sweep_exact, kern, subsets,
                                                    truth, splits)))
    if args.until != "sweep":
        return 0
    results = analyse(root, members, names, args.kinds, CANDIDATES)
    results["settings"] = {"members": {n: members[n] for n in names}, "common": s,
                           "candidates": list(CANDIDATES)}
    results["times"] = times
    md = markdown(results, results["settings"])
    results["exact"] = exact_results(root, members, names)
    exact_md = exact_markdown(results["exact"], members)
    if results["exact"]:
        md += "\n### Against the exact kernel, per benchmark\n\n" + exact_md
    if ks_cells:
        stores = {f"{k}x{s_}": "common" + ks_name((k, s_), s) for k, s_ in ks_cells}
        results["ks"] = ks_results(root, names, stores, CANDIDATES)
        ks_md = ks_markdown(results["ks"], results["settings"])
        (root / "ks.json").write_text(json.dumps(results["ks"], indent=1))
        (root / "ks.md").write_text(ks_md)
        md += "\n### K x S at equal cost\n\n" + ks_md
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "results.md").write_text(md)
    print(md)
    if args.readme:
        readme = HERE / "README.md"
        text = readme.read_text()
        rerun = ("Summary of the members run with this command (columns as in Results):\n\n"
                 + "\n".join(summary(results, results["settings"])) + "\n\n")
        blocks = [(EXACT_BEGIN, EXACT_END, rerun + exact_md)]
        if args.readme == "all":
            blocks.append((BEGIN, END, md.split("\n### Against the exact kernel")[0]))
        for b, e, body in blocks:
            begin, end = text.index(b) + len(b), text.index(e)
            text = text[:begin] + "\n" + body + text[end:]
        readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
