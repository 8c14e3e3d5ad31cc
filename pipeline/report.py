"""Everything people look at: top-k CSV tables, pictures and HTML pages of attributions.

- ``write_topk_csv`` / ``read_topk_csv``: one CSV per method (query_row, query_uid, rank,
  train_row, train_uid, score); ``<method>_topk.csv`` proponents, ``<method>_opponents.csv``
  the most negative scores of signed methods.
- ``contact_sheet``: a legend, column headers (query | methods), each query beside its top
  proponents with rank, score and training uid under each tile; ``draw_attribution`` is the
  demo's sheet.
- ``run_report`` (`das report`): a static, offline HTML report (index + pages of ``PER_PAGE``
  queries, a contact sheet per page) built from the top-k CSVs and cached thumbnails only
  (docs/DESIGN.md, "Reports and serving"); ``rows_html`` also renders `das attribute` and
  `das serve` answers.
- ``draw_counterfactual``: each generated query beside its regenerations after removals.
Images come in as float [-1, 1] (C, H, W) and are drawn as uint8 tiles enlarged by an integer
``scale`` (nearest neighbour, so single pixels stay visible).
"""

from __future__ import annotations

import csv
import os
import threading
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import torch

from .data import to_uint8

CSV_COLUMNS = ["query_row", "query_uid", "rank", "train_row", "train_uid", "score"]


def write_topk_csv(folder: Path, query_uids: list[str], train_uids: list[str], best,
                   skip_queries=(), kind: str = "topk") -> list[Path]:
    """One CSV per method: query_row, query_uid, rank, train_row, train_uid, score.

    ``best`` maps method -> (values (Q, k), train rows (Q, k)). Rows ``skip_queries`` (excluded
    queries) and entries without a finite score (fewer scorable training rows than k) are left out.
    ``kind``: "topk" (proponents, ``<method>_topk.csv``) or "opponents" (the most negative
    scores, ``<method>_opponents.csv``; only scores below 0 are opponents).
    """
    skip = set(skip_queries)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for method, (vals, idx) in best.items():
        path = folder / f"{method}_{kind}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            for q in range(vals.shape[0]):
                if q in skip:
                    continue
                for rank in range(vals.shape[1]):
                    i, v = int(idx[q, rank]), float(vals[q, rank])
                    if i < 0 or not np.isfinite(v) or (kind == "opponents" and v >= 0):
                        continue
                    w.writerow([q, query_uids[q], rank + 1, i, train_uids[i], f"{v:.9g}"])
        paths.append(path)
    return paths


def read_topk_csv(path: Path, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k) float64, NaN where absent; train rows (Q, k) int64, -1 where absent) of a
    CSV written by ``write_topk_csv``; k is the largest rank in the file."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    k = max((int(r[2]) for r in rows), default=0)
    vals = np.full((num_queries, k), np.nan)
    idx = np.full((num_queries, k), -1, dtype=np.int64)
    for q, _, rank, i, _, v in rows:
        vals[int(q), int(rank) - 1], idx[int(q), int(rank) - 1] = float(v), int(i)
    return vals, idx


def tile(img_u8_CHW: np.ndarray, scale: int):
    """A PIL RGB image of one uint8 (C, H, W) image, each pixel a scale x scale block."""
    from PIL import Image

    img = img_u8_CHW[0] if img_u8_CHW.shape[0] == 1 else img_u8_CHW.transpose(1, 2, 0)
    big = np.kron(img, np.ones((scale, scale) + (1,) * (img.ndim - 2), dtype=np.uint8))
    return Image.fromarray(big if big.ndim == 3 else np.repeat(big[..., None], 3, axis=2))


THUMB_MIN, THUMB_MAX = 48, 128  # thumbnail edge: small images enlarged (nearest), big ones shrunk


