"""Datasets, read lazily by rows: arrays, image folders (optionally captioned), Hugging Face
`datasets` saved to disk, and scikit-learn's digits.

A source string is a path or `digits`, optionally followed by a row range `[start:stop]`:
- `.npy`/`.npz`: one array (N, C, H, W), uint8 (0..255) or float; uid = row index.
- a folder of PNG/JPEG images, rows in sorted file-name order; uid = file name. A
  `metadata.jsonl` or `metadata.csv` beside the images (Hugging Face ImageFolder convention:
  a `file_name` column and a caption column) supplies captions and optionally ids.
- a folder written by `datasets.Dataset.save_to_disk`: rows in dataset order; uid = the id
  column or the row index; image and caption columns configurable.
- `digits`: the 1797 8x8 digits shipped with scikit-learn; uid = row index.

Images come out as float32 (n, C, H, W) in [-1, 1]. Sizes, channels, modes and value ranges are
checked against the model and the options before any work. Resizing/cropping happens only when
the config asks for it ([data] resize / center_crop); otherwise a mismatch is an error.

Content identity. Every row has a content hash (``Dataset.row_digests``): for arrays and digits
the sha256 of ``"{dtype.str}|C,H,W|"`` (e.g. ``|u1|1,8,8|``) followed by the row's bytes; for
image files the sha256 of the file (what `sha256sum` prints); for `datasets` folders that of the
stored image bytes (or of the decoded pixels, mode and size when the column is not an Image
feature). ``Dataset.digest`` hashes the
uids, the row digests and the captions. File hashes are cached (``digests.FileCache``).

Image checks. Every image is decoded once in full at open, so a truncated or corrupt file is
refused before any store is written, when the selected files total at most
``DECODE_UPFRONT_BYTES`` (1 GiB; the verdict is cached with the hash, so reruns do not decode
again). Larger selections are hashed and their headers read at open, and each image is decoded
when its rows are loaded: ``Dataset.load`` then raises a ``DataError`` naming the file, the
extraction unit stays unmarked and a rerun resumes there. ``load`` also re-hashes the bytes it
decodes and refuses a file changed since the dataset was opened.

Modes ([data] convert). L and RGB images are read as they are. Other modes (RGBA, LA, P, I;16,
CMYK, ...) are refused unless ``convert`` is "RGB" or "L": then every image not already in that
mode is converted: transparency (an alpha channel, or a palette's/tRNS transparent colour) is
composited on white; 16-bit and 32-bit grayscale (I;16, I) is read as 0..65535 and scaled by
255/65535; everything else goes through PIL's ``convert`` (L = ITU-R 601-2 luma, CMYK without its
ICC profile).

Value ranges ([data] value_range). uint8 arrays and image files are always 0..255. Float arrays
with "auto" are taken as [-1, 1] only if they lie within it and some values are below 0 (data
in [0, 1] or 0..255 is refused with the settings that fit); "-1,1", "0,1" and "0,255" declare
the range, which is mapped linearly to [-1, 1], and refuse values outside it. NaN/inf in an
array are refused, or with ``allow_nonfinite`` recorded in ``Dataset.nonfinite_rows`` (positions
within the split) and loaded as they are; range checks then use the finite rows only.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import digests
from .errors import DataError

if TYPE_CHECKING:
    from .config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODES = {"L": 1, "RGB": 3}
CONVERT = ("", "RGB", "L")
VALUE_RANGES = {"auto": (-1.0, 1.0), "-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0), "0,255": (0.0, 255.0)}
_MAPPING = {"-1,1": "used as they are", "0,1": "x * 2 - 1", "0,255": "x / 127.5 - 1"}
DECODE_UPFRONT_BYTES = 1 << 30
_RANGE_TOL = 1e-3  # of the half-span: float data saved from [-1, 1] images may overshoot slightly
_SCAN_BYTES = 64 << 20
_RANGE = re.compile(r"^(?P<name>.*?)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass(frozen=True)
class DataOptions:
    """How to read a split: the [data] settings that apply per split, and ``allow_nonfinite``."""

    caption_column: str = "text"
    """Caption column of a folder's metadata.jsonl/.csv or of a `datasets` dataset."""
    image_column: str = "image"
    """Image column of a `datasets` dataset."""
    id_column: str = ""
    """Column of stable uids; "": file name (folders) or row index."""
    resize: bool = False
    """Image files may differ in size from the model: ``check_matches_model`` sets a resize."""
    center_crop: bool = False
    """Center-crop after resizing (non-square images)."""
    convert: str = ""
    """"RGB" or "L": convert images of other modes (module docstring); "": refuse them."""
    value_range: str = "auto"
    """Range of float arrays: auto, "-1,1", "0,1" or "0,255" (module docstring)."""
    allow_nonfinite: bool = False
    """Accept array rows holding NaN/inf (listed in ``Dataset.nonfinite_rows``) instead of
    refusing them."""

    def __post_init__(self):
        if self.convert not in CONVERT:
            raise ValueError(f"DataOptions.convert = {self.convert!r}: choose one of {CONVERT}")
        if self.value_range not in VALUE_RANGES:
            raise ValueError(f"DataOptions.value_range = {self.value_range!r}: choose one of "
                             f"{tuple(VALUE_RANGES)}")

    @classmethod
    def from_config(cls, data: DataConfig, allow_nonfinite: bool = False) -> DataOptions:
        """The options of a config's [data] table (``allow_nonfinite`` comes from elsewhere)."""
        return cls(data.caption_column, data.image_column, data.id_column, data.resize,
                   data.center_crop, data.convert, data.value_range, allow_nonfinite)


