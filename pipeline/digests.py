"""Content hashes of image files and their decode verdicts, cached by (path, size, mtime_ns).

A file's digest is the sha256 of its bytes (what `sha256sum FILE` prints), so it is the same on
every run and machine. Probing a file reads it once, streamed, for the hash, then opens it with
PIL for its mode and size and, when asked, decodes it fully (``decoded``: the pixels are whole).
``check_files`` does this for an image folder through the cache, ``check_images`` for the stored
images of a `datasets` folder (no cache: they are bytes in arrow files); both raise a
``DataError`` naming the first unreadable image. ``data.py`` decides what to decode up front.

The cache is one sqlite database (WAL journal, busy timeout: safe for several processes on one
host) in the first of ``$DAS_CACHE_DIR``, ``$XDG_CACHE_HOME/das-pipeline``,
``~/.cache/das-pipeline``; nothing is ever written beside the data. An entry is used only while
the file's absolute path, size and mtime_ns are unchanged; a file modified less than
``RACY_NS`` before it was hashed is not cached (its mtime could still be reused by a write in
the same clock tick). A cache that cannot be created, opened or written (read-only home, full
disk, corrupt file, several hosts sharing it over NFS) turns itself off with one warning and the
run goes on uncached. ``Dataset.load`` re-hashes the bytes it decodes, so a file whose content
changed under an unchanged (size, mtime) is still refused, and its entry forgotten.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from .errors import DataError

CACHE_FILE = "files-v1.sqlite"
RACY_NS = 2_000_000_000
_CHUNK = 1 << 20
# What PIL raises on a file that is not a readable image (truncated, corrupt, not an image).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                Image.DecompressionBombError)
_warned = False


def cache_dir() -> Path:
    """$DAS_CACHE_DIR, else $XDG_CACHE_HOME/das-pipeline, else ~/.cache/das-pipeline."""
    if os.environ.get("DAS_CACHE_DIR"):
        return Path(os.environ["DAS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "das-pipeline"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class FileRecord(NamedTuple):
    """What probing an image file found."""

    sha256: str
    mode: str
    """PIL mode as stored (L, RGB, RGBA, P, I;16, ...)."""
    size: tuple[int, int]
    """(width, height)."""
    decoded: bool
    """True when the whole image was decoded without error; False: only its header was read."""


def probe(source: str | bytes, decode: bool) -> FileRecord | str:
    """Hash an image (a file path, or its bytes) and read its header, and all its pixels if
    ``decode``.

    Returns the record, or a one-line description of why it is not a readable image.
    """
    try:
        if isinstance(source, bytes):
            digest, fh = hashlib.sha256(source).hexdigest(), io.BytesIO(source)
        else:
            digest, fh = sha256_file(source), source
        with Image.open(fh) as img:
            mode, size = img.mode, img.size
            if decode:
                img.load()
    except Image.UnidentifiedImageError:
        return "not an image PIL can read (a wrong extension, or not an image at all)"
    except Image.DecompressionBombError as err:
        return f"too large to decode safely ({err})"
    except IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return FileRecord(digest, mode, size, decode)


def probe_many(paths: list[str], decode: bool, threads: int | None = None) -> list[FileRecord | str]:
    """``probe`` of every file, in order, on a few threads (hashing and decoding release the GIL)."""
    threads = threads or min(8, os.cpu_count() or 1)
    if threads == 1 or len(paths) < 64:
        return [probe(p, decode) for p in paths]
    step = max(16, len(paths) // (threads * 8))
    blocks = [paths[i:i + step] for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(lambda block: [probe(p, decode) for p in block], blocks)
        return [rec for part in parts for rec in part]


_local = threading.local()


@contextmanager
def uncached():
    """In this thread, read and write no file cache (`das attribute` / `das serve`: uploads in a
    temporary folder must leave nothing outside the reports folder)."""
    before = getattr(_local, "uncached", False)
    _local.uncached = True
    try:
        yield
    finally:
        _local.uncached = before


class FileCache:
    """FileRecords by (absolute path, size, mtime_ns). Every method is a no-op once disabled."""

    def __init__(self, db_path: Path | None):
        self.db: sqlite3.Connection | None = None
        if db_path is None:
            return
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(db_path, timeout=30.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                            "mtime_ns INTEGER, sha256 TEXT, mode TEXT, width INTEGER, height "
                            "INTEGER, decoded INTEGER)")
        except (sqlite3.Error, OSError) as err:
            self._disable(err)

    @classmethod
    def open(cls) -> FileCache:
        """The user's cache (see the module docstring); a disabled one if it cannot be used or
        inside ``uncached()``."""
        if getattr(_local, "uncached", False):
            return cls(None)
        try:
            where = cache_dir()
        except RuntimeError as err:  # Path.home() without a home directory
            cache = cls(None)
            cache._disable(err)
            return cache
        return cls(where / CACHE_FILE)

    def _disable(self, err: Exception) -> None:
        global _warned
        if self.db is not None:
            self.db.close()
        self.db = None
        if not _warned:
            _warned = True
            warnings.warn(f"the file digest cache (DAS_CACHE_DIR, default ~/.cache/das-pipeline) "
                          f"is not usable ({err}); hashing every image file on each run: set "
                          f"DAS_CACHE_DIR to a writable folder on this host", stacklevel=3)

    def get_many(self, keys: list[tuple[str, int, int]]) -> dict[str, FileRecord]:
        """Records of the keys (path, size, mtime_ns) that are cached unchanged, by path."""
        found: dict[str, FileRecord] = {}
        if self.db is None:
            return found
        wanted = {path: (size, mtime) for path, size, mtime in keys}
        folders = {os.path.dirname(path) for path in wanted}
        try:
            for folder in folders:  # one range scan of the primary key per folder
                lo, hi = os.path.join(folder, ""), folder + chr(ord(os.sep) + 1)
                for path, size, mtime, digest, mode, w, h, decoded in self.db.execute(
                        "SELECT path, size, mtime_ns, sha256, mode, width, height, decoded FROM "
                        "files WHERE path >= ? AND path < ?", (lo, hi)):
                    if wanted.get(path) == (size, mtime):
                        found[path] = FileRecord(digest, mode, (w, h), bool(decoded))
        except sqlite3.Error as err:
            self._disable(err)
            return {}
        return found

    def put_many(self, items: list[tuple[tuple[str, int, int], FileRecord]]) -> None:
        """Remember records; files modified within RACY_NS of now are skipped."""
        if self.db is None:
            return
        now = time.time_ns()
        rows = [(path, size, mtime, r.sha256, r.mode, r.size[0], r.size[1], int(r.decoded))
                for (path, size, mtime), r in items if abs(now - mtime) >= RACY_NS]
        if not rows:
            return
        self._write("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def forget(self, path: str) -> None:
        self._write("DELETE FROM files WHERE path = ?", [(path,)])

    def _write(self, sql: str, rows: list[tuple]) -> None:
        if self.db is None:
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(sql, rows)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as err:
            self._disable(err)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> FileCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_digests(paths: list[str | Path]) -> list[str]:
    """sha256 of any files (model weights, configs) through the cache: a rerun over unchanged
    files costs one stat each."""
    keys = []
    for p in paths:
        st = os.stat(p)
        keys.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    with FileCache.open() as cache:
        known = cache.get_many(keys)
        new = [(k, FileRecord(sha256_file(k[0]), "", (0, 0), False)) for k in keys
               if k[0] not in known]
        cache.put_many(new)
    known.update({k[0]: rec for k, rec in new})
    return [known[k[0]].sha256 for k in keys]


def check_files(paths: list[str], decode_upfront_bytes: int, what: str) -> list[FileRecord]:
    """The records of image files, from the cache or probed (in order); every file is decoded
    in full unless they total more than ``decode_upfront_bytes``.

    Raises:
        DataError: a file cannot be stat'ed, read or (when decoded) decoded, naming the file.
    """
    from tqdm import tqdm

    try:
        keys = [(p, st.st_size, st.st_mtime_ns) for p, st in ((p, os.stat(p)) for p in paths)]
    except OSError as err:
        raise DataError(f"{what}: cannot read {err.filename} ({err.strerror})") from None
    decode = sum(size for _, size, _ in keys) <= decode_upfront_bytes
    with FileCache.open() as cache:
        found: dict[str, FileRecord | str] = dict(cache.get_many(keys))
        todo = [k for k in keys if k[0] not in found or (decode and not found[k[0]].decoded)]
        step = 4096
        with tqdm(total=len(todo), unit="file", desc=f"checking {what}",
                  disable=True if len(todo) < 2 * step else None) as bar:
            for b in range(0, len(todo), step):
                block = todo[b:b + step]
                results = probe_many([p for p, _, _ in block], decode)
                cache.put_many([(k, r) for k, r in zip(block, results, strict=True)
                                if not isinstance(r, str)])
                found.update((k[0], r) for k, r in zip(block, results, strict=True))
                bar.update(len(block))
    problems = [(p, found[p]) for p in paths if isinstance(found[p], str)]
    if problems:
        more = (f" ({len(problems) - 1} more unreadable images, e.g. "
                f"{[os.path.basename(p) for p, _ in problems[1:4]]})" if len(problems) > 1 else "")
        raise DataError(f"{what}: image {problems[0][0]} cannot be read: {problems[0][1]}; replace "
                        f"or re-save it (PNG/JPEG), or remove it from the folder{more}")
    return [found[p] for p in paths]


def check_images(raw, col: str, labels: list[str], decode_upfront_bytes: int,
                 what: str) -> list[FileRecord]:
    """The records of the images in column ``col`` of a `datasets.Dataset` whose Image column
    is cast to ``decode=False`` (stored bytes, or a file path): hashed with their headers read,
    then decoded too (a second pass) when the bytes total at most ``decode_upfront_bytes``.

    Raises:
        DataError: an image cannot be read, naming its row (``labels``).
    """

    def images():
        for batch in raw.iter(batch_size=256):
            for item in batch[col]:
                yield item["bytes"] if item["bytes"] is not None else item["path"]

    records, total = [], 0
    for src in images():
        records.append(probe(src, decode=False))
        total += len(src) if isinstance(src, bytes) else 0
    if total <= decode_upfront_bytes and not any(isinstance(r, str) for r in records):
        records = [probe(src, decode=True) for src in images()]
    for label, r in zip(labels, records, strict=True):
        if isinstance(r, str):
            raise DataError(f"{what}: the image in {label} cannot be read: {r}; fix or drop that "
                            f"row")
    return records
