"""Everything people look at: top-k CSV tables and pictures of attributions.

- ``write_topk_csv``: one CSV per method (query_row, query_uid, rank, train_row, train_uid, score).
- ``draw_attribution``: each query beside its top proponents per method (the demo picture).
- ``draw_counterfactual``: each generated query beside its regenerations after removals.
Images come in as float [-1, 1] (C, H, W) and are drawn as uint8 tiles enlarged by an integer
``scale`` (nearest neighbour, so single pixels stay visible).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .data import to_uint8


def write_topk_csv(folder: Path, query_uids: list[str], train_uids: list[str], best,
                   skip_queries=()) -> list[Path]:
    """One CSV per method: query_row, query_uid, rank, train_row, train_uid, score.

    ``best`` maps method -> (values (Q, k), train rows (Q, k)). Rows ``skip_queries`` (excluded
    queries) and entries without a finite score (fewer scorable training rows than k) are left out.
    """
    skip = set(skip_queries)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for method, (vals, idx) in best.items():
        path = folder / f"{method}_topk.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["query_row", "query_uid", "rank", "train_row", "train_uid", "score"])
            for q in range(vals.shape[0]):
                if q in skip:
                    continue
                for rank in range(vals.shape[1]):
                    i = int(idx[q, rank])
                    if i < 0 or not np.isfinite(float(vals[q, rank])):
                        continue
                    w.writerow([q, query_uids[q], rank + 1, i, train_uids[i],
                                f"{float(vals[q, rank]):.9g}"])
        paths.append(path)
    return paths


def tile(img_u8_CHW: np.ndarray, scale: int):
    """A PIL RGB image of one uint8 (C, H, W) image, each pixel a scale x scale block."""
    from PIL import Image

    img = img_u8_CHW[0] if img_u8_CHW.shape[0] == 1 else img_u8_CHW.transpose(1, 2, 0)
    big = np.kron(img, np.ones((scale, scale) + img.shape[2:], dtype=np.uint8))
    return Image.fromarray(big if big.ndim == 3 else np.repeat(big[..., None], 3, axis=2))


def draw_attribution(cfg, out_png: Path, per_method: int = 5, scale: int = 6) -> Path:
    """Picture: one row per query: the query, then the top proponents of each method."""
    from PIL import Image, ImageDraw

    from .data import open_dataset
    from .store import read_scores

    train = open_dataset("train", cfg.data.train)
    train_u8 = to_uint8(train.load(0, len(train)))
    methods = list(cfg.score.methods)
    rows = []
    for name, source in cfg.data.queries.items():
        qs = open_dataset(name, source)
        q_u8 = to_uint8(qs.load(0, len(qs)))
        scores = {m: read_scores(cfg.store.path, name, m) for m in methods}
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
        canvas.paste(tile(q_img, scale), (label_w, y))
        for j, m in enumerate(methods):
            x0 = label_w + w + 3 * pad + j * group_w
            for r, idx in enumerate(tops[m]):
                canvas.paste(tile(train_u8[idx], scale), (x0 + r * (w + pad), y))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def draw_counterfactual(originals: dict, results: dict, names: list[str], path: Path, m: int,
                        scale: int = 8) -> Path:
    """Rows: query, then its regeneration without each method's top-m and without random m."""
    from PIL import Image, ImageDraw

    def as_tile(img_CHW):
        return tile(to_uint8(torch.from_numpy(img_CHW)[None])[0], scale)

    first = next(iter(originals.values()))
    h, w = first.shape[1] * scale, first.shape[2] * scale
    col_w, row_h, head = max(w, 116) + 8, h + 34, 30
    canvas = Image.new("RGB", (col_w * (len(names) + 1) + 8, head + row_h * len(originals)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(["query", *[f"-top{m} {n}" if n != "random" else f"-random {m}"
                                         for n in names]]):
        draw.text((8 + j * col_w, 8), label, fill="black")
    for i, (q, orig) in enumerate(originals.items()):
        y = head + i * row_h
        canvas.paste(as_tile(orig), (8, y))
        for j, n in enumerate(names, start=1):
            r = results[q][n]
            canvas.paste(as_tile(r["image"]), (8 + j * col_w, y))
            draw.text((8 + j * col_w, y + h + 2), f"L2 {r['l2']:.2f} dF {r['loss_change']:+.3f}",
                      fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
