"""Querying training samples themselves: each should be its own top proponent."""

import numpy as np

from das_pipeline.config import load_config
from das_pipeline.extract import run_extract
from das_pipeline.reduce import run_reduce
from das_pipeline.score import run_score
from das_pipeline.store import read_scores


def test_trak_and_dtrak_rank_the_sample_itself_first(make_config):
    # 80 training digits, k = 128 > N is avoided on purpose: with N < k self-ranking is trivial.
    cfg = load_config(make_config(train="digits[0:80]", queries={"self": "digits[0:40]"},
                                  timesteps=4, dim=48, rows_per_unit=16, batch_size=16,
                                  methods=("trak", "dtrak", "das"), damping=1e-3))
    run_extract(cfg, show_progress=False)
    run_reduce(cfg, show_progress=False)
    run_score(cfg, show_progress=False)
    for method in ("trak", "dtrak"):
        top1 = np.argmax(read_scores(cfg.store.path, "self", method), axis=1)
        share = float(np.mean(top1 == np.arange(40)))
        assert share >= 0.95, f"{method}: only {share:.0%} of training queries rank themselves first"
