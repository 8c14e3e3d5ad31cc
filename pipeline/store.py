"""The zarr v3 feature store: layout, fingerprint, work units, their markers and integrity.

Layout (format 2; DESIGN.md section 2)::

    <store>/                          root attrs: format_version, fingerprint (dict) and its hash
      <split>/                        attrs: source, dataset_digest, num_samples, rows_per_unit,
                                      num_units, readouts, dim, dtype, cache ([name, shape]
                                      pairs), uids_digest, content_digest
        uids          (N,) str        sample uids (array index or file name)
        content       (N,) str        per-row content hashes (when the dataset gave them)
        features/<readout> (N, k)     projected features, one chunk per unit
        residual, rho (N,)            per-sample scalars, one chunk per unit
        excluded      (N,) uint8      1: a row the run excluded (non-finite features), stored
                                      as zero features, residual and rho; one chunk per unit
        markers       (U, 5 + R + 3)  one chunk per unit, written LAST: [done, rows, time, pid,
                                      rank, crc32 per readout..., crc32 of residual, of rho, of
                                      excluded]
        claims        (U, 4)          one chunk per unit, written FIRST: [time, pid, rank, host
                                      id]; zeroed by ``release``
        locks         (U, 3)          a chunk exists only while a worker commits the unit:
                                      [time, pid, host id] (``locks.file_lock``)
        cache/<name>  (N, ...)        text-conditioned models: VAE latents and caption
                                      embeddings, encoded once per unit and reused on resume
        cache/markers (U, 2 + C)      [done, time, crc32 per cache array...], after the chunks
      reduce/<readout>/ gram, eigvals, eigvecs
      partials/<readout>/r<rank>-w<world> (k, k) partial Gram of one rank's train units (reduce.py)
      scores/<query set>/<method>     (Q, N) scores
      members/m<i>/                   an ensemble's root ([[model]] list) holds no splits: member
                                      i is a whole store of this layout with its own fingerprint
                                      (pipeline/ensemble.py); scores/ holds the members' mean
      .trash/                         what ``replace_split`` is deleting (gone once it returns)

Integrity: every chunk of a split carries a crc32c (codec), so a flipped or truncated chunk
fails when read; a unit's marker holds the crc32 of the unit's bytes of every per-sample array,
so a missing, stale or foreign chunk is detected as well (``read_unit``). An unreadable marker
or claim counts as absent (with one warning), never as a crash. A split opens only when every
array's metadata is the layout its attributes imply; ``das verify --fix``
(``storecheck.verify_store``) rewrites damaged metadata and unmarks units whose data fail.

Rules: a unit is rows [u * rows_per_unit, (u + 1) * rows_per_unit) and owns exactly one chunk of
every array it writes, so one process writes it; its marker is a separate object written after
the data; readers trust only marked units and check the marker's checksums.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import MemoryStore

from .errors import StoreError
from .faults import fault_point
from .locks import HOST_ID as HOST_ID
from .locks import LOCK_STALE_S as LOCK_STALE_S
from .locks import LOCK_WAIT_S as LOCK_WAIT_S
from .locks import StopRequested as StopRequested
from .locks import file_lock, pid_alive

FORMAT_VERSION = 2
MARKER_FIXED = 5  # done, rows, time, pid, rank
MARKER_SCALARS = ("residual", "rho", "excluded")  # checksummed after the readouts
CLAIM_WIDTH = 4  # time, pid, rank, host id
NOT_SPLITS = ("reduce", "scores", "partials", "members")
TRASH = ".trash"
# What reading a damaged chunk raises: crc32c mismatch (ValueError), a codec's own error
# (RuntimeError), an unreadable file (OSError).
CHUNK_ERRORS = (ValueError, RuntimeError, OSError)
_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial$")  # zarr's (and our) temporary files
_LAYOUT_KEYS = ("zarr_format", "node_type", "shape", "data_type", "chunk_grid",
                "chunk_key_encoding", "fill_value", "codecs")
_SPLIT_ATTRS = ("source", "dataset_digest", "num_samples", "rows_per_unit", "num_units",
                "readouts", "dim", "dtype", "uids_digest")
_ROW_BLOCK = 1024  # units read at once when a per-unit array has unreadable chunks


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _diff(a, b, prefix="") -> list[str]:
    """Human-readable differences between two nested dicts (store vs config)."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: store has {va!r}, config gives {vb!r}")
    return out


def _digest(strings) -> str:
    return hashlib.sha256(json.dumps([str(s) for s in strings]).encode()).hexdigest()


def crc(values: np.ndarray) -> float:
    """crc32 of an array's little-endian bytes, as a float64 (exact below 2**53)."""
    a = np.asarray(values)
    a = a.astype(np.uint8) if a.dtype == bool else a
    return float(zlib.crc32(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))))


