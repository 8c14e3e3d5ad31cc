"""Ensembles: several models of one recipe in one store, every method's score averaged.

A `[[model]]` list in the config (``Config.members``) makes the store an ensemble root
(docs/DESIGN.md, "Store")::

    <store>/                root attrs: format_version, fingerprint = {settings, train,
                            model: {"ensemble": ...}}: what the members share
      members/m<i>/         member i: a whole single-model store (its own fingerprint with its
                            model digest, splits, markers, reduce/), made by the ordinary jobs
      scores/<set>/<method> (Q, N): the mean over members of each member's score

Each member is run by the single-model jobs on ``member_config(cfg, i)``, so staleness, resume
and integrity work per member exactly as for one model: a member whose model changed is refused
(naming the member) and `das extract --replace-member I` extracts it again; the others are kept.
The score of every method is (1/M) sum_m score_m, computed in float64 from every member's
``Scorer`` block by block (stored rounded to the feature dtype, top-k on the float64 values), so
`das score` holds the M members' factors at once.

Legend: M members, N train rows, n rows of one unit, Q queries.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from zarr.codecs import Crc32cCodec, ZstdCodec

from .config import Config, ModelConfig
from .errors import ConfigError, StoreError
from .fingerprint import check_query_data, data_options, open_store, settings_identity

MEMBERS_DIR = "members"
ENSEMBLE_MODEL = {"ensemble": "one store per member under members/ (pipeline/ensemble.py)"}
"""The root fingerprint's ``model`` entry: the members' own fingerprints hold their digests."""


def member_dir(store_path: Path, index: int) -> Path:
    """Where member ``index``'s store lives inside the ensemble's store."""
    return Path(store_path) / MEMBERS_DIR / f"m{index}"


def member_config(cfg: Config, index: int) -> Config:
    """The single-model config of member ``index``: its [model], its store inside the ensemble's
    store, its reports under ``<reports>/members/m<i>``; every other setting shared."""
    assert cfg.is_ensemble and 0 <= index < len(cfg.members), (index, len(cfg.members))
    store = replace(cfg.store, path=member_dir(cfg.store.path, index),
                    reports=cfg.reports_dir / MEMBERS_DIR / f"m{index}")
    return replace(cfg, model=cfg.members[index], members=(), store=store)


def refuse_ensemble(cfg: Config, command: str) -> None:
    """Raise for commands that work with one model only.

    Raises:
        ConfigError: ``cfg`` is an ensemble.
    """
    if cfg.is_ensemble:
        raise ConfigError(f"[[model]] lists {len(cfg.members)} member(s) (an ensemble): `das "
                          f"{command}` works with one model; use extract, reduce, score, run, status, "
                          f"verify or report for the ensemble, or a config with a single [model] table")


def _unet_shapes(member: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the UNet weights (and the LoRA weights), from the safetensors
    headers only (nothing is loaded)."""
    from safetensors import safe_open

    files = sorted((Path(member.path) / "unet").glob("*.safetensors"))
    if member.lora is not None:
        lora = Path(member.lora)
        files += [lora] if lora.is_file() else sorted(lora.glob("*.safetensors"))
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shapes[f"{f.parent.name}/{key}"] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _kind(member: ModelConfig) -> str:
    """The pipeline class a member's model_index.json names (read as load_model reads it)."""
    from .models import PIXEL

    index = Path(member.path) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name", PIXEL) if index.is_file() else PIXEL


