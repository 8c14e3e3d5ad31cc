"""`das counterfactual`: remove a method's top proponents, retrain, regenerate, measure the change.

For a generated query q (made from keyed noise with seed s_q by the base model):
    1. take the top m = round(fraction * N) training rows by the method's stored scores for q
       (and, as the control, m rows drawn at random with default_rng([seed, q]));
    2. retrain the built-in recipe with the base model's seed on the remaining rows;
    3. regenerate from the same keyed noise s_q and report the pixel L2 to the base model's image
       and the change of q's loss readout (truth-style: fixed keyed (t, eps) items).
Each retraining is cached in <out>/cache by a hash of its inputs, so reruns are resumable.
A method whose proponents matter should move the image and the loss more than random removal.

Generated query sets carry ``generation.json`` beside their PNGs: {"seeds": [s_q, ...],
"sample_steps": S} in row order (``generate_queries`` writes it).

Legend: Q queries, C channels, H x W pixels.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EvalError
from ..recipe import sample_keyed

GENERATION_FILE = "generation.json"


def generate_queries(model_dir: Path, folder: Path, seeds: list[int], sample_steps: int) -> list[Path]:
    """Generate one PNG per seed from the model and record the seeds in generation.json."""
    from ..models import load_model
    from ..recipe import save_pngs

    model = load_model(model_dir)
    images = sample_keyed(model.unet, model.scheduler, seeds, sample_steps)
    paths = save_pngs(images, folder, prefix="gen")
    (folder / GENERATION_FILE).write_text(json.dumps({"seeds": [int(s) for s in seeds],
                                                      "sample_steps": sample_steps}))
    return paths


def read_generation(source: str) -> dict:
    path = Path(source.split("[", 1)[0]) / GENERATION_FILE
    if not path.is_file():
        raise EvalError(f"query source {source!r} has no {GENERATION_FILE}: the counterfactual check "
                       f"regenerates from each query's seed; make the queries with "
                       f"counterfactual.generate_queries (it records the seeds)")
    return json.loads(path.read_text())


def _retrain_and_regenerate(train_source: str, keep_rows: list[int], recipe: dict, seed: int,
                            sample_seed: int, steps: int, items, cache: Path
                            ) -> tuple[np.ndarray, float]:
    """Retrain without the removed rows, regenerate, and measure; cached by all its inputs."""
    from ..data import open_dataset
    from .retrain import train_recipe
    from .truth import model_output

    key = hashlib.sha256(json.dumps([train_source, keep_rows, recipe, seed, sample_seed, steps])
                         .encode() + items.xt_QI.numpy().tobytes()
                         + items.target_QI.numpy().tobytes()).hexdigest()[:24]
    path = cache / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["image"], float(z["loss"])
    from ..dist import torch_threads

    with torch_threads(1):
        train = open_dataset("train", train_source)
        images = train.load(0, len(train))[torch.as_tensor(keep_rows)]
        unet, scheduler, _ = train_recipe(recipe, images, seed)
        image = sample_keyed(unet, scheduler, [sample_seed], steps)[0].numpy()
        loss = float(model_output(unet, items)[0])
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=image, loss=loss)
    return image, loss


def run_counterfactual(cfg, query_set: str, rows: list[int], methods: list[str], fraction: float,
                       out: Path, recipe: dict, seed: int = 0, jobs: int = 1,
                       truth_timesteps: int = 100, truth_seed: int = 1, log=print) -> dict:
    """Run the check for query ``rows`` of ``query_set``; writes results.json and picture.png."""
    from ..data import open_dataset
    from ..fingerprint import data_options
    from ..models import load_model
    from ..store import read_scores
    from .truth import model_output, query_items

    if not 0.0 < fraction < 1.0:
        raise EvalError(f"--fraction {fraction}: must be in (0, 1) (e.g. 0.1 removes 10% of N)")
    gen = read_generation(cfg.data.queries[query_set])
    qs = open_dataset(query_set, cfg.data.queries[query_set], data_options(cfg))
    bad = [r for r in rows if not 0 <= r < len(qs)]
    if bad:
        raise EvalError(f"--queries {bad}: query set {query_set!r} has rows 0..{len(qs) - 1}")
    train = open_dataset("train", cfg.data.train, data_options(cfg))
    N = len(train)
    m = max(1, int(round(fraction * N)))
    scores = {meth: read_scores(cfg.store.path, query_set, meth) for meth in methods}
    base = load_model(cfg.model.path)
    steps = int(gen["sample_steps"])
    jobs_args, keys = [], []
    originals, base_loss = {}, {}
    for q in rows:
        s_q = int(gen["seeds"][q])
        items = query_items(base, qs.load(q, q + 1), None, truth_timesteps, 1, truth_seed)
        originals[q] = sample_keyed(base.unet, base.scheduler, [s_q], steps)[0].numpy()
        base_loss[q] = float(model_output(base.unet, items)[0])
        removals = {meth: np.argsort(-scores[meth][q], kind="stable")[:m] for meth in methods}
        removals["random"] = np.random.default_rng([seed, q]).choice(N, size=m, replace=False)
        for name, removed in removals.items():
            keep = np.setdiff1d(np.arange(N), removed).tolist()
            jobs_args.append((cfg.data.train, keep, recipe, int(recipe.get("seed", 0)), s_q, steps,
                              items, out / "cache"))
            keys.append((q, name))
    started = time.perf_counter()
    if jobs <= 1:
        outs = [_retrain_and_regenerate(*a) for a in jobs_args]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            outs = list(pool.map(_retrain_and_regenerate, *zip(*jobs_args, strict=True)))
    results = {}
    for (q, name), (image, loss) in zip(keys, outs, strict=True):
        results.setdefault(q, {})[name] = {
            "l2": float(np.linalg.norm(image - originals[q])), "loss_change": loss - base_loss[q],
            "image": image}
    log(f"counterfactual: {len(outs)} retrains in {time.perf_counter() - started:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    names = [*methods, "random"]
    summary = {"fraction": fraction, "removed": m, "num_train": N, "query_set": query_set,
               "queries": [qs.uids[q] for q in rows],
               "per_query": {qs.uids[q]: {n: {k: v for k, v in results[q][n].items() if k != "image"}
                                          for n in names} for q in rows},
               "mean": {n: {k: float(np.mean([results[q][n][k] for q in rows]))
                            for k in ("l2", "loss_change")} for n in names},
               "seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    from ..report import draw_counterfactual

    draw_counterfactual(originals, results, names, out / "picture.png", m)
    return summary
