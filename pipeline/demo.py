"""`das demo`: the whole product on one CPU in a few minutes, with a picture at the end.

1. Train the tiny DDPM on 400 of scikit-learn's 8x8 digits (cached in <out>/base_model and
   reused when the recipe is unchanged).
2. Generate query images from keyed initial noise; also take held-out digits as queries.
3. Write <out>/demo.toml and run extract -> reduce -> score on it.
4. Draw <out>/attribution.png (each query beside its top-5 proponents per method) and
   <out>/summary.txt (timings, and how often the proponents share the query's digit label).
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

CONFIG = """# Written by `das demo`; paths are relative to this file.
[model]
path = "base_model"

[data]
train = "{train}"
[data.queries]
val = "{val}"
gen = "data/gen_png"

[features]
readouts = ["loss", "square", "mean"]
timesteps = 10
noise_draws = 1
seed = 0
batch_size = 25

[projection]
dim = 1024
seed = 0

[store]
path = "runs/demo.zarr"
rows_per_unit = 50

[score]
methods = ["trak", "dtrak", "das"]
topk = 5
"""


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
    from .recipe import sample_ddpm, save_pngs

    folder = out / "data" / "gen_png"
    if not retrained and len(list(folder.glob("*.png"))) == RECIPE["num_generated"]:
        return 0.0
    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    model = load_model(out / "base_model")
    images = sample_ddpm(model.unet, model.scheduler, RECIPE["num_generated"],
                         RECIPE["sample_seed"], RECIPE["sample_steps"])
    save_pngs(images, folder, prefix="gen")
    return time.perf_counter() - started


def _tile(img_CHW: np.ndarray, scale: int) -> np.ndarray:
    img = img_CHW[0] if img_CHW.shape[0] == 1 else img_CHW.transpose(1, 2, 0)
    big = np.kron(img, np.ones((scale, scale) + img.shape[2:], dtype=np.uint8))
    return big if big.ndim == 3 else np.repeat(big[..., None], 3, axis=2)


def draw_attribution(cfg, out_png: Path, per_method: int = 5, scale: int = 6) -> Path:
    """Picture: one row per query: the query, then the top proponents of each method."""
    from PIL import Image, ImageDraw

    from .data import open_dataset
    from .recipe import to_uint8
    from .score import read_scores

    train = open_dataset("train", cfg.data.train)
    train_u8 = to_uint8(train.load(0, len(train)))
    methods = list(cfg.score.methods)
    rows = []
    for name, source in cfg.data.queries.items():
        qs = open_dataset(name, source)
        q_u8 = to_uint8(qs.load(0, len(qs)))
        scores = {m: read_scores(cfg, name, m) for m in methods}
        for q in range(len(qs)):
            tops = {m: np.argsort(-scores[m][q], kind="stable")[:per_method] for m in methods}
            rows.append((f"{name} {qs.uids[q]}", q_u8[q], tops))
    h, w = train_u8.shape[2] * scale, train_u8.shape[3] * scale
    pad, label_w, head = 4, 110, 18
    group_w = per_method * (w + pad) + 3 * pad
    width = label_w + w + 3 * pad + len(methods) * group_w
    height = head + len(rows) * (h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, m in enumerate(methods):
        draw.text((label_w + w + 3 * pad + j * group_w, 3), f"{m}: top-{per_method} proponents",
                  fill="black")
    for i, (label, q_img, tops) in enumerate(rows):
        y = head + i * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        canvas.paste(Image.fromarray(_tile(q_img, scale)), (label_w, y))
        for j, m in enumerate(methods):
            x0 = label_w + w + 3 * pad + j * group_w
            for r, idx in enumerate(tops[m]):
                canvas.paste(Image.fromarray(_tile(train_u8[idx], scale)), (x0 + r * (w + pad), y))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def label_agreement(cfg, query_set: str, per_method: int = 5) -> dict[str, float]:
    """Fraction of top proponents whose digit label equals the query's (digits sources only)."""
    from .data import _parse, digits_labels
    from .score import read_scores

    labels = digits_labels()
    (_, trows), (_, qrows) = _parse(cfg.data.train), _parse(cfg.data.queries[query_set])
    train_labels, query_labels = labels[trows], labels[qrows]
    result = {}
    for m in cfg.score.methods:
        top = np.argsort(-read_scores(cfg, query_set, m), axis=1, kind="stable")[:, :per_method]
        result[m] = float((train_labels[top] == query_labels[:, None]).mean())
    return result


def run_demo(out: Path, show_progress: bool = True) -> dict:
    """Run the demo end to end in ``out``; returns the timings (seconds per stage)."""
    from .config import load_config
    from .extract import run_extract
    from .reduce import run_reduce
    from .score import run_score
    from .store import StoreError

    out.mkdir(parents=True, exist_ok=True)
    times = {}
    started = time.perf_counter()
    retrained, train_summary = _train_or_reuse(out, show_progress)
    times["train"] = time.perf_counter() - started
    times["generate"] = _generate(out, retrained)
    cfg_path = out / "demo.toml"
    cfg_path.write_text(CONFIG.format(**RECIPE))
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
    times["picture"] = time.perf_counter() - t0
    agreement = label_agreement(cfg, "val")
    total = time.perf_counter() - started
    lines = [
        "das demo: tiny DDPM on scikit-learn digits, attribution of generated and held-out images",
        f"model: {out / 'base_model'} ({'trained now' if retrained else 'cached'}; "
        f"{train_summary.get('steps', '-')} steps)",
        f"store: {cfg.store.path}",
        f"picture: {picture}",
        f"top-k CSVs: {cfg.reports_dir}",
        "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f", total {total:.1f}",
        "held-out queries, share of top-5 proponents with the query's digit label: "
        + ", ".join(f"{m} {v:.2f}" for m, v in agreement.items()) + " (chance is about 0.10)",
    ]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"times": times, "agreement": agreement, "picture": str(picture)}
