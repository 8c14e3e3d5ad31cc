"""`das reduce`: stream the train features into one factor per readout and store it.

The maths (Gram, eigendecomposition, the N < k dual, damping, leverage) is in ``linalg``; this
module owns where the features come from and where the factor goes. For N < k the k x k Gram is
neither formed nor stored (8 GB per readout at k = 32768): ``stored_gram`` rebuilds it from the
thin factor when asked.

Partial Grams: a rank may store G_r = sum over its train units (``write_partial``); the reduce
job sums them when one world's partials cover every unit exactly once and match the current
markers, and otherwise streams the store (``--partials auto``), or refuses (``require``).

Legend: N train rows, Q queries, K projection dim.
"""

from __future__ import annotations

import hashlib
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm
from zarr.codecs import Crc32cCodec, ZstdCodec

from .config import METHOD_READOUT, Config
from .errors import ConfigError, StoreError
from .faults import fault_point
from .fingerprint import open_store
from .linalg import Factor, dual_factor, factor, gram
from .store import Split, Store


def markers_digest(markers: np.ndarray) -> str:
    """Identity of a split's content: the per-unit rows and checksums of its markers."""
    return hashlib.sha256(np.ascontiguousarray(markers[:, [1] + list(range(5, markers.shape[1]))])
                          .tobytes()).hexdigest()


def needed_readouts(cfg: Config) -> list[str]:
    return sorted({METHOD_READOUT[m] for m in cfg.score.methods}, key=cfg.features.readouts.index)


def iter_features(split: Split, readout: str, markers: np.ndarray, desc: str, show: bool):
    for unit in tqdm(range(split.num_units), desc=desc, disable=not show, unit="unit"):
        yield split.read_unit(unit, (readout,), markers[unit]).features[readout]


ROWS_PER_WRITE = 1024  # rows of a stored Gram / eigenvector matrix per chunk and per write


def write_rows(group, name: str, value: np.ndarray, fill_value=None):
    """Store a float64 array (overwriting) in row blocks; returns the zarr array.

    One whole-array assignment makes zarr hold about two extra copies of the array (1 GB for a
    k = 8192 Gram); blocks of ROWS_PER_WRITE rows bound that to a few chunks.
    """
    chunks = (min(value.shape[0], ROWS_PER_WRITE),) + tuple(min(s, 4096) for s in value.shape[1:])
    arr = group.create_array(name, shape=value.shape, dtype="float64", chunks=chunks,
                             compressors=[ZstdCodec(), Crc32cCodec()], fill_value=fill_value,
                             overwrite=True)
    for lo in range(0, value.shape[0], ROWS_PER_WRITE):
        arr[lo:lo + ROWS_PER_WRITE] = value[lo:lo + ROWS_PER_WRITE]
    return arr


def write_partial(store: Store, train: Split, readout: str, units: range, rank: int, world: int,
                  device="cpu") -> None:
    """Store the float64 Gram of ``units`` of the train split (all must be marked).

    Written as one (K, K) array whose attributes (the coverage, a digest of the covered units'
    markers and a checksum) are written last, so an interrupted write is never trusted.
    """
    markers = train.markers()
    g = gram((train.read_unit(u, (readout,), markers[u]).features[readout] for u in units),
             train.dim, device).cpu().numpy()
    group = store.root.require_group("partials").require_group(readout)
    arr = write_rows(group, f"r{rank}-w{world}", g, fill_value=np.nan)
    fault_point("partial")
    arr.attrs.update({"units": [units.start, units.stop, units.step], "rank": rank,
                      "world": world, "num_units": train.num_units,
                      "digest": markers_digest(markers[list(units)]),
                      "checksum": float(g.sum()), "time": time.time(),
                      "fingerprint_hash": store.root.attrs["fingerprint_hash"]})


