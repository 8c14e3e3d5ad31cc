"""LDS on real stores and models: sweep vs `score_block`, dual factor, truncation, truth, retraining."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from das_pipeline.config import load_config
from das_pipeline.errors import EvalError
from das_pipeline.eval.lds import make_subsets, save_subsets
from das_pipeline.eval.sweep import Variant, read_split, sweep_predictions
from das_pipeline.extract import run_extract
from das_pipeline.linalg import dual_factor, factor, gram
from das_pipeline.reduce import run_reduce
from das_pipeline.score import run_score
from das_pipeline.scoring import score_block
from das_pipeline.store import Store, read_scores

REPO = Path(__file__).resolve().parents[1]


def test_stored_scores_are_read_in_column_blocks(tmp_path):
    import zarr

    from das_pipeline.eval.sweep import eval_stored_scores

    rng = np.random.default_rng(2)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    root.require_group("scores").require_group("val").create_array(
        "trak", shape=(5, 23), dtype="float64")[...] = rng.standard_normal((5, 23))
    mask, F = rng.random((9, 23)) < 0.5, rng.standard_normal((9, 5))
    store = Store.open_existing(tmp_path / "s.zarr", foreign=True)
    whole = eval_stored_scores(store, "val", None, mask, F, None, [], column_block=10**6)
    blocks = eval_stored_scores(store, "val", None, mask, F, None, [], column_block=7)
    np.testing.assert_allclose(blocks["trak"]["per_query"], whole["trak"]["per_query"], atol=1e-12)


def test_dual_factor_scores_and_leverage_equal_the_full_factor():
    rng = np.random.default_rng(0)
    train, query = rng.standard_normal((12, 40)), rng.standard_normal((5, 40))
    full, thin = factor(gram([train], 40), 12), dual_factor(train)
    assert thin.eigvecs_KK.shape == (40, 12)
    lam = 0.3
    tq = torch.from_numpy(query.T)
    full_scores = torch.from_numpy(train) @ full.solve(tq, lam)
    thin_scores = torch.from_numpy(train) @ thin.solve(tq, lam)
    torch.testing.assert_close(thin_scores, full_scores, rtol=1e-9, atol=1e-10)
    # with the complement term, the thin solve is exact for vectors outside the train span too
    torch.testing.assert_close(thin.solve(tq, lam), full.solve(tq, lam), rtol=1e-9, atol=1e-10)
    assert thin.dim == full.dim == 40 and thin.damping(0.5) == pytest.approx(full.damping(0.5))
    torch.testing.assert_close(thin.leverage(torch.from_numpy(train), lam),
                               full.leverage(torch.from_numpy(train), lam), rtol=1e-9, atol=1e-12)
    assert thin.trace == pytest.approx(full.trace, rel=1e-12)


def test_relative_damping_is_the_trace_without_the_top_eigenvalue():
    """docs/DESIGN.md "Damping": lambda = c (trace(G) - e_max(G)), the same for the thin (N < k)
    and the full factor, unchanged when k changes, and refused for a rank-1 Gram."""
    rng = np.random.default_rng(2)
    shared = rng.standard_normal(64)
    train = rng.standard_normal((12, 64)) + 5 * shared  # one dominant common direction
    e = np.linalg.eigvalsh(train.T @ train)
    want = 0.03 * (e.sum() - e.max())
    thin, full = dual_factor(train), factor(gram([train], 64), 12)
    assert thin.damping(0.03) == pytest.approx(want, rel=1e-9)
    assert full.damping(0.03) == pytest.approx(want, rel=1e-9)
    assert full.damping(0.03, absolute=True) == 0.03
    # trace / k would halve from k = 64 to k = 128 on the same spectrum; this scale does not
    wide = np.concatenate([train, np.zeros((12, 64))], axis=1)
    assert dual_factor(wide).damping(0.03) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="damping_absolute"):
        dual_factor(np.outer(np.arange(1.0, 4.0), shared)).damping(1.0)


def test_sweep_equals_score_block_at_every_damping():
    """The O(k^2)-per-lambda sweep against the scoring module's own formula, per lambda."""
    rng = np.random.default_rng(1)
    N, Q, K, M = 30, 4, 48, 10
    tr = {r: rng.standard_normal((N, K)) for r in ("loss", "mean")}
    qf = {r: rng.standard_normal((Q, K)) for r in ("loss", "mean")}
    res, rho = rng.random(N) + 0.5, rng.standard_normal(N)
    facs = {r: factor(gram([tr[r]], K), N) for r in tr}
    mask = make_subsets(N, M, 0.5, seed=0)
    grid = [1e-3, 0.1, 3.0]
    variants = [Variant("trak"), Variant("das", 1.0, "r"), Variant("das_signed", 0.0, "rho")]
    pred = sweep_predictions(tr, res, rho, qf, facs, grid, variants, mask, unit_rows=7)
    for c_i, c in enumerate(grid):
        lams = {r: facs[r].damping(c) for r in tr}
        pre = {r: facs[r].solve(torch.from_numpy(qf[r].T), lams[r]) for r in tr}
        feats = {r: torch.from_numpy(tr[r]) for r in tr}
        lev = facs["mean"].leverage(feats["mean"], lams["mean"])
        for v in variants:
            w = torch.from_numpy(res if v.residual == "r" else rho)
            ref = score_block(feats, pre, w, lev, [v.method], v.gamma)[v.method].numpy()
            np.testing.assert_allclose(pred[v.name][c_i], ref @ mask.T.astype(float), rtol=1e-9,
                                       atol=1e-9, err_msg=f"{v.name} c={c}")


