"""Image files: unreadable and truncated files, and modes other than L/RGB ([data] convert)."""

import io

import numpy as np
import pytest
import tomllib
from PIL import Image

from das_pipeline import data
from das_pipeline.cli import main
from das_pipeline.config import dump_toml, load_config
from das_pipeline.data import DataError, DataOptions, digits_array, open_dataset
from das_pipeline.store import Store


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DAS_CACHE_DIR", str(tmp_path / "cache"))


def digit_folder(folder, n=4):
    folder.mkdir()
    for i, img in enumerate(digits_array()[100:100 + n, 0]):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def with_data(cfg_path, **settings):
    """Add [data] settings to a written config."""
    raw = tomllib.loads(cfg_path.read_text())
    raw["data"].update(settings)
    cfg_path.write_text(dump_toml(raw))
    return cfg_path


def extract(capsys, cfg_path):
    code = main(["extract", str(cfg_path), "--quiet"])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("damage", ["not_an_image", "truncated"])
def test_bad_image_is_refused_before_the_store_is_written(make_config, capsys, tmp_path, damage):
    folder = digit_folder(tmp_path / "q")
    bad = folder / "02.png"
    if damage == "not_an_image":
        bad.write_text("these are not the pixels you are looking for")
    else:
        whole = bad.read_bytes()
        bad.write_bytes(whole[:len(whole) // 2])
        with Image.open(bad) as img:  # the header alone reads fine
            assert img.size == (8, 8)
    code, err = extract(capsys, make_config(queries={"q": str(folder)}))
    assert_one_line_error(code, err, str(bad), "cannot be read",
                          "not an image" if damage == "not_an_image" else "truncated",
                          "replace or re-save it")
    assert not (tmp_path / "store.zarr").exists()


def test_truncated_image_of_a_large_folder_fails_its_unit_and_resumes(make_config, capsys, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(data, "DECODE_UPFRONT_BYTES", 0)  # as if the folder were too big to decode
    folder = digit_folder(tmp_path / "q")
    bad = folder / "02.png"
    whole = bad.read_bytes()
    bad.write_bytes(whole[:len(whole) // 2])
    cfg_path = make_config(train="digits[0:16]", queries={"q": str(folder)})
    code, err = extract(capsys, cfg_path)
    assert_one_line_error(code, err, str(bad), "cannot be decoded", "truncated")
    store = Store.open_existing(load_config(cfg_path).store.path)
    assert store.split("train").done_units().tolist() == [0]
    assert store.split("q").done_units().tolist() == []  # left unmarked
    train_marker = store.split("train").markers().copy()
    code, err = extract(capsys, cfg_path)  # resumes: the same error, the train unit is kept
    assert_one_line_error(code, err, str(bad), "cannot be decoded")
    np.testing.assert_array_equal(store.split("train").markers(), train_marker)


def rgba_and_palette(folder):
    folder.mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = digits_array()[7, 0][..., None] // np.array([1, 2, 3], np.uint8)
    rgba[..., 3] = 255
    rgba[:2, :, 3] = 0  # two transparent rows: composited on white
    Image.fromarray(rgba, "RGBA").save(folder / "a_rgba.png")
    gray = digits_array()[8, 0]
    Image.fromarray(gray).convert("P").save(folder / "b_palette.png")
    return rgba, gray


def test_rgba_and_palette_are_refused_by_default(make_config, capsys, tmp_path):
    rgba_and_palette(tmp_path / "q")
    code, err = extract(capsys, make_config(queries={"q": str(tmp_path / "q")}))
    assert_one_line_error(code, err, "a_rgba.png has mode RGBA", "(and 1 more images)",
                          '[data] convert = "RGB" or "L"')
    assert not (tmp_path / "store.zarr").exists()


def test_convert_composites_alpha_on_white(tmp_path):
    rgba, gray = rgba_and_palette(tmp_path / "q")
    ds = open_dataset("q", str(tmp_path / "q"), DataOptions(convert="RGB"))
    assert ds.sample_shape == (3, 8, 8)
    expected = rgba[..., :3].copy()
    expected[:2] = 255
    x = ds.load(0, 2)
    np.testing.assert_allclose(x[0].numpy(), expected.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(x[1].numpy(), np.stack([gray] * 3) / 127.5 - 1, atol=1e-6)
    ds_l = open_dataset("q", str(tmp_path / "q"), DataOptions(convert="L"))
    luma = np.asarray(Image.fromarray(expected).convert("L"))  # ITU-R 601-2
    np.testing.assert_allclose(ds_l.load(0, 2)[:, 0].numpy(), np.stack([luma, gray]) / 127.5 - 1,
                               atol=1e-6)


def test_convert_through_the_config_runs_extraction(make_config, capsys, tmp_path):
    rgba_and_palette(tmp_path / "q")
    cfg_path = with_data(make_config(train="digits[0:16]", queries={"q": str(tmp_path / "q")}),
                         convert="L")
    code, err = extract(capsys, cfg_path)
    assert code == 0, err
    with_data(cfg_path, convert="RGB")  # the model takes 1 channel
    code, err = extract(capsys, cfg_path)
    assert_one_line_error(code, err, "3 channels but the model takes 1")


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    wide = (digits_array()[3, 0].astype(np.uint16) * 257)
    (folder / "a.png").write_bytes(png_bytes(Image.fromarray(wide)))
    with pytest.raises(DataError, match=r"a.png has mode I;16; set \[data\] convert"):
        open_dataset("q", str(folder))
    x = open_dataset("q", str(folder), DataOptions(convert="L")).load(0, 1)
    np.testing.assert_allclose(x[0, 0].numpy(), digits_array()[3, 0] / 127.5 - 1, atol=1e-6)


def test_mixed_l_and_rgb_name_both_files(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "b.png")
    with pytest.raises(DataError, match=r"mix modes L and RGB .*a.png and .*b.png.*convert"):
        open_dataset("q", str(folder))
    assert open_dataset("q", str(folder), DataOptions(convert="L")).sample_shape == (1, 8, 8)


@pytest.mark.parametrize("key, value, words", [
    ("convert", "RGBA", ['[data] convert = \'RGBA\'', '"RGB" or "L"']),
    ("value_range", "0-1", ["[data] value_range = '0-1'", '"0,1"']),
])
def test_bad_data_settings_are_refused(make_config, capsys, key, value, words):
    code, err = extract(capsys, with_data(make_config(), **{key: value}))
    assert_one_line_error(code, err, *words)
