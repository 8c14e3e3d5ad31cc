"""One whole `das run` at the defaults against traker's whole D-TRAK run, alternating, same machine.

What a user gets, not a hand-picked setting: das-pipeline runs `das run CONFIG` (extract train and
queries, reduce, score all three methods, write the report) in one process, with a config that sets
only the model, the data, K and the noise seed (everything else at the defaults: projection kind,
batch size, damping, store layout). traker 0.3.2 runs D-TRAK (one method) the way its users must
(benchmarks/traker_adapter.py): featurize the training set in one process, then finalize, featurize
the queries and score in another, at one damping, with the batch it wants (`--batch`, default 64:
it regenerates its projection per batch). Both see the same model, data, timesteps and noise.

Per process, measured by this parent: wall seconds (imports and model loading included), CPU
seconds (user + system, from the kernel's child accounting) and peak RSS (the worker's own
ru_maxrss). traker's whole run is its two processes; its peak RSS the larger of the two. Rounds
alternate the order (traker first in even rounds). Medians over rounds; ratios ours / traker's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/whole_run.py --out runs/whole_run            # k = 2048
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/whole_run.py --out runs/whole_run --dim 8192

Goals (issue "Speed"): ours <= 1/5 of traker's time at <= 1/2 of its peak RSS. CPU seconds are the
fairer clock on a machine shared with other jobs (wall time then includes waiting for a core).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from versus_traker import DIGITS_RECIPE, Setup, ensure_digits_model, export_inputs  # noqa: E402


def das_config(s: Setup, out: Path) -> Path:
    """examples/digits.toml with only the model, data, K and noise seed set (the rest: defaults)."""
    import tomllib

    from das_pipeline.config import dump_toml, merge

    raw = tomllib.loads((HERE.parent / "examples" / "digits.toml").read_text())
    raw["data"]["queries"] = dict(s.queries)
    raw = merge(raw, {"model": {"path": s.model}, "data": {"train": s.train},
                      "features": {"timesteps": s.timesteps, "seed": s.noise_seed},
                      "projection": {"dim": s.dim},
                      "store": {"path": str(out / "work" / "das" / "store.zarr")}})
    for section, key in (("features", "batch_size"), ("projection", "kind"), ("score", "damping"),
                         ("score", "gamma"), ("store", "rows_per_unit"), ("features", "noise")):
        raw.get(section, {}).pop(key, None)  # the defaults, whatever the example file says
    path = out / "das.toml"
    path.write_text(dump_toml(raw))
    return path


def das_worker(config: str, result: str) -> int:
    """`das run CONFIG` in this process; writes its peak RSS to ``result``."""
    from das_pipeline.cli import main

    rc = main(["run", config])
    Path(result).write_text(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return rc


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run one process; its wall and CPU seconds (this parent's child accounting)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {rc}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def run_das(s: Setup, out: Path, env: dict, r: int) -> dict:
    import shutil

    shutil.rmtree(out / "work" / "das", ignore_errors=True)
    (out / "work" / "das").mkdir(parents=True)
    cfg, result = das_config(s, out), out / "jobs" / f"das-r{r}.result.json"
    res = timed([sys.executable, str(Path(__file__).resolve()), "--das-worker", str(cfg), str(result)],
                env, out / "logs" / f"das-r{r}.log")
    res["peak_rss_mb"] = json.loads(result.read_text())["peak_rss_kb"] / 1024
    return res


def run_traker(s: Setup, out: Path, env: dict, r: int) -> dict:
    import shutil

    work, scores = out / "work" / "traker", out / "scores" / "traker"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    scores.mkdir(parents=True, exist_ok=True)
    total = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": 0.0}
    for stage in ("featurize", "score"):
        job = {"tool": "traker", "stage": stage, "setup": asdict(s), "work": str(work),
               "scores": str(scores), "inputs": str(out / "inputs"), "method": "dtrak"}
        path = out / "jobs" / f"traker-{stage}-r{r}.json"
        job["result"] = str(path.with_suffix(".result.json"))
        path.write_text(json.dumps(job, indent=1))
        res = timed([sys.executable, str(HERE / "versus_traker.py"), "--worker", str(path)], env,
                    out / "logs" / f"traker-{stage}-r{r}.log")
        worker = json.loads(Path(job["result"]).read_text())
        # the score worker re-finalizes and re-scores once more for its damping grid (one value
        # here): not part of a run, so its seconds are taken off both clocks (1 thread: CPU = wall)
        extra = worker["seconds"].get("sweep", 0.0)
        total["wall_s"] += res["wall_s"] - extra
        total["cpu_s"] += res["cpu_s"] - extra
        total["peak_rss_mb"] = max(total["peak_rss_mb"], worker["peak_rss_kb"] / 1024)
        total[f"{stage}_wall_s"] = res["wall_s"]
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--das-worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/whole_run", help="output folder")
    ap.add_argument("--widths", default="32,64", help="digits UNet widths (default 32,64 + attention: "
                    "701,345 parameters)")
    ap.add_argument("--no-attention", action="store_true", help="without the attention level")
    ap.add_argument("--train", default="digits[0:256]", help="training rows (default 256)")
    ap.add_argument("--queries", default="digits[1500:1596]", help="query rows (default 96 held-out)")
    ap.add_argument("--dim", type=int, default=2048, help="k of both tools (default 2048)")
    ap.add_argument("--timesteps", type=int, default=10, help="K (default 10)")
    ap.add_argument("--batch", type=int, default=64, help="traker's batch (default 64)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    args = ap.parse_args(argv)
    if args.das_worker:
        return das_worker(*args.das_worker)
    out = Path(args.out).resolve()
    for sub in ("jobs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    recipe = dict(DIGITS_RECIPE, widths=[int(w) for w in args.widths.split(",")],
                  attention=not args.no_attention)
    model = ensure_digits_model(out, None, recipe)
    from das_pipeline.config import ScoreConfig

    s = Setup(model=str(model), train=args.train, queries={"val": args.queries},
              timesteps=args.timesteps, dim=args.dim, batch=args.batch, grid=[ScoreConfig.damping],
              damping=ScoreConfig.damping)
    sizes = export_inputs(s, out / "inputs")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    runs: dict[str, list[dict]] = {"traker": [], "das": []}
    for r in range(args.rounds):
        for tool in (("traker", "das") if r % 2 == 0 else ("das", "traker")):
            res = (run_traker if tool == "traker" else run_das)(s, out, env, r)
            runs[tool].append(res)
            print(f"round {r} {tool:<6} wall {res['wall_s']:.1f} s, CPU {res['cpu_s']:.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    med = {tool: {k: float(np.median([x[k] for x in v])) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
           for tool, v in runs.items()}
    ratio = {k: med["das"][k] / med["traker"][k] for k in ("wall_s", "cpu_s", "peak_rss_mb")}
    import platform

    import torch

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"torch {torch.__version__}, load average at the end {os.getloadavg()[0]:.1f}")
    lines = [f"{time.strftime('%Y-%m-%d')}, {machine}",
             f"N = {sizes['train']} train, Q = {sizes['val']} queries, K = {s.timesteps}, k = {s.dim}, "
             f"model {model.name} ({args.widths}{'' if args.no_attention else ' + attention'}), "
             f"{args.rounds} rounds, medians", "",
             "| | wall, s | CPU, s | peak RSS, MB |", "|---|---|---|---|",
             f"| traker 0.3.2 D-TRAK (one method), batch {s.batch} | {med['traker']['wall_s']:.1f} | "
             f"{med['traker']['cpu_s']:.1f} | {med['traker']['peak_rss_mb']:.0f} |",
             f"| `das run`, defaults (three methods + report) | {med['das']['wall_s']:.1f} | "
             f"{med['das']['cpu_s']:.1f} | {med['das']['peak_rss_mb']:.0f} |",
             f"| ratio ours / traker | {ratio['wall_s']:.3f} | {ratio['cpu_s']:.3f} | "
             f"{ratio['peak_rss_mb']:.3f} |", "",
             f"Goal time <= 0.2: wall {'met' if ratio['wall_s'] <= 0.2 else 'NOT met'}, CPU "
             f"{'met' if ratio['cpu_s'] <= 0.2 else 'NOT met'}; peak RSS <= 0.5: "
             f"{'met' if ratio['peak_rss_mb'] <= 0.5 else 'NOT met'}"]
    text = "\n".join(lines)
    (out / "whole_run.md").write_text(text + "\n")
    (out / "whole_run.json").write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio,
                                                    "setup": asdict(s), "machine": machine}, indent=1))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