def check_members(cfg: Config) -> None:
    """Every member exists, is of the first member's kind (DDPM or Stable Diffusion) and has its
    UNet (and LoRA) tensor shapes, so the attributed parameters match. Reads folders and
    safetensors headers only.

    Raises:
        ConfigError: naming the member index, its path and the difference.
    """
    first_kind, first_shapes = None, None
    for i, m in enumerate(cfg.members):
        where = f"[[model]] member {i} (path = {str(m.path)!r})"
        if not (Path(m.path) / "unet").is_dir():
            raise ConfigError(f"{where}: no diffusers pipeline folder there (no unet/); point "
                              f"path at that member's saved pipeline")
        if m.lora is not None and not Path(m.lora).exists():
            raise ConfigError(f"{where}: lora = {str(m.lora)!r} does not exist; point it at the "
                              f"member's LoRA weights")
        kind, shapes = _kind(m), _unet_shapes(m)
        if not shapes:
            raise ConfigError(f"{where}: unet/ has no .safetensors weights; re-save the member "
                              f"with save_pretrained(safe_serialization=True)")
        if first_kind is None:
            first_kind, first_shapes = kind, shapes
            continue
        if kind != first_kind:
            raise ConfigError(f"{where} is a {kind}, member 0 a {first_kind}: an ensemble's "
                              f"members must be models of one recipe (same pipeline kind)")
        if shapes != first_shapes:
            diff = sorted(set(shapes.items()) ^ set(first_shapes.items()))[0][0]
            raise ConfigError(f"{where}: its weights differ in shape from member 0's (first: "
                              f"{diff!r}: {shapes.get(diff)} vs {first_shapes.get(diff)}); an "
                              f"ensemble's members must share one architecture")


def root_fingerprint(cfg: Config, train_digest: str, num_train: int,
                     stored: dict | None = None) -> dict:
    """The ensemble root's fingerprint: the shared settings and training set (module docstring)."""
    return {"settings": settings_identity(cfg, stored), "model": dict(ENSEMBLE_MODEL),
            "train": {"digest": train_digest, "num_samples": num_train}}


def open_root(cfg: Config, create: bool, wait_s: float = 0.0):
    """Open (``create``: create) the ensemble's root store, refusing other settings or data.

    Raises:
        StoreError: no store (when not creating), or its fingerprint differs.
    """
    from .data import open_dataset
    from .store import Store

    path = Path(cfg.store.path)
    stored = Store.open_existing(path).fingerprint if (path / "zarr.json").exists() else None
    if stored is not None and "ensemble" not in stored.get("model", {}):
        raise StoreError(f"store {path} holds one model's features, not an ensemble's; use a new "
                         f"[store] path for the [[model]] list")
    train = open_dataset("train", cfg.data.train, data_options(cfg))
    fp = root_fingerprint(cfg, train.digest, len(train), stored)
    return Store.open(path, fp, create=create, wait_s=wait_s, train_row_digests=train.row_digests)


def _member_error(cfg: Config, index: int, err: StoreError) -> StoreError:
    m = cfg.members[index]
    text = str(err)
    if "model.digest" in text and "settings." not in text and "train." not in text:
        text += (f"\nOnly this member's model changed: `das extract CONFIG --replace-member "
                 f"{index}` deletes its features and extracts them again (the other members are "
                 f"kept).")
    return StoreError(f"[[model]] member {index} (path = {str(m.path)!r}): {text}")


def open_member(cfg: Config, index: int):
    """Member ``index``'s store, checked against its fingerprint (``open_store``).

    Raises:
        StoreError: naming the member: no store yet, or stale (another model, settings or data).
    """
    try:
        return open_store(member_config(cfg, index))
    except StoreError as err:
        raise _member_error(cfg, index, err) from None


def check_existing_members(cfg: Config) -> None:
    """Refuse, before any work, a member whose existing store was made from another model."""
    for i in range(len(cfg.members)):
        if (member_dir(cfg.store.path, i) / "zarr.json").exists():
            open_member(cfg, i)


def replace_member(cfg: Config, index: int) -> bool:
    """Delete member ``index``'s store (and the ensemble's scores, made from it) so that
    `das extract` extracts that member again. Returns whether there was one.

    Raises:
        ConfigError: ``index`` is not a member.
    """
    if not 0 <= index < len(cfg.members):
        raise ConfigError(f"--replace-member {index}: the ensemble has members 0..."
                          f"{len(cfg.members) - 1}")
    root, path = Path(cfg.store.path), member_dir(cfg.store.path, index)
    doomed = [p for p in (path, root / "scores") if p.exists()]
    trash = root / ".trash" / uuid.uuid4().hex
    for p in doomed:  # rename first: an interrupted delete never leaves a half store behind
        trash.mkdir(parents=True, exist_ok=True)
        p.rename(trash / f"{p.parent.name}--{p.name}")
    shutil.rmtree(root / ".trash", ignore_errors=True)
    return path in doomed


