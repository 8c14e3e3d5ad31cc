"""das-pipeline against MadryLab's traker (PyPI 0.3.2), side by side, on the same inputs.

Both tools attribute the same diffusion model on the same data with the same K timesteps, the
same keyed noise (traker gets das-pipeline's x_t / t / eps as batch tensors: it has no noise
hook), the same projection dimension k and the same relative damping grid; only the random
projections differ. traker runs TRAK and D-TRAK (one method per featurisation, see
traker_adapter.py); das-pipeline runs TRAK, D-TRAK and DAS from one extraction.

Every stage runs in its own subprocess (so peak RSS is per process), tools alternating
(A, B, A, B ...; the order flips every round), with the same thread count. Measured per round:
  featurize: training features (traker: model load + TRAKer + featurize; ours: `das extract`)
  score:     query features, finalize + score at one damping (traker: trace -> lambda_reg,
             finalize_features, finalize_scores; ours: `das reduce` + `das score`), then the
             whole damping grid (traker: re-finalize per value; ours: one factor, O(k^2) per value)
Reported: medians over rounds of time per sample / seconds, peak RSS per process (and its growth
over the RSS after imports), per-query Spearman between the tools' TRAK and D-TRAK scores, and
the LDS with held-out damping choice when the evaluation toolchain (das_pipeline.eval) and a
benchmarks/lds_digits run (subsets, retrained models, truth) are present.

traker is an optional dev dependency (pure Python; its fast_jl CUDA extra is not needed on CPU):
    .venv/bin/pip install -c constraints.txt traker==0.3.2     # or: pip install -e '.[dev]'

Usage (the README's table):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/versus_traker.py --out runs/versus_traker
    ... --config my.toml            # your model, data, K, k, seeds and damping (DDPM pixel models)
    ... --device cuda               # traker with fast-jl (if installed), ours with Triton

Legend: N train rows, Q queries, C damping values, K projection dim.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from das_pipeline.config import ScoreConfig
from das_pipeline.eval.lds import spearman_rows

HERE = Path(__file__).resolve().parent
GRID = [float(c) for c in np.logspace(-5, 4, 19)]  # = das_pipeline.eval.sweep.DEFAULT_GRID
DIGITS_RECIPE = {"widths": [8, 16], "attention": False, "num_train_timesteps": 1000, "steps": 200,
                 "batch_size": 64, "lr": 3e-3, "seed": 0}  # benchmarks/lds_digits (FULL)
TRAKER_METHODS = ("trak", "dtrak")
DAS_METHODS = ("trak", "dtrak", "das")

@dataclass
class Setup:
    """Everything both tools share; written to <out>/setup.json and into every worker's job."""

    model: str
    train: str
    queries: dict[str, str]
    timesteps: int = 10
    noise_draws: int = 1
    noise_seed: int = 0
    noise: str = "common"
    """[features] noise of both tools' noised inputs (das-pipeline's default)."""
    dim: int = 2048
    proj_seed: int = 0
    batch: int = 64
    das_batch: int = 0
    """das-pipeline's batch size if not ``batch`` (0): operational for us (no effect on results),
    while traker regenerates its matrix per batch and so wants large ones."""
    damping: float = ScoreConfig.damping
    gamma: float = ScoreConfig.gamma
    residual: str = ScoreConfig.residual
    grid: list[float] = field(default_factory=lambda: list(GRID))
    das_kinds: list[str] = field(default_factory=lambda: ["rademacher", "sjlt"])
    traker_half: bool = False
    device: str = "cpu"
    threads: int = 1


# ------------------------------------------------------------------------------------ workers


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def traker_featurize(job: dict) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from traker_adapter import featurize, make_traker

    from das_pipeline.features import FeatureSpec

    s = Setup(**job["setup"])
    t0 = time.perf_counter()
    unet = UNet2DModel.from_pretrained(Path(s.model) / "unet").eval().to(s.device)
    scheduler = DDPMScheduler.from_pretrained(Path(s.model) / "scheduler")
    with np.load(Path(job["inputs"]) / "train.npz") as z:
        x, uids = torch.from_numpy(z["x"]), [str(u) for u in z["uids"]]
    spec = FeatureSpec(("loss",), s.timesteps, s.noise_draws, s.noise_seed)
    traker = make_traker(unet, job["method"], len(uids), Path(job["work"]), s.dim, s.proj_seed,
                         s.device, s.traker_half)
    featurize(traker, unet, scheduler, x, uids, spec, s.batch, s.device, s.noise)
    return {"seconds": {"featurize": time.perf_counter() - t0}, "samples": {"train": len(uids)},
            "projector": type(traker.projector).__name__}


