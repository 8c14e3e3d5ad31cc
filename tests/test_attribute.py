"""`das attribute`: new images give the top-k `das score` gives them in a query set."""

import json

import numpy as np
import pytest
from PIL import Image

from das_pipeline.cli import main
from das_pipeline.config import load_config
from das_pipeline.data import digits_array
from das_pipeline.report import read_topk_csv


def write_pngs(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    for i in rows:
        Image.fromarray(digits_array()[i, 0]).save(folder / f"digit{i}.png")
    return sorted(folder.glob("*.png"))


def test_attribute_equals_score_of_the_same_images_in_a_query_set(make_config, tmp_path, capsys):
    pngs = write_pngs(tmp_path / "queries", (300, 301, 302))
    cfg_path = make_config(queries={"new": tmp_path / "queries"})
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    cfg = load_config(cfg_path)
    capsys.readouterr()
    assert main(["attribute", str(cfg_path), *map(str, pngs), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [q["image"] for q in got["queries"]] == [p.name for p in pngs]
    for m in cfg.score.methods:
        vals, rows = read_topk_csv(cfg.reports_dir / "new" / f"{m}_topk.csv", len(pngs))
        for q, query in enumerate(got["queries"]):
            entries = query["methods"][m]
            assert [e["rank"] for e in entries] == list(range(1, cfg.score.topk + 1))
            assert [e["train_row"] for e in entries] == rows[q].tolist(), (m, q)
            assert [e["train_uid"] for e in entries] == [str(r) for r in rows[q]]
            np.testing.assert_allclose([e["score"] for e in entries], vals[q], rtol=1e-6,
                                       err_msg=f"{m} query {q}: attribute vs score, rel 1e-6")
    pages = list((cfg.reports_dir / "attribute").glob("*.html"))
    assert len(pages) == 1 and pages[0].with_suffix(".png").is_file()
    assert not [p for p in (cfg.reports_dir / "attribute").iterdir() if p.is_dir()]  # temp gone


def test_attribute_refuses_wrong_size_and_non_images_by_name(make_config, tmp_path, capsys):
    cfg_path = make_config()
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    big = tmp_path / "big.png"
    Image.new("L", (16, 16)).save(big)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    capsys.readouterr()
    assert main(["attribute", str(cfg_path), str(big), "--json"]) == 2
    err = capsys.readouterr().err
    assert "16x16 images but the model takes 8x8" in err and "upload-" not in err
    assert main(["attribute", str(cfg_path), str(text)]) == 2
    assert "'notes.png' is not a PNG or JPEG file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attribute", str(cfg_path)])  # an image is required


def test_text_conditioned_attribute_takes_the_prompt_and_equals_score(tmp_path, capsys):
    """Tiny Stable Diffusion + LoRA: an image with its prompt gives the top-k of `das score`;
    without a prompt it is refused; the report shows the captions."""
    import tomllib

    from das_pipeline.config import dump_toml
    from helpers import example_config
    from tiny_sd import build_captioned_folder, build_lora, build_pipeline

    pipe = build_pipeline(tmp_path / "sd")
    from diffusers import UNet2DConditionModel

    lora = build_lora(UNet2DConditionModel.from_pretrained(pipe / "unet"), tmp_path / "lora")
    images = build_captioned_folder(tmp_path / "images", 16)
    cfg_path = example_config(tmp_path / "sd.toml", "sd_lora", model=str(pipe), train=str(images),
                              queries={"self": f"{images}[0:2]"}, timesteps=2, batch_size=8,
                              dim=32, store=str(tmp_path / "sd.zarr"), rows_per_unit=8, topk=3,
                              drop=[("data", "center_crop"), ("features", "vmap_chunk_size")])
    raw = tomllib.loads(cfg_path.read_text())
    raw["data"]["resize"], raw["model"]["lora"] = False, str(lora)
    cfg_path.write_text(dump_toml(raw))
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    cfg = load_config(cfg_path)
    captions = [json.loads(line)["text"] for line in
                (images / "metadata.jsonl").read_text().splitlines()]
    page = (cfg.reports_dir / "self" / "page-001.html").read_text()
    assert all(c in page for c in captions[:2])
    capsys.readouterr()
    assert main(["attribute", str(cfg_path), str(images / "img_000.png")]) == 2
    assert "text-conditioned" in capsys.readouterr().err
    for q in range(2):
        assert main(["attribute", str(cfg_path), str(images / f"img_{q:03d}.png"), "--prompt",
                     captions[q], "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["queries"][0]["methods"]
        for m in cfg.score.methods:
            vals, rows = read_topk_csv(cfg.reports_dir / "self" / f"{m}_topk.csv", 2)
            assert [e["train_row"] for e in got[m]] == rows[q].tolist(), (m, q)
            # 1e-5 of the query's largest score, not 1e-6: the query set's VAE and text encoder
            # ran on a batch of 2, this one on a batch of 1, and float32 convolutions round
            # differently per batch (measured 2e-6 of the top score; up to 1.6e-5 of a smaller one)
            scale = float(np.abs(vals[q]).max())
            np.testing.assert_allclose([e["score"] for e in got[m]], vals[q], rtol=1e-5,
                                       atol=1e-5 * scale,
                                       err_msg=f"{m} query {q}: attribute vs score, 1e-5 of the top")
