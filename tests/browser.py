"""Headless Chromium for tests: load an HTML file the way a reader's browser would and report
what it rendered.

The report marks each ``<img>`` after the page's ``load`` event (``data-state`` = loaded/broken,
``data-natural-width``; scope_ray/report/document.py); ``--dump-dom`` prints the DOM after load,
so the marks prove every embedded figure decoded. Network is switched off as far as flags allow
(no QUIC, no background or component traffic), and each run gets a fresh profile directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_or_skip() -> str:
    """Path of the chromium binary; skips the test without one, fails it on CI (CI must run it)."""
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (Debian package `chromium`; `make test` installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run the browser check")
    pytest.skip(reason)


@dataclass
class RenderedPage:
    images: list[dict] = field(default_factory=list)  # each <img>'s attributes after load
    body: dict = field(default_factory=dict)  # <body> attributes after load
    dom: str = ""

    @property
    def broken(self) -> list[dict]:
        """Images that did not decode, or were never marked (the page's script did not run)."""
        return [img for img in self.images
                if img.get("data-state") != "loaded" or int(img.get("data-natural-width") or 0) <= 0]


class _Collect(HTMLParser):
    def __init__(self, page: RenderedPage):
        super().__init__()
        self.page = page

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.page.images.append(dict(attrs))
        elif tag == "body":
            self.page.body = dict(attrs)


def render(html_file: str | Path, chromium: str) -> RenderedPage:
    """Load ``html_file`` (a path, or a ``file:`` URI, which may carry a ``#fragment``) in headless
    Chromium and parse the DOM it holds after ``load``."""
    uri = html_file if str(html_file).startswith("file:") else Path(html_file).absolute().as_uri()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", uri],
            capture_output=True, text=True, check=False,
        )
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    page = RenderedPage(dom=proc.stdout)
    _Collect(page).feed(proc.stdout)
    return page
