"""The zarr v3 feature store: layout, fingerprint, work units and their completion markers.

Layout (DESIGN.md section 2)::

    <store>/                          root attrs: format, fingerprint (dict) and its hash
      <split>/                        attrs: dataset source/digest, num_samples, rows_per_unit
        uids          (N,) str        sample uids (array index or file name)
        features/<readout> (N, k)     projected features, one chunk per unit, crc32c-checked
        residual, rho (N,)            per-sample scalars
        markers       (U, 5 + R + 1)  one chunk per unit, written LAST: [done, rows, time, pid,
                                      rank, checksum per readout..., checksum of residual]
        claims        (U, 3)          one chunk per unit, written FIRST: [time, pid, rank]
        locks         (U, 3)          a chunk exists only while a worker commits the unit:
                                      [time, pid, host id] (``Split.commit_unit``)
        cache/<name>  (N, ...)        text-conditioned models: VAE latents and caption
                                      embeddings, encoded once per unit and reused on resume
        cache/markers (U, 2)          [done, time] per unit, written after the cache chunks
      reduce/<readout>/ gram, eigvals, eigvecs
      partials/<readout>/r<rank>-w<world> (k, k) partial Gram of one rank's train units (reduce.py)
      scores/<query set>/<method>     (Q, N) scores

Rules: a unit is rows [u * rows_per_unit, (u + 1) * rows_per_unit) and owns exactly one chunk of
every array it writes, so one process writes it; its marker is a separate object written after
the data; readers trust only marked units and check the marker's checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .errors import StoreError
from .faults import fault_point

FORMAT_VERSION = 1
MARKER_FIXED = 5  # done, rows, time, pid, rank
# A commit (writing one unit's chunks and marker) takes well under a second; a lock older than
# this belongs to a dead or hung worker and is broken.
LOCK_STALE_S = 300.0
# float64 holds integers exactly up to 2**53: the host id fits.
HOST_ID = float(int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:6], "little"))


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


def _wait_for(path: Path, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise StoreError(f"waited {timeout_s:.0f} s for rank 0 to create {what} ({path}); "
                             f"is rank 0 running?")
        time.sleep(0.2)


class Store:
    """A feature store opened against one fingerprint."""

    def __init__(self, path: Path, root: zarr.Group):
        self.path = path
        self.root = root

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, create: bool = True,
             wait_s: float = 600.0) -> Store:
        """Open (or, if ``create``, create) the store; refuse a different fingerprint.

        Ranks other than 0 pass ``create=False`` and wait up to ``wait_s`` for the store.

        Raises:
            StoreError: the store exists with another fingerprint or format, or never appears.
        """
        path = Path(path)
        meta = path / "zarr.json"
        if not meta.exists():
            if not create:
                _wait_for(meta, "the store", wait_s)
            else:
                if path.exists() and any(path.iterdir()):
                    raise StoreError(f"[store] path = {str(path)!r} exists and is not a zarr store; "
                                     f"choose another path")
                # Attributes in the one (atomic) write of zarr.json: waiting ranks open the
                # store as soon as that file exists.
                root = zarr.open_group(path, mode="w-", attributes={
                    "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                    "fingerprint_hash": fingerprint_hash(fingerprint),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
                return cls(path, root)
        root = zarr.open_group(path, mode="r+")
        attrs = root.attrs.asdict()
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store {path} has format {attrs.get('format_version')}, this version "
                             f"reads format {FORMAT_VERSION}; use a new [store] path")
        stored = attrs.get("fingerprint", {})
        if fingerprint_hash(stored) != fingerprint_hash(fingerprint):
            lines = "\n  ".join(_diff(stored, fingerprint))
            raise StoreError(f"store {path} was made with other result-affecting settings, model "
                             f"or training data, so its features cannot be mixed with these:\n  "
                             f"{lines}\nUse a new [store] path, or restore the settings above.")
        return cls(path, root)

    @classmethod
    def open_existing(cls, path: str | Path) -> Store:
        """Open without a fingerprint check (read-side tools: status, reduce, score)."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"no feature store at {path}; run `das extract CONFIG` first")
        return cls(path, zarr.open_group(path, mode="r+"))

    @property
    def fingerprint(self) -> dict:
        return self.root.attrs["fingerprint"]

    def split_names(self) -> list[str]:
        return [n for n in self.root.group_keys() if n not in ("reduce", "scores", "partials")]

    def split(self, name: str) -> Split:
        if name not in self.root or not (self.path / name / "markers" / "zarr.json").exists():
            raise StoreError(f"split {name!r} is not in store {self.path}; run "
                             f"`das extract CONFIG --split {name}`")
        return Split(self.root[name], name)

    def create_split(self, name: str, *, source: str, digest: str, uids: list[str],
                     readouts: tuple[str, ...], dim: int, dtype: str, rows_per_unit: int,
                     create: bool = True, wait_s: float = 600.0,
                     cache_shapes: dict[str, tuple[int, ...]] | None = None) -> Split:
        """Create split ``name`` (rank 0) or wait for it; refuse one made from other data.

        Raises:
            StoreError: the split exists with another dataset, size or layout.
        """
        ready = self.path / name / "markers" / "zarr.json"
        if not ready.exists():
            if not create:
                _wait_for(ready, f"split {name!r}", wait_s)
            else:
                return self._create_split(name, source, digest, uids, readouts, dim, dtype,
                                          rows_per_unit, cache_shapes or {})
        split = self.split(name)
        attrs = split.group.attrs.asdict()
        if attrs["dataset_digest"] != digest or attrs["num_samples"] != len(uids):
            raise StoreError(
                f"split {name!r} in {self.path} holds features of other data ({attrs['source']}, "
                f"{attrs['num_samples']} samples) than the config gives ({source}, {len(uids)} "
                f"samples); give the query set another name, or delete {self.path / name}")
        if attrs["rows_per_unit"] != rows_per_unit:
            import warnings

            warnings.warn(f"[store] rows_per_unit = {rows_per_unit} ignored for split {name!r}: it "
                          f"was created with {attrs['rows_per_unit']}", stacklevel=2)
        return split

    def _create_split(self, name, source, digest, uids, readouts, dim, dtype, rows_per_unit,
                      cache_shapes):
        n = len(uids)
        num_units = -(-n // rows_per_unit)
        g = self.root.require_group(name)
        g.attrs.update({"source": source, "dataset_digest": digest, "num_samples": n,
                        "rows_per_unit": rows_per_unit, "num_units": num_units,
                        "readouts": list(readouts), "dim": dim, "dtype": dtype})
        ids = g.create_array("uids", shape=(n,), dtype=str, chunks=(min(n, 65536),),
                             overwrite=True)
        ids[:] = np.asarray(uids, dtype=str)
        feats = g.require_group("features")
        for r in readouts:
            feats.create_array(r, shape=(n, dim), dtype=dtype, chunks=(rows_per_unit, dim),
                               compressors=[Crc32cCodec()], fill_value=np.nan, overwrite=True)
        for scalar in ("residual", "rho"):
            g.create_array(scalar, shape=(n,), dtype=dtype, chunks=(rows_per_unit,),
                           compressors=[Crc32cCodec()], fill_value=np.nan, overwrite=True)
        g.create_array("claims", shape=(num_units, 3), dtype="float64", chunks=(1, 3),
                       fill_value=0.0, overwrite=True)
        _create_locks(g, num_units)
        if cache_shapes:
            cache = g.require_group("cache")
            for key, shape in cache_shapes.items():
                cache.create_array(key, shape=(n, *shape), dtype="float32",
                                   chunks=(rows_per_unit, *shape), compressors=[Crc32cCodec()],
                                   fill_value=np.nan, overwrite=True)
            cache.create_array("markers", shape=(num_units, 2), dtype="float64", chunks=(1, 2),
                               fill_value=0.0, overwrite=True)
        # Created last: its metadata file is what other ranks wait for.
        g.create_array("markers", shape=(num_units, MARKER_FIXED + len(readouts) + 1),
                       dtype="float64", chunks=(1, MARKER_FIXED + len(readouts) + 1),
                       fill_value=0.0, overwrite=True)
        return Split(g, name)


def _create_locks(g: zarr.Group, num_units: int) -> zarr.Array:
    # Raw little-endian float64, no compression: ``Split._unit_lock`` writes its chunks itself.
    return g.create_array("locks", shape=(num_units, 3), dtype="float64", chunks=(1, 3),
                          compressors=None, fill_value=0.0, overwrite=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class UnitData:
    features: dict[str, np.ndarray]
    residual: np.ndarray
    rho: np.ndarray


def _checksums(data: UnitData, readouts) -> list[float]:
    return [float(np.sum(data.features[r], dtype=np.float64)) for r in readouts] + [
        float(np.sum(data.residual, dtype=np.float64))]


class Split:
    """One split (train or a query set) of the store."""

    def __init__(self, group: zarr.Group, name: str):
        self.group = group
        self.name = name
        attrs = group.attrs.asdict()
        self.num_samples: int = attrs["num_samples"]
        self.rows_per_unit: int = attrs["rows_per_unit"]
        self.num_units: int = attrs["num_units"]
        self.readouts: tuple[str, ...] = tuple(attrs["readouts"])
        self.dim: int = attrs["dim"]

    def unit_rows(self, unit: int) -> tuple[int, int]:
        lo = unit * self.rows_per_unit
        return lo, min(self.num_samples, lo + self.rows_per_unit)

    def uids(self) -> list[str]:
        return [str(u) for u in self.group["uids"][:]]

    def markers(self) -> np.ndarray:
        return self.group["markers"][:]

    def done_units(self) -> np.ndarray:
        """Indices of units whose completion marker is written."""
        return np.flatnonzero(self.markers()[:, 0] == 1.0)

    def is_done(self, unit: int) -> bool:
        return bool(self.group["markers"][unit, 0] == 1.0)

    def claim(self, unit: int, rank: int) -> None:
        self.group["claims"][unit] = [time.time(), os.getpid(), rank]

    def claims(self) -> np.ndarray:
        return self.group["claims"][:]

    def write_data(self, unit: int, data: UnitData) -> None:
        """Write one unit's chunks (not yet trusted: ``mark`` must follow)."""
        lo, hi = self.unit_rows(unit)
        for r in self.readouts:
            assert data.features[r].shape == (hi - lo, self.dim), data.features[r].shape
            self.group["features"][r][lo:hi] = data.features[r]
            fault_point("mid_write")
        self.group["residual"][lo:hi] = data.residual
        self.group["rho"][lo:hi] = data.rho

    def mark(self, unit: int, data: UnitData, rank: int = 0) -> None:
        """Write the unit's completion marker: the last object of a unit, after its data."""
        lo, hi = self.unit_rows(unit)
        marker = [1.0, hi - lo, time.time(), os.getpid(), rank] + _checksums(data, self.readouts)
        self.group["markers"][unit] = np.asarray(marker, dtype=np.float64)

    def cache_done(self, unit: int) -> bool:
        return bool(self.group["cache"]["markers"][unit, 0] == 1.0)

    def write_cache(self, unit: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a unit's cached encodings, then the cache marker."""
        lo, hi = self.unit_rows(unit)
        for key, value in arrays.items():
            self.group["cache"][key][lo:hi] = value
        self.group["cache"]["markers"][unit] = [1.0, time.time()]

    def read_cache(self, unit: int) -> dict[str, np.ndarray]:
        lo, hi = self.unit_rows(unit)
        cache = self.group["cache"]
        return {key: cache[key][lo:hi] for key in cache.array_keys() if key != "markers"}

    def commit_unit(self, unit: int, data: UnitData, rank: int = 0) -> bool:
        """Write the unit and its marker unless another worker already marked it.

        Twins (a requeued job overlapping its predecessor, possibly on other hardware whose
        floats differ in the last bits) never interleave: the write runs under the unit's lock,
        so a unit's chunks and its marker always come from one writer, and a marked unit is
        never overwritten. Returns False when the unit was already marked.
        """
        with self._unit_lock(unit):
            if self.is_done(unit):
                return False
            self.write_data(unit, data)
            fault_point("before_marker")
            self.mark(unit, data, rank)
            return True

    @contextlib.contextmanager
    def _unit_lock(self, unit: int):
        """Exclusive lock of one unit: the chunk file of ``locks[unit]``, created with link(2).

        A lock whose holder is a dead process on this host, or older than LOCK_STALE_S, is
        broken. (Two workers breaking the same stale lock at the same moment could both enter;
        that needs three workers on one unit and a dead one among them.)
        """
        if "locks" not in self.group:  # store made before locks existed
            _create_locks(self.group, self.num_units)
        arr = self.group["locks"]
        path = Path(arr.store.root) / arr.path / arr.metadata.encode_chunk_key((unit, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.lock")
        tmp.write_bytes(np.asarray([time.time(), os.getpid(), HOST_ID], "<f8").tobytes())
        try:
            while True:
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    pass
                try:
                    held, pid, host = np.frombuffer(path.read_bytes(), "<f8")
                except (FileNotFoundError, ValueError):  # released meanwhile / being written
                    continue
                if (host == HOST_ID and not _pid_alive(int(pid))) or \
                        time.time() - held > LOCK_STALE_S:
                    path.unlink(missing_ok=True)
                    continue
                time.sleep(0.05)
        finally:
            tmp.unlink()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def read_unit(self, unit: int, readouts=None, marker: np.ndarray | None = None) -> UnitData:
        """Read a marked unit and verify it against its marker's checksums.

        Raises:
            StoreError: the unit is not marked, or its data does not match the marker.
        """
        marker = self.group["markers"][unit] if marker is None else marker
        if marker[0] != 1.0:
            raise StoreError(f"unit {unit} of split {self.name!r} is not complete; run "
                             f"`das extract` to finish it")
        lo, hi = self.unit_rows(unit)
        try:
            data = UnitData({r: self.group["features"][r][lo:hi] for r in self.readouts},
                            self.group["residual"][lo:hi], self.group["rho"][lo:hi])
        except ValueError as err:  # crc32c mismatch
            raise StoreError(f"unit {unit} of split {self.name!r} is corrupt ({err}); run "
                             f"`das verify CONFIG --fix` to unmark corrupt units, then "
                             f"`das extract CONFIG`") from None
        want = marker[MARKER_FIXED:]
        got = _checksums(data, self.readouts)
        if marker[1] != hi - lo or not np.allclose(got, want, rtol=1e-12, atol=0):
            raise StoreError(f"unit {unit} of split {self.name!r} does not match its marker "
                             f"(rows {marker[1]:.0f} vs {hi - lo}, checksums {got} vs "
                             f"{list(want)}); it was modified after extraction: run "
                             f"`das verify CONFIG --fix`, then `das extract CONFIG`")
        if readouts is not None:
            data.features = {r: data.features[r] for r in readouts}
        return data

    def verify(self, fix: bool = False) -> list[int]:
        """Re-read every marked unit against its marker; return the units that fail.

        With ``fix`` each failing unit is unmarked under its unit lock (after a second check
        there, so a unit a worker just committed is left alone), and `das extract` redoes it.
        """
        markers = self.markers()
        bad = []
        for unit in np.flatnonzero(markers[:, 0] == 1.0):
            try:
                self.read_unit(int(unit), marker=markers[unit])
            except StoreError:
                bad.append(int(unit))
        if fix:
            for unit in bad:
                with self._unit_lock(unit):
                    try:
                        self.read_unit(unit)
                    except StoreError:
                        self.group["markers"][unit] = 0.0
        return bad

    def require_complete(self) -> np.ndarray:
        """Return the markers, or raise StoreError naming the missing units."""
        markers = self.markers()
        missing = np.flatnonzero(markers[:, 0] != 1.0)
        if len(missing):
            raise StoreError(f"split {self.name!r} has {len(missing)} of {self.num_units} units "
                             f"not extracted (e.g. {missing[:5].tolist()}); run "
                             f"`das extract CONFIG --split {self.name}` to finish them")
        return markers


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
