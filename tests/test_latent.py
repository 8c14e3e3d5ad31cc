"""Text-conditioned latent diffusion (Stable Diffusion layout) with LoRA-parameter attribution."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tomllib
import torch

from das_pipeline.cli import main
from das_pipeline.config import dump_toml, load_config
from das_pipeline.data import DataOptions, open_dataset
from das_pipeline.extract import run_extract
from das_pipeline.features import FeatureSpec, item_grid, keyed_noise, per_sample_gradients
from das_pipeline.models import attributed_params, encode_captions, encode_images, load_model
from das_pipeline.store import Store, read_scores
from helpers import example_config
from tiny_sd import build_captioned_folder, build_lora, build_pipeline, tiny_cond_unet


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipe = build_pipeline(root)
    from diffusers import UNet2DConditionModel

    lora = build_lora(UNet2DConditionModel.from_pretrained(pipe / "unet"), root / "lora")
    other = build_lora(tiny_cond_unet(cross_dim=24, seed=1), root / "other_lora")
    images = build_captioned_folder(root / "images", 40)
    return {"pipe": pipe, "lora": lora, "other_lora": other, "images": images, "root": root}


def write_cfg(tmp_path, sd, lora="lora", train=None, resize=False, dim=32, num_queries=24):
    """examples/sd_lora.toml on the tiny pipeline: train images, their first rows as queries."""
    train = str(train or sd["images"])
    path = example_config(tmp_path / "sd.toml", "sd_lora", model=str(sd["pipe"]), train=train,
                          queries={"self": f"{train}[0:{num_queries}]"}, timesteps=3,
                          batch_size=8, dim=dim, store=str(tmp_path / "sd.zarr"), rows_per_unit=8,
                          damping=0.001, topk=3,
                          drop=[("data", "center_crop"), ("features", "vmap_chunk_size")])
    raw = tomllib.loads(path.read_text())
    raw["data"]["resize"] = resize
    if lora:
        raw["model"]["lora"] = str(sd[lora])
    else:
        del raw["model"]["lora"]
    path.write_text(dump_toml(raw))
    return path


def test_run_attributes_only_lora_and_ranks_training_samples_first(tmp_path, sd, capsys):
    cfg_path = write_cfg(tmp_path, sd)
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    model = load_model(sd["pipe"], sd["lora"])
    lora_params = sum(p.numel() for n, p in model.unet.named_parameters() if "lora_" in n)
    fp = Store.open_existing(load_config(cfg_path).store.path).root.attrs["model_info"]
    assert fp["attributed_params"] == lora_params < model.num_params() / 5
    assert fp["pipeline"] == "StableDiffusionPipeline"
    assert f"{lora_params} attributed parameters" in out
    cfg = load_config(cfg_path)
    for method in ("trak", "dtrak"):
        top1 = np.argmax(read_scores(cfg.store.path, "self", method), axis=1)
        share = float(np.mean(top1 == np.arange(24)))
        assert share >= 0.9, f"{method}: {share:.0%} of training queries rank themselves first"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lora_gradients_equal_for_loop_reference(sd, tmp_path, prediction_type):
    pipe = build_pipeline(tmp_path, prediction_type=prediction_type) if prediction_type != \
        "epsilon" else sd["pipe"]
    model = load_model(pipe, sd["lora"])
    names = attributed_params(model)
    assert names and all("lora_" in n for n in names)
    unet = model.unet.double()
    ds = open_dataset("train", str(sd["images"]) + "[0:3]")
    latents = encode_images(model, ds.load(0, 3)).double()
    text = encode_captions(model, ds.captions).double()
    spec = FeatureSpec(("loss", "square", "mean"), 2, 1, 0, dtype=torch.float64)
    fast = per_sample_gradients(unet, model.scheduler, latents, ds.uids, spec, names,
                                cond_BLD=text, vmap_chunk_size=2).grads_RBP
    ts, draws = item_grid(spec, 100)
    eps = keyed_noise(0, ds.uids, ts, draws, tuple(latents.shape[1:]))
    params = dict(unet.named_parameters())
    chosen = [params[n].requires_grad_(True) for n in names]
    for b in range(3):
        for r, readout in enumerate(spec.readouts):
            acc = 0
            for i in range(len(ts)):
                x0 = latents[b:b + 1].float()
                xt = model.scheduler.add_noise(x0, eps[b, i:i + 1], ts[i:i + 1]).double()
                target = eps[b, i:i + 1] if prediction_type == "epsilon" else \
                    model.scheduler.get_velocity(x0, eps[b, i:i + 1], ts[i:i + 1])
                pred = unet(xt, ts[i:i + 1], encoder_hidden_states=text[b:b + 1]).sample
                value = {"loss": (pred - target.double()).pow(2).mean(),
                         "square": pred.pow(2).mean(), "mean": pred.mean()}[readout]
                acc = acc + torch.cat([g.flatten() for g in torch.autograd.grad(value, chosen)])
            ref = acc / len(ts)
            rel = ((fast[r, b] - ref).norm() / ref.norm()).item()
            assert rel < 1e-10, f"{prediction_type} {readout} sample {b}: relative error {rel:.1e}"


def test_cache_equals_fresh_encoding_and_resume_does_not_reencode(tmp_path, sd):
    cfg_path = write_cfg(tmp_path, sd, num_queries=8)
    killed = subprocess.run([sys.executable, "-m", "das_pipeline.cli", "extract", str(cfg_path),
                             "--quiet"], env={**os.environ, "DAS_FAULT": "after_cache:3"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cfg = load_config(cfg_path)
    split = Store.open_existing(cfg.store.path).split("train")
    cache_markers = split.group["cache"]["markers"][:]
    assert int((cache_markers[:, 0] == 1).sum()) == 3 and len(split.done_units()) == 2
    summary = run_extract(cfg, show_progress=False)
    assert summary["cache_reused"] == 1  # unit 2: encoded before the kill, features not written
    assert summary["cache_encoded"] == split.num_units - 3 + 1  # the rest of train + queries
    np.testing.assert_array_equal(split.group["cache"]["markers"][:3], cache_markers[:3])
    model = load_model(sd["pipe"], sd["lora"])
    ds = open_dataset("train", str(sd["images"]))
    cached = split.read_cache(1)
    lo, hi = split.unit_rows(1)
    np.testing.assert_allclose(cached["latents"], encode_images(model, ds.load(lo, hi)).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached["text"], encode_captions(model, ds.captions[lo:hi]).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_resize_is_explicit(tmp_path, sd, capsys):
    big = build_captioned_folder(tmp_path / "big", 8, size=32)
    code = main(["extract", str(write_cfg(tmp_path, sd, train=big, num_queries=2)), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "32x32 images but the model takes 16x16" in err
    assert "[data] resize = true" in err
    ds = open_dataset("t", str(big), DataOptions(resize=True))
    from das_pipeline.data import check_matches_model

    check_matches_model(ds, (3, 16, 16), needs_captions=True)
    assert tuple(ds.load(0, 2).shape) == (2, 3, 16, 16)


def test_missing_caption_is_refused(tmp_path, sd, capsys):
    folder = build_captioned_folder(tmp_path / "nocap", 6, drop_caption=4)
    code = main(["extract", str(write_cfg(tmp_path, sd, train=folder, num_queries=2)), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no 'text' caption for 1 samples" in err and "img_004.png" in err


def test_lora_for_another_architecture_is_refused(tmp_path, sd, capsys):
    code = main(["extract", str(write_cfg(tmp_path, sd, lora="other_lora")), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "[model] lora" in err and "another architecture" in err
    assert not (tmp_path / "sd.zarr").exists()