@dataclass
class Dataset:
    """Rows of one split. ``load(start, stop)`` returns float32 (n, C, H, W) in [-1, 1]."""

    name: str
    """Split name (train or a query set), used in messages."""
    source: str
    """The source string it was opened from, row range included."""
    uids: list[str]
    """Stable sample ids, in row order (module docstring)."""
    sample_shape: tuple[int, int, int]
    """(C, H, W) as loaded before any resize (C after [data] convert); H, W = 0 when sizes vary."""
    row_digests: list[str]
    """Content hash of each row (hex sha256; module docstring), stable across runs and machines."""
    captions: list[str | None] | None = None
    """Caption of each row (None where missing), or None for an uncaptioned source."""
    options: DataOptions = field(default_factory=DataOptions)
    """How the split is read."""
    nonfinite_rows: list[int] = field(default_factory=list)
    """Positions (0..len-1) of array rows holding NaN/inf; non-empty only with allow_nonfinite."""
    target_hw: tuple[int, int] | None = None
    """Set by ``check_matches_model`` when images must be resized to the model."""
    digest: str = field(init=False)
    """Hash of the uids, the row digests and the captions: the split's content identity."""
    _array: np.ndarray | None = None
    _float_range: tuple[float, float] | None = None
    _files: list[str] | None = None
    _hf: object | None = None

    def __post_init__(self):
        assert len(self.row_digests) == len(self.uids)
        self.digest = _hash(b"das-dataset-v2", self.uids, self.row_digests, self.captions)

    def __len__(self) -> int:
        return len(self.uids)

    def load(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32 (n, C, H, W) in [-1, 1] (non-finite rows as they are).

        Raises:
            DataError: an image cannot be read or decoded, or a file changed since the dataset
                was opened.
        """
        if self._array is not None:
            arr = np.asarray(self._array[start:stop])
            if arr.dtype == np.uint8 or self._float_range == (-1.0, 1.0):
                return _to_unit_range(arr)
            a, b = self._float_range
            return torch.from_numpy(((arr.astype(np.float64) - a) * (2.0 / (b - a)) - 1.0)
                                    .astype(np.float32))
        if self._files is not None:
            images = [self._read_file(i) for i in range(start, stop)]
        else:
            images = [self._read_row(i) for i in range(start, stop)]
        return _to_unit_range(np.stack([self._prepare(img) for img in images]))

    def _read_file(self, i: int):
        from PIL import Image

        path = self._files[i]
        fix = ("replace or re-save it (PNG/JPEG) or remove it from the folder, then rerun (the "
               "split's content changes, so the store will refuse what was extracted from it)")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise DataError(f"dataset {self.name!r}: image {path} cannot be read ({err}); "
                            f"{fix}") from None
        if hashlib.sha256(data).hexdigest() != self.row_digests[i]:
            with digests.FileCache.open() as cache:
                cache.forget(path)
            raise DataError(f"dataset {self.name!r}: image {path} changed after the dataset was "
                            f"opened (its content no longer matches its digest); rerun, so that "
                            f"its new content is checked against the store")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return img
        except digests.IMAGE_ERRORS as err:
            raise DataError(f"dataset {self.name!r}: image {path} cannot be decoded "
                            f"({type(err).__name__}: {err}); {fix}") from None

    def _read_row(self, i: int):
        try:
            return self._hf[i][self.options.image_column]
        except digests.IMAGE_ERRORS as err:
            raise DataError(f"dataset {self.name!r} ({self.source}): the image of row "
                            f"{self.uids[i]!r} cannot be decoded ({type(err).__name__}: {err}); "
                            f"fix or drop that row") from None

    def _prepare(self, img) -> np.ndarray:
        if self.options.convert and img.mode != self.options.convert:
            img = convert_image(img, self.options.convert)
        if self.target_hw is not None and img.size != self.target_hw[::-1]:
            img = _resize_crop(img, self.target_hw, self.options.center_crop)
        arr = np.asarray(img, dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _to_unit_range(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def to_uint8(images_NCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] float -> uint8 (N, C, H, W), the inverse of reading uint8 data."""
    return ((images_NCHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def convert_image(img, target: str):
    """``img`` (a PIL image) in mode ``target`` ("RGB" or "L") by the rule of the module
    docstring: transparency composited on white, 16/32-bit grayscale scaled by 255/65535."""
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(wide * (255 / 65535)), 0, 255).astype(np.uint8))
    elif img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == target else img.convert(target)


def _resize_crop(img, target_hw: tuple[int, int], center_crop: bool):
    """Resize the shorter side to the target (bicubic), then center-crop to the target."""
    from PIL import Image

    th, tw = target_hw
    w, h = img.size
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    if (nh, nw) != (th, tw):
        left, top = (nw - tw) // 2, (nh - th) // 2
        img = img.crop((left, top, left + tw, top + th))
    return img


def _parse(source: str) -> tuple[str, slice]:
    match = _RANGE.match(source)
    name = match["name"]
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    return name, slice(start, stop)


@functools.lru_cache(maxsize=1)
def _digits_table() -> np.ndarray:
    """scikit-learn's digits as its (1797, 65) float table: 64 pixels (0..16), then the label.

    Read from the csv that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, the file
    ``load_digits`` parses) without importing scikit-learn, whose ``datasets`` package takes
    0.5-0.6 s to import; ``load_digits`` is the fallback where that file is not found. Equal to
    ``load_digits`` (tests/test_data.py).
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as fh:
                table = np.loadtxt(fh, delimiter=",")
            if table.shape == (1797, 65):
                return table
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.concatenate([bunch.data, bunch.target[:, None]], axis=1)


def digits_array() -> np.ndarray:
    """scikit-learn's 1797 8x8 digits as uint8 (N, 1, 8, 8), values 0..16 rescaled to 0..255."""
    images = _digits_table()[:, :64].reshape(-1, 8, 8)  # float64 in [0, 16]
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)[:, None]


