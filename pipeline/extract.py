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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from .config import Config
from .data import Dataset, check_matches_model, open_dataset
from .errors import ConfigError, DataError
from .faults import fault_point
from .features import FeatureSpec, noise_keys, noised_items, per_sample_gradients, timestep_grid
from .fingerprint import data_options, fingerprint, settings_identity
from .kernels import project
from .models import DiffusionModel, attributed_params, encode_captions, encode_images, load_model
from .store import Split, StopRequested, Store, UnitData


@dataclass
class Job:
    """Everything extraction needs, checked before any expensive work."""

    cfg: Config
    model: DiffusionModel
    datasets: dict[str, Dataset]
    fingerprint: dict
    param_names: list[str]
    model_info: dict
    plan: object | None = None
    """The factored engine's ``FactoredPlan`` (None for the dense engine)."""


def feature_spec(cfg: Config) -> FeatureSpec:
    f = cfg.features
    return FeatureSpec(tuple(f.readouts), f.timesteps, f.noise_draws, f.seed, f.normalize,
                       getattr(torch, f.dtype), f.timestep_grid)


def model_info(model: DiffusionModel, param_names: list[str]) -> dict:
    """What the store records about the model beside its fingerprint (informative only: the
    model digest and the settings already determine it)."""
    shapes = dict(model.unet.named_parameters())
    return {"pipeline": model.pipeline, "prediction_type": model.prediction_type,
            "num_params": model.num_params(), "attributed_tensors": len(param_names),
            "attributed_params": sum(shapes[n].numel() for n in param_names),
            "attributed_selection": hashlib.sha256("\n".join(param_names).encode()).hexdigest()}


def load_feature_model(cfg: Config) -> tuple[DiffusionModel, list[str], object | None, dict]:
    """The model, its attributed parameters, the factored plan (or None) and ``model_info``:
    what features need besides data (``prepare``; `das attribute` for images outside a store)."""
    settings_identity(cfg)  # projection settings this machine cannot run fail here, first
    model = load_model(cfg.model.path, cfg.model.lora)
    timestep_grid(model.num_train_timesteps, cfg.features.timesteps)  # raises if K > T
    param_names = attributed_params(model, cfg.features.params)
    plan = None
    if cfg.projection.engine == "factored":
        from .factored import FactoredPlan

        p = cfg.projection
        try:
            plan = FactoredPlan.build(model.unet, param_names, p.dim, p.seed, p.kind)
        except ValueError as err:
            raise ConfigError(f"[projection] engine = \"factored\": {err}") from None
        if cfg.features.vmap_chunk_size:
            warnings.warn("[features] vmap_chunk_size is ignored by the factored engine (it never "
                          "forms per-sample gradients)", stacklevel=2)
    info = model_info(model, param_names)
    if plan is not None:
        info["projection_plan"] = plan.identity()
    return model, param_names, plan, info


def prepare(cfg: Config, splits: list[str] | None = None) -> Job:
    """Load the model and open every split's data; raise on any mismatch before work starts."""
    names = ["train", *cfg.data.queries]
    if splits:
        unknown = [s for s in splits if s not in names]
        if unknown:
            raise ConfigError(f"--split {unknown[0]!r} is not a split of this config; choose from "
                              f"{names}")
    model, param_names, plan, info = load_feature_model(cfg)
    options = data_options(cfg)
    sources = {"train": cfg.data.train, **cfg.data.queries}
    datasets = {name: open_dataset(name, sources[name], options) for name in names}
    for ds in datasets.values():
        check_matches_model(ds, model.sample_shape, needs_captions=model.conditional)
    if splits:
        datasets = {"train": datasets["train"], **{s: datasets[s] for s in splits}}
    train = datasets["train"]
    return Job(cfg, model, datasets, fingerprint(cfg, train.digest, len(train)), param_names,
               info, plan)


def to_devices(job: Job, device) -> torch.nn.Module:
    """Move the model to ``device`` (the UNet also to the features' dtype); returns the UNet."""
    # nn.Module.to: diffusers' own .to() warns about dtype casts we make on purpose (float64 checks).
    unet = torch.nn.Module.to(job.model.unet, device, getattr(torch, job.cfg.features.dtype))
    for module in (job.model.vae, job.model.text_encoder):
        if module is not None:
            torch.nn.Module.to(module, device)
    return unet


@dataclass
class UnitInputs:
    """What the gradient pass of one unit needs."""

    x: torch.Tensor
    """Clean samples: pixels in [-1, 1], or scaled VAE latents for latent models."""
    cond: torch.Tensor | None
    """Caption embeddings (text-conditioned models)."""
    keys: list[str]
    """Noise keys, from the pixels and captions (``features.noise_keys``)."""