def _listed(units, limit: int = 10) -> str:
    units = [int(u) for u in units]
    return f"{units[:limit]}{'...' if len(units) > limit else ''} ({len(units)})"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wait_for(path: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise StoreError(f"waited {timeout_s:.0f} s for rank 0 to create {what} ({path}); "
                             f"is rank 0 running?")
        time.sleep(0.2)


# ------------------------------------------------------------------------------ split layout

def array_specs(attrs: dict) -> dict[str, dict]:
    """``create_array`` arguments of every array of a split by path, from the split's attributes
    (in creation order: markers last, the array other ranks wait for)."""
    n, rows, units = attrs["num_samples"], attrs["rows_per_unit"], attrs["num_units"]
    dim, dtype, readouts = attrs["dim"], attrs["dtype"], attrs["readouts"]
    crc32c = [Crc32cCodec()]
    text = {"shape": (n,), "dtype": str, "chunks": (min(n, 65536),),
            "compressors": [ZstdCodec(), Crc32cCodec()]}
    specs = {"uids": dict(text)}
    if attrs.get("content_digest"):
        specs["content"] = dict(text)
    for r in readouts:
        specs[f"features/{r}"] = {"shape": (n, dim), "dtype": dtype, "chunks": (rows, dim),
                                  "compressors": crc32c, "fill_value": np.nan}
    for scalar in ("residual", "rho"):
        specs[scalar] = {"shape": (n,), "dtype": dtype, "chunks": (rows,), "compressors": crc32c,
                         "fill_value": np.nan}
    specs["excluded"] = {"shape": (n,), "dtype": "uint8", "chunks": (rows,),
                         "compressors": crc32c, "fill_value": 0}
    specs["claims"] = {"shape": (units, CLAIM_WIDTH), "dtype": "float64",
                       "chunks": (1, CLAIM_WIDTH), "compressors": crc32c, "fill_value": 0.0}
    # Raw little-endian float64, no codec: ``locks.file_lock`` writes these chunks itself.
    specs["locks"] = {"shape": (units, 3), "dtype": "float64", "chunks": (1, 3),
                      "compressors": None, "fill_value": 0.0}
    cache = attrs.get("cache") or []
    for key, shape in cache:
        specs[f"cache/{key}"] = {"shape": (n, *shape), "dtype": "float32",
                                 "chunks": (rows, *shape), "compressors": crc32c,
                                 "fill_value": np.nan}
    if cache:
        specs["cache/markers"] = {"shape": (units, 2 + len(cache)), "dtype": "float64",
                                  "chunks": (1, 2 + len(cache)), "compressors": crc32c,
                                  "fill_value": 0.0}
    width = MARKER_FIXED + len(readouts) + len(MARKER_SCALARS)
    specs["markers"] = {"shape": (units, width), "dtype": "float64", "chunks": (1, width),
                        "compressors": crc32c, "fill_value": 0.0}
    return specs


def _layout_key(attrs: dict) -> str:
    keys = ("num_samples", "rows_per_unit", "num_units", "dim", "dtype", "readouts", "cache",
            "content_digest")
    return json.dumps({k: attrs.get(k) for k in keys}, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _expected_metadata(layout_key: str) -> dict[str, bytes]:
    """zarr.json bytes of every node of a split (arrays, and the groups features/ and cache/)
    by path, exactly as zarr writes them for ``array_specs``."""
    files: dict = {}
    group = zarr.open_group(MemoryStore(files), mode="w")
    for path, spec in array_specs(json.loads(layout_key)).items():
        group.create_array(path, **spec)
    return {key[:-len("/zarr.json")]: buf.to_bytes() for key, buf in files.items()
            if key != "zarr.json"}


def _metadata_problems(split_dir: Path, attrs: dict) -> dict[str, str]:
    """{node path: what is wrong} for each array or group of a split whose zarr.json is
    missing, unreadable, or not the layout the split's attributes imply."""
    out = {}
    for path, want in _expected_metadata(_layout_key(attrs)).items():
        try:
            have = json.loads((split_dir / path / "zarr.json").read_bytes())
        except FileNotFoundError:
            out[path] = "missing"
            continue
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError included
            out[path] = f"unreadable ({type(err).__name__})"
            continue
        if not isinstance(have, dict):
            out[path] = "unreadable (not a JSON object)"
            continue
        want = json.loads(want)
        differ = [k for k in _LAYOUT_KEYS if json.dumps(have.get(k), sort_keys=True)
                  != json.dumps(want.get(k), sort_keys=True)]
        if differ:
            out[path] = f"differs from the split's layout ({', '.join(differ)})"
    return out


def _has_unit_data(split_dir: Path) -> bool:
    """Whether any per-unit chunk (data, marker, claim, cache) exists: a split with one was in
    use, not merely being created."""
    dirs = [split_dir / name / "c" for name in ("markers", "claims", "residual", "rho", "excluded")]
    dirs += [p / "c" for sub in ("features", "cache") for p in (split_dir / sub).glob("*")]
    return any(d.is_dir() and any(d.iterdir()) for d in dirs)


def _split_state(split_dir: Path) -> tuple[str, list[str]]:
    """(state, problems) of a split folder. States: ``absent``; ``creating`` (no markers
    metadata, which is written last, and no unit chunk: being created, or a creation that was
    interrupted); ``ready``; ``damaged`` (array metadata missing or wrong: verify --fix
    rebuilds it); ``lost`` (the split's own attributes are unreadable: nothing can rebuild it)."""
    if not split_dir.is_dir():
        return "absent", []
    used = _has_unit_data(split_dir)
    try:
        attrs = json.loads((split_dir / "zarr.json").read_bytes()).get("attributes", {})
        missing = [k for k in _SPLIT_ATTRS if k not in attrs]
        if missing:
            raise KeyError(missing)
        _expected_metadata(_layout_key(attrs))
    except FileNotFoundError:
        return ("lost", ["zarr.json (the split's attributes) missing"]) if used else ("creating", [])
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
        if not used:
            return "creating", []
        return "lost", [f"zarr.json (the split's attributes) unreadable ({type(err).__name__})"]
    if not (split_dir / "markers" / "zarr.json").exists() and not used:
        return "creating", []
    problems = _metadata_problems(split_dir, attrs)
    if problems:
        return "damaged", [f"{path}/zarr.json {why}" for path, why in problems.items()]
    return "ready", []


def _damaged(store_path: Path, name: str, state: str, problems: list[str]) -> StoreError:
    listed = "; ".join(problems[:4]) + (f"; {len(problems) - 4} more" if len(problems) > 4 else "")
    if state == "lost":
        return StoreError(f"split {name!r} in {store_path} is damaged beyond repair ({listed}): "
                          f"run `das extract CONFIG --replace-split {name}` (or delete "
                          f"{store_path / name}) to extract it again")
    return StoreError(f"split {name!r} in {store_path} is damaged ({listed}): run "
                      f"`das verify CONFIG --fix`")


def _describe_rows(rows: list[int], uids: list[str]) -> str:
    named = [uids[i] if i < len(uids) else f"row {i}" for i in rows[:10]]
    return f"{len(rows)} rows changed (uids {', '.join(named)}{', ...' if len(rows) > 10 else ''})"


# ------------------------------------------------------------------------------------- store

class Store:
    """A feature store opened against one fingerprint."""

    def __init__(self, path: Path, root: zarr.Group):
        self.path = path
        self.root = root

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, create: bool = True,
             wait_s: float = 600.0, train_row_digests: list[str] | None = None) -> Store:
        """Open (or, if ``create``, create) the store; refuse a different fingerprint.

        Ranks other than 0 pass ``create=False`` and wait up to ``wait_s`` for the store;
        ``wait_s=0`` fails at once when there is none (stage checks). Leftovers of an
        interrupted creation (only zarr temporary files) are removed before creating. With
        ``train_row_digests`` (the current training rows' content hashes) a refusal caused by
        changed training data names the changed rows.

        Raises:
            StoreError: the store exists with another fingerprint or format, its root metadata
                is unreadable, the path holds something else, or the store never appears.
        """
        path = Path(path)
        meta = path / "zarr.json"
        if not meta.exists():
            if create:
                return cls._create(path, fingerprint)
            if wait_s <= 0:
                raise StoreError(f"no feature store at {path}; run `das extract CONFIG` first")
            _wait_for(meta, "the store", wait_s)
        store = cls._open_root(path)
        store._check_fingerprint(fingerprint, train_row_digests)
        return store

    @classmethod
    def _create(cls, path: Path, fingerprint: dict) -> Store:
        if path.exists():
            entries = list(path.iterdir()) if path.is_dir() else [path]
            if any(not (e.is_file() and _PARTIAL.match(e.name)) for e in entries):
                raise StoreError(f"[store] path = {str(path)!r} exists and is not a zarr store; "
                                 f"choose another path")
            for entry in entries:  # an interrupted creation: only temporary files
                entry.unlink(missing_ok=True)
        # Attributes in the one (atomic) write of zarr.json: waiting ranks open the store as
        # soon as that file exists.
        root = zarr.open_group(path, mode="w-", attributes={
            "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
            "fingerprint_hash": fingerprint_hash(fingerprint),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return cls(path, root)

    @classmethod
    def _open_root(cls, path: Path, foreign: bool = False) -> Store:
        try:
            root = zarr.open_group(path, mode="r+")
            attrs = root.attrs.asdict()
        except (ValueError, OSError, KeyError, TypeError) as err:  # JSONDecodeError included
            raise StoreError(f"the root metadata {path / 'zarr.json'} of store {path} is "
                             f"unreadable ({type(err).__name__}); `das verify CONFIG` says how "
                             f"to proceed") from None
        if foreign and "format_version" not in attrs and "fingerprint" not in attrs:
            return cls(path, root)
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store {path} has format {attrs.get('format_version')}, this version "
                             f"reads format {FORMAT_VERSION}; use a new [store] path")
        return cls(path, root)

    def _check_fingerprint(self, fingerprint: dict, train_row_digests: list[str] | None) -> None:
        stored = self.root.attrs.asdict().get("fingerprint", {})
        if fingerprint_hash(stored) == fingerprint_hash(fingerprint):
            return
        lines = "\n  ".join(_diff(stored, fingerprint))
        head = (f"store {self.path} was made with other result-affecting settings, model or "
                f"training data, so its features cannot be mixed with these:\n  {lines}")
        changed = {k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)}
        if changed != {"train"}:
            raise StoreError(f"{head}\nUse a new [store] path, or restore the settings above.")
        rows = ""
        if train_row_digests is not None and "train" in self.split_names():
            try:
                split = self.split("train")
                changed_rows = split.changed_rows(train_row_digests)
                rows = f"\n  training data: {_describe_rows(changed_rows, split.uids())}"
            except StoreError:
                pass
        raise StoreError(f"{head}{rows}\nOnly the training data differ: `das extract CONFIG "
                         f"--replace-split train` extracts the new training set (deleting the "
                         f"train features and the reductions, scores and partial Grams made from "
                         f"them; query features are kept), or use a new [store] path.")

    @classmethod
    def open_existing(cls, path: str | Path, foreign: bool = False) -> Store:
        """Open without a fingerprint check (read-side tools: status, reduce, score).

        ``foreign=True`` also accepts a plain zarr group that this package did not make (no
        format or fingerprint attribute): `das lds eval` reads ``scores/<set>/<method>`` arrays
        written by other tools in the documented layout, and nothing else of it.

        Raises:
            StoreError: no store there, unreadable root metadata, or another format.
        """
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"no feature store at {path}; run `das extract CONFIG` first")
        return cls._open_root(path, foreign)

    @property
    def fingerprint(self) -> dict:
        return self.root.attrs["fingerprint"]

    def split_names(self) -> list[str]:
        """Names of the split folders that have their metadata (readable or not)."""
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and not
                      p.name.startswith(".") and p.name not in NOT_SPLITS and
                      (p / "zarr.json").exists())

    def split(self, name: str) -> Split:
        """The split ``name``.

        Raises:
            StoreError: not in the store, or damaged (message: the damage and the fix).
        """
        state, problems = _split_state(self.path / name)
        if state in ("absent", "creating"):
            raise StoreError(f"split {name!r} is not in store {self.path}; run "
                             f"`das extract CONFIG --split {name}`")
        if state != "ready":
            raise _damaged(self.path, name, state, problems)
        return Split(self.root[name], name)

    def create_split(self, name: str, *, source: str, digest: str, uids: list[str],
                     readouts: tuple[str, ...], dim: int, dtype: str, rows_per_unit: int,
                     create: bool = True, wait_s: float = 600.0,
                     cache_shapes: dict[str, tuple[int, ...]] | None = None,
                     row_digests: list[str] | None = None) -> Split:
        """Create split ``name`` (rank 0) or wait for it; refuse one made from other data.

        ``row_digests``: per-row content hashes, stored in ``<split>/content`` so that a later
        refusal names the rows that changed. A split whose creation was interrupted (no marker
        metadata, no unit data) is created again; a damaged one is refused, never recreated.
        Rank 0 rewrites a damaged ``uids`` / ``content`` array from ``uids`` / ``row_digests``
        when they are the ones the split was made with.

        Raises:
            StoreError: the split exists with another dataset, or is damaged.
        """
        state, problems = _split_state(self.path / name)
        if state in ("absent", "creating"):
            if create:
                return self._create_split(name, source, digest, uids, readouts, dim, dtype,
                                          rows_per_unit, cache_shapes or {}, row_digests)
            state, problems = self._wait_split(name, wait_s)
        if state != "ready":
            raise _damaged(self.path, name, state, problems)
        split = Split(self.root[name], name)
        attrs = split.attrs
        if attrs["dataset_digest"] != digest or attrs["num_samples"] != len(uids):
            rows = ""
            if row_digests is not None and attrs.get("content_digest"):
                with_uids = uids if len(uids) >= split.num_samples else split.uids()
                rows = f"; {_describe_rows(split.changed_rows(row_digests), with_uids)}"
            raise StoreError(
                f"split {name!r} in {self.path} holds features of other data ({attrs['source']}, "
                f"{attrs['num_samples']} samples) than the config gives ({source}, {len(uids)} "
                f"samples){rows}; to extract the new data run `das extract CONFIG --replace-split "
                f"{name}` (or delete {self.path / name}), or give the query set another name")
        if attrs["rows_per_unit"] != rows_per_unit:
            warnings.warn(f"[store] rows_per_unit = {rows_per_unit} ignored for split {name!r}: it "
                          f"was created with {attrs['rows_per_unit']}", stacklevel=2)
        if create:
            split._restore_identity(uids, row_digests)
        return split

    def _wait_split(self, name: str, wait_s: float) -> tuple[str, list[str]]:
        deadline = time.monotonic() + wait_s
        while True:
            state, problems = _split_state(self.path / name)
            if state not in ("absent", "creating"):
                return state, problems
            if time.monotonic() > deadline:
                raise StoreError(f"waited {wait_s:.0f} s for rank 0 to create split {name!r} "
                                 f"({self.path / name}); is rank 0 running?")
            time.sleep(0.2)

    def _create_split(self, name, source, digest, uids, readouts, dim, dtype, rows_per_unit,
                      cache_shapes, row_digests) -> Split:
        n = len(uids)
        assert row_digests is None or len(row_digests) == n, (len(row_digests), n)
        attrs = {"source": source, "dataset_digest": digest, "num_samples": n,
                 "rows_per_unit": rows_per_unit, "num_units": -(-n // rows_per_unit),
                 "readouts": list(readouts), "dim": dim, "dtype": dtype,
                 "cache": [[key, list(shape)] for key, shape in cache_shapes.items()],
                 "uids_digest": _digest(uids),
                 "content_digest": None if row_digests is None else _digest(row_digests)}
        # overwrite: whatever an interrupted creation left (no unit data) goes.
        group = self.root.create_group(name, overwrite=True, attributes=attrs)
        values = {"uids": uids, "content": row_digests}
        for path, spec in array_specs(attrs).items():
            arr = group.create_array(path, **spec, overwrite=True)
            if path in values:
                arr[:] = np.asarray(values[path], dtype=str)
        return Split(group, name)

    def replace_split(self, name: str, fingerprint: dict | None = None) -> list[str]:
        """Delete split ``name`` and what was computed from it, so that `das extract` extracts
        it again from the current data. Run it while no extraction writes to the store.

        ``train`` takes reduce/, scores/ and partials/ with it; a query set its scores/<name>.
        ``fingerprint``: for ``train``, the current config's fingerprint, written to the root
        once the old features are gone; it may differ from the stored one in its ``train``
        entry only. Returns the removed paths (relative to the store); none when nothing is
        there.

        Raises:
            StoreError: ``name`` is not a split name, or the fingerprint differs elsewhere.
        """
        if not name or name.startswith(".") or "/" in name or name in NOT_SPLITS:
            raise StoreError(f"{name!r} is not a split name")
        if fingerprint is not None:
            stored = self.fingerprint
            changed = {k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)}
            allowed = {"train"} if name == "train" else set()
            if changed - allowed:
                raise StoreError(
                    f"cannot replace split {name!r} of {self.path}: the config's fingerprint "
                    f"differs in {', '.join(sorted(changed))}"
                    + (" (only train may differ)" if name == "train" else
                       " (`--replace-split train` handles changed training data)")
                    + "; use a new [store] path")
        doomed = [name, *NOT_SPLITS] if name == "train" else [name, f"scores/{name}"]
        trash = self.path / TRASH / uuid.uuid4().hex
        removed = []
        for rel in doomed:
            if (self.path / rel).exists():
                trash.mkdir(parents=True, exist_ok=True)
                os.rename(self.path / rel, trash / rel.replace("/", "--"))
                removed.append(rel)
        if fingerprint is not None and fingerprint_hash(fingerprint) != fingerprint_hash(self.fingerprint):
            self.root.attrs.update({"fingerprint": fingerprint,
                                    "fingerprint_hash": fingerprint_hash(fingerprint)})
        shutil.rmtree(self.path / TRASH, ignore_errors=True)
        return removed

    def verify(self, fix: bool = False, lock_timeout_s: float = 10.0):
        """``storecheck.verify_store`` of this store: a ``StoreReport``."""
        from .storecheck import verify_store

        return verify_store(self.path, fix, lock_timeout_s)


