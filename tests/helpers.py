"""Test helpers: a tiny config writer, and slow, obvious re-implementations used as references."""

from pathlib import Path

import tomllib
import torch

from das_pipeline.config import dump_toml
from das_pipeline.features import content_keys, item_grid, keyed_noise
from das_pipeline.kernels.reference import materialize

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Flat keyword -> (section, key) of the settings tests override.
_KEYS = {"model": ("model", "path"), "train": ("data", "train"), "store": ("store", "path"),
         **{k: ("features", k) for k in ("readouts", "timesteps", "noise_draws", "normalize", "dtype",
                                         "batch_size", "seed", "params", "noise", "timestep_grid")},
         "dim": ("projection", "dim"), "kind": ("projection", "kind"),
         "rows_per_unit": ("store", "rows_per_unit"),
         **{k: ("score", k) for k in ("methods", "damping", "gamma", "topk", "residual")}}


def example_config(path: Path, name: str, queries: dict | None = None, drop=(), **overrides) -> Path:
    """Write examples/<name>.toml to ``path`` with settings replaced (flat keywords, see _KEYS).

    ``queries`` replaces the whole [data.queries] table; ``drop`` lists (section, key) to remove.
    """
    raw = tomllib.loads((EXAMPLES / f"{name}.toml").read_text())
    for flat, value in overrides.items():
        section, key = _KEYS[flat]
        raw.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    if queries is not None:
        raw["data"]["queries"] = {k: str(v) for k, v in queries.items()}
    for section, key in drop:
        raw[section].pop(key, None)
    path.write_text(dump_toml(raw))
    return path


def write_config(path: Path, model_dir: Path, **overrides) -> Path:
    """The tiny test config: examples/digits.toml on digits rows with a small model, K and k
    (keyword arguments override these)."""
    values = dict(model=model_dir, train="digits[0:40]", queries={"val": "digits[100:106]"},
                  timesteps=4, batch_size=8, dim=64, store=path.parent / "store.zarr",
                  rows_per_unit=16, damping=0.01, gamma=1.0, topk=5)
    values.update(overrides)
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    return example_config(path, "digits", **values)


def loop_gradients(unet, scheduler, x, keys, spec):
    """Per-sample features by a for-loop of backward(): (R, B, P) grads and (B,) residuals r.

    ``keys``: the noise keys, or None for content keys of ``x``.
    """
    unet.requires_grad_(True)
    keys = content_keys(x) if keys is None else keys
    ts, draws = item_grid(spec, scheduler.config.num_train_timesteps)
    eps = keyed_noise(spec.seed, keys, ts, draws, tuple(x.shape[1:]))
    grads = torch.zeros(len(spec.readouts), len(keys), sum(p.numel() for p in unet.parameters()),
                        dtype=torch.float64)
    residual = torch.zeros(len(keys), dtype=torch.float64)
    for b in range(len(keys)):
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


def dense_projection(num_params, dim, seed, kind):
    """The whole P (num_params, dim) of ``kind`` in float64, materialised from the reference
    formula (kernels/README.md), independently of the projection kernels."""
    return materialize(num_params, dim, seed, kind).double()


def brute_scores(train_feats, query_feats, residual, damping, gamma=1.0):
    """docs/DESIGN.md "Scores" formulas with dense float64 solves. Inputs are dicts readout -> (n, k)."""
    out = {}
    solved = {}
    for r, phi in train_feats.items():
        k = phi.shape[1]
        gram = phi.T @ phi
        lam = damping * (torch.trace(gram) - torch.linalg.eigvalsh(gram).max())  # DESIGN "Damping"
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