def encode_unit(job: Job, pixels: torch.Tensor, captions: list[str]) -> dict[str, np.ndarray]:
    """VAE latents and caption embeddings of one unit's rows (text-conditioned models)."""
    step = job.cfg.features.batch_size
    latents = [encode_images(job.model, pixels[b:b + step]) for b in range(0, len(pixels), step)]
    text = encode_captions(job.model, captions)
    return {"latents": torch.cat(latents).cpu().numpy(), "text": text.cpu().numpy()}


def cache_shapes(job: Job) -> dict[str, tuple[int, ...]] | None:
    if not job.model.conditional:
        return None
    probe = encode_captions(job.model, [""])
    return {"latents": job.model.latent_shape, "text": tuple(probe.shape[1:])}


def unit_inputs(job: Job, split: Split | None, ds: Dataset, unit: int, stats: dict,
                stop: dist.StopFlag | None = None) -> UnitInputs:
    """A unit's samples, caption embeddings and noise keys; latent models encode their images and
    captions once and cache them in the store (a resumed run reads them back). With ``split``
    None: all rows of ``ds``, encoded without a cache (`das attribute`)."""
    lo, hi = split.unit_rows(unit) if split is not None else (0, len(ds))
    pixels = ds.load(lo, hi)
    captions = ds.captions[lo:hi] if job.model.conditional else None
    keys = noise_keys(job.cfg.features.noise, pixels, captions)
    if not job.model.conditional:
        return UnitInputs(pixels, None, keys)
    if split is None:
        cached = encode_unit(job, pixels, captions)
    elif split.cache_done(unit):
        cached = split.read_cache(unit)
        stats["cache_reused"] += 1
    else:
        cached = encode_unit(job, pixels, captions)
        split.write_cache(unit, cached, should_stop=lambda: bool(stop))
        stats["cache_encoded"] += 1
        fault_point("after_cache")
    return UnitInputs(torch.from_numpy(cached["latents"]), torch.from_numpy(cached["text"]), keys)


def _nonfinite(feats_RBK: torch.Tensor, residual_B: torch.Tensor, rho_B: torch.Tensor,
               readouts) -> dict[int, list[str]]:
    """Rows of a batch whose features, residual or rho are not finite: row -> what is bad."""
    bad: dict[int, list[str]] = {}
    for i, r in enumerate(readouts):
        for b in torch.nonzero(~torch.isfinite(feats_RBK[i]).all(1)).flatten().tolist():
            bad.setdefault(b, []).append(f"{r} features")
    for name, values in (("residual", residual_B), ("rho", rho_B)):
        for b in torch.nonzero(~torch.isfinite(values)).flatten().tolist():
            bad.setdefault(b, []).append(name)
    return bad


def batch_features(job: Job, unet: torch.nn.Module, x_BCHW: torch.Tensor, keys: list[str],
                   cond_BLD: torch.Tensor | None):
    """(projected features (R, B, k), residual (B,), rho (B,)) of one batch, by the configured
    engine: dense (per-sample gradients, then the JL projection) or factored."""
    cfg, spec = job.cfg, feature_spec(job.cfg)
    f, p = cfg.features, cfg.projection
    if job.plan is not None:
        from .factored import factored_features

        xt_BI, ts_I, target_BI = noised_items(job.model.scheduler, x_BCHW, keys, spec)
        out = factored_features(unet, job.plan, xt_BI, ts_I, target_BI, spec.readouts,
                                cond_BLD=cond_BLD, items_per_pass=f.items_per_pass,
                                dtype=spec.dtype, normalize=spec.normalize)
        return out.feats_RBK, out.residual_B, out.rho_B
    kwargs = dict(param_names=job.param_names, items_per_pass=f.items_per_pass, cond_BLD=cond_BLD,
                  vmap_chunk_size=f.vmap_chunk_size, autocast=f.autocast == "bf16")
    if p.backend == "fastjl":  # its matrix cannot be applied to slices: project the flat vector
        batch = per_sample_gradients(unet, job.model.scheduler, x_BCHW, keys, spec, **kwargs)
        R, B, P = batch.grads_RBP.shape
        proj = project(batch.grads_RBP.view(R * B, P), p.dim, p.seed, p.kind,
                       backend=p.backend).view(R, B, -1)
        return proj, batch.residual_B, batch.rho_B

    def project_slice(x_nP, row_offset):
        return project(x_nP, p.dim, p.seed, p.kind, row_offset=row_offset, backend=p.backend,
                       sjlt_nonzeros=p.sjlt_nonzeros)

    batch = per_sample_gradients(unet, job.model.scheduler, x_BCHW, keys, spec, **kwargs,
                                 project=project_slice)
    return batch.feats_RBK, batch.residual_B, batch.rho_B


