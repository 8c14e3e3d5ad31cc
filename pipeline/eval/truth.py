"""`das lds truth`: the model output F_m(q) of every retrained model m and query q.

F_m(q) = mean over I = K S keyed (t, eps) pairs of mean_j (eps_theta_m(x_t, t) - target)_j^2,
with t on the uniform grid of K timesteps, eps keyed by (seed, the query's content, t, draw), and
the target, inputs and conditioning built as the features build them (eps or v for v_prediction
schedulers; VAE latents and caption embeddings for latent models): the same items for every
model. Defaults K = 100, S = 1, seed 1 (features default to seed 0, so the truth never
reuses the features' exact noise). For LoRA configs model m is the base pipeline with subset m's
adapter (``<models>/<m:04d>/lora``); the VAE and text encoder are the base's, shared by all.

Legend: Q queries, I (timestep, draw) items, M subsets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EvalError
from .retrain import LORA_DIR, MARKER, PIPELINE_DIR


@dataclass
class TruthItems:
    """The fixed (x_t, t, target[, caption embedding]) items of every query, shared by all models."""

    xt_QI: torch.Tensor
    """(Q, I, C, H, W) noised samples (pixels, or VAE latents of latent models)."""
    ts_I: torch.Tensor
    target_QI: torch.Tensor
    """(Q, I, C, H, W) what the loss compares with: eps, or v for v_prediction schedulers."""
    cond_QLD: torch.Tensor | None = None
    """Caption embeddings of text-conditioned models."""


def query_items(model, pixels_QCHW: torch.Tensor, captions: list[str] | None, timesteps: int,
                draws: int, seed: int) -> TruthItems:
    """The items of the truth, built exactly as the features build theirs: content noise keys,
    the scheduler's targets (eps or v), VAE latents and caption embeddings for latent models."""
    from ..features import FeatureSpec, content_keys, noised_items
    from ..models import encode_captions, encode_images

    keys = content_keys(pixels_QCHW, captions if model.conditional else None)
    x = encode_images(model, pixels_QCHW) if model.conditional else pixels_QCHW
    spec = FeatureSpec(("loss",), timesteps, draws, seed)
    xt, ts, target = noised_items(model.scheduler, x, keys, spec)
    cond = encode_captions(model, captions) if model.conditional else None
    return TruthItems(xt, ts, target, cond)


@torch.no_grad()
def model_output(unet, items: TruthItems, batch: int = 2048) -> np.ndarray:
    """(Q,) float64: the loss readout averaged over the items, for one model."""
    Q, I = items.xt_QI.shape[:2]
    shape = items.xt_QI.shape[2:]
    x, target = items.xt_QI.reshape(Q * I, *shape), items.target_QI.reshape(Q * I, *shape)
    t = items.ts_I.repeat(Q)
    cond = None if items.cond_QLD is None else items.cond_QLD.repeat_interleave(I, dim=0)
    losses = torch.empty(Q * I, dtype=torch.float64)
    for lo in range(0, Q * I, batch):
        hi = min(Q * I, lo + batch)
        kwargs = {} if cond is None else {"encoder_hidden_states": cond[lo:hi]}
        pred = unet(x[lo:hi], t[lo:hi], **kwargs).sample
        losses[lo:hi] = (pred - target[lo:hi]).pow(2).flatten(1).mean(1).double()
    return losses.view(Q, I).mean(1).numpy()


def model_dirs(models: Path, num_subsets: int, sub: str = PIPELINE_DIR) -> tuple[list[Path], np.ndarray]:
    """Finished model (``sub`` = model) or adapter (lora) folders and their subset rows; refuses
    an empty or partial set."""
    done = [(models / f"{m:04d}" / MARKER).is_file() for m in range(num_subsets)]
    found = [(m, models / f"{m:04d}") for m in range(num_subsets) if done[m]]
    if not found:
        raise EvalError(f"no finished subset models in {models}; run `das lds train` first")
    missing = [m for m in range(num_subsets) if not done[m]]
    if missing:
        raise EvalError(f"{len(missing)} of {num_subsets} subset models in {models} are not finished "
                       f"(e.g. {missing[:5]}); rerun `das lds train` to finish them")
    return [p / sub for _, p in found], np.asarray([m for m, _ in found], dtype=np.int64)


def run_truth(query_sources: dict[str, str], models: Path, num_subsets: int, out: Path,
              timesteps: int = 100, draws: int = 1, seed: int = 1, log=print, options=None,
              base_model: Path | None = None) -> dict:
    """Write <out>/<query set>.npz (F (M, Q), query_uids, subsets) for every query set.

    ``options``: the config's ``DataOptions`` (resizing, captions), so queries are read as the
    features read them. ``base_model``: for LoRA configs, the pipeline each subset's adapter
    is loaded into.
    """
    from ..data import check_matches_model, open_dataset
    from ..models import load_model

    def load(d: Path):
        return load_model(d) if base_model is None else load_model(base_model, d)

    dirs, rows = model_dirs(models, num_subsets, PIPELINE_DIR if base_model is None else LORA_DIR)
    first = load(dirs[0])
    items = {}
    for name, source in query_sources.items():
        ds = open_dataset(name, source, options)
        check_matches_model(ds, first.sample_shape, needs_captions=first.conditional)
        items[name] = (ds.uids, query_items(first, ds.load(0, len(ds)), ds.captions, timesteps,
                                            draws, seed))
    F = {name: np.zeros((len(dirs), len(uids))) for name, (uids, _) in items.items()}
    started = time.perf_counter()
    for j, d in enumerate(dirs):
        model = load(d)
        if model.scheduler.config.num_train_timesteps != first.scheduler.config.num_train_timesteps:
            raise EvalError(f"{d} has another scheduler than {dirs[0]}; retrain with one recipe")
        for name, (_, its) in items.items():
            F[name][j] = model_output(model.unet, its)
        if (j + 1) % 8 == 0 or j + 1 == len(dirs):
            el = time.perf_counter() - started
            log(f"lds truth: {j + 1}/{len(dirs)} models, ETA {el / (j + 1) * (len(dirs) - j - 1):.0f} s")
    from .lds import save_truth

    paths = {name: str(save_truth(out / f"{name}.npz", F[name], uids, rows))
             for name, (uids, _) in items.items()}
    return {"paths": paths, "seconds": time.perf_counter() - started, "models": len(dirs)}
