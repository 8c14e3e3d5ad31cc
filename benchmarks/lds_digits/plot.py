"""LDS against k and against timesteps per method, drawn with Pillow (no plotting dependency).

One row of two panels per query set: LDS (report half) vs k at the smallest K, and vs K at the
largest k. Each method is shown in its best-on-selection variant (results["defaults"]).
"""

from __future__ import annotations

from pathlib import Path

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22"]


def _panel(draw, box, title, xlabels, series, ylim):
    x0, y0, x1, y1 = box
    left, bottom, top = x0 + 44, y1 - 28, y0 + 22
    right = x1 - 8
    draw.text((x0 + 44, y0 + 4), title, fill="black")
    draw.rectangle((left, top, right, bottom), outline="black")
    lo, hi = ylim
    to_y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
    step = 10 if hi - lo > 30 else 5
    tick = int(lo // step) * step
    while tick <= hi:
        if tick >= lo:
            y = to_y(tick)
            draw.line((left, y, right, y), fill="#dddddd")
            draw.text((x0 + 4, y - 6), f"{tick:>4}", fill="black")
        tick += step
    if lo < 0 < hi:
        draw.line((left, to_y(0), right, to_y(0)), fill="#888888")
    n = len(xlabels)
    to_x = lambda i: left + (i + 0.5) * (right - left) / n  # noqa: E731
    for i, lab in enumerate(xlabels):
        draw.text((to_x(i) - 3 * len(lab), bottom + 6), lab, fill="black")
    for j, ys in enumerate(series.values()):
        color = COLORS[j % len(COLORS)]
        pts = [(to_x(i), to_y(v)) for i, v in enumerate(ys)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)


def plot_lds(results: dict, s: dict, path: Path) -> Path:
    from PIL import Image, ImageDraw

    best = results["defaults"]["per_method"]
    methods = {m: (b["variant"], "norm" if b["normalize"] else "raw") for m, b in best.items()}
    Ks, dims = s["timesteps"], s["dims"]
    panels = []
    for split in ("val", "gen"):
        def lds(K, k, v, norm, split=split):
            return results["sweeps"][f"K{K}_{norm}"][split]["by_k"][str(k)][v]["report"]["mean"] * 100

        vs_k = {f"{m} ({v}, {n})": [lds(Ks[0], k, v, n) for k in dims] for m, (v, n) in methods.items()}
        vs_K = {f"{m} ({v}, {n})": [lds(K, dims[-1], v, n) for K in Ks] for m, (v, n) in methods.items()}
        for kind in ("pixel_neg_l2", "pixel_cosine", "random"):
            val = results["baselines"][split][kind]["mean"] * 100
            vs_k[kind], vs_K[kind] = [val] * len(dims), [val] * len(Ks)
        panels.append((f"{split}: LDS vs k (K={Ks[0]})", [str(k) for k in dims], vs_k))
        panels.append((f"{split}: LDS vs timesteps K (k={dims[-1]})", [str(K) for K in Ks], vs_K))
    values = [v for _, _, ser in panels for ys in ser.values() for v in ys]
    ylim = (min(-5.0, min(values) - 5), max(values) + 5)
    w, h, legend_h = 460, 300, 18 * (len(panels[0][2]) + 1)
    canvas = Image.new("RGB", (2 * w, 2 * h + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, xl, ser) in enumerate(panels):
        _panel(draw, ((i % 2) * w, (i // 2) * h, (i % 2 + 1) * w, (i // 2 + 1) * h),
               title + "  (LDS x 100, report half)", xl, ser, ylim)
    for j, name in enumerate(panels[0][2]):
        y = 2 * h + 6 + 18 * j
        draw.rectangle((20, y + 2, 34, y + 12), fill=COLORS[j % len(COLORS)])
        draw.text((42, y), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
