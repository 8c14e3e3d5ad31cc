"""`das lds {subsets,train,truth,eval}` and `das counterfactual`: thin wrappers over the eval modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, EvalError


def _config(path, command: str | None = None):
    """Load the config; with ``command`` (one that needs one model) refuse an ensemble."""
    from ..config import load_config
    from ..ensemble import refuse_ensemble

    cfg = load_config(path)
    if command is not None:
        refuse_ensemble(cfg, command)
    return cfg


def cmd_subsets(args) -> int:
    from ..data import open_dataset
    from ..fingerprint import data_options
    from .lds import make_subsets, read_labels, save_subsets

    cfg = _config(args.config)
    train = open_dataset("train", cfg.data.train, data_options(cfg))
    labels = read_labels(args.labels, train.uids, args.label_column) if args.labels else None
    mask = make_subsets(len(train), args.num, args.alpha, args.seed, labels)
    seeds = (np.arange(args.num, dtype=np.int64) + args.train_seed if args.seed_per_subset
             else np.full(args.num, args.train_seed, dtype=np.int64))
    path = save_subsets(args.out, mask, seeds, train.uids, args.alpha, args.seed)
    print(f"lds subsets: {args.num} subsets of {int(mask[0].sum())}/{len(train)} training rows"
          f"{' (stratified)' if labels is not None else ''} -> {path}")
    return 0


def cmd_train(args) -> int:
    from ..fingerprint import data_options
    from .retrain import resolve_recipe, run_train

    cfg = _config(args.config, "lds train")
    recipe = None if args.train_command else resolve_recipe(cfg, args.recipe)
    base = cfg.model.path if cfg.model.lora is not None else None
    s = run_train(cfg.data.train, Path(args.subsets), Path(args.out), recipe, args.train_command,
                  args.jobs, threads=args.threads, log=(lambda *_: None) if args.quiet else print,
                  options=data_options(cfg), base_model=base)
    print(f"lds train: {s['trained']} trained, {s['skipped']} already done, {s['seconds']:.1f} s "
          f"-> {args.out}")
    return 0


def cmd_truth(args) -> int:
    from ..fingerprint import data_options
    from .lds import load_subsets
    from .truth import run_truth

    cfg = _config(args.config)
    names = args.query_set or list(cfg.data.queries)
    unknown = [n for n in names if n not in cfg.data.queries]
    if unknown:
        raise ConfigError(f"--query-set {unknown[0]!r} is not in [data.queries]; choose from "
                         f"{list(cfg.data.queries)}")
    subsets = load_subsets(args.subsets)
    s = run_truth({n: cfg.data.queries[n] for n in names}, Path(args.models), len(subsets.mask_MN),
                  Path(args.out), args.timesteps, args.draws, args.seed,
                  log=(lambda *_: None) if args.quiet else print, options=data_options(cfg),
                  base_model=cfg.model.path if cfg.model.lora is not None else None)
    print(f"lds truth: {s['models']} models in {s['seconds']:.1f} s -> "
          f"{', '.join(s['paths'].values())}")
    return 0


def _open_store(target: str):
    from ..store import Store

    path = Path(target)
    if path.suffix == ".toml":
        from ..fingerprint import open_store

        cfg = _config(path)
        if cfg.is_ensemble:  # its root holds the mean scores (and no features to sweep)
            from ..ensemble import open_root

            return open_root(cfg, create=False)
        return open_store(cfg)
    return Store.open_existing(path, foreign=True)


def _truth_files(truth: Path, query_sets: list[str] | None) -> dict[str, Path]:
    if truth.is_dir():
        files = {p.stem: p for p in sorted(truth.glob("*.npz"))}
        if query_sets:
            missing = [q for q in query_sets if q not in files]
            if missing:
                raise EvalError(f"no truth for query set(s) {missing} in {truth}; run `das lds truth`")
            files = {q: files[q] for q in query_sets}
        if not files:
            raise EvalError(f"{truth} holds no <query set>.npz truth files; run `das lds truth`")
        return files
    if query_sets and len(query_sets) > 1:
        raise EvalError("--truth is one file: pass one --query-set, or a folder of <query set>.npz")
    return {(query_sets[0] if query_sets else truth.stem): truth}


def cmd_eval(args) -> int:
    from .lds import load_subsets, load_truth
    from .sweep import DEFAULT_GRID, Variant, eval_stored_scores, eval_sweep, subsets_for_truth

    store = _open_store(args.target)
    if args.sweep and "ensemble" in store.root.attrs.get("fingerprint", {}).get("model", {}):
        raise EvalError(f"--sweep needs a store's features; {store.path} is an ensemble's root, "
                        f"which holds only the members' mean scores: drop --sweep to evaluate "
                        f"them, or sweep a single-model config of one member")
    subsets = load_subsets(args.subsets)
    report = {}
    for name, path in _truth_files(Path(args.truth), args.query_set).items():
        F, uids, rows = load_truth(path)
        mask = subsets_for_truth(subsets.mask_MN, rows)
        if not args.sweep:
            res = eval_stored_scores(store, name, args.method, mask, F, uids, subsets.train_uids)
            report[name] = res
            for m, r in res.items():
                s = r["summary"]
                print(f"lds {name} {m:<12} LDS {s['mean'] * 100:6.2f}  95% CI [{s['lo'] * 100:.2f}, "
                      f"{s['hi'] * 100:.2f}]  ({s['queries']} queries"
                      f"{', ' + str(s['undefined']) + ' undefined' if s['undefined'] else ''})")
            continue
        variants = None
        if args.method:
            variants = [v for m in args.method for v in (
                [Variant(m)] if m in ("trak", "dtrak") else
                [Variant(m, g, r) for g in args.gamma for r in args.residual])]
        res = eval_sweep(store, name, variants, mask, F, uids, args.k, args.grid or DEFAULT_GRID)
        report[name] = res
        for k, per in ({} if args.quiet else res["by_k"]).items():
            for v, r in per.items():
                s = r["report"]
                print(f"lds {name} k={k} {v:<20} c={r['chosen']:.2g} (chosen on "
                      f"{len(res['select'])} queries)  LDS {s['mean'] * 100:6.2f}  95% CI "
                      f"[{s['lo'] * 100:.2f}, {s['hi'] * 100:.2f}] on {len(res['report'])} others")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def cmd_counterfactual(args) -> int:
    from .counterfactual import run_counterfactual
    from .retrain import load_recipe

    cfg = _config(args.config, "counterfactual")
    if args.query_set not in cfg.data.queries:
        raise ConfigError(f"--query-set {args.query_set!r} is not in [data.queries] "
                         f"({list(cfg.data.queries)})")
    recipe = load_recipe(args.recipe or cfg.model.path)
    s = run_counterfactual(cfg, args.query_set, args.queries, args.method or list(cfg.score.methods),
                           args.fraction, Path(args.out), recipe, args.seed, args.jobs,
                           log=(lambda *_: None) if args.quiet else print)
    for n, v in s["mean"].items():
        print(f"counterfactual: -{s['removed']} {n:<12} mean L2 {v['l2']:.3f}  mean loss change "
              f"{v['loss_change']:+.4f}")
    print(f"counterfactual: picture {Path(args.out) / 'picture.png'}")
    return 0


def register_lds(sub) -> None:
    """Add `das lds ...` and `das counterfactual` to the top-level subparsers."""
    lds = sub.add_parser("lds", help="linear datamodeling score: subsets, retraining, truth, eval",
                         description="LDS toolchain (pipeline/lds.py documents the file formats)")
    lsub = lds.add_subparsers(dest="lds_command", required=True)

    def add(name, func, help_, target="config"):
        p = lsub.add_parser(name, help=help_, description=help_)
        p.add_argument(target, help="TOML config file" if target == "config" else
                       "TOML config file or zarr store folder")
        p.add_argument("--quiet", action="store_true", help="no progress lines")
        p.set_defaults(func=func)
        return p

    p = add("subsets", cmd_subsets, "draw M seeded random subsets of the training set")
    p.add_argument("--num", type=int, default=64, help="number of subsets M (default 64)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--labels", help="stratify by labels: `digits`, a .npy (N,), or a .csv")
    p.add_argument("--label-column", help="column of the --labels CSV")
    p.add_argument("--train-seed", type=int, default=0,
                   help="training seed written for every subset (default 0)")
    p.add_argument("--seed-per-subset", action="store_true",
                   help="use train-seed + m for subset m instead of one seed for all")
    p.add_argument("--out", required=True, help="output .npz")

    p = add("train", cmd_train, "retrain on each subset (resumable; one subset per process; a "
            "rank of a Slurm array / accelerate launch takes subsets m = rank mod world); with "
            "[model] lora, each subset is a fresh LoRA fine-tune of the base")
    p.add_argument("--subsets", required=True, help="subsets .npz")
    p.add_argument("--out", required=True, help="folder of <m>/model pipelines (<m>/lora adapters)")
    p.add_argument("--recipe", help="built-in recipe JSON (default: <model path>/das_recipe.json, "
                   "or das_recipe.json beside the [model] lora adapter)")
    # dest: `command` is the top-level subcommand's name, printed in error messages
    p.add_argument("--command", dest="train_command", help="own training command template with "
                   "{subset_file} and {output_dir} (also {seed}, {subset}, {base_model})")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")

    p = add("truth", cmd_truth, "model output F_m(q) of every retrained model and query")
    p.add_argument("--subsets", required=True, help="subsets .npz")
    p.add_argument("--models", required=True, help="folder written by `das lds train`")
    p.add_argument("--out", required=True, help="folder for <query set>.npz")
    p.add_argument("--query-set", action="append", help="only this query set (repeatable)")
    p.add_argument("--timesteps", type=int, default=100, help="timesteps (default 100, uniform)")
    p.add_argument("--draws", type=int, default=1, help="noise draws per timestep (default 1)")
    p.add_argument("--seed", type=int, default=1, help="noise key seed (default 1)")

    p = add("eval", cmd_eval, "LDS per method from a store's scores, or a damping sweep",
            target="target")
    p.add_argument("--subsets", required=True, help="subsets .npz")
    p.add_argument("--truth", required=True, help="truth .npz or folder of <query set>.npz")
    p.add_argument("--query-set", action="append", help="only this query set (repeatable)")
    p.add_argument("--method", action="append", help="only this method (repeatable)")
    p.add_argument("--sweep", action="store_true", help="recompute scores from features over a "
                   "damping grid: chosen on half of the queries, reported on the other half")
    p.add_argument("--k", type=int, action="append", help="(sweep) evaluate at this k <= store k")
    p.add_argument("--grid", type=float, nargs="+", help="(sweep) relative damping values")
    p.add_argument("--gamma", type=float, nargs="+", default=[1.0, 0.0], help="(sweep) das gammas")
    p.add_argument("--residual", nargs="+", default=["r", "rho"], help="(sweep) das residuals")
    p.add_argument("--json", help="write the full report (per-query LDS, curves) here")

    p = sub.add_parser("counterfactual", help="remove top proponents, retrain, regenerate",
                       description="remove a method's top-m proponents of generated queries, "
                       "retrain, regenerate from the same noise; compare with random removal")
    p.add_argument("config", help="TOML config file")
    p.add_argument("--query-set", required=True, help="a generated query set (with generation.json)")
    p.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2], help="query rows")
    p.add_argument("--method", action="append", help="method whose scores rank proponents")
    p.add_argument("--fraction", type=float, default=0.1, help="m as a fraction of N (default 0.1)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", help="built-in recipe JSON (default: <model path>/das_recipe.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random removal")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_counterfactual)