def digits_labels() -> np.ndarray:
    """The digits' labels 0..9 (int64), in the order of ``digits_array``."""
    return _digits_table()[:, 64].astype(np.int64)


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, default=str).encode())
    return h.hexdigest()


def open_dataset(name: str, source: str, options: DataOptions | None = None) -> Dataset:
    """Open a split lazily and check it is readable, non-empty and within the options.

    Raises:
        DataError: missing path, unsupported format, empty selection, bad array shape/range,
            NaN/inf values, unreadable or truncated images, modes other than L/RGB without
            [data] convert, mixed sizes without resize, missing id/caption columns.
    """
    options = options or DataOptions()
    base, rows = _parse(source)
    what = f"dataset {name!r} ({source})"
    if base == "digits":
        array = digits_array()
        index = np.arange(len(array))[rows]
        return _finish(_array_dataset(name, source, array[rows], index, options, what), what)
    path = Path(base)
    if not path.exists():
        raise DataError(f"{what}: path {str(path)!r} does not exist; check [data] in the config")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                          or (path / "dataset_dict.json").exists()):
        return _finish(_open_hf(name, source, path, rows, options, what), what)
    if path.is_dir():
        return _finish(_open_folder(name, source, path, rows, options, what), what)
    return _finish(_open_array(name, source, path, rows, options, what), what)


