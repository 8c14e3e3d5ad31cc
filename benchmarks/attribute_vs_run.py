"""One new image by `das attribute` (and warm, as `das serve` answers it) vs a whole `das run`,
side by side on the demo's config (`das demo` is run first when its folder is missing).

    .venv/bin/python benchmarks/attribute_vs_run.py [--demo das-demo]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

DAS = [sys.executable, "-m", "das_pipeline.cli"]


def timed_cli(*args) -> float:
    t0 = time.perf_counter()
    subprocess.run([*DAS, *map(str, args), "--quiet"], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("das-demo"))
    args = ap.parse_args()
    cfg_path = args.demo / "demo.toml"
    if not cfg_path.is_file():
        subprocess.run([*DAS, "demo", "--out", str(args.demo), "--quiet"], check=True)
    from das_pipeline.attribute import Attributor
    from das_pipeline.config import load_config

    cfg = load_config(cfg_path)
    image = sorted((args.demo / "data" / "gen_png").glob("*.png"))[0]
    shutil.rmtree(cfg.store.path)  # a whole run: extract + reduce + score + report
    run_s = timed_cli("run", cfg_path)
    one_s = timed_cli("attribute", cfg_path, image)
    t0 = time.perf_counter()
    attributor = Attributor(cfg, keep_train=True)
    load_s = time.perf_counter() - t0
    attributor.attribute([(image.name, image.read_bytes())])  # first call fills the train cache
    t0 = time.perf_counter()
    attributor.attribute([(image.name, image.read_bytes())])
    warm_s = time.perf_counter() - t0
    n = attributor.scorer.num_train
    print(f"demo config: {n} training images, {len(cfg.data.queries)} query sets, "
          f"k = {cfg.projection.dim}, K = {cfg.features.timesteps}")
    print(f"das run (extract + reduce + score + report, from scratch): {run_s:.1f} s")
    print(f"das attribute, one image (new process: imports, model and factors, features, "
          f"scores, page): {one_s:.1f} s = {one_s / run_s:.2f} x das run")
    print(f"warm (das serve: model and factors loaded once in {load_s:.1f} s): {warm_s:.2f} s "
          f"per image = {warm_s / run_s:.3f} x das run")


if __name__ == "__main__":
    main()
