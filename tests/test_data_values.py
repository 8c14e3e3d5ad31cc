"""Value ranges of float arrays ([data] value_range) and NaN/inf rows (allow_nonfinite)."""

import numpy as np
import pytest
import torch

from das_pipeline.data import DataError, DataOptions, digits_array, open_dataset


@pytest.fixture
def arrays(tmp_path):
    """The same 6 digits as uint8, float [-1, 1], float [0, 1] and float 0..255 arrays."""
    u8 = digits_array()[:6]
    paths = {}
    for name, arr in {"u8": u8, "m11": u8 / 127.5 - 1, "01": u8 / 255.0,
                      "0255": u8.astype(np.float32)}.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr.astype(np.float32) if arr.dtype != np.uint8 else arr)
    return paths


def load(path, **options):
    ds = open_dataset("t", str(path), DataOptions(**options))
    return ds.load(0, len(ds))


def test_float_zero_one_is_refused_under_auto(arrays):
    with pytest.raises(DataError) as err:
        load(arrays["01"])
    text = str(err.value)
    assert "span [0, 1]" in text and "not [-1, 1]" in text
    assert 'value_range = "0,1" (x * 2 - 1)' in text and text.index('"0,1"') < text.index('"-1,1"')


@pytest.mark.parametrize("name, value_range", [("01", "0,1"), ("0255", "0,255"), ("m11", "-1,1"),
                                               ("m11", "auto"), ("u8", "0,1")])
def test_declared_ranges_load_the_same_tensor(arrays, name, value_range):
    reference = load(arrays["u8"])
    torch.testing.assert_close(load(arrays[name], value_range=value_range), reference)


def test_values_outside_the_declared_range_are_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.linspace(0, 2, 64, dtype=np.float32).reshape(1, 1, 8, 8))
    with pytest.raises(DataError, match=r"span \[0, 2\], outside \[data\] value_range = '0,1'"):
        load(tmp_path / "x.npy", value_range="0,1")


def test_range_that_no_setting_maps_says_how_to_rescale(tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 1, 8, 8), -300.0, np.float32))
    with pytest.raises(DataError, match=r"span \[-300, -300\].*rescale the data to \[-1, 1\]"):
        load(tmp_path / "x.npy")


def test_nan_rows_are_refused_by_default_and_recorded_when_allowed(tmp_path):
    x = (digits_array()[:5] / 127.5 - 1).astype(np.float32)
    x[1, 0, 2, 2] = np.nan
    x[3, 0, 0, 0] = np.inf
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"2 rows hold NaN or inf values, e.g. rows \(uids\) "
                                        r"\['1', '3'\]; remove them, or set \[features\] nonfinite "
                                        r"= \"exclude\""):
        open_dataset("t", str(tmp_path / "x.npy"))
    ds = open_dataset("t", str(tmp_path / "x.npy") + "[1:]", DataOptions(allow_nonfinite=True))
    assert ds.uids == ["1", "2", "3", "4"] and ds.nonfinite_rows == [0, 2]
    loaded = ds.load(0, 4)
    assert torch.isnan(loaded[0, 0, 2, 2]) and torch.isinf(loaded[2, 0, 0, 0])
    np.testing.assert_array_equal(loaded[[1, 3]].numpy(), x[[2, 4]])  # loaded as they are
    assert open_dataset("d", "digits[0:4]", DataOptions(allow_nonfinite=True)).nonfinite_rows == []


def test_range_checks_ignore_nonfinite_rows(tmp_path):
    x = (digits_array()[:3] / 255.0).astype(np.float32)
    x[0, 0, 0, 0] = -np.inf
    np.save(tmp_path / "x.npy", x)
    ds = open_dataset("t", str(tmp_path / "x.npy"), DataOptions(value_range="0,1",
                                                                 allow_nonfinite=True))
    np.testing.assert_allclose(ds.load(1, 3).numpy(), x[1:] * 2 - 1, atol=1e-6)