def _open_array(name, source, path, rows, options, what) -> Dataset:
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if len(keys) != 1:
                raise DataError(f"{what}: .npz holds arrays {keys}; save exactly one array")
            array = archive[keys[0]]
    else:
        raise DataError(f"{what}: unsupported file type {path.suffix!r}; use .npy, .npz, a folder "
                        f"of PNG/JPEG images, or a datasets folder (save_to_disk)")
    if array.ndim != 4:
        raise DataError(f"{what}: array shape {array.shape} is not (N, C, H, W)")
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{what}: dtype {array.dtype} is neither uint8 nor float; convert it")
    return _array_dataset(name, source, array[rows], np.arange(len(array))[rows], options, what)


def _array_dataset(name, source, array, index, options, what) -> Dataset:
    """Row digests, NaN/inf rows and the value range of an (N, C, H, W) array, read in blocks."""
    is_float = array.dtype != np.uint8
    header = f"{array.dtype.str}|{','.join(map(str, array.shape[1:]))}|".encode()
    row_digests, bad = [], []
    lo, hi = np.inf, -np.inf
    step = max(1, _SCAN_BYTES // max(1, array[:1].nbytes))
    for b in range(0, len(array), step):
        block = np.ascontiguousarray(array[b:b + step])
        row_digests += [hashlib.sha256(header + row.tobytes()).hexdigest() for row in block]
        if not is_float:
            continue
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        bad += (b + np.flatnonzero(~finite)).tolist()
        good = block if finite.all() else block[finite]
        if len(good):
            lo, hi = min(lo, float(good.min())), max(hi, float(good.max()))
    uids = [str(i) for i in index]
    if bad and not options.allow_nonfinite:
        raise DataError(f"{what}: {len(bad)} rows hold NaN or inf values, e.g. rows (uids) "
                        f"{[uids[i] for i in bad[:5]]}; remove them, or set [features] nonfinite "
                        f"= \"exclude\" to exclude such samples")
    float_range = _check_range(lo, hi, options.value_range, what) if is_float else None
    return Dataset(name, source, uids, tuple(array.shape[1:]), row_digests, options=options,
                   nonfinite_rows=bad, _array=array, _float_range=float_range)


def _check_range(lo: float, hi: float, value_range: str, what: str) -> tuple[float, float]:
    """The declared (a, b) of float data spanning [lo, hi] (lo > hi: no finite rows)."""

    def fits(a, b):
        tol = _RANGE_TOL * (b - a) / 2
        return a - tol <= lo and hi <= b + tol

    span = f"float values span [{lo:.4g}, {hi:.4g}]"
    if value_range != "auto":
        if lo <= hi and not fits(*VALUE_RANGES[value_range]):
            raise DataError(f"{what}: {span}, outside [data] value_range = {value_range!r}; set "
                            f"the range the data was saved in, or rescale it")
        return VALUE_RANGES[value_range]
    if lo > hi or (fits(-1.0, 1.0) and lo < 0):
        return VALUE_RANGES["auto"]
    ranges = sorted((r for r in _MAPPING if fits(*VALUE_RANGES[r])),
                    key=lambda r: VALUE_RANGES[r][1] - VALUE_RANGES[r][0])
    fix = ("set [data] " + " or ".join(f"value_range = \"{r}\" ({_MAPPING[r]})" for r in ranges) +
           " to declare the range the data was saved in" if ranges else
           "rescale the data to [-1, 1] (x / 127.5 - 1 for 0..255 data) or save uint8")
    raise DataError(f"{what}: {span}, not [-1, 1] with some values below 0, which [data] "
                    f"value_range = \"auto\" requires of float data; {fix}")


def _read_metadata(folder: Path, what: str) -> list[dict] | None:
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        lines = [line for line in jsonl.read_text().splitlines() if line.strip()]
        try:
            return [json.loads(line) for line in lines]
        except json.JSONDecodeError as err:
            raise DataError(f"{what}: {jsonl} is not valid JSON lines ({err})") from None
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            return list(csv.DictReader(fh))
    return None


def _open_folder(name, source, path, rows, options, what) -> Dataset:
    folder = str(path.resolve())
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries
                       if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())
    if not names:
        raise DataError(f"{what}: folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    names = names[rows]
    if not names:
        raise DataError(f"{what}: the row range selects no images")
    meta = _read_metadata(path, what)
    captions, uids = None, names
    if meta is not None:
        if any("file_name" not in row for row in meta):
            raise DataError(f"{what}: metadata rows need a 'file_name' column (Hugging Face "
                            f"ImageFolder convention)")
        by_name = {row["file_name"]: row for row in meta}
        captions = [by_name.get(n, {}).get(options.caption_column) for n in names]
        if options.id_column:
            missing = [n for n in names if by_name.get(n, {}).get(options.id_column) in (None, "")]
            if missing:
                raise DataError(f"{what}: [data] id_column = {options.id_column!r} is missing for "
                                f"{missing[:3]}; add it to the metadata or unset id_column")
            uids = [str(by_name[n][options.id_column]) for n in names]
    files = [os.path.join(folder, n) for n in names]
    records = digests.check_files(files, DECODE_UPFRONT_BYTES, what)
    shape = _image_shape(records, files, options, what)
    return Dataset(name, source, uids, shape, [r.sha256 for r in records], captions, options,
                   _files=files)


def _image_shape(records, labels: list[str], options: DataOptions, what: str):
    """(C, H, W) of checked images; refuses modes other than L/RGB (without convert), mixed
    modes and mixed sizes (without resize). ``labels`` name the images in messages."""
    if options.convert:
        from PIL import Image

        for mode, label in {r.mode: label for label, r in zip(labels, records, strict=True)}.items():
            try:
                convert_image(Image.new(mode, (1, 1)), options.convert)
            except ValueError as err:
                raise DataError(f"{what}: image {label} has mode {mode}, which [data] convert = "
                                f"{options.convert!r} cannot convert ({err}); save it as L or "
                                f"RGB") from None
        channels = MODES[options.convert]
    else:
        odd = [(label, r.mode) for label, r in zip(labels, records, strict=True)
               if r.mode not in MODES]
        if odd:
            more = f" (and {len(odd) - 1} more images)" if len(odd) > 1 else ""
            raise DataError(f"{what}: image {odd[0][0]} has mode {odd[0][1]}{more}; set [data] "
                            f"convert = \"RGB\" or \"L\" to convert such images (transparency "
                            f"composited on white), or save them as L or RGB")
        by_mode = {r.mode: label for label, r in zip(labels, records, strict=True)}
        if len(by_mode) > 1:
            raise DataError(f"{what}: images mix modes L and RGB (e.g. {by_mode['L']} and "
                            f"{by_mode['RGB']}); set [data] convert = \"RGB\" or \"L\", or convert "
                            f"them all to L or RGB")
        channels = MODES[records[0].mode]
    sizes = {r.size for r in records}
    if len(sizes) > 1 and not options.resize:
        raise DataError(f"{what}: images differ in size {sorted(sizes)[:4]}; set [data] resize = "
                        f"true (and center_crop = true for non-square images) or resize them")
    w, h = sizes.pop() if len(sizes) == 1 else (0, 0)
    return channels, h, w


def _open_hf(name, source, path, rows, options, what) -> Dataset:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what}: reading a `datasets` folder needs the `datasets` package: "
                        f"pip install 'das-pipeline[hf]'") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{what}: {path} holds a DatasetDict with splits {list(ds)}; point the "
                        f"source at one split folder, e.g. {path / next(iter(ds))}")
    columns = ds.column_names
    col = options.image_column
    if col not in columns:
        raise DataError(f"{what}: [data] image_column = {col!r} is not a column ({columns})")
    index = np.arange(len(ds))[rows]
    ds = ds.select(index.tolist())
    captions = list(ds[options.caption_column]) if options.caption_column in columns else None
    if options.id_column:
        if options.id_column not in columns:
            raise DataError(f"{what}: [data] id_column = {options.id_column!r} is not a column "
                            f"({columns})")
        uids = [str(u) for u in ds[options.id_column]]
    else:
        uids = [str(i) for i in index]
    if len(ds) == 0:
        return Dataset(name, source, [], (0, 0, 0), [], options=options, _hf=ds)
    labels = [f"{col!r} of row {u!r}" for u in uids]
    if isinstance(ds.features[col], datasets.Image):
        raw = ds.cast_column(col, datasets.Image(decode=False))
        records = digests.check_images(raw, col, labels, DECODE_UPFRONT_BYTES, what)
    else:
        records = []
        for label, row in zip(labels, ds, strict=True):
            img = row[col]
            if not hasattr(img, "mode"):
                raise DataError(f"{what}: column {col!r} must hold images, got "
                                f"{type(img).__name__} in {label}")
            pixels = np.asarray(img).tobytes()
            records.append(digests.FileRecord(_hash(img.mode, img.size, pixels), img.mode,
                                              img.size, True))
    shape = _image_shape(records, labels, options, what)
    return Dataset(name, source, uids, shape, [r.sha256 for r in records], captions, options,
                   _hf=ds)


