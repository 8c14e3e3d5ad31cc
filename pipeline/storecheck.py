"""`das verify`: check a store against its own records, and repair what can be repaired.

Checked, and what ``fix`` does:

- root metadata: readable, this format, fingerprint matching its hash. Nothing repairs a lost
  or damaged root: the fingerprint (settings, model, training data the features were made
  with) is gone, so no config can safely use the features; the report says to move the store
  away and extract into a fresh one. A path holding only zarr temporary files (an interrupted
  creation) is cleaned up (`das extract` does that too).
- each split: its attributes (lost: not repairable, ``--replace-split``); every array's
  metadata against the layout the attributes imply (rewritten, after which the existing chunks
  are read and checked, not discarded); every completion marker (unreadable: unmarked); every
  marked unit's data against its marker (failing: unmarked, so `das extract` redoes exactly
  those units); claims (unreadable: cleared); cache markers and cached encodings (failing:
  cache unmarked, re-encoded on resume); uids and content against their digests (`das
  extract` rewrites them from the dataset). Units are unmarked under their unit lock after a
  second check there; a unit whose lock stays held (a live worker) is skipped and reported.
- reduce/<readout>: attributes complete, arrays readable and finite (damaged: deleted;
  `das reduce` recomputes it).
- scores/<query set>: attributes complete, array metadata readable (damaged or unfinished:
  deleted; `das score` recomputes it). Score values carry no checksum and are not read.
- partials/<readout>/<name>: finished ones against their checksum (damaged: deleted;
  unfinished ones are left, reduce never uses them).
- .trash/ (an interrupted ``replace_split``) and stray temporary files in the root: removed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StoreError
from .store import (
    _PARTIAL,
    CHUNK_ERRORS,
    NOT_SPLITS,
    TRASH,
    Split,
    Store,
    _damaged,
    _digest,
    _listed,
    _split_state,
    fingerprint_hash,
)

# zarr and JSON errors met when opening damaged metadata or reading damaged chunks.
_READ_ERRORS = (*CHUNK_ERRORS, KeyError, TypeError)
_ROWS_PER_READ = 1024


@dataclass
class SplitReport:
    """What verification found in one split and, with ``fixed``, did about it.

    Iterating it (and ``len``) gives the damaged units, as the list ``Split.verify`` used to
    return.
    """

    name: str
    fixed: bool = False
    checked: int = 0                                            # marked units re-read
    damaged: dict[int, str] = field(default_factory=dict)      # unit -> why it fails
    unmarked: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)     # node path -> problem found
    repaired: list[str] = field(default_factory=list)          # node paths rewritten
    cache_damaged: dict[int, str] = field(default_factory=dict)
    cache_unmarked: list[int] = field(default_factory=list)
    claims_cleared: list[int] = field(default_factory=list)    # unreadable claims
    skipped: dict[int, str] = field(default_factory=dict)      # units locked by a live worker
    unrepairable: list[str] = field(default_factory=list)      # each with how to proceed
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.damaged)

    def __iter__(self):
        return iter(sorted(self.damaged))

    def __getitem__(self, index):
        return sorted(self.damaged)[index]

    @property
    def found(self) -> bool:
        """Whether anything was damaged."""
        return bool(self.damaged or self.metadata or self.cache_damaged or self.claims_cleared
                    or self.unrepairable)

    @property
    def unresolved(self) -> bool:
        """Whether damage remains after this run (all of it, without ``fixed``)."""
        if not self.fixed:
            return self.found
        return bool(self.unrepairable or self.skipped
                    or set(self.damaged) - set(self.unmarked) - set(self.skipped)
                    or set(self.cache_damaged) - set(self.cache_unmarked))

    def lines(self) -> list[str]:
        n = self.name
        state = "unmarked" if self.fixed else "corrupt"
        bad = sorted(self.damaged)
        out = [f"{n}: {self.checked} marked units checked, {len(bad)} {state}"
               + (f": {bad[:10]}" if bad else "")]
        if bad:
            out.append(f"{n}:   e.g. unit {bad[0]}: {self.damaged[bad[0]]}")
            if self.fixed and self.unmarked:
                out.append(f"{n}:   `das extract CONFIG` redoes the {len(self.unmarked)} "
                           f"unmarked units")
        for path, why in self.metadata.items():
            out.append(f"{n}: metadata {path}/zarr.json {why}"
                       + (" -> rewritten from the split's attributes" if path in self.repaired else ""))
        if self.cache_damaged:
            out.append(f"{n}: cache of units {_listed(sorted(self.cache_damaged))} damaged"
                       + (" -> cache unmarked (re-encoded on resume)" if self.cache_unmarked else ""))
        if self.claims_cleared:
            out.append(f"{n}: claims of units {_listed(self.claims_cleared)} unreadable"
                       + (" -> cleared" if self.fixed else ""))
        if self.skipped:
            out.append(f"{n}: units {_listed(sorted(self.skipped))} left as they are: "
                       f"{next(iter(self.skipped.values()))}")
        out += [f"{n}: {note}" for note in self.notes]
        out += [f"{n}: cannot repair: {why}" for why in self.unrepairable]
        return out


@dataclass
class StoreReport:
    """What ``verify_store`` found and did: per split, and for the store itself."""

    path: Path
    fixed: bool = False
    splits: dict[str, SplitReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)      # store-level damage found
    repaired: list[str] = field(default_factory=list)      # what fix did about it
    unrepairable: list[str] = field(default_factory=list)  # each with how to proceed

    @property
    def found(self) -> bool:
        return bool(self.problems or self.unrepairable or
                    any(s.found for s in self.splits.values()))

    @property
    def unresolved(self) -> bool:
        own = self.unrepairable or (self.problems and not self.fixed)
        return bool(own or any(s.unresolved for s in self.splits.values()))

    def lines(self) -> list[str]:
        out = [f"store {self.path}: " + ("damage found" if self.found else "no damage found")]
        for split in self.splits.values():
            out += split.lines()
        out += [f"store: {p}" for p in self.problems]
        out += [f"store: fixed: {r}" for r in self.repaired]
        out += [f"store: cannot repair: {u}" for u in self.unrepairable]
        return out


def _lost_root(path: Path, why: str) -> str:
    return (f"the root metadata {path / 'zarr.json'} is {why}: the store's fingerprint (the "
            f"settings, model and training data its features were made with) is lost, so no "
            f"config can safely use these features; move {path} away (or delete it) and run "
            f"`das extract CONFIG` into a fresh store")


def _remove(store_path: Path, rel: str) -> None:
    """Delete ``rel`` of the store: renamed into .trash first, so no reader sees half of it."""
    trash = store_path / TRASH / uuid.uuid4().hex
    trash.mkdir(parents=True, exist_ok=True)
    os.rename(store_path / rel, trash / rel.replace("/", "--"))
    shutil.rmtree(store_path / TRASH, ignore_errors=True)


def _reason(err: StoreError) -> str:
    """The finding of a unit's error message, without its subject and its fix."""
    text = str(err).split("; ")[0]
    return re.sub(r"^(the \S+ chunk of )?unit \d+ of split '[^']*' ", "", text)


