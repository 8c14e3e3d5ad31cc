"""Per-unit commit locks of the store: one lock file per unit, taken with link(2).

A lock file holds 24 bytes, little-endian float64 ``[time, pid, host id]``, written to a private
file first and then hard-linked into place, so a live lock is always whole. Rules:

- A holder on this host whose process is gone (or whose pid now belongs to a younger process)
  has lost its lock at once. Any other lock is stale, and broken, once both its recorded time
  and its file mtime are LOCK_STALE_S old (a commit takes well under a second).
- An empty, short or garbled lock file (what a machine crash can leave) is held, and stale by
  its file mtime alone.
- Waits sleep with exponential backoff (10 ms doubling to 0.5 s), call ``should_stop`` between
  sleeps and raise ``StopRequested`` when it turns true, and give up after ``timeout_s``
  (LOCK_WAIT_S: longer than LOCK_STALE_S, so any stale lock is broken before) with a
  ``StoreError`` naming the unit, the lock file and the fix.
- Release removes the lock file only while it is still this holder's (same content: time to
  the microsecond, pid, host).

Breaking a stale lock re-checks the file's identity just before unlinking it, so only two
waiters judging the same stale lock within microseconds of each other could both enter.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import StoreError

# A commit (writing one unit's chunks and marker) takes well under a second; a lock older than
# this belongs to a dead or hung worker and is broken.
LOCK_STALE_S = 300.0
# The longest a lock wait lasts: a stale lock is broken before, so only a lock that stays fresh
# (a clock far ahead, a lock file that cannot be removed) makes a wait time out.
LOCK_WAIT_S = LOCK_STALE_S + 60.0
# float64 holds integers exactly up to 2**53: the host id fits.
HOST_ID = float(int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:6], "little"))
LOCK_BYTES = 24
_BACKOFF_S = (0.01, 0.5)


class StopRequested(Exception):
    """A lock wait returned because its ``should_stop`` turned true; nothing was written.

    Not a ``StoreError``: the caller (extraction) treats it as preemption (``dist.Preempted``).
    """


def _start_time(pid: int) -> float | None:
    """Start time (epoch seconds, 1 s resolution) of a process, from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` of this host lives; with ``since`` (when it wrote a claim or a
    lock), a process started after that moment is another one that reused the pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _start_time(pid) if since is not None else None
    return started is None or started <= since + 2.0  # /proc/stat btime has 1 s resolution


def _holder(path: Path) -> tuple[os.stat_result, np.ndarray | None] | None:
    """(stat, [time, pid, host] or None when garbled) of a lock file; None when it is gone."""
    try:
        stat = os.stat(path)
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    values = np.frombuffer(raw, "<f8") if len(raw) == LOCK_BYTES else None
    if values is not None and not np.isfinite(values).all():
        values = None
    return stat, values


def _describe(holder, now: float) -> str:
    stat, values = holder
    if values is None:
        return (f"garbled ({stat.st_size} bytes, written {now - stat.st_mtime:.0f} s ago: a "
                f"crashed machine's leftover)")
    where = "this host" if values[2] == HOST_ID else "another host"
    return f"by pid {int(values[1])} on {where} since {now - values[0]:.0f} s"


def _stale(holder, now: float) -> bool:
    stat, values = holder
    if values is None:
        return now - stat.st_mtime > LOCK_STALE_S
    held, pid, host = values
    if host == HOST_ID and not pid_alive(int(pid), since=held):
        return True
    return min(now - held, now - stat.st_mtime) > LOCK_STALE_S


def _break(path: Path, seen: os.stat_result) -> bool:
    """Remove a stale lock file if it is still the one judged stale; False if it cannot be."""
    try:
        now = os.stat(path)
        if (now.st_ino, now.st_mtime_ns, now.st_size) == (seen.st_ino, seen.st_mtime_ns,
                                                           seen.st_size):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:  # e.g. no permission: wait, and time out with the file named
        return False
    return True


@contextlib.contextmanager
def file_lock(path: Path, what: str, *, should_stop: Callable[[], object] | None = None,
              timeout_s: float | None = None):
    """Hold the lock file ``path`` for the block (rules: module docstring).

    ``what`` names the locked thing in messages ("unit 3 of split 'train'").

    Raises:
        StopRequested: ``should_stop()`` turned true while waiting.
        StoreError: the lock stayed held for ``timeout_s`` (default LOCK_WAIT_S).
    """
    timeout_s = LOCK_WAIT_S if timeout_s is None else timeout_s
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.lock")
    mine = np.asarray([time.time(), os.getpid(), HOST_ID], "<f8").tobytes()
    tmp.write_bytes(mine)
    deadline = time.monotonic() + timeout_s
    delay = _BACKOFF_S[0]
    try:
        while True:
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                pass
            holder = _holder(path)
            if holder is None:  # released meanwhile
                continue
            now = time.time()
            if _stale(holder, now) and _break(path, holder[0]):
                continue
            if should_stop is not None and should_stop():
                raise StopRequested(f"stop requested while waiting for the lock of {what}")
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{what}: waited {timeout_s:.0f} s for its lock {path}, held "
                    f"{_describe(holder, now)}; if no worker is committing it now, delete that "
                    f"file and rerun")
            time.sleep(delay)
            delay = min(2 * delay, _BACKOFF_S[1])
    finally:
        tmp.unlink()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_bytes() == mine:
                path.unlink()
