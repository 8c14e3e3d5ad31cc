"""Datasets, read lazily by rows: arrays, image folders (optionally captioned), Hugging Face
`datasets` saved to disk, and scikit-learn's digits.

A source string is a path or `digits`, optionally followed by a row range `[start:stop]`:
- `.npy`/`.npz`: one array (N, C, H, W), uint8 or float in [-1, 1]; uid = row index.
- a folder of PNG/JPEG images, rows in sorted file-name order; uid = file name. A
  `metadata.jsonl` or `metadata.csv` beside the images (Hugging Face ImageFolder convention:
  a `file_name` column and a caption column) supplies captions and optionally ids.
- a folder written by `datasets.Dataset.save_to_disk`: rows in dataset order; uid = the id
  column or the row index; image and caption columns configurable.
- `digits`: the 1797 8x8 digits shipped with scikit-learn; uid = row index.

Images come out as float32 (n, C, H, W) in [-1, 1]. Sizes, channels and value ranges are
checked against the model before any work. Resizing/cropping happens only when the config asks
for it ([data] resize / center_crop); otherwise a mismatch is an error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODES = {"L": 1, "RGB": 3}
_RANGE = re.compile(r"^(?P<name>.*?)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass(frozen=True)
class DataOptions:
    """How to read captioned and resizable sources (the [data] settings that apply per split)."""

    caption_column: str = "text"
    image_column: str = "image"
    id_column: str = ""
    resize: bool = False
    center_crop: bool = False


@dataclass
class Dataset:
    """Rows of one split. ``load(start, stop)`` returns float32 (n, C, H, W) in [-1, 1]."""

    name: str
    source: str
    uids: list[str]
    sample_shape: tuple[int, int, int]
    """(C, H, W) as stored (before any resize); H, W = 0 when sizes vary."""
    digest: str
    """Hash of the uids, the content identity (array bytes, or file names and sizes) and captions."""
    captions: list[str | None] | None = None
    options: DataOptions = field(default_factory=DataOptions)
    target_hw: tuple[int, int] | None = None
    """Set by ``check_matches_model`` when images must be resized to the model."""
    _array: np.ndarray | None = None
    _files: list[Path] | None = None
    _hf: object | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def load(self, start: int, stop: int) -> torch.Tensor:
        if self._array is not None:
            return _to_unit_range(np.asarray(self._array[start:stop]))
        if self._files is not None:
            images = [_open_image(path) for path in self._files[start:stop]]
        else:
            images = [self._hf[i][self.options.image_column] for i in range(start, stop)]
        return _to_unit_range(np.stack([self._prepare(img) for img in images]))

    def _prepare(self, img) -> np.ndarray:
        if self.target_hw is not None and img.size != self.target_hw[::-1]:
            img = _resize_crop(img, self.target_hw, self.options.center_crop)
        arr = np.asarray(img, dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _to_unit_range(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def to_uint8(images_NCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] float -> uint8 (N, C, H, W), the inverse of reading uint8 data."""
    return ((images_NCHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img


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


def digits_array() -> np.ndarray:
    """scikit-learn's 1797 8x8 digits as uint8 (N, 1, 8, 8), values 0..16 rescaled to 0..255."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # float64 in [0, 16]
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)[:, None]


def digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, default=str).encode())
    return h.hexdigest()


def open_dataset(name: str, source: str, options: DataOptions | None = None) -> Dataset:
    """Open a split lazily and check it is readable and non-empty.

    Raises:
        DataError: missing path, unsupported format, empty selection, bad array shape/range,
            inconsistent image modes, missing id/caption columns.
    """
    options = options or DataOptions()
    base, rows = _parse(source)
    what = f"dataset {name!r} ({source})"
    if base == "digits":
        array = digits_array()
        index = np.arange(len(array))[rows]
        return _finish(Dataset(name, source, [str(i) for i in index], (1, 8, 8),
                               _hash(b"digits", index.tobytes()), options=options,
                               _array=array[rows]), what)
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
    index = np.arange(len(array))[rows]
    array = array[rows]
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"{what}: dtype {array.dtype} is neither uint8 nor float; convert it")
        lo, hi = (float(array.min()), float(array.max())) if len(array) else (0.0, 0.0)
        if lo < -1.001 or hi > 1.001:
            raise DataError(f"{what}: float values span [{lo:.3g}, {hi:.3g}], not [-1, 1]; scale "
                            f"them (x / 127.5 - 1 for 0..255 data) or save uint8")
    digest = _hash(index.tobytes(), np.ascontiguousarray(array).tobytes())
    return Dataset(name, source, [str(i) for i in index], tuple(array.shape[1:]), digest,
                   options=options, _array=array)


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
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{what}: folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    files = files[rows]
    if not files:
        raise DataError(f"{what}: the row range selects no images")
    meta = _read_metadata(path, what)
    captions, uids = None, [p.name for p in files]
    if meta is not None:
        if any("file_name" not in row for row in meta):
            raise DataError(f"{what}: metadata rows need a 'file_name' column (Hugging Face "
                            f"ImageFolder convention)")
        by_name = {row["file_name"]: row for row in meta}
        captions = [by_name.get(p.name, {}).get(options.caption_column) for p in files]
        if options.id_column:
            missing = [p.name for p in files if by_name.get(p.name, {}).get(options.id_column) in
                       (None, "")]
            if missing:
                raise DataError(f"{what}: [data] id_column = {options.id_column!r} is missing for "
                                f"{missing[:3]}; add it to the metadata or unset id_column")
            uids = [str(by_name[p.name][options.id_column]) for p in files]
    headers = [_image_header(p) for p in files]
    modes = {mode for _, mode in headers}
    if len(modes) > 1:
        raise DataError(f"{what}: images mix modes {sorted(modes)}; convert them all to L or RGB")
    sizes = {size for size, _ in headers}
    if len(sizes) > 1 and not options.resize:
        raise DataError(f"{what}: images differ in size {sorted(sizes)[:4]}; set [data] resize = "
                        f"true (and center_crop = true for non-square images) or resize them")
    (w, h), mode = (sizes.pop() if len(sizes) == 1 else (0, 0)), modes.pop()
    digest = _hash([(p.name, p.stat().st_size) for p in files], uids, captions)
    return Dataset(name, source, uids, (MODES[mode], h, w), digest, captions, options,
                   _files=files)


def _image_header(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in MODES:
            raise DataError(f"image {path} has mode {img.mode}; save it as grayscale (L) or RGB")
        return img.size, img.mode


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
    if options.image_column not in columns:
        raise DataError(f"{what}: [data] image_column = {options.image_column!r} is not a column "
                        f"({columns})")
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
        return Dataset(name, source, [], (0, 0, 0), "", options=options, _hf=ds)
    first = ds[0][options.image_column]
    if getattr(first, "mode", None) not in MODES:
        raise DataError(f"{what}: column {options.image_column!r} must hold L or RGB images, got "
                        f"{type(first).__name__} {getattr(first, 'mode', '')}")
    w, h = first.size
    digest = _hash(getattr(ds, "_fingerprint", ""), uids, captions)
    return Dataset(name, source, uids, (MODES[first.mode], h, w), digest, captions, options,
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
