"""Headless Chromium for the report's browser test and benchmark (needs the ``dev`` extra:
Playwright drives the system's Chromium, e.g. Debian's ``chromium`` package)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


def find_chromium() -> str | None:
    """The Chromium binary (CROSSDIFF_CHROMIUM, else chromium on PATH), or None."""
    for candidate in (os.environ.get("CROSSDIFF_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextmanager
def chromium(executable: str | None = None) -> Iterator["object"]:
    """A launched headless Chromium (a Playwright Browser), closed on exit."""
    from playwright.sync_api import sync_playwright  # deferred: optional dependency (playwright, in crossdiff[dev])

    executable = executable or find_chromium()
    if executable is None:
        raise RuntimeError("no chromium binary found (apt-get install chromium, or set CROSSDIFF_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