def unit_features(job: Job, unet: torch.nn.Module, ds: Dataset, lo: int, hi: int,
                  stop: dist.StopFlag | None = None, inputs: UnitInputs | None = None,
                  on_batch=None) -> UnitData | None:
    """Projected features of rows [lo, hi) of ``ds``; None if a stop signal arrived mid-unit.

    ``inputs``: the unit's ``UnitInputs`` (default: the pixels of ``ds.load``, content keys).
    ``on_batch(n)`` is called after each batch of n samples (progress).

    Raises:
        DataError: a sample's features are not finite and ``[features] nonfinite = "error"``
            (the default): nothing of the unit is written, and the message names the sample.
    """
    cfg = job.cfg
    spec = feature_spec(cfg)
    if inputs is None:
        pixels = ds.load(lo, hi)
        inputs = UnitInputs(pixels, None, noise_keys(cfg.features.noise, pixels))
    feats = {r: [] for r in spec.readouts}
    residual, rho = [], []
    excluded = np.zeros(hi - lo, dtype=bool)
    for b_lo in range(lo, hi, cfg.features.batch_size):
        if stop:
            return None
        fault_point("batch")
        b_hi = min(hi, b_lo + cfg.features.batch_size)
        sel = slice(b_lo - lo, b_hi - lo)
        cond = None if inputs.cond is None else inputs.cond[sel]
        proj, res_B, rho_B = _guard_memory(lambda sel=sel, cond=cond: batch_features(
            job, unet, inputs.x[sel], inputs.keys[sel], cond), cfg)
        bad = _nonfinite(proj, res_B, rho_B, spec.readouts)
        if bad and cfg.features.nonfinite == "exclude":
            for b in bad:
                excluded[b_lo - lo + b] = True
        elif bad:
            rows = ", ".join(f"row {b_lo + b} (uid {ds.uids[b_lo + b]!r}: {', '.join(what)})"
                             for b, what in list(bad.items())[:5])
            raise DataError(
                f"split {ds.name!r} ({ds.source}): {len(bad)} sample(s) give non-finite values, "
                f"e.g. {rows}; check those inputs (NaN or extreme pixels?) and the model, or set "
                f"[features] nonfinite = \"exclude\" to leave such samples out of the Gram and "
                f"the scores (they are listed in the store and by `das status`)")
        for i, r in enumerate(spec.readouts):
            feats[r].append(proj[i].cpu().numpy())
        residual.append(res_B.cpu().numpy())
        rho.append(rho_B.cpu().numpy())
        if on_batch is not None:
            on_batch(b_hi - b_lo)
    return UnitData({r: np.concatenate(v) for r, v in feats.items()}, np.concatenate(residual),
                    np.concatenate(rho), excluded if excluded.any() else None)


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


def open_splits(job: Job, rank: dist.RankInfo, replace: list[str] | None = None
                ) -> tuple[Store, dict[str, Split]]:
    """Open (rank 0: create) the store and every split of the job; ``replace`` names splits to
    delete first (with what depends on them), so that their changed data can be extracted."""
    cfg = job.cfg
    path = Path(cfg.store.path)
    for name in replace or []:
        if name not in job.datasets:
            raise ConfigError(f"--replace-split {name!r} is not a split of this run; choose from "
                              f"{list(job.datasets)}")
        if rank.is_main and (path / "zarr.json").exists():
            removed = Store.open_existing(path).replace_split(
                name, fingerprint=job.fingerprint if name == "train" else None)
            print(f"extract: replaced split {name!r} (removed {', '.join(removed)})")
    store = Store.open(path, job.fingerprint, create=rank.is_main,
                       train_row_digests=job.datasets["train"].row_digests)
    if rank.is_main and store.root.attrs.get("model_info") != job.model_info:
        store.root.attrs["model_info"] = job.model_info
    shapes = cache_shapes(job)
    splits = {}
    for name, ds in job.datasets.items():
        splits[name] = store.create_split(
            name, source=ds.source, digest=ds.digest, uids=ds.uids, row_digests=ds.row_digests,
            readouts=cfg.features.readouts, dim=cfg.projection.dim, dtype=cfg.features.dtype,
            rows_per_unit=cfg.store.rows_per_unit, create=rank.is_main, cache_shapes=shapes)
    return store, splits


