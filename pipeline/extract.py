"""`das extract`: compute projected per-sample features of every split into the store.

Each rank takes the units it owns (``dist.owned_units``), skips marked ones, and for each unit:
claim -> features of its rows (batches of ``features.batch_size``) -> write chunks -> marker.
A stop signal between batches drops the unit unmarked and raises ``Preempted``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from .config import Config, result_settings
from .data import Dataset, check_matches_model, open_dataset
from .features import FeatureSpec, per_sample_gradients, timestep_grid
from .kernels import identity as projection_identity
from .kernels import project
from .models import DiffusionModel, load_model
from .store import Split, Store, UnitData


@dataclass
class Job:
    """Everything extraction needs, checked before any expensive work."""

    cfg: Config
    model: DiffusionModel
    datasets: dict[str, Dataset]
    fingerprint: dict


def feature_spec(cfg: Config) -> FeatureSpec:
    f = cfg.features
    return FeatureSpec(tuple(f.readouts), f.timesteps, f.noise_draws, f.seed, f.normalize,
                       getattr(torch, f.dtype))


def fingerprint(cfg: Config, model: DiffusionModel, train: Dataset) -> dict:
    """Result-affecting settings + model weights + training-set identity (DESIGN.md section 2)."""
    settings = result_settings(cfg)
    p = cfg.projection
    settings["projection"] = projection_identity(p.kind, p.dim, p.seed, p.backend, p.sjlt_nonzeros)
    params = list(dict(model.unet.named_parameters()))
    return {"settings": settings,
            "model": {"digest": model.digest, "num_params": model.num_params(),
                      "attributed_params": len(params)},
            "train": {"digest": train.digest, "num_samples": len(train)}}


def prepare(cfg: Config, splits: list[str] | None = None) -> Job:
    """Load the model and open every split's data; raise on any mismatch before work starts."""
    names = ["train", *cfg.data.queries]
    if splits:
        unknown = [s for s in splits if s not in names]
        if unknown:
            raise ValueError(f"--split {unknown[0]!r} is not a split of this config; choose from "
                             f"{names}")
    model = load_model(cfg.model.path)
    timestep_grid(model.num_train_timesteps, cfg.features.timesteps)  # raises if K > T
    sources = {"train": cfg.data.train, **cfg.data.queries}
    datasets = {name: open_dataset(name, sources[name]) for name in names}
    for ds in datasets.values():
        check_matches_model(ds, model.sample_shape)
    if splits:
        datasets = {"train": datasets["train"], **{s: datasets[s] for s in splits}}
    return Job(cfg, model, datasets, fingerprint(cfg, model, datasets["train"]))


def unit_features(job: Job, unet: torch.nn.Module, ds: Dataset, lo: int, hi: int,
                  stop: dist.StopFlag | None = None) -> UnitData | None:
    """Projected features of rows [lo, hi); None if a stop signal arrived mid-unit."""
    cfg = job.cfg
    spec = feature_spec(cfg)
    feats = {r: [] for r in spec.readouts}
    residual, rho = [], []
    for b_lo in range(lo, hi, cfg.features.batch_size):
        if stop:
            return None
        b_hi = min(hi, b_lo + cfg.features.batch_size)
        batch = per_sample_gradients(unet, job.model.scheduler, ds.load(b_lo, b_hi),
                                     ds.uids[b_lo:b_hi], spec,
                                     items_per_pass=cfg.features.items_per_pass)
        R, B, P = batch.grads_RBP.shape
        p = cfg.projection
        proj = project(batch.grads_RBP.view(R * B, P), p.dim, p.seed, p.kind, backend=p.backend,
                       sjlt_nonzeros=p.sjlt_nonzeros).view(R, B, -1)
        for i, r in enumerate(spec.readouts):
            feats[r].append(proj[i].cpu().numpy())
        residual.append(batch.residual_B.cpu().numpy())
        rho.append(batch.rho_B.cpu().numpy())
    return UnitData({r: np.concatenate(v) for r, v in feats.items()}, np.concatenate(residual),
                    np.concatenate(rho))


def open_splits(job: Job, rank: dist.RankInfo) -> tuple[Store, dict[str, Split]]:
    cfg = job.cfg
    store = Store.open(cfg.store.path, job.fingerprint, create=rank.is_main)
    splits = {}
    for name, ds in job.datasets.items():
        splits[name] = store.create_split(
            name, source=ds.source, digest=ds.digest, uids=ds.uids,
            readouts=cfg.features.readouts, dim=cfg.projection.dim, dtype=cfg.features.dtype,
            rows_per_unit=cfg.store.rows_per_unit, create=rank.is_main)
    return store, splits


def run_extract(cfg: Config, splits: list[str] | None = None, rank: dist.RankInfo | None = None,
                show_progress: bool = True) -> dict:
    """Extract the features of the given splits (default: train and every query set).

    Returns a summary dict (units written, samples, seconds). Raises ``dist.Preempted`` after a
    stop signal; what was marked stays valid and the rerun continues from it.
    """
    rank = rank or dist.current()
    job = prepare(cfg, splits)
    store, split_map = open_splits(job, rank)
    if splits:
        split_map = {s: split_map[s] for s in splits}
    unet = job.model.unet.to(rank.device, getattr(torch, cfg.features.dtype))
    stop = dist.StopFlag().install()
    todo = []
    for name, split in split_map.items():
        done = set(split.done_units().tolist())
        todo += [(name, u) for u in dist.owned_units(split.num_units, rank) if u not in done]
    total = sum(np.subtract(*reversed(split_map[n].unit_rows(u))) for n, u in todo)
    started = time.perf_counter()
    written, samples = 0, 0
    with tqdm(total=int(total), unit="sample", disable=not show_progress or total == 0,
              desc=f"extract rank {rank.rank}/{rank.world}") as bar:
        for name, unit in todo:
            split, ds = split_map[name], job.datasets[name]
            if split.is_done(unit):  # another worker (e.g. a requeued twin) finished it
                continue
            split.claim(unit, rank.rank)
            lo, hi = split.unit_rows(unit)
            data = unit_features(job, unet, ds, lo, hi, stop)
            if data is None:
                raise dist.Preempted(f"signal {stop.signum}: dropped unit {unit} of {name!r} "
                                     f"unmarked after {written} units; rerun to continue")
            dist.fault_point("before_write")
            split.write_unit(unit, data, rank.rank)
            written += 1
            samples += hi - lo
            bar.set_postfix(split=name, unit=unit)
            bar.update(hi - lo)
            dist.fault_point("after_unit")
            if stop:
                raise dist.Preempted(f"signal {stop.signum}: stopped after unit {unit} of "
                                     f"{name!r}; rerun to continue")
    seconds = time.perf_counter() - started
    return {"units": written, "samples": samples, "seconds": seconds, "rank": rank.rank,
            "world": rank.world, "store": str(store.path)}
