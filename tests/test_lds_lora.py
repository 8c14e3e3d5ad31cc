"""LDS for a LoRA fine-tune of a text-conditioned latent model: `das lds train` fine-tunes a fresh
adapter per subset from the frozen base, `das lds truth` measures base + adapter with captions."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from das_pipeline.cli import main
from das_pipeline.config import dump_toml
from das_pipeline.data import open_dataset
from das_pipeline.eval.lds import load_subsets, load_truth
from das_pipeline.features import content_keys, keyed_noise, timestep_grid
from das_pipeline.lora_recipe import adapter_layout, encode_rows, train_lora
from das_pipeline.models import attributed_params, encode_captions, encode_images, load_model
from helpers import example_config
from tiny_sd import build_captioned_folder, build_lora, build_pipeline

# The configured adapter (tiny_sd.build_lora): rank 4, alpha 4 on the attention projections.
RECIPE = {"lora_rank": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
          "steps": 6, "batch_size": 4, "lr": 1e-2}
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Base pipeline, its configured adapter, 12 captioned train images, 5 captioned queries, a
    config at the example's settings, 2 subsets, and the subsets' fine-tunes (trained once)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd_lds")
    pipe = build_pipeline(root)
    lora = build_lora(UNet2DConditionModel.from_pretrained(pipe / "unet"), root / "lora")
    train = build_captioned_folder(root / "train", 12, seed=0)
    val = build_captioned_folder(root / "val", 5, seed=3)
    cfg = example_config(root / "sd.toml", "sd_lora", model=str(pipe), train=str(train),
                         queries={"val": str(val)}, timesteps=2, batch_size=4, dim=32,
                         store=str(root / "sd.zarr"), drop=[("data", "center_crop")])
    raw = tomllib.loads(cfg.read_text())
    raw["data"]["resize"] = False
    raw["model"]["lora"] = str(lora)
    cfg.write_text(dump_toml(raw))
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    subsets, models = root / "subsets.npz", root / "models"
    assert main(["lds", "subsets", str(cfg), "--num", "2", "--seed-per-subset", "--out",
                 str(subsets), "--quiet"]) == 0
    assert main(["lds", "train", str(cfg), "--subsets", str(subsets), "--out", str(models),
                 "--recipe", str(recipe), "--quiet"]) == 0
    return {"root": root, "pipe": pipe, "lora": lora, "train": train, "val": val, "cfg": cfg,
            "recipe": recipe, "subsets": subsets, "models": models}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / WEIGHTS)


def test_subsets_are_fresh_adapters_of_the_configured_shape_and_deterministic(sd, capsys):
    subsets = load_subsets(sd["subsets"])
    configured = load_model(sd["pipe"], sd["lora"])
    adapters = [sd["models"] / f"{m:04d}" / "lora" for m in range(2)]
    for folder in adapters:
        model = load_model(sd["pipe"], folder)  # what `[model] lora = folder` loads
        assert adapter_layout(model.unet) == adapter_layout(configured.unet)
        assert attributed_params(model) == attributed_params(configured)
        assert json.loads((folder / "das_recipe.json").read_text()) == RECIPE
    w0, w1 = _weights(adapters[0]), _weights(adapters[1])
    assert sorted(w0) == sorted(w1) == sorted(_weights(Path(sd["lora"]).parent))
    diff = max(float((w0[k] - w1[k]).abs().max()) for k in w0)
    assert diff > 1e-4, f"subsets 0 and 1 gave adapters within {diff:.1e} of each other"
    # Trained: the up-projections started at zero (peft's init) and moved.
    assert all(float(w0[k].abs().max()) > 0 for k in w0 if ".lora.up." in k)
    # Adapter m is the recipe on subset m's rows and seed: an in-process fine-tune agrees exactly.
    model = load_model(sd["pipe"])
    ds = open_dataset("train", str(sd["train"]))
    rows = np.flatnonzero(subsets.mask_MN[1]).tolist()
    from das_pipeline.dist import torch_threads

    with torch_threads(1):  # `das lds train` trains at --threads (default 1): same reduction order
        latents, text = encode_rows(model, ds, rows)
        train_lora(model, latents, text, RECIPE, int(subsets.seeds_M[1]))
    from das_pipeline.lora_recipe import save_lora

    save_lora(model.unet, sd["root"] / "direct")
    direct = _weights(sd["root"] / "direct")
    assert all(torch.equal(direct[k], w1[k]) for k in w1)
    # Retraining the same subsets elsewhere gives byte-identical files; rerunning skips both.
    again = sd["root"] / "again"
    assert main(["lds", "train", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--out", str(again),
                 "--recipe", str(sd["recipe"]), "--quiet"]) == 0
    for m in range(2):
        assert (again / f"{m:04d}" / "lora" / WEIGHTS).read_bytes() == \
            (adapters[m] / WEIGHTS).read_bytes(), f"subset {m} retrained to other bytes"
    capsys.readouterr()
    assert main(["lds", "train", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--out",
                 str(sd["models"]), "--recipe", str(sd["recipe"]), "--quiet"]) == 0
    assert "0 trained, 2 already done" in capsys.readouterr().out


def test_truth_is_base_plus_each_adapter_with_the_query_caption(sd):
    out = sd["root"] / "truth"
    assert main(["lds", "truth", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--models",
                 str(sd["models"]), "--out", str(out), "--timesteps", "4", "--quiet"]) == 0
    F, uids, rows = load_truth(out / "val.npz")
    assert F.shape == (2, 5) and rows.tolist() == [0, 1] and len(uids) == 5
    # Slow twin: subset 1's fine-tune on query 3, one timestep at a time, noise keyed by the
    # query's pixels and caption (seed 1, the truth's default), the caption's embedding as the
    # condition.
    ds = open_dataset("val", str(sd["val"]))
    q, x = 3, ds.load(3, 4)
    key = content_keys(x, [ds.captions[q]])

    def loss(model):
        z0, text = encode_images(model, x), encode_captions(model, [ds.captions[q]])
        values = []
        for t in timestep_grid(model.num_train_timesteps, 4).tolist():
            eps = keyed_noise(1, key, torch.tensor([t]), torch.tensor([0]), tuple(z0.shape[1:]))[:, 0]
            zt = model.scheduler.add_noise(z0, eps, torch.tensor([t]))
            with torch.no_grad():
                pred = model.unet(zt, torch.tensor([t]), encoder_hidden_states=text).sample
            values.append(float((pred - eps).pow(2).mean()))
        return float(np.mean(values))

    direct = loss(load_model(sd["pipe"], sd["models"] / "0001" / "lora"))
    assert F[1, q] == pytest.approx(direct, rel=1e-5)
    base = loss(load_model(sd["pipe"]))
    assert abs(base - direct) > 1e-4 * direct, "the truth did not see the adapter"
    assert not np.allclose(F[0], F[1], rtol=1e-6), "both subsets gave the same truth"


def test_recipe_that_does_not_fit_the_adapter_is_refused(sd, capsys):
    for change, words in [({"lora_rank": 8}, ["lora_rank = 8", "lora_rank = 4"]),
                          ({"lora_alpha": 2}, ["lora_alpha = 2", "lora_alpha = 4"]),
                          ({"target_modules": ["to_q", "to_k"]},
                           ["target_modules = ['to_q', 'to_k']", "also adapts"])]:
        path = sd["root"] / "bad.json"
        path.write_text(json.dumps({**RECIPE, **change}))
        out = sd["root"] / "bad_models"
        code = main(["lds", "train", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--out",
                     str(out), "--recipe", str(path), "--quiet"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]
        assert code == 2 and len(errors) == 1 and errors[0].startswith("das lds: error: "), err
        assert all(w in err for w in words), err
        assert not out.exists()
    pixel = sd["root"] / "pixel.json"
    pixel.write_text(json.dumps({"widths": [8, 16], "attention": False, "num_train_timesteps": 50,
                                 "steps": 3, "batch_size": 8, "lr": 1e-3}))
    code = main(["lds", "train", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--out",
                 str(sd["root"] / "bad_models"), "--recipe", str(pixel), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pixel DDPM recipe" in err and "[model] lora" in err
    # Finished adapters made with another recipe are refused, not mixed.
    other = sd["root"] / "other.json"
    other.write_text(json.dumps({**RECIPE, "steps": 7}))
    code = main(["lds", "train", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--out",
                 str(sd["models"]), "--recipe", str(other), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "another subset, seed or recipe (or base model)" in err


def test_lora_recipe_on_a_pixel_config_is_refused(tmp_path, make_config, capsys):
    cfg = make_config()
    recipe = tmp_path / "lora.json"
    recipe.write_text(json.dumps(RECIPE))
    assert main(["lds", "subsets", str(cfg), "--num", "2", "--out", str(tmp_path / "s.npz"),
                 "--quiet"]) == 0
    code = main(["lds", "train", str(cfg), "--subsets", str(tmp_path / "s.npz"), "--out",
                 str(tmp_path / "m"), "--recipe", str(recipe), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "is a LoRA recipe but the config has no [model] lora" in err


def test_own_command_writes_adapters_that_the_truth_loads(sd):
    lora = Path(sd["lora"])
    cmd = (f"test -f {{subset_file}} && test -f {{base_model}}/model_index.json && "
           f"mkdir -p {{output_dir}} && cp {shlex.quote(str(lora))} {{output_dir}}/")
    models = sd["root"] / "cmd_models"
    assert main(["lds", "train", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--out",
                 str(models), "--command", cmd, "--quiet"]) == 0
    assert (models / "0001" / "subset.json").is_file()
    out = sd["root"] / "cmd_truth"
    assert main(["lds", "truth", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--models",
                 str(models), "--out", str(out), "--timesteps", "2", "--quiet"]) == 0
    F, _, _ = load_truth(out / "val.npz")
    np.testing.assert_array_equal(F[0], F[1])  # both subsets got the configured adapter
    bad = sd["root"] / "cmd_bad"
    assert main(["lds", "train", str(sd["cfg"]), "--subsets", str(sd["subsets"]), "--out", str(bad),
                 "--command", "mkdir -p {output_dir} && echo {subset_file}", "--quiet"]) == 2