def _unmark(split: Split, array: str, unit: int, check, lock_timeout_s: float) -> str | None:
    """Under the unit's lock, delete ``array``'s chunk of ``unit`` unless ``check()`` passes
    now. Returns None when done (or not needed), else why it was left alone."""
    try:
        with split.unit_lock(unit, timeout_s=lock_timeout_s):
            try:
                check()
                return None  # a worker committed it meanwhile
            except StoreError:
                pass
            split.chunk_file(array, unit).unlink(missing_ok=True)
    except StoreError as err:
        return str(err)
    return None


def verify_split(split: Split, fix: bool = False, lock_timeout_s: float = 10.0) -> SplitReport:
    """Check (and with ``fix`` repair) one split; see the module docstring."""
    report = SplitReport(split.name, fixed=fix)
    report.metadata = split.metadata_problems()
    if report.metadata:
        if not fix:
            report.notes.append("units not checked until the metadata is repaired "
                                "(`das verify CONFIG --fix`)")
            return report
        report.repaired = split.repair_metadata()

    markers, unreadable = split.rows_checked("markers")
    for unit in unreadable:
        report.damaged[unit] = "its completion marker is unreadable"
    for unit in np.flatnonzero(markers[:, 0] == 1.0):
        report.checked += 1
        try:
            split.read_unit(int(unit), marker=markers[unit])
        except StoreError as err:
            report.damaged[int(unit)] = _reason(err)
    if fix:
        for unit in sorted(report.damaged):
            why = _unmark(split, "markers", unit, lambda u=unit: split.read_unit(u), lock_timeout_s)
            if why is None:
                report.unmarked.append(unit)
            else:
                report.skipped[unit] = why

    _, report.claims_cleared = split.rows_checked("claims")
    if fix:
        for unit in report.claims_cleared:
            split.chunk_file("claims", unit).unlink(missing_ok=True)

    if split.cache_keys:
        cached, unreadable = split.rows_checked("cache/markers")
        for unit in unreadable:
            report.cache_damaged[unit] = "its cache marker is unreadable"
        for unit in np.flatnonzero(cached[:, 0] == 1.0):
            try:
                split.read_cache(int(unit))
            except StoreError as err:
                report.cache_damaged[int(unit)] = _reason(err)
        if fix:
            for unit in sorted(report.cache_damaged):
                why = _unmark(split, "cache/markers", unit, lambda u=unit: split.read_cache(u),
                              lock_timeout_s)
                if why is None:
                    report.cache_unmarked.append(unit)
                else:
                    report.skipped[unit] = why

    for path, key in (("uids", "uids_digest"), ("content", "content_digest")):
        if not split.attrs.get(key):
            continue
        try:
            intact = _digest(split.group[path][:]) == split.attrs[key]
        except _READ_ERRORS:
            intact = False
        if not intact:
            report.unrepairable.append(f"the {path} array is damaged; `das extract CONFIG` "
                                       f"rewrites it from the dataset")
    return report


