"""What makes a store's features what they are, and opening a store against a config.

A store's fingerprint (docs/DESIGN.md, "Store") is
    {"settings": the result-affecting settings (config.result_settings + the projection's identity),
     "model":    {"digest": sha256 of the pipeline's component files and the LoRA weights},
     "train":    {"digest": the training set's content identity, "num_samples": N}}
and every stage (extract, reduce, score, status, verify, lds eval) opens the store through
``open_store``, which refuses a config whose fingerprint differs and names the fields. Nothing
here loads the model: the digest is over its files (streamed, cached by size and mtime), so a
check costs a directory walk, not a model load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import Config, result_settings
from .digests import file_digests
from .errors import ConfigError, StoreError
from .kernels import identity as projection_identity

# Pipeline component folders whose files make the model (the root's das_recipe.json and other
# notes beside them are not part of it).
COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")


def model_digest(path: Path, lora: Path | None = None) -> str:
    """sha256 over (relative path, content digest) of every file of the pipeline's components,
    its model_index.json, and the LoRA weights file(s)."""
    path = Path(path)
    files = [path / "model_index.json"] if (path / "model_index.json").is_file() else []
    for sub in COMPONENTS:
        if (path / sub).is_dir():
            files += sorted(p for p in (path / sub).rglob("*") if p.is_file()
                            and not p.name.startswith("."))
    names = [str(f.relative_to(path)) for f in files]
    if lora is not None:
        lora = Path(lora)
        weights = [lora] if lora.is_file() else sorted(lora.glob("*.safetensors"))
        files += weights
        names += [f"lora/{f.name}" for f in weights]
    h = hashlib.sha256()
    for name, digest in zip(names, file_digests(files), strict=True):
        h.update(f"{name}:{digest};".encode())
    return h.hexdigest()


def settings_identity(cfg: Config, stored: dict | None = None) -> dict:
    """``result_settings`` with the projection's identity (``kernels.identity``).

    fast-jl's identity needs the GPU it ran on; on a machine without one (a CPU reduce node)
    the stored SM count and build are taken as given, the rest is still compared.
    """
    settings = result_settings(cfg)
    p = cfg.projection
    if p.engine == "factored":
        from .factored import ENGINE as ENGINE_ID
        from .kernels import RNG_VERSION

        # The per-layer dims follow from the model (its digest) and these settings; the store
        # records them beside the fingerprint (root attribute "projection_plan").
        settings["projection"] = {"engine": ENGINE_ID, "kind": p.kind, "dim": p.dim,
                                  "seed": p.seed, "rng": RNG_VERSION}
        return settings
    try:
        settings["projection"] = projection_identity(p.kind, p.dim, p.seed, p.backend,
                                                     p.sjlt_nonzeros)
    except (ValueError, ImportError) as err:
        stored_proj = ((stored or {}).get("settings") or {}).get("projection")
        if p.backend != "fastjl" or not stored_proj:
            raise ConfigError(f"[projection] backend = {p.backend!r}: {err}") from None
        settings["projection"] = {**stored_proj, "kind": p.kind, "dim": p.dim, "seed": p.seed}
    return settings


def fingerprint(cfg: Config, train_digest: str, num_train: int, stored: dict | None = None) -> dict:
    """The fingerprint a store made from ``cfg`` has (module docstring)."""
    return {"settings": settings_identity(cfg, stored),
            "model": {"digest": model_digest(cfg.model.path, cfg.model.lora)},
            "train": {"digest": train_digest, "num_samples": num_train}}


def data_options(cfg: Config):
    """The per-split read options of ``[data]`` (and ``[features] nonfinite``)."""
    from .data import DataOptions

    return DataOptions.from_config(cfg.data, allow_nonfinite=cfg.features.nonfinite == "exclude")


def open_store(cfg: Config):
    """Open the config's existing store, refusing one made from other settings, model or data.

    Raises:
        StoreError: no store yet, or its fingerprint differs (the fields are named).
    """
    from .data import open_dataset
    from .store import Store

    path = Path(cfg.store.path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"no feature store at {path}; run `das extract CONFIG` first")
    stored = Store.open_existing(path).fingerprint
    train = open_dataset("train", cfg.data.train, data_options(cfg))
    return Store.open(path, fingerprint(cfg, train.digest, len(train), stored), create=False,
                      wait_s=0, train_row_digests=train.row_digests)


def check_query_data(cfg: Config, store, names: list[str]) -> None:
    """Refuse query sets that are not in the config, not extracted, or whose data changed since
    their features were extracted (content identity, ``Dataset.digest``).

    Raises:
        ConfigError: a name is not in [data.queries].
        StoreError: a split is missing or holds features of other data.
    """
    from .data import open_dataset

    for name in names:
        if name not in cfg.data.queries:
            raise ConfigError(f"--query-set {name!r} is not in [data.queries]; choose from "
                              f"{list(cfg.data.queries)}")
        split = store.split(name)
        ds = open_dataset(name, cfg.data.queries[name], data_options(cfg))
        attrs = split.group.attrs.asdict()
        if attrs.get("dataset_digest") != ds.digest or attrs.get("num_samples") != len(ds):
            raise StoreError(
                f"query set {name!r}: its data ({ds.source}, {len(ds)} samples) changed since its "
                f"features were extracted ({attrs.get('source')}, {attrs.get('num_samples')} "
                f"samples), so its stored features and scores are stale; re-extract it with "
                f"`das extract CONFIG --split {name} --replace-split {name}`, or give the new data "
                f"another query set name")