def _finish(ds: Dataset, what: str) -> Dataset:
    if len(ds) == 0:
        raise DataError(f"{what}: holds no samples (check the file or the row range)")
    if len(set(ds.uids)) != len(ds.uids):
        raise DataError(f"{what}: sample uids are not unique; set [data] id_column to a unique "
                        f"column")
    return ds


def check_matches_model(ds: Dataset, sample_shape: tuple[int, int, int],
                        needs_captions: bool = False) -> None:
    """Raise DataError unless the dataset fits the model; set up the configured resize.

    Args:
        sample_shape: (C, H, W) of the images the model takes.
        needs_captions: the model is text-conditioned, so every sample needs a caption.
    """
    c, h, w = ds.sample_shape
    mc, mh, mw = sample_shape
    problems = []
    if c != mc:
        problems.append(f"{c} channels but the model takes {mc}")
    if (h, w) != (mh, mw):
        if ds.options.resize and (ds._files is not None or ds._hf is not None):
            square_fix = h and w and h * mw != w * mh and not ds.options.center_crop
            if square_fix:
                problems.append(f"{w}x{h} images cannot be resized to {mw}x{mh} without "
                                f"cropping; also set [data] center_crop = true")
            ds.target_hw = (mh, mw)
        else:
            fix = ("; set [data] resize = true to resize them" if ds._array is None else
                   "; resize the array yourself ([data] resize applies to image files)")
            problems.append(f"{h}x{w} images but the model takes {mh}x{mw}{fix}")
    if problems:
        raise DataError(f"dataset {ds.name!r} ({ds.source}) has {' and '.join(problems)}; the "
                        f"model takes (C, H, W) = {tuple(sample_shape)}")
    if needs_captions:
        if ds.captions is None:
            raise DataError(f"dataset {ds.name!r} ({ds.source}) has no captions but the model is "
                            f"text-conditioned; add a metadata.jsonl with file_name and "
                            f"{ds.options.caption_column!r} columns")
        missing = [u for u, cap in zip(ds.uids, ds.captions, strict=True) if not cap]
        if missing:
            raise DataError(f"dataset {ds.name!r} ({ds.source}): no {ds.options.caption_column!r} "
                            f"caption for {len(missing)} samples, e.g. {missing[:3]}")