def _check_group(store: Store, rel: str, attrs: tuple[str, ...], arrays, read: bool) -> str | None:
    """Why the group ``rel`` is damaged or unfinished, or None: its attributes hold ``attrs``,
    and each array ``arrays(attributes)`` names opens (and with ``read`` reads as finite)."""
    try:
        group = store.root[rel]
        have = group.attrs.asdict()
    except _READ_ERRORS as err:
        return f"metadata unreadable ({type(err).__name__})"
    missing = [k for k in attrs if k not in have]
    if missing:
        return f"unfinished or damaged: attributes {missing} missing"
    for name in arrays(have):
        try:
            arr = group[name]
            for lo in range(0, arr.shape[0] if read else 0, _ROWS_PER_READ):
                if not np.isfinite(arr[lo:lo + _ROWS_PER_READ]).all():
                    return f"{name} holds non-finite values"
        except _READ_ERRORS as err:
            return f"{name} unreadable ({type(err).__name__})"
    return None


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _check_products(store: Store, report: StoreReport, fix: bool) -> None:
    """reduce/, scores/ and partials/ (see the module docstring)."""
    found = []
    for d in _children(store.path / "reduce"):
        gram = ["gram"] if (d / "gram").is_dir() else []  # absent for a thin factor
        why = _check_group(store, f"reduce/{d.name}", ("train_digest", "trace", "num_samples",
                                                       "dim"),
                           lambda _, gram=gram: ["eigvals", "eigvecs", *gram], read=True)
        found.append((f"reduce/{d.name}", why, "`das reduce CONFIG` recomputes it"))
    for d in _children(store.path / "scores"):
        why = _check_group(store, f"scores/{d.name}", ("methods", "train_digest", "query_digest"),
                           lambda attrs: list(attrs["methods"]), read=False)
        found.append((f"scores/{d.name}", why, "`das score CONFIG` recomputes it"))
    for d in _children(store.path / "partials"):
        for part in _children(d):
            rel = f"partials/{d.name}/{part.name}"
            try:
                arr = store.root[rel]
                checksum = arr.attrs.asdict().get("checksum")
                if checksum is None:
                    continue  # unfinished: reduce rejects it, a rerun overwrites it
                total = sum(float(arr[lo:lo + _ROWS_PER_READ].sum())
                            for lo in range(0, arr.shape[0], _ROWS_PER_READ))
                why = (None if np.isclose(total, checksum, rtol=1e-12, atol=0)
                       else "does not match its checksum")
            except _READ_ERRORS as err:
                why = f"unreadable ({type(err).__name__})"
            found.append((rel, why, "`das extract CONFIG --partial-gram` writes it again, or "
                                    "`das reduce` streams the store"))
    for rel, why, redo in found:
        if why is None:
            continue
        report.problems.append(f"{rel}: {why}")
        if fix:
            _remove(store.path, rel)
            report.repaired.append(f"deleted {rel}; {redo}")