def summed_partials(store: Store, train: Split, readout: str, markers: np.ndarray
                    ) -> tuple[torch.Tensor | None, str]:
    """Sum of the partial Grams of one world that cover every train unit exactly once.

    Returns (gram or None, explanation). Partials that are unfinished, corrupt, stale (their
    units were re-extracted since) or from another fingerprint never count; when no world's
    valid partials cover every unit exactly once the result is None and the explanation says
    which units are missing or doubled.
    """
    if "partials" not in store.root or readout not in store.root["partials"]:
        return None, "no partial Grams in the store"
    by_world: dict[int, list] = {}
    rejected = []
    for name, arr in sorted(store.root["partials"][readout].arrays()):
        a = arr.attrs.asdict()
        if "checksum" not in a:
            rejected.append(f"{name} (unfinished)")
            continue
        units = range(*a["units"])
        if a["fingerprint_hash"] != store.root.attrs["fingerprint_hash"] or \
                a["num_units"] != train.num_units or units.stop > train.num_units:
            rejected.append(f"{name} (other store layout)")
            continue
        if a["digest"] != markers_digest(markers[list(units)]):
            rejected.append(f"{name} (stale: its units hold other data now)")
            continue
        by_world.setdefault(a["world"], []).append((name, arr, units, a["checksum"]))
    problems = [f"rejected {', '.join(rejected)}"] if rejected else []
    for world, parts in sorted(by_world.items()):
        count = np.zeros(train.num_units, dtype=np.int64)
        for _, _, units, _ in parts:
            count[list(units)] += 1
        missing, doubled = np.flatnonzero(count == 0), np.flatnonzero(count > 1)
        if len(missing) or len(doubled):
            problems.append(f"world {world}: {len(parts)} partials miss units "
                            f"{missing[:8].tolist()} and double units {doubled[:8].tolist()}")
            continue
        total = np.zeros((train.dim, train.dim))
        for name, arr, _, checksum in parts:
            g = arr[...]
            if not np.isclose(g.sum(), checksum, rtol=1e-12, atol=0):
                raise StoreError(f"partial Gram {store.path}/partials/{readout}/{name} does not "
                                 f"match its checksum; delete it and rerun `das reduce CONFIG`")
            total += g
        return torch.from_numpy(total), f"summed {len(parts)} partial Grams of world {world}"
    return None, "; ".join(problems) or "no finished partial Grams"


def factor_is_current(store: Store, readout: str, digest: str) -> bool:
    """Whether the stored factor of ``readout`` was computed from the train features whose
    markers digest is ``digest``, under this store's fingerprint (settings, model, data)."""
    if "reduce" not in store.root or readout not in store.root["reduce"]:
        return False
    group = store.root["reduce"][readout]
    attrs = group.attrs.asdict()
    return (attrs.get("train_digest") == digest and "eigvals" in group and "eigvecs" in group
            and attrs.get("fingerprint_hash") == store.root.attrs["fingerprint_hash"])


