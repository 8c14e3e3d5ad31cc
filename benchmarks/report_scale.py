"""`das report` at scale: 10^3 queries x 10^5 training images (synthetic), timed stage by stage.

A synthetic store of (Q, N) float32 scores (zarr, chunks as `das score` writes them) and 8x8
uint8 image arrays stand in for a scored run. Measured, side by side in one run:
1. top-k + opponents of all queries streamed from the stored scores (``score.Best``, what
   `das score` does while it writes them) and written as CSVs;
2. report pages from the CSVs: first pass (thumbnails made) and second pass (thumbnails
   cached), seconds per page of 50 queries;
3. page load time in headless chromium (``--dump-dom``), minus chromium's start-up on an empty
   page, when chromium is installed.

    .venv/bin/python benchmarks/report_scale.py [--queries 1000] [--train 100000] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from das_pipeline.data import open_dataset
from das_pipeline.report import read_topk_csv, write_query_pages, write_topk_csv
from das_pipeline.score import Best

METHODS = ("trak", "dtrak", "das")


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def chromium_seconds(url: str, repeats: int = 3) -> float:
    exe = shutil.which("chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url]
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, timeout=300)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--train", type=int, default=100_000)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--rows-per-unit", type=int, default=4096)
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="report_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    Q, N, k = args.queries, args.train, args.topk
    rng = np.random.default_rng(0)
    np.save(work / "train.npy", rng.integers(0, 256, (N, 1, 8, 8), dtype=np.uint8))
    np.save(work / "queries.npy", rng.integers(0, 256, (Q, 1, 8, 8), dtype=np.uint8))
    scores = zarr.open_array(work / "scores.zarr", mode="w", shape=(Q, N), dtype="float32",
                             chunks=(Q, args.rows_per_unit))
    t0 = time.perf_counter()
    for lo in range(0, N, args.rows_per_unit):
        hi = min(N, lo + args.rows_per_unit)
        scores[:, lo:hi] = rng.standard_normal((Q, hi - lo), dtype=np.float32)
    write_s = time.perf_counter() - t0
    print(f"synthetic store: {Q} x {N} float32 scores ({Q * N * 4 / 2**30:.2f} GiB) written in "
          f"{write_s:.1f} s -> {work}")

    train, _ = timed(open_dataset, "train", str(work / "train.npy"))
    qs, _ = timed(open_dataset, "gen", str(work / "queries.npy"))
    t0 = time.perf_counter()
    best = Best(METHODS, Q, k)
    for lo in range(0, N, args.rows_per_unit):
        block = torch.from_numpy(scores[:, lo:lo + args.rows_per_unit])
        for m in METHODS:  # the same block stands in for each method's scores
            best.add(m, block if m != "das" else block.square(), 0, lo)
    topk_s = time.perf_counter() - t0
    reports = work / "reports"
    _, csv_s = timed(lambda: (write_topk_csv(reports / "gen", qs.uids, train.uids, best.top),
                              write_topk_csv(reports / "gen", qs.uids, train.uids, best.bottom,
                                             kind="opponents")))
    t0 = time.perf_counter()
    top = {m: read_topk_csv(reports / "gen" / f"{m}_topk.csv", Q) for m in METHODS}
    bottom = {m: read_topk_csv(reports / "gen" / f"{m}_opponents.csv", Q) for m in METHODS[:2]}
    read_s = time.perf_counter() - t0
    pages, cold_s = timed(write_query_pages, reports, "gen", qs, train, top, bottom)
    _, warm_s = timed(write_query_pages, reports, "gen", qs, train, top, bottom)
    num_thumbs = len(list((reports / "thumbs" / "train").glob("*.png")))
    print(f"top-k + opponents streamed from the stored scores: {topk_s:.1f} s "
          f"({len(METHODS)} methods, k = {k}); CSVs written {csv_s:.2f} s, read {read_s:.2f} s")
    print(f"report: {len(pages)} pages of 50 queries; first pass {cold_s:.1f} s "
          f"({cold_s / len(pages):.2f} s/page, {num_thumbs} train thumbnails made), "
          f"second pass {warm_s:.1f} s ({warm_s / len(pages):.2f} s/page, thumbnails cached); "
          f"cached/first = {warm_s / cold_s:.2f}")
    size = pages[0].stat().st_size
    print(f"page size: {size / 1024:.0f} KiB HTML, "
          f"{pages[0].with_suffix('.png').stat().st_size / 1024:.0f} KiB contact sheet")
    if shutil.which("chromium"):
        blank = chromium_seconds("about:blank")
        page = chromium_seconds(pages[0].as_uri())
        print(f"page load in headless chromium: {page:.2f} s for page 1 vs {blank:.2f} s for "
              f"about:blank (start-up): {max(0.0, page - blank):.2f} s to load and render "
              f"{50 * (len(METHODS) * k + 2 * k + 1)} images")
    else:
        print("page load: chromium not installed (apt-get install chromium); not measured")
    if args.out is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