def run_extract_ensemble(cfg: Config, splits=None, show_progress: bool = True,
                         partial_gram: bool = False, replace: list[str] | None = None,
                         replace_members: list[int] | None = None, rank=None) -> list[dict]:
    """Extract every member, one after another (each resumes from its own markers).

    Returns the per-member summaries of ``extract.run_extract``, with ``member`` added.

    Raises:
        ConfigError, StoreError: before any extraction, for a bad member or a stale member
            store (unless it is named in ``replace_members``).
    """
    from . import dist
    from .extract import run_extract

    rank = rank or dist.current()
    check_members(cfg)
    for i in replace_members or []:
        if not 0 <= i < len(cfg.members):
            raise ConfigError(f"--replace-member {i}: the ensemble has members 0..."
                              f"{len(cfg.members) - 1}")
    open_root(cfg, create=rank.is_main, wait_s=0 if rank.is_main else 600)
    if rank.is_main:
        for i in replace_members or []:
            if replace_member(cfg, i) and show_progress:
                print(f"extract: removed member {i}'s features (and the ensemble's scores)")
    for i in range(len(cfg.members)):
        if i not in (replace_members or []) and (member_dir(cfg.store.path, i) / "zarr.json").exists():
            open_member(cfg, i)
    summaries = []
    for i, m in enumerate(cfg.members):
        if show_progress:
            print(f"extract: member {i + 1}/{len(cfg.members)} ({m.path})", flush=True)
        try:
            s = run_extract(member_config(cfg, i), splits, rank, show_progress, partial_gram, replace)
        except StoreError as err:
            raise _member_error(cfg, i, err) from None
        summaries.append({**s, "member": i})
    return summaries


def run_reduce_ensemble(cfg: Config, **kwargs) -> list[dict]:
    """``reduce.run_reduce`` per member (a factor per member and readout): one dict per member."""
    from .reduce import run_reduce

    check_members(cfg)
    open_root(cfg, create=False)
    for i in range(len(cfg.members)):  # every member checked before any work
        open_member(cfg, i)
    return [run_reduce(member_config(cfg, i), **kwargs) for i in range(len(cfg.members))]