def test_truncated_features_equal_a_smaller_projection(make_config, tmp_path):
    """Column b of the projection depends on (seed, a, b) only, so k=16 is a prefix of k=64."""
    big = load_config(make_config("big.toml", dim=64, store=tmp_path / "big.zarr",
                                  train="digits[0:20]", kind="rademacher"))
    small = load_config(make_config("small.toml", dim=16, store=tmp_path / "small.zarr",
                                    train="digits[0:20]", kind="rademacher"))
    for cfg in (big, small):
        run_extract(cfg, show_progress=False)
    a = read_split(Store.open_existing(big.store.path), "train", ("mean",), dim=16)
    b = read_split(Store.open_existing(small.store.path), "train", ("mean",))
    np.testing.assert_allclose(a[0]["mean"], b[0]["mean"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a[1], b[1])
    # `das lds eval --sweep` on that store, at a truncated k, for the requested variants.
    from das_pipeline.cli import main

    mask = make_subsets(20, 8, 0.5, seed=0)
    save_subsets(tmp_path / "s.npz", mask, np.zeros(8, np.int64), [str(i) for i in range(20)], 0.5, 0)
    np.savez(tmp_path / "val.npz", F=np.random.default_rng(0).standard_normal((8, 6)),
             query_uids=np.array([str(i) for i in range(100, 106)]))
    assert main(["lds", "eval", str(tmp_path / "big.toml"), "--subsets", str(tmp_path / "s.npz"),
                 "--truth", str(tmp_path / "val.npz"), "--sweep", "--method", "trak", "--method", "das",
                 "--k", "16", "--grid", "0.01", "1", "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())["val"]
    assert set(rep["by_k"]["16"]) == {"trak", "das g1 r", "das g1 rho", "das g0 r", "das g0 rho"}
    assert (len(rep["select"]), len(rep["report"])) == (3, 3)
    assert rep["by_k"]["16"]["trak"]["chosen"] in (0.01, 1.0)


def test_rho_residual_scores_are_r_scores_rescaled(make_config, tmp_path):
    paths = {res: make_config(f"{res}.toml", methods=("das_signed",), readouts=("mean",))
             for res in ("r", "rho")}
    text = paths["rho"].read_text().replace("topk = 5", 'topk = 5\nresidual = "rho"')
    paths["rho"].write_text(text)
    cfgs = {k: load_config(p) for k, p in paths.items()}
    assert cfgs["rho"].score.residual == "rho"
    run_extract(cfgs["r"], show_progress=False)
    run_reduce(cfgs["r"], show_progress=False)
    out = {}
    for k, cfg in cfgs.items():
        run_score(cfg, show_progress=False)
        out[k] = read_scores(cfg.store.path, "val", "das_signed").astype(np.float64)
    train = Store.open_existing(cfgs["r"].store.path).split("train")
    r, rho = train.group["residual"][...], train.group["rho"][...]
    np.testing.assert_allclose(out["rho"], out["r"] * (rho / r)[None, :], rtol=2e-4, atol=1e-7)
    bad = paths["r"].read_text().replace("topk = 5", 'topk = 5\nresidual = "mse"')
    paths["r"].write_text(bad)
    with pytest.raises(ValueError, match=r"\[score\] residual = 'mse'"):
        load_config(paths["r"])


def test_truth_is_keyed_per_query_and_matches_a_plain_loop(tiny_model_dir):
    from das_pipeline.data import open_dataset
    from das_pipeline.eval.truth import model_output, query_items
    from das_pipeline.features import content_keys, keyed_noise
    from das_pipeline.models import load_model

    model = load_model(tiny_model_dir)
    ds = open_dataset("q", "digits[200:204]")
    x = ds.load(0, 4)
    items = query_items(model, x, None, 5, 2, seed=1)
    F = model_output(model.unet, items, batch=3)
    # Slow twin: one (t, draw) at a time with freshly keyed noise (keyed by the query's pixels).
    keys = content_keys(x)
    for q in range(4):
        losses = []
        for t in items.ts_I.unique().tolist():
            for d in range(2):
                e = keyed_noise(1, [keys[q]], torch.tensor([t]), torch.tensor([d]), (1, 8, 8))[0, 0]
                xt1 = model.scheduler.add_noise(x[q:q + 1], e[None], torch.tensor([t]))
                with torch.no_grad():
                    pred = model.unet(xt1, torch.tensor([t])).sample
                losses.append(float((pred - e).pow(2).mean()))
        assert F[q] == pytest.approx(np.mean(losses), rel=1e-5)
    # Query 2 alone gives the same output: the items depend on its content, not its position.
    alone = query_items(model, x[2:3], None, 5, 2, seed=1)
    assert model_output(model.unet, alone)[0] == pytest.approx(F[2], rel=1e-6)


RECIPE = {"widths": [8, 16], "attention": False, "num_train_timesteps": 50, "steps": 3,
          "batch_size": 8, "lr": 1e-3, "seed": 0}


def test_train_is_resumable_deterministic_and_refuses_other_recipes(tmp_path):
    from das_pipeline.eval.retrain import run_train
    from das_pipeline.models import load_model

    mask = make_subsets(16, 3, 0.5, seed=0)
    subsets = save_subsets(tmp_path / "s.npz", mask, np.zeros(3, np.int64), [str(i) for i in range(16)],
                           0.5, 0)
    quiet = lambda *_: None  # noqa: E731
    s = run_train("digits[0:16]", subsets, tmp_path / "models", RECIPE, log=quiet)
    assert (s["trained"], s["skipped"]) == (3, 0)
    assert run_train("digits[0:16]", subsets, tmp_path / "models", RECIPE, log=quiet)["skipped"] == 3
    run_train("digits[0:16]", subsets, tmp_path / "again", RECIPE, subsets_only=[1], log=quiet)
    w1 = load_model(tmp_path / "models" / "0001" / "model").digest
    assert w1 == load_model(tmp_path / "again" / "0001" / "model").digest
    assert w1 != load_model(tmp_path / "models" / "0002" / "model").digest
    with pytest.raises(EvalError, match="another subset, seed or recipe"):
        run_train("digits[0:16]", subsets, tmp_path / "models", {**RECIPE, "steps": 4}, log=quiet)


def test_own_training_command_hook(tmp_path):
    from das_pipeline.eval.retrain import MARKER, run_train

    script = tmp_path / "my_train.py"
    script.write_text(
        "import json, sys\n"
        "from das_pipeline.data import open_dataset\n"
        "from das_pipeline.eval.retrain import train_recipe\n"
        "from das_pipeline.recipe import save_pipeline\n"
        "sub = json.load(open(sys.argv[1]))\n"
        "x = open_dataset('t', 'digits[0:16]').load(0, 16)[sub['rows']]\n"
        f"u, s, _ = train_recipe({RECIPE!r}, x, sub['seed'])\n"
        "save_pipeline(u, s, sys.argv[2])\n")
    mask = make_subsets(16, 2, 0.5, seed=0)
    subsets = save_subsets(tmp_path / "s.npz", mask, np.array([5, 6]), [str(i) for i in range(16)], 0.5, 0)
    template = f"{sys.executable} {script} {{subset_file}} {{output_dir}}"
    run_train("digits[0:16]", subsets, tmp_path / "m", None, template, log=lambda *_: None)
    sub = json.loads((tmp_path / "m" / "0001" / "subset.json").read_text())
    assert sub["seed"] == 6 and sub["rows"] == np.flatnonzero(mask[1]).tolist()
    assert (tmp_path / "m" / "0001" / MARKER).is_file()
    with pytest.raises(EvalError, match=r"lacks \{output_dir\}"):
        run_train("digits[0:16]", subsets, tmp_path / "n", None, "train.sh {subset_file}")


def test_keyed_sampling_is_independent_of_the_batch(tiny_model_dir):
    from das_pipeline.models import load_model
    from das_pipeline.recipe import sample_keyed

    model = load_model(tiny_model_dir)
    batch = sample_keyed(model.unet, model.scheduler, [11, 12, 13], 10)
    alone = sample_keyed(model.unet, model.scheduler, [12], 10)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)


def test_benchmark_miniature_end_to_end(tmp_path):
    """The CI miniature of benchmarks/lds_digits: every stage through the `das` commands."""
    out = tmp_path / "mini"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lds_digits" / "run.py"), "--mini",
                           "--jobs", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for store in ("K2_raw", "K2_norm", "K4_raw", "K4_norm"):
        for split in ("val", "gen"):
            cell = results["sweeps"][store][split]["by_k"]["64"]["das g1 r"]
            assert -1.0 <= cell["report"]["mean"] <= 1.0 and cell["chosen"] in cell["grid"]
    assert set(results["baselines"]["val"]) == {"pixel_neg_l2", "pixel_cosine", "random"}
    # An ordering with a stated margin: on held-out queries the default method (das, gamma 0,
    # residual r) at the largest K and k predicts retraining better than random scores by at
    # least 0.10 LDS (measured 0.27 vs -0.02, bootstrap intervals disjoint).
    das = results["sweeps"]["K4_raw"]["val"]["by_k"]["64"]["das g0 r"]["report"]["mean"]
    assert das > 0.10 and das > results["baselines"]["val"]["random"]["mean"] + 0.10
    assert set(results["counterfactual"]["mean"]) == {"das", "dtrak", "trak", "random"}
    assert (out / "lds.png").stat().st_size > 5000
    assert (out / "counterfactual" / "picture.png").is_file()
    table = (out / "table.md").read_text()
    assert table.count("| das g1 r | off |") == 2 and "[" in table