# ------------------------------------------------------------------------------------ splits

@dataclass
class UnitData:
    """One unit's per-sample arrays: features[readout] (n, k), residual (n,), rho (n,), and
    excluded (n,) bool (None: no row excluded), rows whose features were non-finite and that
    the run excludes; the store keeps them as zeros."""

    features: dict[str, np.ndarray]
    residual: np.ndarray
    rho: np.ndarray
    excluded: np.ndarray | None = None


def _checksums(data: UnitData, readouts) -> list[float]:
    return [crc(data.features[r]) for r in readouts] + [
        crc(data.residual), crc(data.rho), crc(data.excluded)]


def dead_claims(claims: np.ndarray) -> np.ndarray:
    """(U,) bool: claims (U, 4) written by a process of this host that is gone (or whose pid
    now belongs to a younger process). Unclaimed rows and other hosts' claims are False."""
    out = np.zeros(len(claims), dtype=bool)
    alive: dict[tuple[int, float], bool] = {}
    for u in np.flatnonzero((claims[:, 0] > 0) & (claims[:, 3] == HOST_ID)):
        key = (int(claims[u, 1]), float(claims[u, 0]))
        if key not in alive:
            alive[key] = pid_alive(*key)
        out[u] = not alive[key]
    return out


class Split:
    """One split (train or a query set) of the store."""

    def __init__(self, group: zarr.Group, name: str):
        self.group = group
        self.name = name
        self.attrs: dict = group.attrs.asdict()
        self.num_samples: int = self.attrs["num_samples"]
        self.rows_per_unit: int = self.attrs["rows_per_unit"]
        self.num_units: int = self.attrs["num_units"]
        self.readouts: tuple[str, ...] = tuple(self.attrs["readouts"])
        self.dim: int = self.attrs["dim"]
        self.dtype: str = self.attrs["dtype"]
        self.cache_keys: list[str] = [key for key, _ in self.attrs.get("cache") or []]
        self.path = Path(group.store.root) / group.path
        self._specs = array_specs(self.attrs)
        self._arrays: dict[str, zarr.Array] = {}

    def _arr(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            self._arrays[path] = self.group[path]
        return self._arrays[path]

    def chunk_file(self, path: str, unit: int) -> Path:
        """The file of unit ``unit``'s chunk of array ``path`` (default chunk key encoding)."""
        ndim = len(self._specs[path]["shape"])
        return self.path.joinpath(path, "c", str(unit), *["0"] * (ndim - 1))

    def unit_rows(self, unit: int) -> tuple[int, int]:
        lo = unit * self.rows_per_unit
        return lo, min(self.num_samples, lo + self.rows_per_unit)

    def _text(self, path: str) -> list[str]:
        try:
            return [str(u) for u in self._arr(path)[:]]
        except CHUNK_ERRORS:
            raise StoreError(f"the {path} array of split {self.name!r} ({self.path / path}) is "
                             f"unreadable; `das extract CONFIG` rewrites it from the dataset") from None

    def uids(self) -> list[str]:
        return self._text("uids")

    def changed_rows(self, row_digests: list[str]) -> list[int]:
        """Rows whose content hash differs between the store and ``row_digests`` (the current
        dataset's), ascending; rows present on one side only count as changed.

        Raises:
            StoreError: the split was made without row digests, or they are unreadable.
        """
        if not self.attrs.get("content_digest"):
            raise StoreError(f"split {self.name!r} stores no per-row content hashes (it was "
                             f"extracted without them), so changed rows cannot be named")
        stored = self._text("content")
        common = min(len(stored), len(row_digests))
        rows = [i for i in range(common) if stored[i] != row_digests[i]]
        return rows + list(range(common, max(len(stored), len(row_digests))))

    def _restore_identity(self, uids: list[str], row_digests: list[str] | None) -> None:
        """Rewrite a damaged uids / content array from the given values when they are the
        ones the split was made with (their digest is in the split's attributes)."""
        for path, values, key in (("uids", uids, "uids_digest"),
                                  ("content", row_digests, "content_digest")):
            want = self.attrs.get(key)
            if want is None or values is None or _digest(values) != want:
                continue
            try:
                intact = _digest(self._arr(path)[:]) == want
            except CHUNK_ERRORS:
                intact = False
            if not intact:
                self._arr(path)[:] = np.asarray(values, dtype=str)
                warnings.warn(f"split {self.name!r}: its {path} array was damaged and has been "
                              f"rewritten from the dataset", stacklevel=3)

    # ------------------------------------------------------------ markers, claims, locks

    def rows_checked(self, path: str) -> tuple[np.ndarray, list[int]]:
        """All rows of a per-unit array (markers, claims, cache/markers) and the units whose
        chunk is unreadable (their rows read as 0)."""
        arr = self._arr(path)
        try:
            return arr[:], []
        except CHUNK_ERRORS:
            pass
        out, bad = np.zeros(arr.shape, dtype=arr.dtype), []
        for lo in range(0, arr.shape[0], _ROW_BLOCK):
            hi = min(arr.shape[0], lo + _ROW_BLOCK)
            try:
                out[lo:hi] = arr[lo:hi]
                continue
            except CHUNK_ERRORS:
                pass
            for u in range(lo, hi):
                try:
                    out[u] = arr[u]
                except CHUNK_ERRORS:
                    bad.append(u)
        return out, bad

    def _rows(self, path: str, what: str, meaning: str) -> np.ndarray:
        values, bad = self.rows_checked(path)
        if bad:
            warnings.warn(f"split {self.name!r}: the {what} of units {_listed(bad)} are unreadable "
                          f"and count as {meaning}; `das verify CONFIG --fix` clears them",
                          stacklevel=3)
        return values

    def markers(self) -> np.ndarray:
        """(U, 5 + R + 3) completion markers; a unit whose marker is unreadable reads as not
        done (one warning names them)."""
        return self._rows("markers", "completion markers", "not done")

    def done_units(self) -> np.ndarray:
        """Indices of units whose completion marker is written (and readable)."""
        return np.flatnonzero(self.markers()[:, 0] == 1.0)

    def is_done(self, unit: int) -> bool:
        try:
            return bool(self._arr("markers")[unit, 0] == 1.0)
        except CHUNK_ERRORS:
            warnings.warn(f"split {self.name!r}: the completion marker of unit {unit} is "
                          f"unreadable and counts as not done", stacklevel=2)
            return False

    def claim(self, unit: int, rank: int) -> None:
        self._arr("claims")[unit] = [time.time(), os.getpid(), rank, HOST_ID]

    def release(self, unit: int) -> None:
        """Zero the claim of ``unit`` if this process wrote it (a worker dropping the unit on
        a stop signal), so `das status` no longer counts it as in progress."""
        arr = self._arr("claims")
        try:
            mine = arr[unit]
            mine = int(mine[1]) == os.getpid() and mine[3] == HOST_ID
        except CHUNK_ERRORS:
            mine = True
        if mine:
            arr[unit] = 0.0

    def claims(self) -> np.ndarray:
        """(U, 4) [time, pid, rank, host id]; unreadable claims read as unclaimed (zeros)."""
        return self._rows("claims", "claims", "unclaimed")

    def dead_claims(self, claims: np.ndarray | None = None) -> np.ndarray:
        """``dead_claims`` of this split's claims (or of the given ones)."""
        return dead_claims(self.claims() if claims is None else claims)

    def unit_lock(self, unit: int, should_stop: Callable[[], object] | None = None,
                  timeout_s: float | None = None):
        """Context manager: the exclusive commit lock of one unit (``locks.file_lock``).

        Raises:
            StopRequested: ``should_stop()`` turned true while waiting.
            StoreError: still held after ``timeout_s`` (default LOCK_WAIT_S).
        """
        return file_lock(self.chunk_file("locks", unit), f"unit {unit} of split {self.name!r}",
                         should_stop=should_stop, timeout_s=timeout_s)

    # ----------------------------------------------------------------- writing units

    def _prepared(self, unit: int, data: UnitData) -> UnitData:
        """The unit as stored: store dtype, excluded rows zeroed, ``excluded`` a bool array.

        Raises:
            StoreError: a row that is not excluded has non-finite values.
        """
        lo, hi = self.unit_rows(unit)
        n, dtype = hi - lo, np.dtype(self.dtype)
        excluded = (np.zeros(n, dtype=bool) if data.excluded is None
                    else np.asarray(data.excluded, dtype=bool).copy())
        assert excluded.shape == (n,), excluded.shape
        feats = {}
        for r in self.readouts:
            feats[r] = np.array(data.features[r], dtype=dtype)
            assert feats[r].shape == (n, self.dim), feats[r].shape
            feats[r][excluded] = 0
        scalars = []
        for values in (data.residual, data.rho):
            values = np.array(values, dtype=dtype)
            assert values.shape == (n,), values.shape
            values[excluded] = 0
            scalars.append(values)
        finite = np.isfinite(scalars[0]) & np.isfinite(scalars[1])
        for f in feats.values():
            finite &= np.isfinite(f).all(axis=1)
        bad = np.flatnonzero(~finite)
        if len(bad):
            raise StoreError(f"unit {unit} of split {self.name!r}: rows {_listed(bad + lo)} have "
                             f"non-finite features, residual or rho and are not excluded; "
                             f"refusing to store them")
        return UnitData(feats, scalars[0], scalars[1], excluded)

    def _write(self, unit: int, data: UnitData) -> None:
        lo, hi = self.unit_rows(unit)
        for r in self.readouts:
            self._arr(f"features/{r}")[lo:hi] = data.features[r]
            fault_point("mid_write")
        self._arr("residual")[lo:hi] = data.residual
        self._arr("rho")[lo:hi] = data.rho
        self._arr("excluded")[lo:hi] = data.excluded.astype(np.uint8)

    def _mark(self, unit: int, data: UnitData, rank: int) -> None:
        lo, hi = self.unit_rows(unit)
        marker = [1.0, hi - lo, time.time(), os.getpid(), rank] + _checksums(data, self.readouts)
        self._arr("markers")[unit] = np.asarray(marker, dtype=np.float64)

    def write_data(self, unit: int, data: UnitData) -> None:
        """Write one unit's chunks (not yet trusted: ``mark`` must follow)."""
        self._write(unit, self._prepared(unit, data))

    def mark(self, unit: int, data: UnitData, rank: int = 0) -> None:
        """Write the unit's completion marker: the last object of a unit, after its data."""
        self._mark(unit, self._prepared(unit, data), rank)

    def commit_unit(self, unit: int, data: UnitData, rank: int = 0, *,
                    should_stop: Callable[[], object] | None = None,
                    lock_timeout_s: float | None = None) -> bool:
        """Write the unit and its marker unless another worker already marked it.

        Twins (a requeued job overlapping its predecessor, possibly on other hardware whose
        floats differ in the last bits) never interleave: the write runs under the unit's lock,
        so a unit's chunks and its marker always come from one writer, and a marked unit is
        never overwritten. Returns False when the unit was already marked.

        Raises:
            StoreError: non-finite rows that are not excluded, or the lock stayed held.
            StopRequested: ``should_stop()`` turned true while waiting for the lock (nothing
                was written).
        """
        data = self._prepared(unit, data)
        with self.unit_lock(unit, should_stop, lock_timeout_s):
            if self.is_done(unit):
                return False
            self._write(unit, data)
            fault_point("before_marker")
            self._mark(unit, data, rank)
            return True

    # ----------------------------------------------------------------------- cache

    def cache_done(self, unit: int) -> bool:
        try:
            return bool(self._arr("cache/markers")[unit, 0] == 1.0)
        except CHUNK_ERRORS:
            warnings.warn(f"split {self.name!r}: the cache marker of unit {unit} is unreadable "
                          f"and counts as not cached", stacklevel=2)
            return False

    def write_cache(self, unit: int, arrays: dict[str, np.ndarray], *,
                    should_stop: Callable[[], object] | None = None,
                    lock_timeout_s: float | None = None) -> None:
        """Write a unit's cached encodings, then the cache marker (under the unit's lock; kept
        as it is when a twin cached the unit meanwhile).

        Raises:
            StopRequested, StoreError: as ``commit_unit``'s lock wait.
        """
        lo, hi = self.unit_rows(unit)
        values = {k: np.ascontiguousarray(arrays[k], dtype=np.float32) for k in self.cache_keys}
        with self.unit_lock(unit, should_stop, lock_timeout_s):
            if self.cache_done(unit):
                return
            for key, value in values.items():
                self._arr(f"cache/{key}")[lo:hi] = value
            self._arr("cache/markers")[unit] = [1.0, time.time(), *(crc(values[k])
                                                                     for k in self.cache_keys)]

    def read_cache(self, unit: int) -> dict[str, np.ndarray]:
        """A cached unit's encodings, checked against its cache marker.

        Raises:
            StoreError: not cached, or the cache does not match its marker.
        """
        lo, hi = self.unit_rows(unit)
        fix = "run `das verify CONFIG --fix` (it unmarks the cache; `das extract` re-encodes it)"
        try:
            marker = self._arr("cache/markers")[unit]
        except CHUNK_ERRORS:
            raise StoreError(f"the cache marker of unit {unit} of split {self.name!r} is "
                             f"unreadable; {fix}") from None
        if marker[0] != 1.0:
            raise StoreError(f"unit {unit} of split {self.name!r} is not cached")
        out = {}
        for i, key in enumerate(self.cache_keys):
            try:
                out[key] = self._arr(f"cache/{key}")[lo:hi]
            except CHUNK_ERRORS as err:
                raise StoreError(f"the cache/{key} chunk of unit {unit} of split {self.name!r} is "
                                 f"corrupt ({type(err).__name__}); {fix}") from None
            if crc(out[key]) != marker[2 + i]:
                raise StoreError(f"the cache/{key} chunk of unit {unit} of split {self.name!r} "
                                 f"does not match its cache marker; {fix}")
        return out

    # ---------------------------------------------------------------------- reading

    def read_unit(self, unit: int, readouts=None, marker: np.ndarray | None = None) -> UnitData:
        """Read a marked unit (the given readouts, default all; residual, rho and excluded
        always) and verify every array read against its marker's checksums.

        Raises:
            StoreError: the unit is not marked (or its marker is unreadable), or its data does
                not match the marker (corrupt, missing or replaced chunks).
        """
        redo = "run `das verify CONFIG --fix`, then `das extract CONFIG`"
        if marker is None:
            try:
                marker = self._arr("markers")[unit]
            except CHUNK_ERRORS:
                raise StoreError(f"unit {unit} of split {self.name!r} is not complete (its "
                                 f"completion marker is unreadable); {redo}") from None
        if marker[0] != 1.0:
            raise StoreError(f"unit {unit} of split {self.name!r} is not complete; run "
                             f"`das extract` to finish it")
        wanted = self.readouts if readouts is None else tuple(readouts)
        unknown = [r for r in wanted if r not in self.readouts]
        if unknown:
            raise StoreError(f"split {self.name!r} has no readout {unknown[0]!r} (it has "
                             f"{list(self.readouts)})")
        lo, hi = self.unit_rows(unit)
        names = [f"features/{r}" for r in wanted] + list(MARKER_SCALARS)
        columns = [MARKER_FIXED + self.readouts.index(r) for r in wanted] + [
            MARKER_FIXED + len(self.readouts) + i for i in range(len(MARKER_SCALARS))]
        values = {}
        for name in names:
            try:
                values[name] = self._arr(name)[lo:hi]
            except CHUNK_ERRORS as err:
                raise StoreError(f"unit {unit} of split {self.name!r} is corrupt ({name}: "
                                 f"{type(err).__name__}: {str(err)[:80]}); run `das verify "
                                 f"CONFIG --fix` to unmark corrupt units, then `das extract "
                                 f"CONFIG`") from None
        bad = [name for name, col in zip(names, columns, strict=True)
               if crc(values[name]) != marker[col]]
        if marker[1] != hi - lo or bad:
            gone = {name: not self.chunk_file(name, unit).exists() for name in bad}
            why = ", ".join(f"{name} ({'chunk missing' if gone[name] else 'other content'})"
                            for name in bad) or f"rows {marker[1]:.0f} vs {hi - lo}"
            raise StoreError(f"unit {unit} of split {self.name!r} does not match its marker "
                             f"({why}); its data were damaged or replaced after extraction: "
                             f"{redo}")
        return UnitData({r: values[f"features/{r}"] for r in wanted}, values["residual"],
                        values["rho"], values["excluded"].astype(bool))

    def excluded_rows(self, markers: np.ndarray | None = None) -> np.ndarray:
        """Row indices (ascending, int64) that marked units excluded; reads only the (N,)
        uint8 ``excluded`` array, checked against the markers.

        Raises:
            StoreError: the excluded chunk of a marked unit is corrupt.
        """
        markers = self.markers() if markers is None else markers
        col = MARKER_FIXED + len(self.readouts) + MARKER_SCALARS.index("excluded")
        arr = self._arr("excluded")
        try:
            flags = arr[:]
        except CHUNK_ERRORS:
            flags = None
        rows = []
        for unit in np.flatnonzero(markers[:, 0] == 1.0):
            lo, hi = self.unit_rows(int(unit))
            try:
                chunk = flags[lo:hi] if flags is not None else arr[lo:hi]
            except CHUNK_ERRORS:
                chunk = None
            if chunk is None or crc(chunk) != markers[unit, col]:
                raise StoreError(f"unit {unit} of split {self.name!r} is corrupt (excluded does "
                                 f"not match its marker); run `das verify CONFIG --fix`, then "
                                 f"`das extract CONFIG`")
            rows.append(lo + np.flatnonzero(chunk))
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)

    def require_complete(self) -> np.ndarray:
        """Return the markers, or raise StoreError naming the missing units (an unreadable
        marker counts as missing)."""
        markers = self.markers()
        missing = np.flatnonzero(markers[:, 0] != 1.0)
        if len(missing):
            raise StoreError(f"split {self.name!r} has {len(missing)} of {self.num_units} units "
                             f"not extracted (e.g. {missing[:5].tolist()}); run "
                             f"`das extract CONFIG --split {self.name}` to finish them")
        return markers

    # ---------------------------------------------------------------- checks, repairs

    def metadata_problems(self) -> dict[str, str]:
        """{node path: problem} of the split's array/group metadata (see ``_metadata_problems``)."""
        return _metadata_problems(self.path, self.attrs)

    def repair_metadata(self) -> list[str]:
        """Rewrite every missing or damaged array/group zarr.json from the split's attributes;
        existing chunks become readable again. Returns the repaired node paths."""
        expected = _expected_metadata(_layout_key(self.attrs))
        repaired = list(self.metadata_problems())
        for path in repaired:
            _atomic_write(self.path / path / "zarr.json", expected[path])
        self._arrays.clear()
        return repaired

    def verify(self, fix: bool = False, lock_timeout_s: float = 10.0):
        """Re-read every marked unit (and cached unit) against its marker: a ``SplitReport``
        (``storecheck.verify_split``); iterating it gives the failing units.

        With ``fix`` damaged metadata is rewritten first, then each failing unit is unmarked
        under its unit lock (after a second check there, so a unit a worker just committed is
        left alone), and `das extract` redoes it.
        """
        from .storecheck import verify_split

        return verify_split(self, fix, lock_timeout_s)


def read_scores(path: str | Path, query_set: str, method: str) -> np.ndarray:
    """The (Q, N) score matrix of one method, as written by `das score`.

    Raises:
        StoreError: no store at ``path``, or no scores for that query set and method.
    """
    store = Store.open_existing(path)
    try:
        return store.root["scores"][query_set][method][...]
    except KeyError:
        raise StoreError(f"no scores for {query_set!r}/{method!r} in {store.path}; run "
                         f"`das score CONFIG`") from None
