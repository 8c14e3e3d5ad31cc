"""Datasets: .npy/.npz arrays, image folders, and scikit-learn's digits, read lazily by rows.

A source string is a path or `digits`, optionally followed by a row range `[start:stop]`.
Rows keep their order (array index, or sorted file names) and their uid (the original array
index as a string, or the file name), so scores line up with the user's own indexing.

Images come out as float32 (n, C, H, W) in [-1, 1]. Shapes, channels and value ranges are
checked against the model before any work; mismatches are errors, never silent conversions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_RANGE = re.compile(r"^(?P<name>.*?)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


class DataError(ValueError):
    """A dataset is missing, empty, or does not match the model."""


@dataclass
class Dataset:
    """Rows of one split. ``load(start, stop)`` returns float32 (n, C, H, W) in [-1, 1]."""

    name: str
    source: str
    uids: list[str]
    sample_shape: tuple[int, int, int]
    digest: str
    """Hash of the uids and the content identity (array bytes, or file names and sizes)."""
    _array: np.ndarray | None = None
    _files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def load(self, start: int, stop: int) -> torch.Tensor:
        if self._array is not None:
            return _to_unit_range(np.asarray(self._array[start:stop]), self.source)
        images = [_read_image(path) for path in self._files[start:stop]]
        return _to_unit_range(np.stack(images), self.source)


def _to_unit_range(arr: np.ndarray, source: str) -> torch.Tensor:
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "RGB"):
            raise DataError(f"image {path} has mode {img.mode}; save it as 8-bit grayscale (L) or "
                            f"RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _parse(source: str) -> tuple[str, slice]:
    match = _RANGE.match(source)
    name = match["name"]
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    return name, slice(start, stop)


def digits_array() -> np.ndarray:
    """scikit-learn's 1797 8x8 digits as uint8 (N, 1, 8, 8), values 0..16 rescaled to 0..255."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # float64 in [0, 16]
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)[:, None]


def digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def open_dataset(name: str, source: str) -> Dataset:
    """Open a split lazily and check it is readable and non-empty.

    Raises:
        DataError: missing path, unsupported format, empty selection, bad array shape/range.
    """
    base, rows = _parse(source)
    what = f"dataset {name!r} ({source})"
    if base == "digits":
        array = digits_array()
        index = np.arange(len(array))[rows]
        uids = [str(i) for i in index]
        array = array[rows]
        digest = hashlib.sha256(b"digits" + index.tobytes()).hexdigest()
        return _finish(Dataset(name, source, uids, tuple(array.shape[1:]), digest, _array=array),
                       what)
    path = Path(base)
    if not path.exists():
        raise DataError(f"{what}: path {str(path)!r} does not exist; check [data] in the config")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{what}: folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} "
                            f"images")
        files = files[rows]
        shapes = {(_image_header(p)) for p in files}
        if len(shapes) > 1:
            raise DataError(f"{what}: images differ in size or mode {sorted(shapes)}; resize them "
                            f"to one size and mode first")
        if not files:
            raise DataError(f"{what}: the row range selects no images")
        size, channels = shapes.pop()
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}:{p.stat().st_size};".encode())
        return _finish(Dataset(name, source, [p.name for p in files], (channels, size[1], size[0]),
                               h.hexdigest(), _files=files), what)
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if len(keys) != 1:
                raise DataError(f"{what}: .npz holds arrays {keys}; save exactly one array")
            array = archive[keys[0]]
    else:
        raise DataError(f"{what}: unsupported file type {path.suffix!r}; use .npy, .npz or a "
                        f"folder of PNG/JPEG images")
    if array.ndim != 4:
        raise DataError(f"{what}: array shape {array.shape} is not (N, C, H, W)")
    index = np.arange(len(array))[rows]
    array = array[rows]
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"{what}: dtype {array.dtype} is neither uint8 nor float; convert it")
        lo, hi = (float(array.min()), float(array.max())) if len(array) else (0.0, 0.0)
        if lo < -1.001 or hi > 1.001:
            raise DataError(f"{what}: float values span [{lo:.3g}, {hi:.3g}], not [-1, 1]; scale "
                            f"them (x / 127.5 - 1 for 0..255 data) or save uint8")
    digest = hashlib.sha256(index.tobytes() + np.ascontiguousarray(array).tobytes()).hexdigest()
    return _finish(Dataset(name, source, [str(i) for i in index], tuple(array.shape[1:]), digest,
                           _array=array), what)


def _image_header(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        channels = {"L": 1, "RGB": 3}.get(img.mode, 0)
        if channels == 0:
            raise DataError(f"image {path} has mode {img.mode}; save it as grayscale (L) or RGB")
        return img.size, channels


def _finish(ds: Dataset, what: str) -> Dataset:
    if len(ds) == 0:
        raise DataError(f"{what}: holds no samples (check the file or the row range)")
    return ds


def check_matches_model(ds: Dataset, sample_shape: tuple[int, int, int]) -> None:
    """Raise DataError unless the dataset's (C, H, W) equals the model's."""
    if tuple(ds.sample_shape) != tuple(sample_shape):
        c, h, w = ds.sample_shape
        mc, mh, mw = sample_shape
        fix = []
        if c != mc:
            fix.append(f"{c} channels but the model takes {mc}")
        if (h, w) != (mh, mw):
            fix.append(f"{h}x{w} images but the model takes {mh}x{mw}")
        raise DataError(f"dataset {ds.name!r} ({ds.source}) has {' and '.join(fix)}; convert the "
                        f"data to (C, H, W) = {tuple(sample_shape)}")