def run_extract(cfg: Config, splits: list[str] | None = None, rank: dist.RankInfo | None = None,
                show_progress: bool = True, partial_gram: bool = False,
                replace: list[str] | None = None) -> dict:
    """Extract the features of the given splits (default: train and every query set).

    ``replace``: splits whose stored features are deleted first (``Store.replace_split``), for
    data that changed since they were extracted.

    With ``partial_gram`` the rank then stores the partial Gram of the train units it owns
    (``reduce.write_partial``), which ``das reduce`` sums instead of streaming the store; not
    when N < k, where the features are smaller than one partial.

    Returns a summary dict (units written, samples, seconds). Raises ``dist.Preempted`` after a
    stop signal; what was marked stays valid and the rerun continues from it.
    """
    with dist.StopFlag() as stop:
        return _extract(cfg, splits, rank or dist.current(), show_progress, partial_gram, stop,
                        replace)


def _extract(cfg, splits, rank, show_progress, partial_gram, stop, replace=None) -> dict:
    job = prepare(cfg, sorted(set(splits or []) | set(replace or [])) or None)
    store, split_map = open_splits(job, rank, replace)
    if splits:
        split_map = {s: split_map[s] for s in splits}
    unet = to_devices(job, rank.device)
    todo = []
    for name, split in split_map.items():
        done = set(split.done_units().tolist())
        todo += [(name, u) for u in dist.owned_units(split.num_units, rank) if u not in done]
    total = sum(np.subtract(*reversed(split_map[n].unit_rows(u))) for n, u in todo)
    started = time.perf_counter()
    written, samples = 0, 0
    stats = {"cache_encoded": 0, "cache_reused": 0}
    with tqdm(total=int(total), unit="sample", disable=not show_progress or total == 0,
              desc=f"extract rank {rank.rank}/{rank.world}", smoothing=0.1) as bar:
        for name, unit in todo:
            split, ds = split_map[name], job.datasets[name]
            if split.is_done(unit):  # another worker (e.g. a requeued twin) finished it
                continue
            split.claim(unit, rank.rank)
            fault_point("claim")
            lo, hi = split.unit_rows(unit)
            try:
                inputs = unit_inputs(job, split, ds, unit, stats, stop)
                bar.set_postfix_str(f"{name} unit {unit}", refresh=False)
                data = unit_features(job, unet, ds, lo, hi, stop, inputs, on_batch=bar.update)
                if data is None:
                    raise dist.Preempted(f"signal {stop.signum}: dropped unit {unit} of {name!r} "
                                         f"unmarked after {written} units; rerun to continue")
                fault_point("before_write")
                committed = split.commit_unit(unit, data, rank.rank,
                                              should_stop=lambda: bool(stop))
            except StopRequested:
                split.release(unit)
                raise dist.Preempted(f"signal {stop.signum}: dropped unit {unit} of {name!r} "
                                     f"unmarked (waiting for its lock) after {written} units; "
                                     f"rerun to continue") from None
            except BaseException:
                split.release(unit)  # nobody works on it any more: `das status` must not wait
                raise
            if committed:
                written += 1
                samples += hi - lo
            fault_point("after_unit")
            if stop:
                raise dist.Preempted(f"signal {stop.signum}: stopped after unit {unit} of "
                                     f"{name!r}; rerun to continue")
    partials = []
    if partial_gram and "train" in split_map:
        from .reduce import needed_readouts, write_partial

        train = split_map["train"]
        units = range(rank.rank, train.num_units, rank.world)
        # A partial (k x k float64) is worth writing only when it is smaller than the features it
        # sums (rows x k): rows > 2 k for float32 features. With N < k, `das reduce` streams the
        # features into the exact thin factor anyway.
        rows = sum(np.subtract(*reversed(train.unit_rows(u))) for u in units)
        itemsize = np.dtype(cfg.features.dtype).itemsize
        wanted = len(units) and train.num_samples >= train.dim and rows * itemsize > 8 * train.dim
        for readout in needed_readouts(cfg) if wanted else []:
            write_partial(store, train, readout, units, rank.rank, rank.world)
            partials.append(readout)
    seconds = time.perf_counter() - started
    return {"units": written, "samples": samples, "seconds": seconds, "rank": rank.rank,
            "world": rank.world, "store": str(store.path), **stats,
            "attributed_params": job.model_info["attributed_params"],
            "partials": partials}
