"""`das report` (and `das run`'s report, the reused reduce): pages of queries beside their top-k
per method, read from the top-k CSVs; rendered by a real headless chromium when installed."""

import numpy as np
import pytest
from browser import Rows, dump_dom, screenshot_colours

from das_pipeline.cli import main
from das_pipeline.config import load_config
from das_pipeline.fingerprint import open_store
from das_pipeline.report import read_topk_csv, run_report


@pytest.fixture
def scored(make_config, capsys):
    """A config after `das run` (tiny model, 40 train rows, 6 val queries, top-5)."""
    cfg_path = make_config(methods=("trak", "dtrak", "das", "das_signed"))
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "report: 1 pages" in out and "reused" not in out
    return cfg_path


def test_report_pages_hold_every_query_with_k_images_per_method_and_csv_scores(scored, tmp_path,
                                                                              capsys):
    assert main(["report", str(scored), "--method", "pixel"]) == 2
    assert "--method 'pixel' is not in [score] methods" in capsys.readouterr().err
    cfg = load_config(scored)
    assert (cfg.reports_dir / "index.html").is_file()
    assert (cfg.reports_dir / "val" / "page-001.png").is_file()  # contact sheet
    out = tmp_path / "report"
    first = run_report(cfg, out=out, per_page=4)
    assert [p.name for p in first["pages"]] == ["page-001.html", "page-002.html"]
    thumbs = sorted((out / "thumbs" / "train").glob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in thumbs]
    csv = {m: read_topk_csv(cfg.reports_dir / "val" / f"{m}_topk.csv", 6) for m in cfg.score.methods}
    opp = {m: read_topk_csv(cfg.reports_dir / "val" / f"{m}_opponents.csv", 6)
           for m in ("trak", "dtrak", "das_signed")}
    assert not (cfg.reports_dir / "val" / "das_opponents.csv").exists()  # das is squared
    seen = 0
    for page in first["pages"]:
        html = page.read_text()
        parsed = Rows(html)
        assert all(not s.startswith(("http:", "https:", "//")) for s in parsed.srcs)
        assert len(parsed.rows) == (4 if page.name == "page-001.html" else 2)
        for row in parsed.rows:
            q = seen
            seen += 1
            for m in cfg.score.methods:
                pro, num_opp, scores = row[m]
                assert pro == cfg.score.topk
                np.testing.assert_allclose(scores, csv[m][0][q], rtol=1e-3)
                expected_opp = int(np.isfinite(opp[m][0][q]).sum()) if m in opp else 0
                assert num_opp == expected_opp
        assert "model digest" not in html
    assert seen == 6
    assert any(np.isfinite(v).any() for v, _ in opp.values())  # some opponents were shown
    index = (out / "index.html").read_text()
    assert "model digest" in index and open_store(cfg).fingerprint["model"]["digest"][:16] in index
    run_report(cfg, out=out, per_page=4, methods=["das"])
    assert [p.stat().st_mtime_ns for p in thumbs] == stamps  # thumbnails made once


def test_reduce_reuses_a_current_factor_and_force_recomputes(scored, capsys):
    cfg = load_config(scored)
    eigvecs = cfg.store.path / "reduce" / "mean" / "eigvecs" / "c" / "0" / "0"
    stamp = eigvecs.stat().st_mtime_ns
    assert main(["reduce", str(scored), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("reused the stored factor") == 3 and eigvecs.stat().st_mtime_ns == stamp
    assert main(["run", str(scored), "--quiet"]) == 0
    assert capsys.readouterr().out.count("reused the stored factor") == 3
    assert main(["reduce", str(scored), "--quiet", "--force"]) == 0
    out = capsys.readouterr().out
    assert "reused" not in out and out.count("N x N kernel eigh") == 3
    assert eigvecs.stat().st_mtime_ns != stamp
    store = open_store(cfg)
    store.root["reduce"]["loss"].attrs["train_digest"] = "0" * 64  # as if from other features
    assert main(["reduce", str(scored), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("reused") == 2 and "reduce: loss: trace" in out


def test_chromium_renders_the_report_page(scored, tmp_path):
    cfg = load_config(scored)
    page = cfg.reports_dir / "val" / "page-001.html"
    rows = Rows(dump_dom(page.as_uri())).rows
    assert len(rows) == 6
    assert all(rows[q][m][0] == cfg.score.topk for q in range(6) for m in cfg.score.methods)
    assert screenshot_colours(page.as_uri(), tmp_path / "page.png") > 16
