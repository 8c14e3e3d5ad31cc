"""`das extract`: compute projected per-sample features of every split into the store.

Each rank takes the units it owns (``dist.owned_units``), skips marked ones, and for each unit:
claim -> [text-conditioned models: VAE latents and caption embeddings, from the unit's cache or
encoded once and cached] -> features of its rows (batches of ``features.batch_size``) -> write
chunks -> marker. A stop signal between batches drops the unit unmarked and raises ``Preempted``.
Rank 0 alone creates the store and its splits; other ranks wait for them. Zarr writes each
chunk to a temporary file and renames it, so a worker killed at any moment leaves whole chunks
and no marker; a unit's chunks and marker are committed under a per-unit lock, so duplicate
workers (a requeued job overlapping its predecessor) never mix their writes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from .config import Config, result_settings
from .data import DataOptions, Dataset, check_matches_model, open_dataset
from .errors import ConfigError
from .faults import fault_point
from .features import FeatureSpec, per_sample_gradients, timestep_grid
from .kernels import identity as projection_identity
from .kernels import project
from .models import DiffusionModel, attributed_params, encode_captions, encode_images, load_model
from .store import Split, Store, UnitData


@dataclass
class Job:
    """Everything extraction needs, checked before any expensive work."""

    cfg: Config
    model: DiffusionModel
    datasets: dict[str, Dataset]
    fingerprint: dict
    param_names: list[str]


def feature_spec(cfg: Config) -> FeatureSpec:
    f = cfg.features
    return FeatureSpec(tuple(f.readouts), f.timesteps, f.noise_draws, f.seed, f.normalize,
                       getattr(torch, f.dtype))


def fingerprint(cfg: Config, model: DiffusionModel, train: Dataset, param_names: list[str]) -> dict:
    """Result-affecting settings + model weights + training-set identity (DESIGN.md section 2)."""
    settings = result_settings(cfg)
    p = cfg.projection
    settings["projection"] = projection_identity(p.kind, p.dim, p.seed, p.backend, p.sjlt_nonzeros)
    shapes = dict(model.unet.named_parameters())
    selection = hashlib.sha256("\n".join(param_names).encode()).hexdigest()
    return {"settings": settings,
            "model": {"digest": model.digest, "pipeline": model.pipeline,
                      "prediction_type": model.prediction_type, "num_params": model.num_params(),
                      "attributed_tensors": len(param_names),
                      "attributed_params": sum(shapes[n].numel() for n in param_names),
                      "attributed_selection": selection},
            "train": {"digest": train.digest, "num_samples": len(train)}}


def prepare(cfg: Config, splits: list[str] | None = None) -> Job:
    """Load the model and open every split's data; raise on any mismatch before work starts."""
    names = ["train", *cfg.data.queries]
    if splits:
        unknown = [s for s in splits if s not in names]
        if unknown:
            raise ConfigError(f"--split {unknown[0]!r} is not a split of this config; choose from "
                             f"{names}")
    model = load_model(cfg.model.path, cfg.model.lora)
    timestep_grid(model.num_train_timesteps, cfg.features.timesteps)  # raises if K > T
    param_names = attributed_params(model, cfg.features.params)
    d = cfg.data
    options = DataOptions.from_config(d)
    sources = {"train": d.train, **d.queries}
    datasets = {name: open_dataset(name, sources[name], options) for name in names}
    for ds in datasets.values():
        check_matches_model(ds, model.sample_shape, needs_captions=model.conditional)
    if splits:
        datasets = {"train": datasets["train"], **{s: datasets[s] for s in splits}}
    return Job(cfg, model, datasets, fingerprint(cfg, model, datasets["train"], param_names),
               param_names)


def encode_unit(job: Job, ds: Dataset, lo: int, hi: int) -> dict[str, np.ndarray]:
    """VAE latents and caption embeddings of rows [lo, hi) (text-conditioned models)."""
    step = job.cfg.features.batch_size
    latents = [encode_images(job.model, ds.load(b, min(hi, b + step))) for b in range(lo, hi, step)]
    text = encode_captions(job.model, ds.captions[lo:hi])
    return {"latents": torch.cat(latents).cpu().numpy(), "text": text.cpu().numpy()}


def cache_shapes(job: Job) -> dict[str, tuple[int, ...]] | None:
    if not job.model.conditional:
        return None
    probe = encode_captions(job.model, [""])
    return {"latents": job.model.latent_shape, "text": tuple(probe.shape[1:])}


def unit_inputs(job: Job, split: Split, ds: Dataset, unit: int, stats: dict):
    """(samples, caption embeddings or None) of a unit; encodes and caches them once if needed."""
    lo, hi = split.unit_rows(unit)
    if not job.model.conditional:
        return ds.load(lo, hi), None
    if split.cache_done(unit):
        cached = split.read_cache(unit)
        stats["cache_reused"] += 1
    else:
        cached = encode_unit(job, ds, lo, hi)
        split.write_cache(unit, cached)
        stats["cache_encoded"] += 1
        fault_point("after_cache")
    return torch.from_numpy(cached["latents"]), torch.from_numpy(cached["text"])


