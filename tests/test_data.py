"""Dataset sources: arrays, image folders, digits, row ranges, uids and value ranges."""

import numpy as np
import pytest
import torch
from PIL import Image

from das_pipeline.data import DataError, digits_array, digits_labels, open_dataset


def test_digits_rows_and_uids():
    ds = open_dataset("train", "digits[10:14]")
    assert ds.uids == ["10", "11", "12", "13"] and ds.sample_shape == (1, 8, 8)
    x = ds.load(0, 4)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(x.numpy(), digits_array()[10:14] / 127.5 - 1, atol=1e-6)


def test_digits_read_without_sklearn_equal_load_digits():
    """The shipped csv read directly == scikit-learn's load_digits (images and labels)."""
    from sklearn.datasets import load_digits

    ref = load_digits()
    expected = np.round(ref.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    np.testing.assert_array_equal(digits_array(), expected)
    np.testing.assert_array_equal(digits_labels(), ref.target)


def test_scheduler_built_directly_equals_from_pretrained(tmp_path):
    """models._build_scheduler keeps every key of scheduler_config.json, as from_pretrained does."""
    import json

    import diffusers

    from das_pipeline.models import _build_scheduler

    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler, diffusers.PNDMScheduler):
        folder = tmp_path / cls.__name__
        cls(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2").save_pretrained(folder)
        cfg = json.loads((folder / "scheduler_config.json").read_text())
        cfg.update({"skip_prk_steps": True, "steps_offset": 1, "an_unknown_key": 3})
        (folder / "scheduler_config.json").write_text(json.dumps(cfg))
        ref, ours = cls.from_pretrained(folder), _build_scheduler(cls, cfg)
        assert type(ours) is cls and dict(ours.config) == dict(ref.config)
        torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)


def test_uint8_and_float_arrays_agree(tmp_path):
    u8 = digits_array()[:5]
    np.save(tmp_path / "u8.npy", u8)
    np.savez(tmp_path / "f.npz", images=(u8 / 127.5 - 1).astype(np.float32))
    a = open_dataset("a", str(tmp_path / "u8.npy")).load(0, 5)
    b = open_dataset("b", str(tmp_path / "f.npz")).load(0, 5)
    torch.testing.assert_close(a, b)
    assert open_dataset("c", str(tmp_path / "u8.npy") + "[3:]").uids == ["3", "4"]


def test_image_folder_in_sorted_file_name_order(tmp_path):
    u8 = digits_array()[:3, 0]
    for name, img in zip(["b.png", "c.png", "a.png"], u8, strict=True):
        Image.fromarray(img).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = open_dataset("q", str(tmp_path))
    assert ds.uids == ["a.png", "b.png", "c.png"]
    x = ds.load(0, 3)
    np.testing.assert_allclose(x[:, 0].numpy(), u8[[2, 0, 1]] / 127.5 - 1, atol=1e-6)


def test_mixed_image_sizes_are_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="differ in size .* set \\[data\\] resize = true"):
        open_dataset("q", str(tmp_path))


def test_digest_changes_with_content(tmp_path):
    u8 = digits_array()[:4]
    np.save(tmp_path / "x.npy", u8)
    first = open_dataset("a", str(tmp_path / "x.npy")).digest
    u8[2, 0, 3, 3] ^= 1
    np.save(tmp_path / "x.npy", u8)
    assert open_dataset("a", str(tmp_path / "x.npy")).digest != first


def test_datasets_folder_with_captions_and_ids(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"img": images, "caption": [f"c{i}" for i in range(4)],
                                     "key": [f"k{i}" for i in range(4)]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    from das_pipeline.data import DataOptions

    opened = open_dataset("t", str(tmp_path / "hf") + "[1:3]",
                          DataOptions(caption_column="caption", image_column="img", id_column="key"))
    assert opened.uids == ["k1", "k2"] and opened.captions == ["c1", "c2"]
    assert opened.sample_shape == (3, 8, 8)
    x = opened.load(0, 2)
    np.testing.assert_allclose(x[:, 0, 0, 0].numpy(), [10 / 127.5 - 1, 20 / 127.5 - 1], atol=1e-6)
    with pytest.raises(DataError, match="image_column = 'image' is not a column"):
        open_dataset("t", str(tmp_path / "hf"))