def verify_store(path: str | Path, fix: bool = False, lock_timeout_s: float = 10.0) -> StoreReport:
    """Check (and with ``fix`` repair) a whole store: root, splits, reductions, scores,
    partial Grams (see the module docstring). Works on a store whose root metadata is lost.

    Raises:
        StoreError: there is no store at ``path``.
    """
    path = Path(path)
    report = StoreReport(path, fixed=fix)
    if not path.is_dir():
        raise StoreError(f"no feature store at {path}; run `das extract CONFIG` first")
    if not (path / "zarr.json").exists():
        entries = list(path.iterdir())
        if entries and all(e.is_file() and _PARTIAL.match(e.name) for e in entries):
            report.problems.append("the store's creation was interrupted (only temporary files "
                                   "are there)")
            if fix:
                for entry in entries:
                    entry.unlink(missing_ok=True)
                report.repaired.append("removed them; `das extract CONFIG` creates the store")
        else:
            report.unrepairable.append(_lost_root(path, "missing"))
        return report
    try:
        store = Store._open_root(path)
    except StoreError as err:
        report.unrepairable.append(str(err) if "format" in str(err) else _lost_root(path, "unreadable"))
        return report
    attrs = store.root.attrs.asdict()
    if fingerprint_hash(attrs.get("fingerprint", {})) != attrs.get("fingerprint_hash"):
        report.unrepairable.append(_lost_root(path, "inconsistent (its fingerprint does not "
                                                    "match the recorded hash)"))
    stray = [e for e in path.iterdir() if e.is_file() and _PARTIAL.match(e.name)
             and time.time() - e.stat().st_mtime > 60]
    trash = (path / TRASH).exists()
    if trash or stray:
        report.problems.append("leftovers of an interrupted write or replace_split "
                               f"({len(stray)} temporary files{', .trash/' if trash else ''})")
        if fix:
            shutil.rmtree(path / TRASH, ignore_errors=True)
            for entry in stray:
                entry.unlink(missing_ok=True)
            report.repaired.append("removed the leftovers")
    for child in _children(path):
        name = child.name
        if name.startswith(".") or name in NOT_SPLITS:
            continue
        state, problems = _split_state(child)
        if state == "creating":
            report.splits[name] = SplitReport(name, fix, notes=[
                "its creation did not finish; `das extract CONFIG` creates it"])
        elif state == "lost":
            report.splits[name] = SplitReport(name, fix, unrepairable=[
                str(_damaged(path, name, state, problems))])
        elif state != "absent":
            report.splits[name] = verify_split(Split(store.root[name], name), fix, lock_timeout_s)
    _check_products(store, report, fix)
    return report
