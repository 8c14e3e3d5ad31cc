"""Feature-extraction throughput against plain training throughput, measured side by side.

Same model, same batch, same process, alternating the two workloads:
  train:   forward + backward of the batch loss (one random timestep per sample)
  extract: per-sample gradients of all readouts at K timesteps (vmap), JL projection to k,
           and writing the unit into a real zarr store (chunks + marker)
Throughput is counted in sample-timesteps per second (a training step processes B of them,
an extraction batch B * K). The ratio extract / train is what the README reports.

    python benchmarks/extract.py [--batch 32] [--timesteps 10] [--dim 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from das_pipeline.data import open_dataset
from das_pipeline.features import FeatureSpec, per_sample_gradients
from das_pipeline.kernels import project
from das_pipeline.recipe import ddpm_scheduler, tiny_unet
from das_pipeline.store import Store, UnitData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", default="16,32", help="UNet block widths (demo model: 16,32)")
    args = parser.parse_args()

    widths = tuple(int(w) for w in args.widths.split(","))
    unet = tiny_unet(8, 1, widths, attention=True, seed=0)
    scheduler = ddpm_scheduler(1000)
    num_params = sum(p.numel() for p in unet.parameters())
    data = open_dataset("train", f"digits[0:{args.batch}]")
    x = data.load(0, args.batch)
    spec = FeatureSpec(("loss", "square", "mean"), args.timesteps, 1, 0)
    opt = torch.optim.SGD(unet.parameters(), lr=0.0)  # lr 0: the model stays fixed
    gen = torch.Generator().manual_seed(0)

    def train_step():
        unet.train()
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x, eps, t), t).sample, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        unet.eval()

    folder = tempfile.mkdtemp(prefix="das-bench-")
    store = Store.open(f"{folder}/bench.zarr", {"bench": True})
    split = store.create_split("train", source="bench", digest="-", uids=data.uids,
                               readouts=spec.readouts, dim=args.dim, dtype="float32",
                               rows_per_unit=args.batch)
    parts = {"gradients": 0.0, "projection": 0.0, "write": 0.0}

    def extract_batch():
        t0 = time.perf_counter()
        feats = per_sample_gradients(unet, scheduler, x, data.uids, spec)
        t1 = time.perf_counter()
        R, B, P = feats.grads_RBP.shape
        proj = project(feats.grads_RBP.view(R * B, P), args.dim, 0).view(R, B, -1)
        t2 = time.perf_counter()
        unit = UnitData({r: proj[i].numpy() for i, r in enumerate(spec.readouts)},
                        feats.residual_B.numpy(), feats.rho_B.numpy())
        split.write_data(0, unit)  # rewritten every repeat: not through commit_unit
        split.mark(0, unit)
        t3 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key] += dt

    train_step()
    extract_batch()  # warm-up both
    parts = dict.fromkeys(parts, 0.0)
    train_s, extract_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.timesteps):  # as many sample-timesteps as one extraction batch
            train_step()
        train_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        extract_batch()
        extract_s.append(time.perf_counter() - t0)
    work = args.batch * args.timesteps
    train_rate = work / np.median(train_s)
    extract_rate = work / np.median(extract_s)
    total = sum(parts.values())
    print(f"model: UNet2DModel widths {widths} + attention, {num_params:,} parameters; batch "
          f"{args.batch}, K={args.timesteps} timesteps, 3 readouts, k={args.dim}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'workload':<34}{'sample-timesteps/s':>20}")
    print(f"{'train (fwd+bwd of batch loss)':<34}{train_rate:>20.1f}")
    print(f"{'extract (3 readouts, project, write)':<34}{extract_rate:>20.1f}")
    print(f"ratio extract/train: {extract_rate / train_rate:.3f}")
    print("extract time split: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts.items()))


if __name__ == "__main__":
    main()
