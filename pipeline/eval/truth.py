"""`das lds truth`: the model output F_m(q) of every retrained model m and query q.

F_m(q) = mean over I = K S keyed (t, eps) pairs of mean_j (eps_theta_m(x_t, t) - eps)_j^2, with
t on the uniform grid of K timesteps and eps keyed by (seed, query, t, draw): the same pairs for
every model. Defaults K = 100, S = 1, seed 1 (features default to seed 0, so the truth never
reuses the features' exact noise).

Legend: Q queries, I (timestep, draw) items, M subsets.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EvalError
from .retrain import MARKER


def query_items(uids: list[str], images_QCHW: torch.Tensor, scheduler, timesteps: int, draws: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed (x_t, t, eps) of every query: (Q, I, C, H, W), (I,), (Q, I, C, H, W)."""
    from ..features import FeatureSpec, item_grid, keyed_noise

    spec = FeatureSpec(("loss",), timesteps, draws, seed)
    ts_I, draws_I = item_grid(spec, int(scheduler.config.num_train_timesteps))
    eps = keyed_noise(seed, uids, ts_I, draws_I, tuple(images_QCHW.shape[1:]))
    Q, I = eps.shape[:2]
    xt = scheduler.add_noise(images_QCHW[:, None].expand_as(eps).reshape(Q * I, *eps.shape[2:]),
                             eps.reshape(Q * I, *eps.shape[2:]), ts_I.repeat(Q)).view_as(eps)
    return xt, ts_I, eps


@torch.no_grad()
def model_output(unet, xt_QI, ts_I, eps_QI, batch: int = 2048) -> np.ndarray:
    """(Q,) float64: loss readout averaged over the items, for one model."""
    Q, I = xt_QI.shape[:2]
    x, e = xt_QI.reshape(Q * I, *xt_QI.shape[2:]), eps_QI.reshape(Q * I, *xt_QI.shape[2:])
    t = ts_I.repeat(Q)
    losses = torch.empty(Q * I, dtype=torch.float64)
    for lo in range(0, Q * I, batch):
        hi = min(Q * I, lo + batch)
        pred = unet(x[lo:hi], t[lo:hi]).sample
        losses[lo:hi] = (pred - e[lo:hi]).pow(2).flatten(1).mean(1).double()
    return losses.view(Q, I).mean(1).numpy()


def model_dirs(models: Path, num_subsets: int) -> tuple[list[Path], np.ndarray]:
    """Finished model folders and their subset rows; refuses an empty or partial set."""
    done = [(models / f"{m:04d}" / MARKER).is_file() for m in range(num_subsets)]
    found = [(m, models / f"{m:04d}") for m in range(num_subsets) if done[m]]
    if not found:
        raise EvalError(f"no finished subset models in {models}; run `das lds train` first")
    missing = [m for m in range(num_subsets) if not done[m]]
    if missing:
        raise EvalError(f"{len(missing)} of {num_subsets} subset models in {models} are not finished "
                       f"(e.g. {missing[:5]}); rerun `das lds train` to finish them")
    return [p / "model" for _, p in found], np.asarray([m for m, _ in found], dtype=np.int64)


def run_truth(query_sources: dict[str, str], models: Path, num_subsets: int, out: Path,
              timesteps: int = 100, draws: int = 1, seed: int = 1, log=print) -> dict:
    """Write <out>/<query set>.npz (F (M, Q), query_uids, subsets) for every query set."""
    from ..data import open_dataset
    from ..models import load_model

    dirs, rows = model_dirs(models, num_subsets)
    first = load_model(dirs[0])
    items = {}
    for name, source in query_sources.items():
        ds = open_dataset(name, source)
        items[name] = (ds.uids, query_items(ds.uids, ds.load(0, len(ds)), first.scheduler,
                                            timesteps, draws, seed))
    F = {name: np.zeros((len(dirs), len(uids))) for name, (uids, _) in items.items()}
    started = time.perf_counter()
    for j, d in enumerate(dirs):
        model = load_model(d)
        if model.scheduler.config.num_train_timesteps != first.scheduler.config.num_train_timesteps:
            raise EvalError(f"{d} has another scheduler than {dirs[0]}; retrain with one recipe")
        for name, (_, (xt, ts, eps)) in items.items():
            F[name][j] = model_output(model.unet, xt, ts, eps)
        if (j + 1) % 8 == 0 or j + 1 == len(dirs):
            el = time.perf_counter() - started
            log(f"lds truth: {j + 1}/{len(dirs)} models, ETA {el / (j + 1) * (len(dirs) - j - 1):.0f} s")
    from .lds import save_truth

    paths = {name: str(save_truth(out / f"{name}.npz", F[name], uids, rows))
             for name, (uids, _) in items.items()}
    return {"paths": paths, "seconds": time.perf_counter() - started, "models": len(dirs)}
