"""Headless chromium for the browser tests (Debian's `chromium`; no selenium), and a DOM counter."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu"]


def chromium() -> str:
    """The chromium binary, or skip the test with the reason."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return exe


def dump_dom(url: str) -> str:
    done = subprocess.run([chromium(), *FLAGS, "--dump-dom", url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot_colours(url: str, path, size="1200,800") -> int:
    """Distinct colours of a screenshot of ``url`` (a blank page has one or two)."""
    from PIL import Image

    done = subprocess.run([chromium(), *FLAGS, f"--screenshot={path}", f"--window-size={size}",
                           url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))


class Rows(HTMLParser):
    """Per ``tr.query`` row: {method: (proponent <img> count, opponent <img> count, scores)}."""

    def __init__(self, html: str):
        super().__init__()
        self.rows, self._method, self._div, self._score = [], None, None, False
        self.srcs = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "query":
            self.rows.append({})
        elif tag == "td":
            self._method = a.get("data-method")
            if self._method:
                self.rows[-1][self._method] = [0, 0, []]
        elif tag == "div" and a.get("class") in ("pro", "opp"):
            self._div = a["class"]
        elif tag == "img":
            self.srcs.append(a.get("src", ""))
            if self._method and self._div:
                self.rows[-1][self._method][0 if self._div == "pro" else 1] += 1
        elif tag == "span" and a.get("class") == "score":
            self._score = True

    def handle_endtag(self, tag):
        if tag == "td":
            self._method, self._div = None, None

    def handle_data(self, data):
        if self._score and self._method and self._div == "pro":
            self.rows[-1][self._method][2].append(float(data))
        self._score = False