def traker_score(job: dict) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from traker_adapter import absolute_damping, featurize_queries, finalize, make_traker, scores

    from das_pipeline.features import FeatureSpec

    s = Setup(**job["setup"])
    seconds = {}
    t0 = time.perf_counter()
    unet = UNet2DModel.from_pretrained(Path(s.model) / "unet").eval().to(s.device)
    scheduler = DDPMScheduler.from_pretrained(Path(s.model) / "scheduler")
    spec = FeatureSpec(("loss",), s.timesteps, s.noise_draws, s.noise_seed)
    num_train = len(np.load(Path(job["inputs"]) / "train.npz")["uids"])
    traker = make_traker(unet, job["method"], num_train, Path(job["work"]), s.dim, s.proj_seed,
                         s.device, s.traker_half)
    finalize(traker, absolute_damping(traker, s.damping))  # must precede query featurisation
    t1 = time.perf_counter()
    num_queries = 0
    for name in s.queries:
        with np.load(Path(job["inputs"]) / f"{name}.npz") as z:
            x, uids = torch.from_numpy(z["x"]), [str(u) for u in z["uids"]]
        featurize_queries(traker, unet, scheduler, name, x, uids, spec, s.batch, s.device,
                          s.noise)
        num_queries += len(uids)
    t2 = time.perf_counter()
    for name in s.queries:
        scores(traker, name)
    t3 = time.perf_counter()
    seconds["featurize_queries"] = t2 - t1
    seconds["finalize_score"] = (t1 - t0) + (t3 - t2)
    swept = {name: [] for name in s.queries}
    for c in s.grid:
        finalize(traker, absolute_damping(traker, c))
        for name in s.queries:
            swept[name].append(scores(traker, name))
    seconds["sweep"] = time.perf_counter() - t3
    for name, per_c in swept.items():
        np.savez(Path(job["scores"]) / f"{name}.npz", **{job["method"]: np.stack(per_c)})
    return {"seconds": seconds, "samples": {"queries": num_queries}}


def das_featurize(job: dict) -> dict:
    from das_pipeline import dist
    from das_pipeline.config import load_config
    from das_pipeline.extract import run_extract

    s = Setup(**job["setup"])
    t0 = time.perf_counter()
    summary = run_extract(load_config(job["config"]), splits=["train"], rank=dist.current(s.device),
                          show_progress=False)
    return {"seconds": {"featurize": time.perf_counter() - t0}, "samples": {"train": summary["samples"]}}


def das_score(job: dict) -> dict:
    import torch

    from das_pipeline import dist
    from das_pipeline.config import load_config
    from das_pipeline.eval.sweep import read_split
    from das_pipeline.extract import run_extract
    from das_pipeline.reduce import load_factor, run_reduce
    from das_pipeline.score import run_score
    from das_pipeline.scoring import score_block
    from das_pipeline.store import Store

    cfg = load_config(job["config"])
    s = Setup(**job["setup"])
    t0 = time.perf_counter()
    summary = run_extract(cfg, splits=list(s.queries), rank=dist.current(s.device), show_progress=False)
    t1 = time.perf_counter()
    run_reduce(cfg, show_progress=False, device=s.device)
    run_score(cfg, show_progress=False, device=s.device)
    t2 = time.perf_counter()
    # The damping sweep: one stored factor per readout, every value O(k^2) + one product.
    store = Store.open_existing(cfg.store.path)
    readouts = ("loss", "square", "mean")
    factors = {r: load_factor(store, r) for r in readouts}

    def read(name):
        feats, res, rho, _ = read_split(store, name, readouts)
        weight = rho if cfg.score.residual == "rho" else res
        return {r: torch.from_numpy(f) for r, f in feats.items()}, torch.from_numpy(weight)

    train_feats, residual = read("train")
    q_feats = {name: read(name)[0] for name in s.queries}
    out = {name: {m: [] for m in DAS_METHODS} for name in s.queries}
    for c in s.grid:
        lams = {r: f.damping(c) for r, f in factors.items()}
        lev = factors["mean"].leverage(train_feats["mean"], lams["mean"])
        for name in s.queries:
            precond = {r: factors[r].solve(q_feats[name][r].T, lams[r]) for r in readouts}
            block = score_block(train_feats, precond, residual, lev, DAS_METHODS, cfg.score.gamma)
            for m in DAS_METHODS:
                out[name][m].append(block[m].numpy().astype(np.float32))
    for name, per_method in out.items():
        np.savez(Path(job["scores"]) / f"{name}.npz", **{m: np.stack(v) for m, v in per_method.items()})
    return {"seconds": {"featurize_queries": t1 - t0, "finalize_score": t2 - t1,
                        "sweep": time.perf_counter() - t2},
            "samples": {"queries": summary["samples"]}}


