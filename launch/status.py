"""`das status`: progress of an extraction from the store alone (markers and claims).

Per split: units and samples done, each rank's rate (samples per second of unit work: marker
time minus claim time of the units it marked), the summed rate of the ranks active in the last
``stale_after`` seconds, the ETA at that rate, units in progress, and stale units (claimed
longer ago than ``stale_after`` and never marked: their worker died or was preempted; any
rerun of the plan picks them up). Reads only small arrays: cheap on a store of any size.
"""

from __future__ import annotations

import time

import numpy as np

from ..config import Config
from ..store import Split, Store

MAX_LISTED_RANKS = 8


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
        return [head + "  complete"]
    rates = rank_rates(markers, claims)
    speed = sum(rates.get(r, 0.0) for r in active)
    if speed > 0:
        head += f"  rate {speed:.3g} samples/s ({len(active)} active ranks)  ETA {_duration(left / speed)}"
    elif active:
        head += f"  {len(active)} active ranks, no rate yet"
    else:
        head += f"  no rank active in the last {_duration(stale_after)}"
    lines = [head]
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
    running = np.flatnonzero(claimed & (now - claims[:, 0] <= stale_after))
    stale = np.flatnonzero(claimed & (now - claims[:, 0] > stale_after))
    if len(running):
        lines.append(f"  {'':<12} in progress: {len(running)} units")
    if len(stale):
        more = "..." if len(stale) > 8 else ""
        lines.append(f"  {'':<12} stale units (claimed over {_duration(stale_after)} ago, never "
                     f"marked): {len(stale)}: {stale[:8].tolist()}{more}")
    return lines


def status_lines(cfg: Config, stale_after: float = 1800.0, now: float | None = None) -> list[str]:
    """Human-readable progress of every split of the config, plus stored partial Grams."""
    store = Store.open_existing(cfg.store.path)
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
    return lines
