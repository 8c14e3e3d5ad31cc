"""`das attribute`: top-k training images of new image files against a reduced store.

No TOML edit: the images are written to a temporary folder under the reports folder (with a
metadata.jsonl holding ``--prompt`` for text-conditioned models) and opened exactly as a query
folder (``data.open_dataset`` with the config's [data] options, ``check_matches_model``); their
features come from ``extract.unit_features`` with the store's noise mode, and their scores from the
``score.Scorer`` that `das score` uses, so an image gives the same top-k here as in a query set.
``Attributor`` holds the model and the factors in memory (`das serve` keeps one).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from .config import Config
from .data import check_matches_model, open_dataset, to_uint8
from .digests import uncached
from .errors import DataError
from .extract import Job, load_feature_model, to_devices, unit_features, unit_inputs
from .fingerprint import data_options, open_store
from .report import rows_from_best
from .score import Scorer


class NotAnImage(DataError):
    """The bytes are not a PNG or JPEG image."""


def safe_name(name: str, index: int, data: bytes) -> str:
    """``<index>-<stem>.<png|jpg>``: the stem with everything but letters, digits, '.', '-' and
    '_' replaced and no directories; the suffix from the decoded format (what a query folder
    reads).

    Raises:
        NotAnImage: ``data`` is not a PNG or JPEG image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError):
        fmt = None
    if fmt not in ("PNG", "JPEG"):
        raise NotAnImage(f"image {name!r} is not a PNG or JPEG file ({fmt or 'unknown format'}); "
                         f"save it as PNG")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name.replace("\\", "/")).stem).strip("._")
    return f"{index:04d}-{stem[:80] or 'image'}.{'png' if fmt == 'PNG' else 'jpg'}"


class Attributor:
    """The model, factors and train weights of one reduced store, loaded once.

    ``attribute`` is thread-safe: model use is serialised by a lock; the store is only read.

    Raises:
        StoreError: no store, another fingerprint, incomplete train split, missing or stale
            reduction.
    """

    def __init__(self, cfg: Config, keep_train: bool = False):
        self.cfg = cfg
        self.store = open_store(cfg)
        self.scorer = Scorer(cfg, self.store, keep_train=keep_train)
        model, names, plan, info = load_feature_model(cfg)
        self.job = Job(cfg, model, {}, self.store.fingerprint, names, info, plan)
        self.unet = to_devices(self.job, "cpu")
        self.lock = threading.Lock()
        self.folder = cfg.reports_dir / "attribute"
        self._train = None

    @property
    def conditional(self) -> bool:
        return self.job.model.conditional

    def attribute(self, images: list[tuple[str, bytes]], prompt: str | None = None,
                  k: int | None = None) -> dict:
        """Top-k per method of images given as (file name, bytes).

        Returns ``{"queries": [{"image": name, "methods": {method: [{"rank", "train_uid",
        "train_row", "score"}]}}]}`` plus, for ``write_page``, ``_best`` (the ``score.Best``
        tables), ``_pixels`` and ``_prompt``; ``answer`` drops those.

        Raises:
            DataError: not an image, unreadable, wrong size/mode/range for the model, or no
                prompt for a text-conditioned model.
        """
        if self.conditional and not prompt:
            raise DataError("the model is text-conditioned: give the prompt of the image(s) with "
                            "--prompt TEXT (or the form's prompt field)")
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=self.folder))
        try:
            names = [safe_name(n, i, d) for i, (n, d) in enumerate(images)]
            for name, (_, data) in zip(names, images, strict=True):
                (tmp / name).write_bytes(data)
            if prompt:
                (tmp / "metadata.jsonl").write_text("".join(
                    json.dumps({"file_name": n, self.cfg.data.caption_column: prompt}) + "\n"
                    for n in names))
            try:
                with uncached():  # temporary files: nothing goes into the user's file cache
                    ds = open_dataset("attribute", str(tmp), data_options(self.cfg))
                check_matches_model(ds, self.job.model.sample_shape, self.conditional)
            except DataError as err:  # name the user's images, not the temporary folder
                raise type(err)(str(err).replace(f"dataset 'attribute' ({tmp})", "the image(s)")
                                .replace(str(tmp) + "/", "")) from None
            with uncached():  # the pixels, for the page (latent models' inputs are latents)
                pixels = ds.load(0, len(ds))
            with self.lock, uncached():
                inputs = unit_inputs(self.job, None, ds, 0, {})
                data = unit_features(self.job, self.unet, ds, 0, len(ds), inputs=inputs)
                feats = {r: torch.from_numpy(data.features[r]) for r in self.scorer.readouts}
                best = self.scorer.topk(feats, data.excluded, k)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        labels = [Path(name.replace("\\", "/")).name for name, _ in images]
        rows = rows_from_best(labels, [None] * len(images), None, best.top, {},
                              self.scorer.train_uids)
        queries = [{"image": row.label, "methods": {
            m: [{"rank": rank, "train_uid": uid, "train_row": i, "score": v}
                for rank, i, uid, v in entries] for m, entries in row.pro.items()}} for row in rows]
        return {"queries": queries, "_best": best, "_pixels": pixels, "_prompt": prompt}

    def write_page(self, result: dict) -> Path:
        """Picture and HTML page of a result under ``<reports>/attribute/<digest>.html``."""
        from .report import Thumbs, contact_sheet, html_page, rows_html, thumbnail, with_thumbs

        if self._train is None:  # opened once (a folder's files are hashed or looked up)
            self._train = open_dataset("train", self.cfg.data.train, data_options(self.cfg))
        thumbs = Thumbs(self.cfg.reports_dir / "thumbs" / "train", self._train)
        u8 = to_uint8(result["_pixels"])
        stem = hashlib.sha256(u8.tobytes() + str(result["_prompt"]).encode()).hexdigest()[:16]
        page = self.folder / f"{stem}.html"
        images = []
        for q in range(len(result["queries"])):
            images.append(self.folder / f"{stem}-q{q}.png")
            thumbnail(u8[q]).save(images[-1])
        n, prompt, best = len(images), result["_prompt"], result["_best"]
        rows = rows_from_best([query["image"] for query in result["queries"]], images,
                              None if prompt is None else [prompt] * n, best.top, best.bottom,
                              self.scorer.train_uids)
        sheet = contact_sheet(rows, thumbs.path, page.with_suffix(".png"))

        def href(path):
            return os.path.relpath(path, page.parent).replace(os.sep, "/")

        page.write_text(html_page("attribution", f"<h1>attribution of {len(rows)} image(s)</h1>"
                                  f"<p><a href='{href(sheet)}'>picture (PNG)</a></p>"
                                  + rows_html(with_thumbs(rows, thumbs.path), href)))
        return page


def answer(result: dict) -> dict:
    """The JSON answer (`das attribute --json`, ``POST /api/attribute``)."""
    return {"queries": result["queries"]}


def run_attribute(cfg: Config, paths: list[Path], prompt: str | None = None, k: int | None = None
                  ) -> tuple[dict, Path, float]:
    """Attribute image files; returns (result, HTML page, seconds).

    Raises:
        DataError: a file is missing, not an image, or does not fit the model.
    """
    started = time.perf_counter()
    images = []
    for path in paths:
        try:
            images.append((Path(path).name, Path(path).read_bytes()))
        except OSError as err:
            raise DataError(f"image {path} cannot be read ({err.strerror}); check the path") from None
    attributor = Attributor(cfg)
    result = attributor.attribute(images, prompt, k)
    page = attributor.write_page(result)
    return result, page, time.perf_counter() - started
