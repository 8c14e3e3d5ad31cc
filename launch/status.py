"""`das status`: progress of an extraction from the store alone (markers and claims).

Per split: units and samples done, each rank's rate (samples per second of unit work: marker
time minus claim time of the units it marked), the summed rate of the ranks active in the last
``stale_after`` seconds, the ETA at that rate, units in progress, and stale units (claimed
longer ago than ``stale_after`` and never marked: their worker died or was preempted; any
rerun of the plan picks them up). Reads only small arrays: cheap on a store of any size.

When ``das submit`` recorded jobs (``<store stem>.slurm/jobs.json``), the last lines give their
Slurm state and pending reason (``slurm_lines``: squeue, sacct for jobs that left the queue).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import StoreError
from ..fingerprint import open_store
from ..store import Split
from .slurm import JOBS_FILE, recorded_jobs, slurm_dir

MAX_LISTED_RANKS = 8
MAX_LISTED_TASKS = 8
REASON_HINTS = {"PartitionConfig": "no node of the partition can run it: scancel it and submit "
                                   "again with fewer CPUs, GPUs or memory"}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def rank_rates(markers: np.ndarray, claims: np.ndarray) -> dict[int, float]:
    """Samples per second of unit work per rank, from units whose claim and marker it wrote."""
    done = markers[:, 0] == 1.0
    own = done & (claims[:, 2] == markers[:, 4]) & (claims[:, 0] > 0) & (claims[:, 0] <= markers[:, 2])
    rates = {}
    for r in np.unique(markers[own, 4]).astype(int):
        sel = own & (markers[:, 4] == r)
        busy = float((markers[sel, 2] - claims[sel, 0]).sum())
        if busy > 0:
            rates[int(r)] = float(markers[sel, 1].sum()) / busy
    return rates


def active_ranks(split: Split, now: float, window: float) -> set[int]:
    """Ranks that claimed or marked a unit of the split in the last ``window`` seconds."""
    markers, claims = split.markers(), split.claims()
    done = markers[:, 0] == 1.0
    return ({int(r) for r in markers[done & (markers[:, 2] > now - window), 4]}
            | {int(r) for r in claims[~done & (claims[:, 0] > now - window), 2]})


def split_lines(split: Split, now: float, stale_after: float, active: set[int]) -> list[str]:
    """Lines of one split; ``active``: ranks working anywhere in the store lately."""
    markers, claims = split.markers(), split.claims()
    done = markers[:, 0] == 1.0
    rows_done = int(markers[done, 1].sum())
    left = split.num_samples - rows_done
    head = (f"  {split.name:<12} units {int(done.sum())}/{split.num_units}  samples "
            f"{rows_done}/{split.num_samples} ({100.0 * rows_done / max(split.num_samples, 1):.0f}%)")
    if not left:
        return [head + "  complete"] + excluded_line(split, markers)
    rates = rank_rates(markers, claims)
    speed = sum(rates.get(r, 0.0) for r in active)
    if speed > 0:
        head += f"  rate {speed:.3g} samples/s ({len(active)} active ranks)  ETA {_duration(left / speed)}"
    elif active:
        head += f"  {len(active)} active ranks, no rate yet"
    else:
        head += f"  no rank active in the last {_duration(stale_after)}"
    lines = [head] + excluded_line(split, markers)
    if rates:
        ordered = sorted(rates.items())
        if len(ordered) <= MAX_LISTED_RANKS:
            per = ", ".join(f"r{r} {v:.3g}" for r, v in ordered)
        else:
            vals = np.array([v for _, v in ordered])
            slow = sorted(ordered, key=lambda kv: kv[1])[:3]
            per = (f"min {vals.min():.3g}, median {np.median(vals):.3g}, max {vals.max():.3g}; "
                   f"slowest {', '.join(f'r{r} {v:.3g}' for r, v in slow)}")
        lines.append(f"  {'':<12} per rank (samples/s): {per}")
    claimed = ~done & (claims[:, 0] > 0)
    # A claim of a process of this host that no longer exists is stale at once.
    is_stale = claimed & ((now - claims[:, 0] > stale_after) | split.dead_claims(claims))
    running = np.flatnonzero(claimed & ~is_stale)
    stale = np.flatnonzero(is_stale)
    if len(running):
        lines.append(f"  {'':<12} in progress: {len(running)} units")
    if len(stale):
        more = "..." if len(stale) > 8 else ""
        lines.append(f"  {'':<12} stale units (claimed over {_duration(stale_after)} ago or by a "
                     f"process that is gone, never marked): {len(stale)}: {stale[:8].tolist()}{more}")
    return lines


def excluded_line(split: Split, markers: np.ndarray) -> list[str]:
    """The samples left out for non-finite features ([features] nonfinite = "exclude")."""
    try:
        rows = split.excluded_rows(markers)
    except StoreError as err:
        return [f"  {'':<12} excluded samples unreadable ({err})"]
    if not len(rows):
        return []
    uids = split.uids()
    shown = ", ".join(uids[i] for i in rows[:5]) + (", ..." if len(rows) > 5 else "")
    return [f"  {'':<12} excluded (non-finite features): {len(rows)} samples: {shown}"]


def status_lines(cfg: Config, stale_after: float = 1800.0, now: float | None = None) -> list[str]:
    """Human-readable progress of every split of the config, plus stored partial Grams."""
    store = open_store(cfg)
    now = time.time() if now is None else now
    lines = [f"store {store.path} (fingerprint {store.root.attrs['fingerprint_hash'][:12]})"]
    present = store.split_names()
    splits = [store.split(n) for n in ["train", *cfg.data.queries] if n in present]
    active = set().union(*(active_ranks(s, now, stale_after) for s in splits))
    by_name = {s.name: s for s in splits}
    for name in ["train", *cfg.data.queries]:
        if name in by_name:
            lines += split_lines(by_name[name], now, stale_after, active)
        else:
            lines.append(f"  {name:<12} not started")
    if "partials" in store.root:
        for readout, group in sorted(store.root["partials"].groups()):
            worlds = sorted({a.attrs.get("world") for _, a in group.arrays() if "checksum" in a.attrs})
            count = sum(1 for _, a in group.arrays() if "checksum" in a.attrs)
            lines.append(f"  partial Grams {readout}: {count} finished (world {worlds})")
    if "train" in by_name:
        lines += result_lines(cfg, store, by_name["train"])
    return lines + slurm_lines(cfg.store.path)


def result_lines(cfg: Config, store, train: Split) -> list[str]:
    """Whether the reduction and the stored scores are current for the stored train units (and
    for the config's damping and methods)."""
    from ..reduce import markers_digest, needed_readouts

    markers = train.markers()
    complete = bool((markers[:, 0] == 1.0).all())
    digest = markers_digest(markers)
    lines = []
    reduce_group = store.root["reduce"] if "reduce" in store.root else None
    states = []
    for r in needed_readouts(cfg):
        if reduce_group is None or r not in reduce_group:
            states.append(f"{r} not reduced")
        elif reduce_group[r].attrs.get("train_digest") != digest:
            states.append(f"{r} stale (train units changed since)")
    if not complete:
        lines.append(f"  {'reduce':<12} waits for the train split")
    elif states:
        lines.append(f"  {'reduce':<12} {'; '.join(states)}: run `das reduce CONFIG`")
    else:
        lines.append(f"  {'reduce':<12} current for the {train.num_units} train units")
    s = cfg.score
    want = {"methods": list(s.methods), "damping": s.damping, "damping_absolute": s.damping_absolute,
            "gamma": s.gamma, "residual": s.residual}
    for name in cfg.data.queries:
        label = f"scores {name}"
        group = store.root["scores"][name] if "scores" in store.root and name in store.root["scores"] \
            else None
        if group is None or "train_digest" not in group.attrs:
            lines.append(f"  {label:<12} not scored")
            continue
        a = group.attrs.asdict()
        query = store.split(name) if name in store.split_names() else None
        why = []
        if a["train_digest"] != digest:
            why.append("train units changed since")
        if query is not None and a.get("query_digest") != markers_digest(query.markers()):
            why.append("query units changed since")
        why += [f"{k} {a.get(k)!r} in the store, {v!r} in the config" for k, v in want.items()
                if a.get(k) != v]
        kind = "absolute" if a.get("damping_absolute") else "relative"
        if why:
            lines.append(f"  {label:<12} stale ({'; '.join(why)}): run `das score CONFIG`")
        else:
            lines.append(f"  {label:<12} current (damping {a['damping']:g} {kind}, methods "
                         f"{', '.join(a['methods'])})")
    return lines


def _num_tasks(job_id: str) -> int:
    """Array tasks that one squeue/sacct id stands for: 12 and 12_3 -> 1, 12_[0-3,7,8-12:2%4] -> 8."""
    m = re.search(r"_\[([^\]%]*)", job_id)
    if m is None:
        return 1
    count = 0
    for lo, hi, step in re.findall(r"(\d+)(?:-(\d+)(?::(\d+))?)?", m[1]):
        count += (int(hi) - int(lo)) // int(step or 1) + 1 if hi else 1
    return count


def _query(cmd: list[str]) -> tuple[list[list[str]], str]:
    """Rows (whitespace- or |-separated, at most 3 fields) of a Slurm client's output, and its
    error ("" when it succeeded)."""
    if shutil.which(cmd[0]) is None:
        return [], f"`{cmd[0]}` is not on PATH"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return [], f"`{cmd[0]}` gave no answer in 30 s"
    if done.returncode != 0:
        return [], (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    sep = "|" if "-P" in cmd else None
    return [line.split(sep, 2) for line in done.stdout.splitlines() if line.strip()], ""


def _job_lines(job_id: str, rows: list[list[str]]) -> list[str]:
    """``slurm: ID STATE (REASON)`` per row of one job; counts per state for a big array."""

    def state(row: list[str]) -> str:
        reason = row[2].strip() if len(row) > 2 else ""
        text = row[1] + (f" ({reason})" if reason and reason != "None" else "")
        return text + (f": {REASON_HINTS[reason]}" if reason in REASON_HINTS else "")

    def first_task(row: list[str]) -> int:
        return int((re.findall(r"_\[?(\d+)", row[0]) or ["-1"])[0])

    if len(rows) <= MAX_LISTED_TASKS:
        return [f"slurm: {row[0]} {state(row)}" for row in sorted(rows, key=first_task)]
    counts = Counter()
    for row in rows:
        counts[state(row)] += _num_tasks(row[0])
    return [f"slurm: {job_id} array tasks: " + ", ".join(f"{n} {s}" for s, n in counts.most_common())]


def slurm_lines(store: Path) -> list[str]:
    """Slurm state and pending reason of the jobs of the store's latest ``das submit``.

    Lines like ``slurm: 1234_[0-3] PENDING (Resources)`` and ``slurm: 1235 PENDING
    (Dependency)``, after one line naming the jobs; from ``squeue`` (all states: finished jobs
    stay there for MinJobAge), then ``sacct`` for jobs that left the queue. [] when no jobs were
    recorded; one line when squeue is unavailable.
    """
    try:
        jobs = recorded_jobs(store)
    except (OSError, ValueError, KeyError) as err:
        return [f"slurm: the job record {slurm_dir(store) / JOBS_FILE} is unreadable ({err})"]
    if jobs is None:
        return []
    ids = [jobs["extract"]] + ([jobs["reduce_score"]] if jobs.get("reduce_score") else [])
    named = (f"extraction array {jobs['extract']} ({jobs['array_tasks']} tasks) and "
             + (f"reduce + score {ids[1]}" if len(ids) > 1 else "no reduce + score job (its sbatch failed)")
             + f", submitted {jobs['submitted']}")
    rows, err = _query(["squeue", "-h", "--states=all", f"--jobs={','.join(ids)}", "-o", "%i %T %r"])
    if err and "Invalid job id" not in err:  # the error when every id has left the queue
        return [f"slurm: squeue: {err}: the state of the {named} is unknown here"]
    lines = [f"slurm: {named}"]
    by_job = {i: [r for r in rows if r[0].split("_")[0] == i] for i in ids}
    gone = [i for i in ids if not by_job[i]]
    if gone:
        done, err = _query(["sacct", "-n", "-X", "-P", f"--jobs={','.join(gone)}", "-o", "JobID,State"])
        for i in gone:
            by_job[i] = [r for r in done if r[0].split("_")[0] == i]
    for i in ids:
        lines += (_job_lines(i, by_job[i]) if by_job[i] else
                  [f"slurm: {i} no longer in the queue, state unknown (sacct: {err or 'no record'}); "
                   f"logs in {Path(jobs['out_dir']) / 'logs'}"])
    return lines
