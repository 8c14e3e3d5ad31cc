"""Feature-extraction throughput against plain training throughput, per engine, side by side.

For each model and engine one worker process (so peak RSS figures do not contaminate each other)
alternates the two workloads on the same model and batch:
  train:   forward + backward of the standard epsilon loss (one random timestep per sample) + SGD step
  extract: features of all readouts at K timesteps, written as one unit of a real zarr store;
           dense-<kind>: per-sample gradients (vmap of jacrev) + JL projection of that kind;
           factored:     das_pipeline.factored (Kronecker-projected, no per-sample gradients)
Throughput is counted in sample-timesteps per second (a training step processes B of them, an
extraction batch B * K); the ratio extract / train is the figure of merit. Both clocks are kept:
process CPU time (the headline: at one thread it is the wall time an idle machine would give,
and it does not move when other jobs share the cores) and wall time. Peak RSS of a worker is
read after its first extraction, before any training step (train-only workers give training's).

Models: ``demo`` (the demo UNet: widths (16, 32) + attention, 8x8x1, digits) and ``cifar10``
(the DDPM CIFAR-10 UNet2DModel from config: 35.7M parameters, 32x32x3, random images). The
dense engines on cifar10 are slow on CPU (the dense Rademacher projection regenerates a
35.7M x k matrix per batch), so they run at ``--cifar-dense-batch`` with one repetition.

    python benchmarks/extract.py [--models demo,cifar10] [--engines dense-rademacher,dense-sjlt,factored]
        [--batch 32] [--cifar-batch 2] [--cifar-dense-batch 1] [--timesteps 10] [--dim 2048]
        [--repeats 3] [--cifar-repeats 2] [--cifar-items-per-pass 2] [--threads 1]
    python benchmarks/extract.py --quality [--dim 2048] [--quality-steps 400] [--quality-seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ENGINES = ("dense-rademacher", "dense-sjlt", "factored")
MODELS = ("demo", "cifar10")


def build_model(name: str):
    """(unet, sample shape): the demo UNet or the DDPM CIFAR-10 architecture, from config."""
    if name == "demo":
        from das_pipeline.recipe import tiny_unet

        return tiny_unet(8, 1, (16, 32), attention=True, seed=0), (1, 8, 8)
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                           block_out_channels=(128, 256, 256, 256),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                           dropout=0.1, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                           norm_eps=1e-6)
    return unet, (3, 32, 32)


def worker(cfg: dict) -> dict:
    """Measure one (model, engine) pair; returns the figures as a dict."""
    from das_pipeline.factored import FactoredPlan, factored_features, noised_items
    from das_pipeline.features import FeatureSpec, per_sample_gradients
    from das_pipeline.kernels import project
    from das_pipeline.recipe import ddpm_scheduler
    from das_pipeline.store import Store, UnitData

    torch.set_num_threads(cfg["threads"])
    unet, shape = build_model(cfg["model"])
    unet.eval()
    scheduler = ddpm_scheduler(1000)
    B, K, dim, engine = cfg["batch"], cfg["timesteps"], cfg["dim"], cfg["engine"]
    if cfg["model"] == "demo":
        from das_pipeline.data import open_dataset

        data = open_dataset("train", f"digits[0:{B}]")
        x, uids = data.load(0, B), data.uids
    else:
        x = torch.rand(B, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        uids = [str(i) for i in range(B)]
    spec = FeatureSpec(("loss", "square", "mean"), K, 1, 0)
    opt = torch.optim.SGD(unet.parameters(), lr=0.0)  # lr 0: the model stays fixed
    gen = torch.Generator().manual_seed(0)

    def train_step():
        unet.train()
        t = torch.randint(0, 1000, (B,), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x, eps, t), t).sample, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        unet.eval()

    out = {"params": sum(p.numel() for p in unet.parameters())}
    if engine == "train":
        train_step()
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    folder = tempfile.mkdtemp(prefix="das-bench-")
    split = Store.open(f"{folder}/bench.zarr", {"bench": True}).create_split(
        "train", source="bench", digest="-", uids=uids, readouts=spec.readouts, dim=dim,
        dtype="float32", rows_per_unit=B)
    parts = {"features": 0.0, "projection": 0.0, "write": 0.0}
    plan = None
    if engine == "factored":
        t0 = time.perf_counter()
        plan = FactoredPlan.build(unet, None, dim, seed=0)
        out["plan_s"] = time.perf_counter() - t0
        out["rest_dim"], out["layers"] = plan.rest_dim, len(plan.layers)

    def extract_batch():
        t0 = time.perf_counter()
        if plan is None:
            feats = per_sample_gradients(unet, scheduler, x, uids, spec, items_per_pass=cfg["items_per_pass"])
            t1 = time.perf_counter()
            R, _, P = feats.grads_RBP.shape
            proj = project(feats.grads_RBP.view(R * B, P), dim, 0, engine.split("-")[1]).view(R, B, -1)
            residual, rho = feats.residual_B, feats.rho_B
            del feats
        else:
            xt_BI, ts_I, target_BI = noised_items(scheduler, x, uids, spec)
            proj, residual, rho = factored_features(unet, plan, xt_BI, ts_I, target_BI, spec.readouts,
                                                    items_per_pass=cfg["items_per_pass"])
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        unit = UnitData({r: proj[i].numpy() for i, r in enumerate(spec.readouts)},
                        residual.numpy(), rho.numpy())
        split.write_data(0, unit)  # rewritten every repeat: not through commit_unit
        split.mark(0, unit)
        t3 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key] += dt
        return t3 - t0

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    first = timed(extract_batch)  # warm-up, and the extraction's own peak memory
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_step()
    train_s, extract_s = [], []
    if cfg["repeats"] == 0:  # a single, unwarmed extraction (slow engines on big models)
        extract_s, parts_used = [first], dict(parts)
        train_s = [timed(train_step) for _ in range(cfg["train_steps"])]
    else:
        parts = dict.fromkeys(parts, 0.0)
        for _ in range(cfg["repeats"]):
            train_s += [timed(train_step) for _ in range(cfg["train_steps"])]
            extract_s.append(timed(extract_batch))
        parts_used = parts
    # wall clock and process CPU time (robust to other jobs on a shared machine at 1 thread)
    for i, clock in enumerate(("wall", "cpu")):
        train = float(np.median([t[i] for t in train_s]))
        extract = float(np.median([t[i] for t in extract_s]))
        out[f"train_rate_{clock}"] = B / train
        out[f"extract_rate_{clock}"] = B * K / extract
        out[f"ms_per_sample_{clock}"] = 1e3 * extract / B
    total = sum(parts_used.values())
    out["split"] = {k: v / total for k, v in parts_used.items()}
    out["runs"] = len(extract_s)
    return out


def run_worker(cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quality(args) -> None:
    """Distortion of gradient inner products and of TRAK-style scores: factored vs dense JL
    features of the same per-sample gradients, at equal total k, on the trained digits UNet."""
    from das_pipeline.data import open_dataset
    from das_pipeline.factored import FactoredPlan, energy_weights, factored_features, noised_items
    from das_pipeline.features import FeatureSpec, per_sample_gradients
    from das_pipeline.kernels import project
    from das_pipeline.lds import spearman_rows
    from das_pipeline.recipe import ddpm_scheduler, tiny_unet, train_ddpm

    torch.set_num_threads(args.threads)
    unet, scheduler = tiny_unet(8, 1, (16, 32), attention=True, seed=0), ddpm_scheduler(1000)
    train_ddpm(unet, scheduler, open_dataset("train", "digits[0:400]").load(0, 400), args.quality_steps,
               seed=0, show_progress=False)
    unet.eval()
    train, queries = open_dataset("train", "digits[0:64]"), open_dataset("q", "digits[1700:1716]")
    x = torch.cat([train.load(0, len(train)), queries.load(0, len(queries))])
    uids = train.uids + ["q" + u for u in queries.uids]
    spec = FeatureSpec(("loss", "mean"), args.timesteps, 1, 0)
    grads_RNP = per_sample_gradients(unet, scheduler, x, uids, spec).grads_RBP.double()
    xt_BI, ts_I, target_BI = noised_items(scheduler, x, uids, spec)
    calib = open_dataset("calibration", "digits[400:432]")  # disjoint from train and queries
    calib_items = noised_items(scheduler, calib.load(0, len(calib)), calib.uids, spec)
    n = len(train)

    def metrics(phi_NK, g_NP):
        exact, approx = g_NP @ g_NP.T, phi_NK @ phi_NK.T
        norms = exact.diagonal().sqrt()
        iu = torch.triu_indices(len(g_NP), len(g_NP), 1)
        err = (approx - exact)[iu[0], iu[1]].abs()
        scale = (norms[iu[0]] * norms[iu[1]])
        cos = exact[iu[0], iu[1]] / scale
        big = cos.abs() >= 0.2

        def scores(kern):  # TRAK-style: (K_qt) (K_tt + lam I)^-1 in the N x N kernel form
            k_tt, k_qt = kern[:n, :n], kern[n:, :n]
            lam = 0.1 * k_tt.trace() / n
            return torch.linalg.solve(k_tt + lam * torch.eye(n, dtype=kern.dtype), k_qt.T).T

        rho = spearman_rows(scores(approx).numpy(), scores(exact).numpy())
        return {"norm": (approx.diagonal() / exact.diagonal() - 1).abs().mean().item(),
                "ip_norm": (err / scale).mean().item(),
                "ip_rel": (err[big] / exact[iu[0], iu[1]][big].abs()).median().item(),
                "pairs_big": int(big.sum()), "spearman": float(np.mean(rho))}

    rows = {}
    for seed in range(args.quality_seeds):
        plan = FactoredPlan.build(unet, None, args.dim, seed=seed)
        fact_RNK = factored_features(unet, plan, xt_BI, ts_I, target_BI, spec.readouts).feats_RBK.double()
        weighted = FactoredPlan.build(unet, None, args.dim, seed=seed,
                                      weights=energy_weights(unet, plan, *calib_items, spec.readouts))
        energy_RNK = factored_features(unet, weighted, xt_BI, ts_I, target_BI, spec.readouts).feats_RBK
        for r, readout in enumerate(spec.readouts):
            g = grads_RNP[r]
            for name, phi in (("dense-rademacher", project(g.float(), args.dim, seed, "rademacher")),
                              ("dense-sjlt", project(g.float(), args.dim, seed, "sjlt")),
                              ("factored", fact_RNK[r]), ("factored-energy", energy_RNK[r])):
                rows.setdefault((readout, name), []).append(metrics(phi.double(), g))
    print(f"quality: digits UNet ({sum(p.numel() for p in unet.parameters()):,} params) trained "
          f"{args.quality_steps} steps; {n} train + {len(queries)} query digits, K={args.timesteps}, "
          f"k={args.dim}, mean over {args.quality_seeds} projection seeds (worst seed in brackets); "
          f"factored-energy: weights from energy_weights on 32 other digits")
    print(f"{'readout':<8}{'engine':<18}{'|norm^2 err|':>17}{'|ip err|/(|g||h|)':>19}"
          f"{'median rel ip err':>19}{'score Spearman':>18}")
    for (readout, name), ms in rows.items():
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
        worst = {k: float(np.min([m[k] for m in ms]) if k == "spearman" else np.max([m[k] for m in ms]))
                 for k in ms[0]}
        print(f"{readout:<8}{name:<18}" + "".join(
            f"{f'{mean[k]:.4f} ({worst[k]:.3f})':>{w}}" for k, w in
            (("norm", 17), ("ip_norm", 19), ("ip_rel", 19), ("spearman", 18))))
    print(f"median rel ip err: over pairs with |cos| >= 0.2 ({ms[0]['pairs_big']} of the last readout's); "
          f"score Spearman: per query, exact vs projected TRAK-style scores (lam = 0.1 tr(K)/N), mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch", type=int, default=32, help="demo batch (all engines)")
    parser.add_argument("--cifar-batch", type=int, default=2, help="cifar10 batch (factored, train)")
    parser.add_argument("--cifar-dense-batch", type=int, default=1,
                        help="cifar10 batch of the dense engines (0 = skip them)")
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed extractions per demo worker")
    parser.add_argument("--cifar-repeats", type=int, default=2,
                        help="timed extractions per cifar10 factored worker (dense ones: the warm-up only)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed train steps per repeat (demo)")
    parser.add_argument("--cifar-items-per-pass", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quality", action="store_true",
                        help="instead: inner-product / score distortion of factored vs dense JL (digits)")
    parser.add_argument("--quality-steps", type=int, default=400, help="training steps of that model")
    parser.add_argument("--quality-seeds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quality:
        quality(args)
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    print(f"extract/train throughput per engine; K={args.timesteps} timesteps, 3 readouts, k={args.dim}; "
          f"torch {torch.__version__}, {args.threads} thread(s) per worker, {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d')}")
    header = (f"{'model':<9}{'engine':<18}{'batch':>6}{'train st/s':>12}{'extract st/s':>14}{'ratio':>8}"
              f"{'wall ratio':>12}{'ms/sample':>11}{'peak RSS MB':>13}  notes")
    print(header)
    print("-" * len(header))
    results = {}
    for model in args.models.split(","):
        cifar = model == "cifar10"
        for engine in ["train", *args.engines.split(",")]:
            dense = engine.startswith("dense")
            batch = (args.cifar_dense_batch if dense else args.cifar_batch) if cifar else args.batch
            notes = []
            if cifar and dense and batch == 0:
                print(f"{model:<9}{engine:<18}{'-':>6}  skipped (--cifar-dense-batch 0)")
                continue
            cfg = {"model": model, "engine": engine, "batch": batch, "timesteps": args.timesteps,
                   "dim": args.dim, "threads": args.threads,
                   "repeats": (0 if dense else args.cifar_repeats) if cifar else args.repeats,
                   "train_steps": 3 if cifar else args.train_steps,
                   "items_per_pass": args.cifar_items_per_pass if cifar else 0}
            started = time.perf_counter()
            res = run_worker(cfg)
            results[(model, engine)] = res
            if "error" in res:
                print(f"{model:<9}{engine:<18}{batch:>6}  failed: {res['error']}")
                continue
            if engine == "train":
                print(f"{model:<9}{'train only':<18}{batch:>6}{'':>12}{'':>14}{'':>8}{'':>12}{'':>11}"
                      f"{res['rss_mb']:>13.0f}  {res['params']:,} parameters")
                continue
            if cfg["repeats"] == 0:
                notes.append("one unwarmed extraction (slow on CPU)")
            if cifar:
                notes.append(f"items_per_pass {cfg['items_per_pass']}")
            if engine == "factored":
                notes.append(f"plan {res['plan_s']:.1f} s, {res['layers']} Kronecker layers, "
                             f"rest dim {res['rest_dim']}")
            notes.append("split " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in res["split"].items()
                                               if k != "projection" or dense))
            notes.append(f"{time.perf_counter() - started:.0f} s wall")
            train, extract = res["train_rate_cpu"], res["extract_rate_cpu"]
            wall_ratio = res["extract_rate_wall"] / res["train_rate_wall"]
            print(f"{model:<9}{engine:<18}{batch:>6}{train:>12.3g}{extract:>14.3g}{extract / train:>8.3f}"
                  f"{wall_ratio:>12.3f}{res['ms_per_sample_cpu']:>11.0f}{res['rss_mb']:>13.0f}  "
                  f"{'; '.join(notes)}", flush=True)
    print("st/s = sample-timesteps per second of process CPU time (1 thread: wall time on an idle "
          "machine); ms/sample = extraction CPU time per sample for all K timesteps and 3 readouts; "
          "ratio = extract st/s / train st/s in the same worker (CPU time; wall ratio: wall clock)")


if __name__ == "__main__":
    main()