WORKERS = {("traker", "featurize"): traker_featurize, ("traker", "score"): traker_score,
           ("das", "featurize"): das_featurize, ("das", "score"): das_score}


def preload(tool: str) -> None:
    """Import every library a worker uses before the clock starts: timings exclude import time
    for both tools; peak RSS includes it (a process pays for what it imports)."""
    import diffusers  # noqa: F401
    from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401

    if tool == "traker":
        import trak  # noqa: F401
        import traker_adapter  # noqa: F401
    else:
        import PIL.Image  # noqa: F401
        import sklearn.datasets  # noqa: F401

        import das_pipeline.extract  # noqa: F401
        import das_pipeline.reduce  # noqa: F401
        import das_pipeline.score  # noqa: F401


def run_worker(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    s = Setup(**job["setup"])
    import torch

    torch.set_num_threads(s.threads)
    preload(job["tool"])
    base = _rss_kb()
    result = WORKERS[(job["tool"], job["stage"])](job)
    result["base_rss_kb"] = base
    result["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["device_name"] = torch.cuda.get_device_name()
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------ parent


def ensure_digits_model(out: Path, lds_dir: Path | None, recipe: dict) -> Path:
    """The LDS benchmark's base model: from --lds-dir when it has one with this recipe, else
    trained here with it (about a minute for the benchmark's widths on 2 cores)."""
    if lds_dir is not None and (lds_dir / "base_model" / "das_recipe.json").is_file() and \
            json.loads((lds_dir / "base_model" / "das_recipe.json").read_text()) == recipe:
        return lds_dir / "base_model"
    from das_pipeline.data import open_dataset
    from das_pipeline.recipe import ddpm_scheduler, save_pipeline, tiny_unet, train_ddpm

    widths = "-".join(map(str, recipe["widths"])) + ("a" if recipe["attention"] else "")
    folder = out.parent / f"versus_traker_models/w{widths}"
    stamp = folder / "das_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return folder
    r = recipe
    train = open_dataset("train", "digits[0:300]")
    unet = tiny_unet(8, 1, tuple(r["widths"]), r["attention"], seed=r["seed"])
    scheduler = ddpm_scheduler(r["num_train_timesteps"])
    train_ddpm(unet, scheduler, train.load(0, len(train)), r["steps"], seed=r["seed"],
               batch_size=r["batch_size"], lr=r["lr"], show_progress=False)
    save_pipeline(unet, scheduler, folder)
    stamp.write_text(json.dumps(recipe))
    return folder


def setup_from_args(args, out: Path) -> Setup:
    lds_dir = Path(args.lds_dir).resolve() if args.lds_dir else None
    if args.config:
        from das_pipeline.config import load_config

        cfg = load_config(args.config)
        f = cfg.features
        if f.normalize:
            raise ValueError(f"[features] normalize = true in {args.config}: traker has no "
                             f"per-timestep normalisation; compare with normalize = false")
        s = Setup(model=str(cfg.model.path), train=cfg.data.train, queries=dict(cfg.data.queries),
                  timesteps=f.timesteps, noise_draws=f.noise_draws, noise_seed=f.seed, noise=f.noise,
                  dim=cfg.projection.dim, proj_seed=cfg.projection.seed, batch=f.batch_size,
                  damping=cfg.score.damping, gamma=cfg.score.gamma, residual=cfg.score.residual)
    else:
        queries = {"val": "digits[1500:1564]"}
        if lds_dir is not None and (lds_dir / "gen_png").is_dir():
            queries["gen"] = str(lds_dir / "gen_png")
        recipe = dict(DIGITS_RECIPE)
        if args.widths:
            recipe["widths"] = [int(w) for w in args.widths.split(",")]
        recipe["attention"] = bool(args.attention)
        s = Setup(model=str(ensure_digits_model(out, lds_dir, recipe)), train="digits[0:300]",
                  queries=queries)
    for key in ("timesteps", "dim", "batch", "das_batch", "threads", "device", "damping"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if args.das_kinds:
        s.das_kinds = args.das_kinds.split(",")
    if args.grid:
        s.grid = [float(c) for c in args.grid.split(",")]
        if s.damping not in s.grid:
            raise ValueError(f"--grid {args.grid}: include the one-damping value {s.damping}")
    s.traker_half = args.traker_half
    from das_pipeline.models import load_model

    model = load_model(s.model)
    if model.conditional:
        raise ValueError(f"model {s.model} is text-conditioned: this comparison runs pixel-space "
                         f"DDPM pipelines only (traker needs a hand-written output for each model)")
    return s


def export_inputs(s: Setup, folder: Path) -> dict[str, int]:
    """Each split's pixels and uids as .npz for the traker workers (which never import our data code)."""
    from das_pipeline.data import open_dataset

    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, source in {"train": s.train, **s.queries}.items():
        ds = open_dataset(name, source)
        np.savez(folder / f"{name}.npz", x=ds.load(0, len(ds)).numpy().astype(np.float32),
                 uids=np.asarray(ds.uids, dtype=str))
        sizes[name] = len(ds)
    return sizes


def spawn(out: Path, name: str, job: dict, env: dict) -> dict:
    """Run one worker subprocess; its log goes to <out>/logs/<name>.log."""
    jobs = out / "jobs"
    jobs.mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    job["result"] = str(jobs / f"{name}.result.json")
    path = jobs / f"{name}.json"
    path.write_text(json.dumps(job, indent=1))
    with open(out / "logs" / f"{name}.log", "w") as log:
        rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"worker {name} failed (exit {rc}); see {out / 'logs' / (name + '.log')}")
    return json.loads(Path(job["result"]).read_text())


def variants(s: Setup, out: Path) -> list[dict]:
    """One entry per (tool, method or projection kind) with its work and score folders."""
    vs = []
    for method in TRAKER_METHODS:
        vs.append({"tool": "traker", "name": f"traker-{method}", "method": method})
    for kind in s.das_kinds:
        vs.append({"tool": "das", "name": f"das-{kind}", "kind": kind})
    # interleave: traker, das, traker, das ...
    trak, das = [v for v in vs if v["tool"] == "traker"], [v for v in vs if v["tool"] == "das"]
    order = []
    for i in range(max(len(trak), len(das))):
        order += trak[i:i + 1] + das[i:i + 1]
    for v in order:
        v["work"] = str(out / "work" / v["name"])
        v["scores"] = str(out / "scores" / v["name"])
    return order


def write_das_config(s: Setup, v: dict) -> Path:
    """examples/digits.toml with the shared setup (model, data, K, S, seeds, k, kind, damping)."""
    import tomllib

    from das_pipeline.config import dump_toml, merge

    work = Path(v["work"])
    batch = s.das_batch or s.batch
    raw = tomllib.loads((Path(__file__).resolve().parents[1] / "examples" / "digits.toml").read_text())
    raw["data"]["queries"] = dict(s.queries)
    raw = merge(raw, {
        "model": {"path": s.model}, "data": {"train": s.train},
        "features": {"timesteps": s.timesteps, "noise_draws": s.noise_draws, "seed": s.noise_seed,
                     "noise": s.noise, "batch_size": batch},
        "projection": {"dim": s.dim, "seed": s.proj_seed, "kind": v["kind"]},
        "store": {"path": str(work / "store.zarr"), "rows_per_unit": batch},
        "score": {"damping": s.damping, "gamma": s.gamma, "residual": s.residual}})
    path = work.parent / f"{v['name']}.toml"
    path.write_text(dump_toml(raw))
    return path


def run_rounds(s: Setup, out: Path, rounds: int) -> dict[str, list[dict]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    vs = variants(s, out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for r in range(rounds):
        order = vs if r % 2 == 0 else vs[::-1]
        for stage in ("featurize", "score"):
            for v in order:
                if stage == "featurize":
                    shutil.rmtree(v["work"], ignore_errors=True)
                    Path(v["work"]).mkdir(parents=True)
                Path(v["scores"]).mkdir(parents=True, exist_ok=True)
                job = {"tool": v["tool"], "stage": stage, "setup": asdict(s), "work": v["work"],
                       "scores": v["scores"], "inputs": str(out / "inputs"),
                       "method": v.get("method")}
                if v["tool"] == "das":
                    job["config"] = str(write_das_config(s, v))
                started = time.perf_counter()
                res = spawn(out, f"{v['name']}-{stage}-r{r}", job, env)
                res["process_seconds"] = time.perf_counter() - started
                results.setdefault(f"{v['name']}/{stage}", []).append(res)
                print(f"round {r} {v['name']:<16} {stage:<9} "
                      + ", ".join(f"{k} {t:.2f} s" for k, t in res["seconds"].items())
                      + f", peak RSS {res['peak_rss_kb'] / 1024:.0f} MB", flush=True)
    return results


def load_scores(out: Path, name: str, split: str) -> dict[str, np.ndarray]:
    with np.load(out / "scores" / name / f"{split}.npz") as z:
        return {k: z[k] for k in z.files}


def exact_scores(s: Setup, out: Path, sizes: dict[str, int], limit_bytes: float = 1e9) -> bool:
    """Unprojected TRAK / D-TRAK scores (the k -> infinity limit both tools estimate) at every damping.

    Relative damping c means lambda = c * (trace(G) - e_max(G)) of the unprojected Gram, the rule
    of the projected runs (JL roughly preserves both; linalg.Factor.damping_scale), solved
    through the N x N kernel: scores = (g_q A^T) (A A^T + lambda I)^-1. Skipped (returns False)
    when the (N + Q) x p float64 gradients of the two readouts would exceed ``limit_bytes``.
    """
    import torch

    from das_pipeline.data import open_dataset
    from das_pipeline.features import FeatureSpec, noise_keys, per_sample_gradients
    from das_pipeline.models import load_model

    model = load_model(s.model)
    num_params = sum(p.numel() for p in model.unet.parameters())
    if sum(sizes.values()) * num_params * 2 * 8 > limit_bytes:
        return False
    spec = FeatureSpec(("loss", "square"), s.timesteps, s.noise_draws, s.noise_seed)

    def grads(name, source):
        ds = open_dataset(name, source)
        x = ds.load(0, len(ds))
        parts = [per_sample_gradients(model.unet, model.scheduler, x[lo:lo + s.batch],
                                      noise_keys(s.noise, x[lo:lo + s.batch]), spec).grads_RBP
                 for lo in range(0, len(ds), s.batch)]
        return torch.cat(parts, dim=1).to(torch.float64)  # (2, n, p)

    train_RNP = grads("train", s.train)
    folder = out / "scores" / "exact"
    folder.mkdir(parents=True, exist_ok=True)
    kernels = [a @ a.T for a in train_RNP]
    for name, source in s.queries.items():
        query_RQP = grads(name, source)
        result = {}
        for r, method in enumerate(("trak", "dtrak")):
            cross_QN = query_RQP[r] @ train_RNP[r].T
            # linalg.Factor.damping_scale of the unprojected Gram (same non-zero spectrum as A A^T)
            scale = float(torch.trace(kernels[r]) - torch.linalg.eigvalsh(kernels[r]).max())
            eye = torch.eye(len(kernels[r]), dtype=torch.float64)
            result[method] = np.stack([
                torch.linalg.solve(kernels[r] + c * scale * eye, cross_QN.T).T.numpy()
                for c in s.grid]).astype(np.float32)
        np.savez(folder / f"{name}.npz", **result)
    return True


def agreement(s: Setup, out: Path, has_exact: bool) -> dict:
    """Per-query Spearman over the training rows between the tools (and each against the exact
    scores), TRAK and D-TRAK, for every damping value of the grid."""
    res = {}
    for method in TRAKER_METHODS:
        for split in s.queries:
            tools = {"traker": load_scores(out, f"traker-{method}", split)[method]}
            for kind in s.das_kinds:
                tools[f"das-{kind}"] = load_scores(out, f"das-{kind}", split)[method]
            if has_exact:
                tools["exact"] = load_scores(out, "exact", split)[method]
            pairs = [("traker", f"das-{kind}") for kind in s.das_kinds]
            if has_exact:
                pairs += [(t, "exact") for t in tools if t != "exact"]
            for a, b in pairs:
                per_c = [spearman_rows(tools[a][c], tools[b][c]) for c in range(len(s.grid))]
                res[f"{method}/{split}/{a} vs {b}"] = {
                    "mean": [float(r.mean()) for r in per_c], "min": [float(r.min()) for r in per_c],
                    "share_above_0.95": [float((r > 0.95).mean()) for r in per_c]}
    return res


def lds(s: Setup, out: Path, lds_dir: Path | None, has_exact: bool) -> dict | str:
    """LDS of every method of both tools (and of the exact scores), damping chosen on one half of
    each query set and reported on the other, with the evaluation toolchain (das_pipeline.eval)
    and the subsets and retrained-model truth of a benchmarks/lds_digits run; else a reason."""
    from das_pipeline.eval.lds import load_subsets, load_truth, query_halves, subset_predictions
    from das_pipeline.eval.sweep import choose_damping, match_queries, subsets_for_truth

    if lds_dir is None or not (lds_dir / "subsets.npz").is_file():
        return (f"no LDS ground truth at {lds_dir}: run `python benchmarks/lds_digits/run.py --out "
                f"{lds_dir}` first (this benchmark reuses its subsets, retrained models and truth)")
    if Path(s.model).resolve() != (lds_dir / "base_model").resolve():
        return (f"the attributed model {s.model} is not {lds_dir / 'base_model'}, whose retrained "
                f"subsets define the truth in {lds_dir}")
    subsets = load_subsets(lds_dir / "subsets.npz")
    train_uids = [str(u) for u in np.load(out / "inputs" / "train.npz")["uids"]]
    if subsets.train_uids != train_uids:
        return f"the subsets in {lds_dir} were drawn over another training set than {s.train!r}"
    names = [f"traker-{m}" for m in TRAKER_METHODS] + [f"das-{k}" for k in s.das_kinds]
    names += ["exact"] if has_exact else []
    res = {}
    for split in s.queries:
        path = lds_dir / "truth" / f"{split}.npz"
        if not path.is_file():
            continue
        F, truth_uids, rows = load_truth(path)
        uids = [str(u) for u in np.load(out / "inputs" / f"{split}.npz")["uids"]]
        F = match_queries(truth_uids, uids, F, len(uids), f"query set {split!r}")
        mask = subsets_for_truth(subsets.mask_MN, rows)
        select, report = query_halves(len(uids), 0)
        for name in names:
            for method, scores_CQN in load_scores(out, name, split).items():
                pred_CQM = np.stack([subset_predictions(sc, mask) for sc in scores_CQN])
                res[f"{method}/{split}/{name}"] = asdict(
                    choose_damping(pred_CQM, F, s.grid, select, report, f"{name} {method}"))
    if not res:
        return f"no truth files for the query sets {list(s.queries)} in {lds_dir / 'truth'}"
    return res


def lds_table(s: Setup, res: dict) -> tuple[list[str], dict]:
    """Markdown lines of the LDS table and the D-TRAK equality check per das kind and query set."""
    splits = sorted({key.split("/")[1] for key in res}, key=list(s.queries).index)
    names = [n for n in ["traker"] + [f"das-{k}" for k in s.das_kinds] + ["exact"]
             if any(key.split("/")[2].startswith(n) for key in res)]
    lines = ["LDS x 100 on the report half of each query set, mean [bootstrap 95% interval] (relative "
             "damping chosen on the other half); `exact` = unprojected gradients (not a tool):", "",
             "| method | query set | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    check = {}
    for method in DAS_METHODS:
        for split in splits:
            cells = []
            for n in names:
                r = res.get(f"{method}/{split}/{n}" if n != "traker" else f"{method}/{split}/traker-{method}")
                cells.append("n/a" if r is None else
                             f"{100 * r['report']['mean']:.1f} [{100 * r['report']['lo']:.1f}, "
                             f"{100 * r['report']['hi']:.1f}] (c = {r['chosen']:g})")
            if cells.count("n/a") < len(cells):
                lines.append(f"| {method} | {split} | " + " | ".join(cells) + " |")
    for kind in s.das_kinds:
        for split in splits:
            a = res[f"dtrak/{split}/das-{kind}"]["report"]
            b = res[f"dtrak/{split}/traker-dtrak"]["report"]
            check[f"{kind}/{split}"] = bool(b["lo"] <= a["mean"] <= b["hi"]
                                            and a["lo"] <= b["mean"] <= a["hi"])
    return lines, check


def grid_index(s: Setup, c: float) -> int:
    """Index of the grid value nearest to c (log scale)."""
    return int(np.argmin(np.abs(np.log(np.asarray(s.grid)) - np.log(c))))


def median(values):
    return float(np.median(np.asarray(values, dtype=np.float64)))


def summarize_runs(s: Setup, runs: dict, sizes: dict[str, int]) -> dict:
    num_train = sizes["train"]
    num_queries = sum(sizes[q] for q in s.queries)
    rows = {}
    for key, per_round in runs.items():
        name, stage = key.split("/")
        row = rows.setdefault(name, {})
        secs = {k: median([r["seconds"][k] for r in per_round]) for k in per_round[0]["seconds"]}
        if stage == "featurize":
            row["featurize_ms_per_sample"] = 1e3 * secs["featurize"] / num_train
        else:
            row["featurize_queries_ms_per_sample"] = 1e3 * secs["featurize_queries"] / num_queries
            row["finalize_score_s"] = secs["finalize_score"]
            row["sweep_s"] = secs["sweep"]
        if "projector" in per_round[0]:
            row["projector"] = per_round[0]["projector"]
        if "peak_cuda_mb" in per_round[0]:
            row[f"peak_cuda_mb_{stage}"] = median([r["peak_cuda_mb"] for r in per_round])
        row[f"peak_rss_mb_{stage}"] = median([r["peak_rss_kb"] for r in per_round]) / 1024
        row[f"growth_rss_mb_{stage}"] = median([r["peak_rss_kb"] - r["base_rss_kb"]
                                                for r in per_round]) / 1024
    return rows


def targets(s: Setup, rows: dict) -> dict:
    """The issue's targets, per das-pipeline projection kind."""
    out = {}
    for kind in s.das_kinds:
        ours = rows[f"das-{kind}"]
        speed = {m: rows[f"traker-{m}"]["featurize_ms_per_sample"] / ours["featurize_ms_per_sample"]
                 for m in TRAKER_METHODS}
        memory = {f"{m}/{stage}": ours[f"peak_rss_mb_{stage}"] / rows[f"traker-{m}"][f"peak_rss_mb_{stage}"]
                  for m in TRAKER_METHODS for stage in ("featurize", "score")}
        out[kind] = {"speed_all_readouts_vs_one_traker_method": speed,
                     "speed_met (>= 5)": all(v >= 5 for v in speed.values()),
                     "peak_rss_ratio": memory,
                     "memory_met (<= 0.5)": all(v <= 0.5 for v in memory.values())}
    return out


def table(s: Setup, rows: dict, sizes: dict, agree: dict, tgt: dict, lds_res) -> str:
    qs = " + ".join(f"{sizes[q]} {q}" for q in s.queries)
    lines = [f"N = {sizes['train']} train, Q = {qs} queries, K = {s.timesteps} timesteps x "
             f"{s.noise_draws} draw, k = {s.dim}, batch {s.batch}"
             + (f" (das-pipeline {s.das_batch})" if s.das_batch else "")
             + f", {s.threads} thread(s), device "
             f"{s.device}, damping grid of {len(s.grid)} values (one-damping columns: c = {s.damping}).",
             "",
             "| tool (projection) | methods | featurize train, ms/sample | featurize queries, ms/sample "
             f"| finalize + score, s | sweep of {len(s.grid)} dampings, s | peak RSS featurize, MB (growth) "
             "| peak RSS score, MB (growth) |",
             "|---|---|---|---|---|---|---|---|"]
    labels = {"BasicProjector": "Gaussian, regenerated per call", "CudaProjector": "fast-jl",
              "ChunkedCudaProjector": "fast-jl, chunked"}
    for name, row in rows.items():
        projector = row.get("projector", "BasicProjector" if s.device == "cpu" else "?")
        tool = (f"traker 0.3.2 ({labels.get(projector, projector)})"
                if name.startswith("traker") else f"das-pipeline ({name.split('-', 1)[1]})")
        methods = name.split("-", 1)[1] if name.startswith("traker") else "trak + dtrak + das"
        lines.append(
            f"| {tool} | {methods} | {row['featurize_ms_per_sample']:.1f} | "
            f"{row['featurize_queries_ms_per_sample']:.1f} | {row['finalize_score_s']:.2f} | "
            f"{row['sweep_s']:.2f} | {row['peak_rss_mb_featurize']:.0f} "
            f"({row['growth_rss_mb_featurize']:.0f}) | {row['peak_rss_mb_score']:.0f} "
            f"({row['growth_rss_mb_score']:.0f}) |")
    if any("peak_cuda_mb_featurize" in row for row in rows.values()):
        lines += ["", "Peak CUDA memory allocated, MB (featurize / score): " + ", ".join(
            f"{name} {row.get('peak_cuda_mb_featurize', 0):.0f} / {row.get('peak_cuda_mb_score', 0):.0f}"
            for name, row in rows.items())]
    lines += ["", "Targets, per das-pipeline projection: featurisation speed = traker's time for one "
              "method / ours for all three readouts (target >= 5, i.e. >= 15 per method); peak RSS = ours / "
              "traker's per process (target <= 0.5):", ""]
    for kind, t in tgt.items():
        sp = ", ".join(f"vs traker {m} {v:.2f} ({3 * v:.1f} per method)"
                       for m, v in t["speed_all_readouts_vs_one_traker_method"].items())
        mem = ", ".join(f"{k} {v:.2f}" for k, v in t["peak_rss_ratio"].items())
        lines.append(f"- {kind}: speed {sp}: {'met' if t['speed_met (>= 5)'] else 'not met'}; "
                     f"peak RSS {mem}: {'met' if t['memory_met (<= 0.5)'] else 'not met'}")
    shown = sorted({grid_index(s, c) for c in (0.01, s.damping, 100.0)})
    lines += ["", "Per-query Spearman correlation over the training rows, mean (min over queries), "
              "by relative damping c; `exact` = unprojected gradients at the same lambda:", "",
              "| method / query set / pair | " + " | ".join(f"c = {s.grid[i]:g}" for i in shown) + " |",
              "|---|" + "---|" * len(shown)]
    for key, a in agree.items():
        lines.append(f"| {key} | " + " | ".join(f"{a['mean'][i]:.3f} ({a['min'][i]:.3f})" for i in shown)
                     + " |")
    lines += [""]
    if isinstance(lds_res, str):
        lines.append(f"LDS: not measured ({lds_res}).")
    else:
        lds_lines, check = lds_table(s, lds_res)
        lines += lds_lines + ["", "D-TRAK LDS equal to traker's (each mean inside the other's interval): "
                              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in check.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/versus_traker", help="output folder (rebuilt per run)")
    ap.add_argument("--config", help="a das TOML config (DDPM pixel model); default: the digits benchmark")
    ap.add_argument("--lds-dir", default="runs/lds_digits",
                    help="a benchmarks/lds_digits run: its base model, generated queries and LDS truth")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are reported)")
    ap.add_argument("--widths", help="digits benchmark UNet block widths (default 8,16: the LDS "
                    "benchmark's model; others are trained here with its recipe, without LDS)")
    ap.add_argument("--attention", action="store_true", help="with --widths: an attention level")
    ap.add_argument("--timesteps", type=int, help="K (default: config, or 10)")
    ap.add_argument("--dim", type=int, help="k (default: config, or 2048)")
    ap.add_argument("--batch", type=int, help="samples per batch, both tools (default: config, or 64)")
    ap.add_argument("--das-batch", type=int, help="das-pipeline's batch size if not --batch (operational)")
    ap.add_argument("--damping", type=float, help="relative damping of the one-damping columns")
    ap.add_argument("--grid", help="relative damping grid, comma-separated (default: 19 values 1e-5..1e4, "
                    "as benchmarks/lds_digits)")
    ap.add_argument("--threads", type=int, help="torch/OMP threads of every worker (default 1)")
    ap.add_argument("--device", help="cpu (default) or cuda (traker: fast-jl if installed)")
    ap.add_argument("--das-kinds", help="our projection kinds, comma-separated (default rademacher,sjlt)")
    ap.add_argument("--report-only", action="store_true",
                    help="redo the tables from the worker results and scores already in --out")
    ap.add_argument("--traker-half", action="store_true",
                    help="traker's default float16 storage and projection (default here: float32)")
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    try:
        import trak  # noqa: F401
    except ImportError:
        raise SystemExit("traker is not installed: .venv/bin/pip install -c constraints.txt "
                         "traker==0.3.2 (pure Python; or pip install -e '.[dev]')") from None
    out = Path(args.out).resolve()
    started = time.perf_counter()
    if args.report_only:
        s = Setup(**json.loads((out / "setup.json").read_text()))
        sizes = json.loads((out / "sizes.json").read_text())
        runs = json.loads((out / "runs.json").read_text())
        shutil.rmtree(out / "scores" / "exact", ignore_errors=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("work", "scores", "jobs", "logs"):
            shutil.rmtree(out / sub, ignore_errors=True)
        s = setup_from_args(args, out)
        (out / "setup.json").write_text(json.dumps(asdict(s), indent=1))
        sizes = export_inputs(s, out / "inputs")
        (out / "sizes.json").write_text(json.dumps(sizes))
        runs = run_rounds(s, out, args.rounds)
        (out / "runs.json").write_text(json.dumps(runs, indent=1))
    rows = summarize_runs(s, runs, sizes)
    has_exact = exact_scores(s, out, sizes)
    agree = agreement(s, out, has_exact)
    tgt = targets(s, rows)
    lds_dir = Path(args.lds_dir).resolve() if args.lds_dir else None
    lds_res = lds(s, out, lds_dir, has_exact)
    import platform

    import torch

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, torch {torch.__version__}")
    md = table(s, rows, sizes, agree, tgt, lds_res)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(
        {"setup": asdict(s), "sizes": sizes, "machine": machine, "rows": rows, "targets": tgt,
         "agreement": agree, "lds": lds_res, "runs": runs,
         "seconds": time.perf_counter() - started}, indent=1))
    print(f"\nmachine: {machine}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
