"""Content identity of datasets: per-row digests, the dataset digest, and the file-hash cache."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from das_pipeline import digests
from das_pipeline.data import DataError, digits_array, open_dataset

OLD_NS = 1_600_000_000 * 10**9  # an mtime far enough in the past to be cached


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("DAS_CACHE_DIR", str(path))
    return path


@pytest.fixture
def hash_calls(monkeypatch):
    """Paths whose bytes were hashed through the file cache's hashing function, in order."""
    calls = []
    real = digests.sha256_file

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(digests, "sha256_file", counting)
    return calls


def write_pngs(folder, images, mtime_ns=OLD_NS):
    """Uncompressed PNGs (compress_level 0: the file size does not depend on the pixels)."""
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(images):
        path = folder / f"{i:02d}.png"
        Image.fromarray(img).save(path, compress_level=0)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
    return folder


def test_row_digests_are_documented_hashes(tmp_path):
    u8 = digits_array()[:3]
    np.save(tmp_path / "x.npy", u8)
    ds = open_dataset("a", str(tmp_path / "x.npy"))
    assert ds.row_digests == [hashlib.sha256(b"|u1|1,8,8|" + row.tobytes()).hexdigest()
                              for row in u8]
    assert open_dataset("d", "digits[0:3]").row_digests == ds.row_digests
    folder = write_pngs(tmp_path / "imgs", u8[:, 0])
    files = sorted(folder.iterdir())
    assert open_dataset("f", str(folder)).row_digests == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in files]  # what `sha256sum` prints


def test_swapped_same_size_images_change_exactly_their_rows(tmp_path, hash_calls):
    u8 = digits_array()[:4, 0]
    folder = write_pngs(tmp_path / "imgs", u8)
    a, b = folder / "01.png", folder / "02.png"
    assert a.stat().st_size == b.stat().st_size
    before = open_dataset("q", str(folder))
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    hash_calls.clear()
    after = open_dataset("q", str(folder))
    assert sorted(hash_calls) == ["01.png", "02.png"]  # the two rewritten files only
    assert after.uids == before.uids
    changed = [i for i in range(4) if after.row_digests[i] != before.row_digests[i]]
    assert changed == [1, 2]
    assert after.row_digests[1:3] == before.row_digests[2:0:-1]
    assert after.digest != before.digest
    np.testing.assert_allclose(after.load(1, 3)[:, 0].numpy(), u8[[2, 1]] / 127.5 - 1, atol=1e-6)


def test_cache_skips_unchanged_files_and_rehashes_touched_ones(tmp_path, hash_calls):
    u8 = digits_array()[:3, 0]
    folder = write_pngs(tmp_path / "imgs", u8)
    first = open_dataset("q", str(folder))
    assert hash_calls == ["00.png", "01.png", "02.png"]
    hash_calls.clear()
    assert open_dataset("q", str(folder)).digest == first.digest
    assert hash_calls == []  # the second open reads no unchanged file
    os.utime(folder / "00.png", ns=(OLD_NS + 10**9, OLD_NS + 10**9))  # touched: same bytes
    Image.fromarray(255 - u8[2]).save(folder / "02.png", compress_level=0)  # same size, new bytes
    os.utime(folder / "02.png", ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    third = open_dataset("q", str(folder))
    assert hash_calls == ["00.png", "02.png"]
    assert third.row_digests[:2] == first.row_digests[:2]
    assert third.row_digests[2] != first.row_digests[2]


def test_recently_written_files_are_not_cached(tmp_path, hash_calls):
    folder = write_pngs(tmp_path / "imgs", digits_array()[:2, 0], mtime_ns=None)  # mtime: now
    open_dataset("q", str(folder))
    open_dataset("q", str(folder))
    assert hash_calls == ["00.png", "01.png"] * 2


def test_content_changed_under_the_same_size_and_mtime_is_refused_at_load(tmp_path, hash_calls):
    u8 = digits_array()[:2, 0]
    folder = write_pngs(tmp_path / "imgs", u8)
    open_dataset("q", str(folder))
    Image.fromarray(255 - u8[1]).save(folder / "01.png", compress_level=0)
    os.utime(folder / "01.png", ns=(OLD_NS, OLD_NS))  # e.g. `cp -p` or `rsync -t` of other bytes
    stale = open_dataset("q", str(folder))  # the cache cannot tell
    with pytest.raises(DataError, match="01.png changed after the dataset was opened"):
        stale.load(0, 2)
    hash_calls.clear()
    fresh = open_dataset("q", str(folder))  # the load forgot the stale entry
    assert hash_calls == ["01.png"] and fresh.row_digests[1] != stale.row_digests[1]
    np.testing.assert_allclose(fresh.load(1, 2)[0, 0].numpy(), (255 - u8[1]) / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("where", ["a_file", "corrupt", "read_only"])
def test_unusable_cache_falls_back_to_hashing(tmp_path, monkeypatch, hash_calls, where):
    if where == "a_file":
        (tmp_path / "not_a_dir").write_text("")
        monkeypatch.setenv("DAS_CACHE_DIR", str(tmp_path / "not_a_dir" / "cache"))
    elif where == "corrupt":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / digests.CACHE_FILE).write_bytes(b"\x00garbage" * 1000)
        monkeypatch.setenv("DAS_CACHE_DIR", str(tmp_path / "bad"))
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        (tmp_path / "ro").mkdir(mode=0o500)
        monkeypatch.setenv("DAS_CACHE_DIR", str(tmp_path / "ro"))
    monkeypatch.setattr(digests, "_warned", False)
    folder = write_pngs(tmp_path / "imgs", digits_array()[:2, 0])
    with pytest.warns(UserWarning, match="DAS_CACHE_DIR"):
        first = open_dataset("q", str(folder))
    second = open_dataset("q", str(folder))
    assert second.digest == first.digest and hash_calls == ["00.png", "01.png"] * 2
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png"]  # nothing written there


def test_datasets_folder_rows_hash_their_image_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")

    def save(values, where):
        images = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in values]
        ds = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
        ds.save_to_disk(str(tmp_path / where))
        return open_dataset("t", str(tmp_path / where))

    a, b = save([10, 20, 30], "a"), save([10, 99, 30], "b")
    assert len(set(a.row_digests)) == 3
    assert [i for i in range(3) if a.row_digests[i] != b.row_digests[i]] == [1]
    assert a.digest != b.digest and save([10, 20, 30], "c").digest == a.digest


def _check_in_child(paths, queue):
    queue.put([tuple(r) for r in digests.check_files(paths, 1 << 30, "test")])


def test_processes_sharing_the_cache_agree(tmp_path, cache_dir):
    import multiprocessing

    folder = write_pngs(tmp_path / "imgs", np.repeat(digits_array()[:50, 0], 4, axis=0))
    paths = sorted(str(p) for p in folder.iterdir())
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_check_in_child, args=(paths, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == results[0] for r in results) and len(results[0]) == 200
    import sqlite3

    with sqlite3.connect(cache_dir / digests.CACHE_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (200,)
    assert [tuple(r) for r in digests.check_files(paths, 1 << 30, "test")] == results[0]