def run_score_ensemble(cfg: Config, query_sets: list[str] | None = None,
                       show_progress: bool = True, device: str = "cpu",
                       query_block: int = 4096) -> dict:
    """Score every query set with every member and store the mean, with top-k CSVs.

    score (Q, N) = (1/M) sum_m score_m in float64 (NaN where any member excludes the row or
    query), stored in the ensemble root's ``scores/<set>/<method>``; the top-k and opponents CSVs
    go to the config's reports folder as for one model.

    Raises:
        StoreError: a member stale, incomplete or not reduced (naming it); nothing is written then.
    """
    from .report import write_topk_csv
    from .score import Best, Scorer, read_queries

    check_members(cfg)
    root = open_root(cfg, create=False)
    M = len(cfg.members)
    stores = [open_member(cfg, i) for i in range(M)]
    scorers = []
    for i, store in enumerate(stores):
        try:
            scorers.append(Scorer(member_config(cfg, i), store, device))
        except StoreError as err:
            raise _member_error(cfg, i, err) from None
    first = scorers[0]
    for i, sc in enumerate(scorers[1:], 1):
        if [sc.train.unit_rows(u) for u in range(sc.train.num_units)] != \
                [first.train.unit_rows(u) for u in range(first.train.num_units)]:
            raise StoreError(f"[[model]] member {i}: its train split has other units "
                             f"(rows_per_unit) than member 0's; extract it again with "
                             f"`das extract CONFIG --replace-member {i}`")
    names = query_sets or list(cfg.data.queries)
    for i, store in enumerate(stores):
        try:
            check_query_data(member_config(cfg, i), store, names)
        except StoreError as err:
            raise _member_error(cfg, i, err) from None
    methods, N, dtype = first.methods, first.num_train, first.dtype
    summary = {}
    for name in names:
        started = time.perf_counter()
        queries = [read_queries(store.split(name), first.readouts) for store in stores]
        Q = len(queries[0][1])
        q_excluded = np.logical_or.reduce([q[1] for q in queries])
        group = root.root.require_group("scores").require_group(name)
        arrays = {m: group.create_array(m, shape=(Q, N), dtype=dtype,
                                        chunks=(min(Q, query_block), first.train.rows_per_unit),
                                        compressors=[ZstdCodec(), Crc32cCodec()], overwrite=True)
                  for m in methods}
        best = Best(methods, Q, min(cfg.score.topk, N))
        for q_lo in range(0, Q, query_block):
            q_hi = min(Q, q_lo + query_block)
            streams = [sc.blocks({r: f[q_lo:q_hi] for r, f in feats.items()}, q_excluded[q_lo:q_hi],
                                 f"score {name} member {i}", show_progress and i == 0)
                       for i, (sc, (feats, _, _)) in enumerate(zip(scorers, queries, strict=True))]
            for parts in zip(*streams, strict=True):
                lo, hi = parts[0][0], parts[0][1]
                for m in methods:
                    mean_Qn = torch.stack([p[2][m] for p in parts]).sum(0) / M
                    arrays[m][q_lo:q_hi, lo:hi] = mean_Qn.numpy().astype(dtype)
                    best.add(m, mean_Qn, q_lo, lo)
        from .reduce import markers_digest

        group.attrs.update({
            "methods": methods, "damping": cfg.score.damping,
            "damping_absolute": cfg.score.damping_absolute, "gamma": cfg.score.gamma,
            "residual": cfg.score.residual, "ensemble": "mean over members",
            "members": [{"fingerprint_hash": st.root.attrs["fingerprint_hash"], "lambda": sc.lams,
                         "train_digest": markers_digest(sc.markers),
                         "query_digest": markers_digest(q[2])}
                        for st, sc, q in zip(stores, scorers, queries, strict=True)],
            "excluded_query_rows": np.flatnonzero(q_excluded).tolist()[:1000],
            "fingerprint_hash": root.root.attrs["fingerprint_hash"]})
        skip = np.flatnonzero(q_excluded).tolist()
        uids = stores[0].split(name).uids()
        paths = write_topk_csv(cfg.reports_dir / name, uids, first.train_uids, best.top,
                               skip_queries=skip)
        paths += write_topk_csv(cfg.reports_dir / name, uids, first.train_uids, best.bottom,
                                skip_queries=skip, kind="opponents")
        summary[name] = {"seconds": time.perf_counter() - started, "queries": Q, "members": M,
                         "csv": [str(p) for p in paths]}
    return summary


def status_lines_ensemble(cfg: Config, stale_after: float = 1800.0) -> list[str]:
    """`das status` of an ensemble: the root, then every member's own status (or why not)."""
    from .launch.status import status_lines
    from .reduce import markers_digest

    check_members(cfg)
    root = open_root(cfg, create=False)
    lines = [f"ensemble store {root.path} (fingerprint {root.root.attrs['fingerprint_hash'][:12]}, "
             f"{len(cfg.members)} members)"]
    current = []
    for i, m in enumerate(cfg.members):
        lines.append(f"member {i} ({m.path}):")
        if not (member_dir(cfg.store.path, i) / "zarr.json").exists():
            lines.append("  not started")
            current.append(None)
            continue
        try:
            lines += ["  " + line for line in status_lines(member_config(cfg, i), stale_after)]
            store = open_store(member_config(cfg, i))
            current.append((store.root.attrs["fingerprint_hash"],
                            markers_digest(store.split("train").markers())
                            if "train" in store.split_names() else None))
        except StoreError as err:
            lines.append(f"  {str(err).splitlines()[0]}")
            current.append(None)
    for name in cfg.data.queries:
        label = f"ensemble scores {name}"
        scores = root.root["scores"] if "scores" in root.root else None
        if scores is None or name not in scores or "members" not in scores[name].attrs:
            lines.append(f"{label}: not scored")
            continue
        made = [(e["fingerprint_hash"], e["train_digest"]) for e in scores[name].attrs["members"]]
        state = "current" if made == current else "stale (members changed since): run `das score CONFIG`"
        lines.append(f"{label}: {state} ({len(made)} members)")
    return lines
