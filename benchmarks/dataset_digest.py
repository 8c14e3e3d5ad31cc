"""Opening an image folder: content digests with an empty (cold) vs a filled (warm) file cache.

Builds a folder of small PNGs in a temporary directory, then times in one run:
- ``main (names+sizes)``: what opening a folder cost before content digests: list, stat and read
  every header (no content identity);
- ``cold``: ``open_dataset`` with an empty cache: every file hashed (sha256) and fully decoded,
  verdicts written to the sqlite cache;
- ``warm``: ``open_dataset`` again: every file stat'ed and found unchanged in the cache.
The files were just written, so "cold" still reads them from the OS page cache: it measures
hashing + decoding, not the disk. Their mtimes are set an hour back, as for data at rest (files
modified in the last 2 s are never cached: digests.RACY_NS).

Usage: python benchmarks/dataset_digest.py [--files 100000] [--side 8] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def build(folder: Path, num_files: int, side: int) -> int:
    rng = np.random.default_rng(0)
    past = time.time_ns() - 3600 * 10**9
    total = 0
    for i in range(num_files):
        path = folder / f"{i:07d}.png"
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(path)
        os.utime(path, ns=(past, past))
        total += path.stat().st_size
    return total


def main_baseline(folder: Path) -> float:
    """The folder open of main before this change: names, sizes and headers."""
    started = time.perf_counter()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for p in files:
        with Image.open(p) as img:
            img.size, img.mode  # noqa: B018
    [(p.name, p.stat().st_size) for p in files]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--side", type=int, default=8, help="PNG width = height (grayscale)")
    parser.add_argument("--threads", type=int, default=0, help="probe threads (0: min(8, CPUs))")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DAS_CACHE_DIR"] = str(Path(tmp) / "cache")
        from das_pipeline import data, digests

        if args.threads:
            real = digests.probe_many
            digests.probe_many = lambda paths, decode: real(paths, decode, args.threads)
        folder = Path(tmp) / "images"
        folder.mkdir()
        started = time.perf_counter()
        total = build(folder, args.files, args.side)
        print(f"{args.files} PNGs of {args.side}x{args.side}, {total / 2**20:.1f} MiB, written in "
              f"{time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs, "
              f"{args.threads or min(8, os.cpu_count() or 1)} probe threads")
        base = main_baseline(folder)
        started = time.perf_counter()
        cold_ds = data.open_dataset("bench", str(folder))
        cold = time.perf_counter() - started
        started = time.perf_counter()
        warm_ds = data.open_dataset("bench", str(folder))
        warm = time.perf_counter() - started
        assert warm_ds.digest == cold_ds.digest and len(warm_ds) == args.files
        db = Path(os.environ["DAS_CACHE_DIR"]) / digests.CACHE_FILE
        print(f"{'what':<34}{'seconds':>9}{'us/file':>9}")
        for name, t in [("main (names+sizes, headers)", base), ("cold (hash + decode, empty cache)",
                                                                 cold), ("warm (cache hit)", warm)]:
            print(f"{name:<34}{t:>9.2f}{t / args.files * 1e6:>9.1f}")
        print(f"cold / warm = {cold / warm:.1f}x; warm / main = {warm / base:.2f}x; cache file "
              f"{db.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
