"""`das serve` through a real uvicorn server on a free port: uploads give the JSON of
`das attribute --json`, bad uploads a 4xx with a message, concurrent requests equal answers, and
the store is only read."""

import io
import json
import os
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from browser import dump_dom, screenshot_colours
from PIL import Image

from das_pipeline.cli import main
from das_pipeline.config import load_config
from das_pipeline.data import digits_array
from das_pipeline.digests import CACHE_FILE
from das_pipeline.serve import MAX_UPLOAD_BYTES, build_app
from helpers import write_config


def png_bytes(row=300, size=None) -> bytes:
    img = Image.fromarray(digits_array()[row, 0])
    buf = io.BytesIO()
    (img.resize(size) if size else img).save(buf, format="PNG")
    return buf.getvalue()


def post(url, fields: dict, files: dict, timeout=120, parse=json.loads):
    """(status, parsed body) of a multipart POST built by hand (files: name -> (filename, bytes))."""
    boundary = "das-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for k, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename='
                     f'"{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                     + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, parse(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def snapshot(folder):
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """(base URL, config path) of a uvicorn server of a scored tiny run."""
    import uvicorn

    root = tmp_path_factory.mktemp("serve")
    old_cache = os.environ.get("DAS_CACHE_DIR")
    os.environ["DAS_CACHE_DIR"] = str(root / "file-cache")  # uploads must leave nothing there
    cfg_path = write_config(root / "cfg.toml", tiny_model_dir, store=root / "store.zarr")
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(load_config(cfg_path)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", cfg_path
    server.should_exit = True
    thread.join(timeout=30)
    if old_cache is None:
        del os.environ["DAS_CACHE_DIR"]
    else:
        os.environ["DAS_CACHE_DIR"] = old_cache


def test_api_answers_like_attribute_json_and_concurrently(server, tmp_path, capsys):
    url, cfg_path = server
    cfg = load_config(cfg_path)
    image = tmp_path / "digit300.png"
    image.write_bytes(png_bytes())
    capsys.readouterr()
    assert main(["attribute", str(cfg_path), str(image), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    store_before = snapshot(cfg.store.path)
    outside = {p for p in cfg_path.parent.rglob("*") if cfg.reports_dir not in p.parents}
    status, got = post(url + "/api/attribute", {}, {"image": ("digit300.png", png_bytes())})
    assert status == 200 and got == expected
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(url + "/api/attribute", {},
                                               {"image": ("digit300.png", png_bytes())}), range(4)))
    assert all(a == (200, expected) for a in answers)
    assert snapshot(cfg.store.path) == store_before  # serve only reads the store
    assert {p for p in cfg_path.parent.rglob("*") if cfg.reports_dir not in p.parents} == outside
    assert not [p for p in (cfg.reports_dir / "attribute").iterdir() if p.is_dir()]
    with sqlite3.connect(cfg_path.parent / "file-cache" / CACHE_FILE) as db:  # the model's files
        cached = [p for (p,) in db.execute("SELECT path FROM files")]
    assert cached and not [p for p in cached if "upload-" in p]  # no upload entered the cache


def test_bad_uploads_get_4xx_with_a_message(server):
    url, _ = server
    status, got = post(url + "/api/attribute", {}, {"image": ("notes.png", b"not an image")})
    assert status == 415 and "is not a PNG or JPEG file" in got["error"]
    status, got = post(url + "/api/attribute", {}, {"image": ("big.png", png_bytes(size=(16, 16)))})
    assert status == 422 and "16x16 images but the model takes 8x8" in got["error"]
    status, got = post(url + "/api/attribute", {"prompt": "x"}, {})
    assert status == 400 and "'image'" in got["error"]
    status, got = post(url + "/api/attribute", {}, {"image": ("../../evil.png",
                                                              b"\x89PNG" + b"0" * (MAX_UPLOAD_BYTES + 1))})
    assert status == 413 and "over the limit" in got["error"]


def test_form_upload_shows_a_page_of_the_answer(server):
    from browser import Rows

    url, cfg_path = server
    status, html = post(url + "/attribute", {}, {"image": ("digit301.png", png_bytes(301))},
                        parse=bytes.decode)
    rows = Rows(html).rows
    assert status == 200 and len(rows) == 1
    assert all(rows[0][m][0] == load_config(cfg_path).score.topk for m in ("trak", "dtrak", "das"))


def test_chromium_renders_the_served_page(server, tmp_path):
    url, _ = server
    dom = dump_dom(url + "/")
    assert "type=\"file\"" in dom and "name=\"image\"" in dom and "page-001.html" in dom
    assert screenshot_colours(url + "/reports/val/page-001.html", tmp_path / "served.png") > 16
