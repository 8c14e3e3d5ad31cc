"""`das demo`: the whole product on one CPU in a few minutes, with a picture at the end.

1. Train the tiny DDPM on 400 of scikit-learn's 8x8 digits (cached in <out>/base_model and
   reused when the recipe is unchanged).
2. Generate query images from keyed initial noise; also take held-out digits as queries.
3. Write <out>/demo.toml and run extract -> reduce -> score on it.
4. Draw <out>/attribution.png (each query beside its top-5 proponents per method), write the
   HTML report (<out>/runs/demo.reports/index.html) and <out>/summary.txt (timings, and how
   often the proponents share the query's digit label).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

RECIPE = {
    "train": "digits[0:400]",
    "val": "digits[1700:1708]",
    "widths": [16, 32],
    "attention": True,
    "num_train_timesteps": 1000,
    "steps": 800,
    "batch_size": 128,
    "lr": 3e-3,
    "seed": 0,
    "num_generated": 8,
    "sample_seed": 1,
    "sample_steps": 250,
}



def demo_config() -> dict:
    """The demo's run (paths relative to the demo folder); written to <out>/demo.toml."""
    return {
        "model": {"path": "base_model"},
        "data": {"train": RECIPE["train"], "queries": {"val": RECIPE["val"], "gen": "data/gen_png"}},
        "features": {"readouts": ["loss", "square", "mean"], "timesteps": 10, "batch_size": 25},
        "projection": {"dim": 1024},
        "store": {"path": "runs/demo.zarr", "rows_per_unit": 50},
        "score": {"methods": ["trak", "dtrak", "das"], "topk": 5},
    }


def _train_or_reuse(out: Path, show_progress: bool) -> tuple[bool, dict]:
    from .data import open_dataset
    from .recipe import ddpm_scheduler, save_pipeline, tiny_unet, train_ddpm

    model_dir = out / "base_model"
    stamp = model_dir / "das_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == RECIPE:
        return False, {"seconds": 0.0}
    shutil.rmtree(model_dir, ignore_errors=True)
    train = open_dataset("train", RECIPE["train"])
    unet = tiny_unet(8, 1, tuple(RECIPE["widths"]), RECIPE["attention"], seed=RECIPE["seed"])
    scheduler = ddpm_scheduler(RECIPE["num_train_timesteps"])
    summary = train_ddpm(unet, scheduler, train.load(0, len(train)), RECIPE["steps"],
                         seed=RECIPE["seed"], batch_size=RECIPE["batch_size"], lr=RECIPE["lr"],
                         show_progress=show_progress)
    save_pipeline(unet, scheduler, model_dir)
    stamp.write_text(json.dumps(RECIPE, indent=1))
    return True, summary


def _generate(out: Path, retrained: bool) -> float:
    from .models import load_model
    from .recipe import sample_keyed, save_pngs

    folder = out / "data" / "gen_png"
    if not retrained and len(list(folder.glob("*.png"))) == RECIPE["num_generated"]:
        return 0.0
    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    model = load_model(out / "base_model")
    seeds = [RECIPE["sample_seed"] + i for i in range(RECIPE["num_generated"])]
    images = sample_keyed(model.unet, model.scheduler, seeds, RECIPE["sample_steps"])
    save_pngs(images, folder, prefix="gen")
    return time.perf_counter() - started


def label_agreement(cfg, query_set: str, per_method: int = 5) -> dict[str, float]:
    """Fraction of top proponents whose digit label equals the query's (digits sources only)."""
    from .data import _parse, digits_labels
    from .store import read_scores

    labels = digits_labels()
    (_, trows), (_, qrows) = _parse(cfg.data.train), _parse(cfg.data.queries[query_set])
    train_labels, query_labels = labels[trows], labels[qrows]
    result = {}
    for m in cfg.score.methods:
        top = np.argsort(-read_scores(cfg.store.path, query_set, m), axis=1, kind="stable")[:, :per_method]
        result[m] = float((train_labels[top] == query_labels[:, None]).mean())
    return result


def run_demo(out: Path, show_progress: bool = True) -> dict:
    """Run the demo end to end in ``out``; returns the timings (seconds per stage)."""
    from .config import dump_toml, load_config
    from .extract import run_extract
    from .reduce import run_reduce
    from .report import draw_attribution, run_report
    from .score import run_score
    from .store import StoreError

    out.mkdir(parents=True, exist_ok=True)
    times = {}
    started = time.perf_counter()
    retrained, train_summary = _train_or_reuse(out, show_progress)
    times["train"] = time.perf_counter() - started
    times["generate"] = _generate(out, retrained)
    cfg_path = out / "demo.toml"
    cfg_path.write_text("# Written by `das demo`; paths are relative to this file.\n"
                        + dump_toml(demo_config()))
    cfg = load_config(cfg_path)
    if retrained:
        shutil.rmtree(cfg.store.path, ignore_errors=True)
    for stage, fn in (("extract", run_extract), ("reduce", run_reduce), ("score", run_score)):
        t0 = time.perf_counter()
        try:
            fn(cfg, show_progress=show_progress)
        except StoreError as err:
            if stage != "extract" or "other result-affecting settings" not in str(err):
                raise
            # The demo owns its store: one made by another version of the demo is rebuilt.
            print(f"das demo: rebuilding {cfg.store.path} ({str(err).splitlines()[0]})")
            shutil.rmtree(cfg.store.path)
            fn(cfg, show_progress=show_progress)
        times[stage] = time.perf_counter() - t0
    t0 = time.perf_counter()
    picture = draw_attribution(cfg, out / "attribution.png")
    report = run_report(cfg)["index"]
    times["picture"] = time.perf_counter() - t0
    agreement = label_agreement(cfg, "val")
    total = time.perf_counter() - started
    lines = [
        "das demo: tiny DDPM on scikit-learn digits, attribution of generated and held-out images",
        f"model: {out / 'base_model'} ({'trained now' if retrained else 'cached'}; "
        f"{train_summary.get('steps', '-')} steps)",
        f"store: {cfg.store.path}",
        f"picture: {picture}",
        f"report: {report}",
        f"top-k CSVs: {cfg.reports_dir}",
        "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f", total {total:.1f}",
        "held-out queries, share of top-5 proponents with the query's digit label: "
        + ", ".join(f"{m} {v:.2f}" for m, v in agreement.items()) + " (chance is about 0.10)",
    ]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"times": times, "agreement": agreement, "picture": str(picture), "report": str(report)}