def unit_features(job: Job, unet: torch.nn.Module, ds: Dataset, lo: int, hi: int,
                  stop: dist.StopFlag | None = None, inputs=None) -> UnitData | None:
    """Projected features of rows [lo, hi); None if a stop signal arrived mid-unit.

    ``inputs`` = (samples, caption embeddings or None) for the rows; default: ``ds.load``.
    """
    cfg = job.cfg
    spec = feature_spec(cfg)
    x_all, cond_all = inputs if inputs is not None else (ds.load(lo, hi), None)
    feats = {r: [] for r in spec.readouts}
    residual, rho = [], []
    for b_lo in range(lo, hi, cfg.features.batch_size):
        if stop:
            return None
        fault_point("batch")
        b_hi = min(hi, b_lo + cfg.features.batch_size)
        cond = None if cond_all is None else cond_all[b_lo - lo:b_hi - lo]
        batch = _guard_memory(lambda b_lo=b_lo, b_hi=b_hi, cond=cond: per_sample_gradients(
            unet, job.model.scheduler, x_all[b_lo - lo:b_hi - lo], ds.uids[b_lo:b_hi], spec,
            param_names=job.param_names, items_per_pass=cfg.features.items_per_pass,
            cond_BLD=cond, vmap_chunk_size=cfg.features.vmap_chunk_size,
            autocast=cfg.features.autocast == "bf16"), cfg)
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


def _guard_memory(compute, cfg: Config):
    """Run ``compute``; turn an out-of-memory failure into a clear error with the fix."""
    try:
        return compute()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and (
                "out of memory" not in text and "can't allocate memory" not in text):
            raise
        f = cfg.features
        raise ConfigError(
            f"a batch of per-sample gradients does not fit in memory ({text.splitlines()[0][:200]}); "
            f"lower [features] batch_size (now {f.batch_size}), set vmap_chunk_size (now "
            f"{f.vmap_chunk_size}, e.g. 4) or items_per_pass (now {f.items_per_pass}, e.g. 1), "
            f"or attribute fewer parameters ([features] params)") from None


def open_splits(job: Job, rank: dist.RankInfo) -> tuple[Store, dict[str, Split]]:
    cfg = job.cfg
    store = Store.open(cfg.store.path, job.fingerprint, create=rank.is_main)
    shapes = cache_shapes(job)
    splits = {}
    for name, ds in job.datasets.items():
        splits[name] = store.create_split(
            name, source=ds.source, digest=ds.digest, uids=ds.uids,
            readouts=cfg.features.readouts, dim=cfg.projection.dim, dtype=cfg.features.dtype,
            rows_per_unit=cfg.store.rows_per_unit, create=rank.is_main, cache_shapes=shapes)
    return store, splits


def run_extract(cfg: Config, splits: list[str] | None = None, rank: dist.RankInfo | None = None,
                show_progress: bool = True, partial_gram: bool = False) -> dict:
    """Extract the features of the given splits (default: train and every query set).

    With ``partial_gram`` the rank then stores the partial Gram of the train units it owns
    (``reduce.write_partial``), which ``das reduce`` sums instead of streaming the store; not
    when N < k, where the features are smaller than one partial.

    Returns a summary dict (units written, samples, seconds). Raises ``dist.Preempted`` after a
    stop signal; what was marked stays valid and the rerun continues from it.
    """
    with dist.StopFlag() as stop:
        return _extract(cfg, splits, rank or dist.current(), show_progress, partial_gram, stop)


def _extract(cfg, splits, rank, show_progress, partial_gram, stop) -> dict:
    job = prepare(cfg, splits)
    store, split_map = open_splits(job, rank)
    if splits:
        split_map = {s: split_map[s] for s in splits}
    # nn.Module.to: diffusers' own .to() warns about dtype casts we make on purpose (float64 checks).
    unet = torch.nn.Module.to(job.model.unet, rank.device, getattr(torch, cfg.features.dtype))
    for module in (job.model.vae, job.model.text_encoder):
        if module is not None:
            torch.nn.Module.to(module, rank.device)
    todo = []
    for name, split in split_map.items():
        done = set(split.done_units().tolist())
        todo += [(name, u) for u in dist.owned_units(split.num_units, rank) if u not in done]
    total = sum(np.subtract(*reversed(split_map[n].unit_rows(u))) for n, u in todo)
    started = time.perf_counter()
    written, samples = 0, 0
    stats = {"cache_encoded": 0, "cache_reused": 0}
    with tqdm(total=int(total), unit="sample", disable=not show_progress or total == 0,
              desc=f"extract rank {rank.rank}/{rank.world}") as bar:
        for name, unit in todo:
            split, ds = split_map[name], job.datasets[name]
            if split.is_done(unit):  # another worker (e.g. a requeued twin) finished it
                continue
            split.claim(unit, rank.rank)
            fault_point("claim")
            lo, hi = split.unit_rows(unit)
            inputs = unit_inputs(job, split, ds, unit, stats)
            data = unit_features(job, unet, ds, lo, hi, stop, inputs)
            if data is None:
                raise dist.Preempted(f"signal {stop.signum}: dropped unit {unit} of {name!r} "
                                     f"unmarked after {written} units; rerun to continue")
            fault_point("before_write")
            if split.commit_unit(unit, data, rank.rank):
                written += 1
                samples += hi - lo
            bar.set_postfix(split=name, unit=unit)
            bar.update(hi - lo)
            fault_point("after_unit")
            if stop:
                raise dist.Preempted(f"signal {stop.signum}: stopped after unit {unit} of "
                                     f"{name!r}; rerun to continue")
    partials = []
    if partial_gram and "train" in split_map:
        from .reduce import needed_readouts, write_partial

        train = split_map["train"]
        units = range(rank.rank, train.num_units, rank.world)
        # With N < k a partial (k x k) is bigger than all train features (N x k), and `das reduce`
        # streams them for the exact thin factor anyway: write none.
        wanted = len(units) and train.num_samples >= train.dim
        for readout in needed_readouts(cfg) if wanted else []:
            write_partial(store, train, readout, units, rank.rank, rank.world)
            partials.append(readout)
    seconds = time.perf_counter() - started
    return {"units": written, "samples": samples, "seconds": seconds, "rank": rank.rank,
            "world": rank.world, "store": str(store.path), **stats,
            "attributed_params": job.fingerprint["model"]["attributed_params"],
            "partials": partials}
