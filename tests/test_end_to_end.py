"""The whole pipeline on a tiny model, in process: extract -> reduce -> score."""

import csv

import numpy as np

from das_pipeline.config import load_config
from das_pipeline.extract import run_extract
from das_pipeline.reduce import run_reduce
from das_pipeline.score import run_score
from das_pipeline.store import read_scores


def test_run_writes_scores_and_topk(make_config):
    cfg = load_config(make_config())
    summary = run_extract(cfg, show_progress=False)
    assert summary["units"] == 3 + 1  # 40 train rows / 16 per unit, 6 val rows
    run_reduce(cfg, show_progress=False)
    run_score(cfg, show_progress=False)
    for method in ("trak", "dtrak", "das"):
        scores = read_scores(cfg.store.path, "val", method)
        assert scores.shape == (6, 40)
        assert np.isfinite(scores).all()
        with open(cfg.reports_dir / "val" / f"{method}_topk.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 6 * 5
        first = rows[0]
        assert float(first["score"]) == np.float32(scores[0].max())
        assert int(first["train_row"]) == int(np.argmax(scores[0]))
    assert (read_scores(cfg.store.path, "val", "das") >= 0).all()
