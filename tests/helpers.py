"""Test helpers: a tiny config writer, and slow, obvious re-implementations used as references."""

import math
from pathlib import Path

import torch

from das_pipeline.features import item_grid, keyed_noise
from das_pipeline.kernels.reference import matrix_block

TINY_TOML = """
[model]
path = "{model}"

[data]
train = "{train}"
[data.queries]
{queries}

[features]
readouts = {readouts}
timesteps = {timesteps}
noise_draws = {noise_draws}
seed = 0
normalize = {normalize}
dtype = "{dtype}"
batch_size = {batch_size}

[projection]
dim = {dim}
seed = 0

[store]
path = "{store}"
rows_per_unit = {rows_per_unit}

[score]
methods = {methods}
damping = {damping}
gamma = {gamma}
topk = 5
"""


def _toml_list(items) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def _toml_list(items) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def write_config(path: Path, model_dir: Path, **overrides) -> Path:
    """Write a tiny TOML config (keyword arguments override the defaults) and return its path."""
    values = dict(model=model_dir, train="digits[0:40]", queries={"val": "digits[100:106]"},
                  readouts=("loss", "square", "mean"), timesteps=4, noise_draws=1,
                  normalize="false", dtype="float32", batch_size=8, dim=64,
                  store=path.parent / "store.zarr", rows_per_unit=16,
                  methods=("trak", "dtrak", "das"), damping=0.01, gamma=1.0)
    values.update(overrides)
    values["queries"] = "\n".join(f'{k} = "{v}"' for k, v in values["queries"].items())
    values["readouts"] = _toml_list(values["readouts"])
    values["methods"] = _toml_list(values["methods"])
    path.write_text(TINY_TOML.format(**values))
    return path


def loop_gradients(unet, scheduler, x, uids, spec):
    """Per-sample features by a for-loop of backward(): (R, B, P) grads and (B,) residuals r."""
    unet.requires_grad_(True)
    ts, draws = item_grid(spec, scheduler.config.num_train_timesteps)
    eps = keyed_noise(spec.seed, uids, ts, draws, tuple(x.shape[1:]))
    grads = torch.zeros(len(spec.readouts), len(uids), sum(p.numel() for p in unet.parameters()),
                        dtype=torch.float64)
    residual = torch.zeros(len(uids), dtype=torch.float64)
    for b in range(len(uids)):
        for i in range(len(ts)):
            xt = scheduler.add_noise(x[b:b + 1].float(), eps[b, i:i + 1], ts[i:i + 1]).double()
            e = eps[b, i:i + 1].double()
            pred = unet(xt, ts[i:i + 1]).sample
            values = {"loss": (pred - e).pow(2).mean(), "square": pred.pow(2).mean(),
                      "mean": pred.mean()}
            for r, readout in enumerate(spec.readouts):
                g = torch.cat([p.flatten() for p in torch.autograd.grad(
                    values[readout], list(unet.parameters()), retain_graph=True)]).double()
                grads[r, b] += (g / g.norm() if spec.normalize else g) / len(ts)
            residual[b] += values["loss"].item() / len(ts)
    return grads, residual.sqrt()


def dense_projection(num_params, dim, seed):
    """The whole P (num_params, dim) in float64, materialised from the reference formula."""
    return matrix_block("rademacher", 0, num_params, dim, seed).double() / math.sqrt(dim)


def brute_scores(train_feats, query_feats, residual, damping, gamma=1.0):
    """DESIGN.md section 1 formulas with dense float64 solves. Inputs are dicts readout -> (n, k)."""
    out = {}
    solved = {}
    for r, phi in train_feats.items():
        k = phi.shape[1]
        gram = phi.T @ phi
        lam = damping * torch.trace(gram) / k
        a = gram + lam * torch.eye(k, dtype=torch.float64)
        solved[r] = (a, torch.linalg.solve(a, query_feats[r].T))  # (k, Q)
    base = {r: (train_feats[r] @ solved[r][1]).T for r in train_feats}
    if "loss" in base:
        out["trak"] = base["loss"]
    if "square" in base:
        out["dtrak"] = base["square"]
    if "mean" in base:
        a = solved["mean"][0]
        phi = train_feats["mean"]
        lev = torch.einsum("ik,ki->i", phi, torch.linalg.solve(a, phi.T))
        signed = base["mean"] * (residual / (1 - lev) ** gamma)[None, :]
        out["das_signed"], out["das"] = signed, signed ** 2
    return out