def run_reduce(cfg: Config, show_progress: bool = True, device: str = "cpu",
               partials: str = "auto", force: bool = False) -> dict:
    """Compute and store the Gram factor of every readout the configured methods need.

    With ``partials = "auto"`` a readout whose stored factor is current (``factor_is_current``:
    same train markers digest and fingerprint) is reused, not recomputed, unless ``force``; its
    summary says ``"reused": True``. ``require`` and ``ignore`` name how to compute, so they
    always recompute.

    ``partials``: ``auto`` sums the extraction ranks' partial Grams when N >= k and they cover
    every unit exactly once, and streams the store otherwise; ``require`` refuses to stream
    (and eigendecomposes the summed k x k Gram even when N < k); ``ignore`` always streams.

    Raises:
        StoreError: the train split is incomplete or corrupt, or partials are required but
            unusable.
    """
    if partials not in ("auto", "require", "ignore"):
        raise ConfigError(f"--partials {partials!r}: choose auto, require or ignore")
    store = open_store(cfg)
    train = store.split("train")
    markers = train.require_complete()
    digest = markers_digest(markers)
    summary = {}
    for readout in needed_readouts(cfg):
        started = time.perf_counter()
        if not force and partials == "auto" and factor_is_current(store, readout, digest):
            attrs = store.root["reduce"][readout].attrs
            summary[readout] = {"seconds": time.perf_counter() - started, "reused": True,
                                "trace": attrs["trace"], "num_samples": attrs["num_samples"]}
            continue
        g, source, method = None, "streamed the store", f"k x k eigh (k = {train.dim})"
        thin = train.num_samples < train.dim
        if partials == "auto" and thin:
            # The N x k features are smaller than one k x k partial, and the thin factor skips
            # the O(k^3) eigh that a summed Gram would need: stream them.
            source = f"streamed the store (N = {train.num_samples} < k: cheaper than partials)"
        elif partials != "ignore":
            g, why = summed_partials(store, train, readout, markers)
            if g is None and partials == "require":
                raise StoreError(f"--partials require: no usable partial Grams for {readout!r} "
                                 f"({why}); rerun `das extract CONFIG --partial-gram`, or use "
                                 f"--partials auto to stream the store")
            if g is None and why != "no partial Grams in the store":
                warnings.warn(f"partial Grams of {readout!r} not used ({why}); streaming the "
                              f"store instead", stacklevel=2)
            source = why if g is not None else source
        if g is None and thin:
            # N < k: eigendecompose the N x N kernel instead of the k x k Gram (exact, cheaper).
            blocks = iter_features(train, readout, markers, f"reduce {readout}: features (N < k)",
                                   show_progress)
            phi = torch.cat([torch.as_tensor(b) for b in blocks]).to(device, torch.float64)
            fac = dual_factor(phi)
            method = f"N x N kernel eigh (N = {train.num_samples} < k = {train.dim})"
        else:
            if g is None:
                g = gram(iter_features(train, readout, markers, f"reduce {readout}: Gram",
                                       show_progress),
                         train.dim, device)
            fac = factor(g.to(device), train.num_samples)
        save_factor(store, readout, g, fac, digest)
        summary[readout] = {"seconds": time.perf_counter() - started, "reused": False,
                            "trace": fac.trace,
                            "rank": int((fac.eigvals_K > fac.eigvals_K.max() * 1e-12).sum()),
                            "source": source, "factor": method}
    return summary


def save_factor(store: Store, readout: str, gram_KK: torch.Tensor | None, fac: Factor, digest: str):
    """Write eigvals (R,), eigvecs (k, R) and, when one was formed, the Gram (k, k).

    R < k for the thin factor, whose Gram is not stored (a stale one is removed).
    """
    group = store.root.require_group("reduce").require_group(readout)
    k = fac.dim
    group.attrs["train_digest"] = ""  # until the new arrays are written: not current, not loadable
    if gram_KK is None and "gram" in group:
        del group["gram"]
    arrays = {"eigvals": fac.eigvals_K, "eigvecs": fac.eigvecs_KK}
    if gram_KK is not None:
        arrays["gram"] = gram_KK
    for name, value in arrays.items():
        write_rows(group, name, value.cpu().numpy())
    group.attrs.update({"num_samples": fac.num_samples, "trace": fac.trace, "dim": k,
                        "train_digest": digest,
                        "fingerprint_hash": store.root.attrs["fingerprint_hash"]})


def load_factor(store: Store, readout: str, device="cpu") -> Factor:
    """Load a stored factor; refuse one computed from other training features.

    Raises:
        StoreError: missing or stale reduction.
    """
    if "reduce" not in store.root or readout not in store.root["reduce"]:
        raise StoreError(f"no reduction for readout {readout!r} in {store.path}; run "
                         f"`das reduce CONFIG` first")
    group = store.root["reduce"][readout]
    train = store.split("train")
    if group.attrs["train_digest"] != markers_digest(train.markers()):
        raise StoreError(f"the reduction of {readout!r} in {store.path} was computed from other "
                         f"training features than the store now holds; rerun `das reduce CONFIG`")
    as_t = lambda name: torch.from_numpy(group[name][...]).to(device)  # noqa: E731
    return Factor(as_t("eigvals"), as_t("eigvecs"), group.attrs["trace"],
                  group.attrs["num_samples"], num_dims=group.attrs["dim"])


def stored_gram(store: Store, readout: str) -> np.ndarray:
    """The reduced Gram G (k, k) float64: as stored, or V diag(e) V^T of a thin factor."""
    group = store.root["reduce"][readout]
    if "gram" in group:
        return group["gram"][...]
    v_KR = group["eigvecs"][...]
    return (v_KR * group["eigvals"][...]) @ v_KR.T