def thumbnail(img_u8_CHW: np.ndarray):
    """A PIL RGB thumbnail: images under THUMB_MIN px enlarged by an integer factor (nearest
    neighbour, single pixels stay visible), images over THUMB_MAX px shrunk."""
    from PIL import Image

    edge = max(img_u8_CHW.shape[1:])
    img = tile(img_u8_CHW, max(1, -(-THUMB_MIN // edge)))
    if edge > THUMB_MAX:
        img.thumbnail((THUMB_MAX, THUMB_MAX), Image.LANCZOS)
    return img


class Thumbs:
    """PNG thumbnails of one split's rows, made once: ``<folder>/<row>-<content digest>.png``,
    so a row whose content changed gets a new file and a cached one is reused by every page."""

    def __init__(self, folder: Path, ds):
        self.folder, self.ds = Path(folder), ds
        self._known: dict[int, Path] = {}

    def path(self, row: int) -> Path:
        if row in self._known:
            return self._known[row]
        path = self.folder / f"{row}-{self.ds.row_digests[row][:12]}.png"
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp.png")
            thumbnail(to_uint8(self.ds.load(row, row + 1))[0]).save(tmp)
            tmp.replace(path)  # a concurrent page never reads half a file
        self._known[row] = path
        return path


@dataclass
class Row:
    """One query of a report: its picture and, per method, its proponents and opponents as
    (rank, train row, train uid, score)."""

    label: str
    image: Path
    caption: str | None
    pro: dict[str, list[tuple[int, int, str, float]]]
    opp: dict[str, list[tuple[int, int, str, float]]] = field(default_factory=dict)


def rows_from_best(labels, images, captions, best_top, best_bottom, train_uids) -> list[Row]:
    """``Row`` s from top-k tables: method -> (values (Q, k), train rows (Q, k)) (NaN or row -1
    where absent); opponents only where the score is below 0."""
    def entries(vals, idx, q, opponents=False):
        return [(r + 1, int(i), train_uids[int(i)], float(v)) for r, (v, i) in
                enumerate(zip(vals[q], idx[q], strict=True))
                if i >= 0 and np.isfinite(float(v)) and (not opponents or float(v) < 0)]

    return [Row(labels[q], images[q], None if captions is None else captions[q],
                {m: entries(v, i, q) for m, (v, i) in best_top.items()},
                {m: entries(v, i, q, True) for m, (v, i) in best_bottom.items()})
            for q in range(len(labels))]


def overlap(row: Row) -> list[tuple[str, str, int, int]]:
    """(method a, method b, |top-k(a) & top-k(b)|, k) for each pair of methods of a row."""
    sets = {m: {e[1] for e in v} for m, v in row.pro.items()}
    ms = list(sets)
    return [(a, b, len(sets[a] & sets[b]), max(len(sets[a]), len(sets[b])))
            for i, a in enumerate(ms) for b in ms[i + 1:]]


def contact_sheet(rows: list[Row], train_thumb, out_png: Path, per_method: int | None = None
                  ) -> Path:
    """The picture: a legend line, column headers (query | each method), then one row per
    query: its tile, a gap, and each method's top proponents with rank, score and training uid
    under each tile. ``train_thumb(row) -> Path`` gives a training row's thumbnail."""
    from PIL import Image, ImageDraw

    methods = list(rows[0].pro) if rows else []
    opened = {}

    def tile_of(row: int):
        if row not in opened:
            opened[row] = Image.open(train_thumb(row)).convert("RGB")
        return opened[row]

    k = per_method or max((len(e) for r in rows for e in r.pro.values()), default=0)
    first = Image.open(rows[0].image) if rows else Image.new("RGB", (THUMB_MIN, THUMB_MIN))
    tw, th = max(first.width, 64), first.height
    qw = max(tw, 110)  # the query column also holds its uid and caption
    pad, gap, text_h, legend_h, head_h = 4, 24, 24, 16, 16
    cell_w, row_h = tw + pad, th + text_h + pad
    group_w = k * cell_w + gap // 2
    width = pad + qw + gap + len(methods) * group_w
    height = legend_h + head_h + len(rows) * row_h + pad
    canvas = Image.new("RGB", (max(width, 520), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), f"each row: a query, then each method's top-{k} proponents; under a tile: "
              f"rank, score (positive = proponent), training uid", fill="black")

    def fit(text, w):
        while text and draw.textlength(text) > w:
            text = text[:-1]
        return text

    x_groups = [pad + qw + gap + j * group_w for j in range(len(methods))]
    draw.text((pad, legend_h), "query", fill="black")
    for x0, m in zip(x_groups, methods, strict=True):
        draw.text((x0, legend_h), m, fill="black")
        draw.line((x0 - gap // 4, legend_h, x0 - gap // 4, height), fill=(200, 200, 200))
    for i, row in enumerate(rows):
        y = legend_h + head_h + i * row_h
        canvas.paste(Image.open(row.image).convert("RGB"), (pad, y))
        draw.text((pad, y + th + 1), fit(row.label, qw), fill="black")
        if row.caption:
            draw.text((pad, y + th + 12), fit(row.caption, qw), fill=(90, 90, 90))
        for x0, m in zip(x_groups, methods, strict=True):
            for j, (rank, train_row, uid, score) in enumerate(row.pro[m][:k]):
                x = x0 + j * cell_w
                canvas.paste(tile_of(train_row), (x, y))
                draw.text((x, y + th + 1), fit(f"#{rank}: {score:.3g}", tw), fill="black")
                draw.text((x, y + th + 12), fit(f"uid {uid}", tw), fill=(90, 90, 90))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: a third of the default's encode time for a few per cent more bytes
    canvas.save(out_png, compress_level=1)
    return out_png


def draw_attribution(cfg, out_png: Path, per_method: int = 5) -> Path:
    """The demo picture: every query of every set beside its top proponents per method
    (from the top-k CSVs of `das score`)."""
    from .data import open_dataset
    from .fingerprint import data_options

    train = open_dataset("train", cfg.data.train, data_options(cfg))
    thumbs = Thumbs(cfg.reports_dir / "thumbs" / "train", train)
    rows = []
    for name, source in cfg.data.queries.items():
        qs = open_dataset(name, source, data_options(cfg))
        q_thumbs = Thumbs(cfg.reports_dir / "thumbs" / name, qs)
        top = {m: read_topk_csv(cfg.reports_dir / name / f"{m}_topk.csv", len(qs))
               for m in cfg.score.methods}
        rows += rows_from_best([f"{name} {u}" for u in qs.uids],
                               [q_thumbs.path(q) for q in range(len(qs))], qs.captions, top, {},
                               train.uids)
    return contact_sheet(rows, thumbs.path, out_png, per_method)


def draw_counterfactual(originals: dict, results: dict, names: list[str], path: Path, m: int,
                        scale: int = 8) -> Path:
    """Rows: query, then its regeneration without each method's top-m and without random m."""
    from PIL import Image, ImageDraw

    def as_tile(img_CHW):
        return tile(to_uint8(torch.from_numpy(img_CHW)[None])[0], scale)

    first = next(iter(originals.values()))
    h, w = first.shape[1] * scale, first.shape[2] * scale
    col_w, row_h, head = max(w, 116) + 8, h + 34, 30
    canvas = Image.new("RGB", (col_w * (len(names) + 1) + 8, head + row_h * len(originals)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(["query", *[f"-top{m} {n}" if n != "random" else f"-random {m}"
                                         for n in names]]):
        draw.text((8 + j * col_w, 8), label, fill="black")
    for i, (q, orig) in enumerate(originals.items()):
        y = head + i * row_h
        canvas.paste(as_tile(orig), (8, y))
        for j, n in enumerate(names, start=1):
            r = results[q][n]
            canvas.paste(as_tile(r["image"]), (8 + j * col_w, y))
            draw.text((8 + j * col_w, y + h + 2), f"L2 {r['l2']:.2f} dF {r['loss_change']:+.3f}",
                      fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# --- the HTML report (`das report`, `das attribute`, `das serve`): static, offline, paginated ---

PER_PAGE = 50
CSS = """body{font:13px sans-serif;margin:12px;color:#222}table{border-collapse:collapse}
td,th{border-top:1px solid #ddd;padding:4px;vertical-align:top;text-align:left}
figure{display:inline-block;margin:0 4px 4px 0;text-align:center;font-size:11px;width:68px}
figure img{width:64px;height:64px;image-rendering:pixelated;object-fit:contain;background:#eee}
figure.q{width:100px}figure.q img{width:96px;height:96px}
.opp img{outline:2px solid #c33}.score{font-weight:bold}
.uid{color:#666;word-break:break-all}.cap{max-width:200px;color:#444}nav a{margin-right:8px}
.small{color:#666;font-size:11px}"""


def html_page(title: str, body: str) -> str:
    """A self-contained page: inline CSS, no scripts, no external resources."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def rows_html(rows: list[Row], href) -> str:
    """A table: one ``tr.query`` per query (its image, uid, caption), then per method its
    proponents (``div.pro``) and, for signed methods, opponents (``div.opp``), then the methods'
    top-k overlap. ``href(path) -> str`` makes an image path relative to the page."""
    if not rows:
        return "<p>no queries</p>"
    methods = list(rows[0].pro)

    def figs(entries):
        return "".join(f"<figure><img src='{href(path)}' alt='train row {row}' loading='lazy' "
                       f"decoding='async'><figcaption>"
                       f"{rank}. <span class='score'>{score:.4g}</span><br><span class='uid'>"
                       f"{escape(uid)}</span></figcaption></figure>"
                       for rank, row, uid, score, path in entries)

    out = ["<table><tr><th>query</th>", *(f"<th>{m}</th>" for m in methods),
           "<th>top-k overlap</th></tr>"]
    for row in rows:
        cap = f"<div class='cap'>{escape(row.caption)}</div>" if row.caption else ""
        out.append(f"<tr class='query'><td><figure class='q'><img src='{href(row.image)}' "
                   f"alt='query'><figcaption>{escape(row.label)}</figcaption></figure>{cap}</td>")
        for m in methods:
            opp = ""
            if m in row.opp:
                opp = ("<div class='small'>opponents</div><div class='opp'>"
                       + (figs(row.opp[m]) or "<span class='small'>none below 0</span>") + "</div>")
            out.append(f"<td class='method' data-method='{m}'><div class='pro'>"
                       f"{figs(row.pro[m])}</div>{opp}</td>")
        out.append("<td class='small'>" + "<br>".join(f"{a} &amp; {b}: {n}/{k}"
                                                     for a, b, n, k in overlap(row)) + "</td></tr>")
    out.append("</table>")
    return "".join(out)


def with_thumbs(rows: list[Row], train_thumb) -> list[Row]:
    """The rows with each entry extended by its training thumbnail path (made when missing)."""
    def ext(d):
        return {m: [(*e, train_thumb(e[1])) for e in v] for m, v in d.items()}

    return [Row(r.label, r.image, r.caption, ext(r.pro), ext(r.opp)) for r in rows]


def settings_html(settings: dict, lds: dict | None) -> str:
    items = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>"
                    for k, v in settings.items())
    out = f"<h2>settings</h2><table>{items}</table>"
    if lds:
        cells = "".join(f"<tr><th>{escape(n)}</th><td>{escape(m)}</td><td>{v * 100:.1f}</td></tr>"
                        for n, per in lds.items() for m, v in per.items())
        out += ("<h2>LDS x 100</h2><table><tr><th>query set</th><th>method</th><th>LDS</th></tr>"
                f"{cells}</table>")
    return out


def run_settings(cfg, store, member_digests: list[str] | None = None) -> dict:
    """What a reader of a report needs to know about the run (``member_digests``: an
    ensemble's members' model digests)."""
    fp = store.fingerprint
    model = ({"model digest": fp["model"]["digest"][:16]} if member_digests is None else
             {f"ensemble of {len(member_digests)} models (mean scores), digests":
              ", ".join(member_digests)})
    return {"store": store.path, **model,
            "training samples (N)": fp["train"]["num_samples"], "projection dim (k)":
            cfg.projection.dim, "timesteps (K)": cfg.features.timesteps, "noise draws":
            cfg.features.noise_draws, "damping": f"{cfg.score.damping:g}"
            + (" (absolute)" if cfg.score.damping_absolute else " (relative: x trace(G)/k)"),
            "gamma": cfg.score.gamma, "residual": cfg.score.residual, "top-k": cfg.score.topk,
            "methods": ", ".join(cfg.score.methods)}


def read_lds(path: Path) -> dict:
    """{query set: {method: LDS}} from a `das lds eval --json` file (stored-score mode)."""
    import json

    raw = json.loads(Path(path).read_text())
    return {n: {m: r["summary"]["mean"] for m, r in per.items()
                if isinstance(r, dict) and "summary" in r} for n, per in raw.items()}


def run_report(cfg, query_sets: list[str] | None = None, methods: list[str] | None = None,
               out: Path | None = None, per_page: int = PER_PAGE, lds: Path | None = None) -> dict:
    """Write the HTML report of a scored run: ``<out>/index.html`` and per query set pages of
    ``per_page`` queries (``<set>/page-001.html``) each with a PNG contact sheet beside it.

    Reads only the top-k CSVs of `das score` and the thumbnails' rows (made once, cached in
    ``<out>/thumbs``), so a page costs O(per_page x k) whatever Q and N. ``lds``: a
    `das lds eval --json` file (default ``<reports>/lds.json`` when present).

    Raises:
        StoreError: fingerprint mismatch, stale query data, or a query set not yet scored.
        ConfigError: an unknown query set or method.
    """
    import time

    from .data import open_dataset
    from .errors import ConfigError, StoreError
    from .fingerprint import check_query_data, data_options, open_store

    started = time.perf_counter()
    names = query_sets or list(cfg.data.queries)
    member_digests = None
    if cfg.is_ensemble:  # the root's CSVs rank the members' mean; every member must be current
        from .ensemble import check_members, member_config, open_member, open_root

        check_members(cfg)
        store = open_root(cfg, create=False)
        member_digests = []
        for i in range(len(cfg.members)):
            member = open_member(cfg, i)
            check_query_data(member_config(cfg, i), member, names)
            member_digests.append(member.fingerprint["model"]["digest"][:12])
    else:
        store = open_store(cfg)
        check_query_data(cfg, store, names)
    methods = list(methods or cfg.score.methods)
    unknown = [m for m in methods if m not in cfg.score.methods]
    if unknown:
        raise ConfigError(f"--method {unknown[0]!r} is not in [score] methods "
                          f"{list(cfg.score.methods)}; choose one of those")
    out = Path(out or cfg.reports_dir)
    lds = lds or (cfg.reports_dir / "lds.json" if (cfg.reports_dir / "lds.json").is_file() else None)
    lds_values = read_lds(lds) if lds else None
    train = open_dataset("train", cfg.data.train, data_options(cfg))
    index = ["<h1>attribution report</h1>"]
    pages = []
    for name in names:
        qs = open_dataset(name, cfg.data.queries[name], data_options(cfg))
        tables = {}
        for kind in ("topk", "opponents"):
            for m in methods:
                path = cfg.reports_dir / name / f"{m}_{kind}.csv"
                if path.is_file():
                    tables[kind, m] = read_topk_csv(path, len(qs))
                elif kind == "topk":
                    raise StoreError(f"no top-k table {path} for query set {name!r}; run "
                                     f"`das score CONFIG --query-set {name}` first")
        top = {m: tables["topk", m] for m in methods}
        bottom = {m: tables["opponents", m] for m in methods if ("opponents", m) in tables}
        set_pages = write_query_pages(out, name, qs, train, top, bottom, per_page)
        pages += set_pages
        links = [f"<a href='{escape(name)}/{page.name}'>{p + 1}</a>"
                 for p, page in enumerate(set_pages)]
        index.append(f"<h2>{escape(name)} ({len(qs)} queries)</h2><p>pages: {' '.join(links)}</p>")
    index.append(settings_html(run_settings(cfg, store, member_digests), lds_values))
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(html_page("attribution report", "".join(index)))
    return {"index": out / "index.html", "pages": pages, "seconds": time.perf_counter() - started}


def write_query_pages(out: Path, name: str, qs, train, top: dict, bottom: dict,
                      per_page: int = PER_PAGE) -> list[Path]:
    """Pages ``<out>/<name>/page-NNN.html`` (+ a contact sheet .png each) of ``per_page``
    queries of dataset ``qs``; ``top`` / ``bottom``: method -> (scores (Q, k), train rows (Q, k))
    of proponents / opponents. Thumbnails come from (or go to) ``<out>/thumbs``."""
    train_thumbs = Thumbs(out / "thumbs" / "train", train)
    q_thumbs = Thumbs(out / "thumbs" / name, qs)
    num_pages = max(1, -(-len(qs) // per_page))
    pages = []
    for p in range(num_pages):
        lo, hi = p * per_page, min(len(qs), (p + 1) * per_page)
        page = out / name / f"page-{p + 1:03d}.html"
        rows = rows_from_best([f"{name} {u}" for u in qs.uids[lo:hi]],
                              [q_thumbs.path(q) for q in range(lo, hi)],
                              None if qs.captions is None else qs.captions[lo:hi],
                              {m: (v[lo:hi], i[lo:hi]) for m, (v, i) in top.items()},
                              {m: (v[lo:hi], i[lo:hi]) for m, (v, i) in bottom.items()},
                              train.uids)
        sheet = contact_sheet(rows, train_thumbs.path, page.with_suffix(".png"))

        def href(path, page=page):
            return escape(os.path.relpath(path, page.parent).replace(os.sep, "/"))

        nav = ["<nav><a href='../index.html'>index</a>"]
        if p:
            nav.append(f"<a href='page-{p:03d}.html'>previous</a>")
        if p + 1 < num_pages:
            nav.append(f"<a href='page-{p + 2:03d}.html'>next</a>")
        nav.append(f"<a href='{href(sheet)}'>contact sheet (PNG)</a></nav>")
        body = (f"<h1>{escape(name)}: queries {lo + 1}-{hi} of {len(qs)}</h1>{''.join(nav)}"
                f"{rows_html(with_thumbs(rows, train_thumbs.path), href)}{''.join(nav)}")
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(html_page(f"{name} page {p + 1}", body))
        pages.append(page)
    return pages
