"""The dashboard's browser: Debian's chromium (/usr/bin/chromium, which `make test` installs through
scripts/ensure-browser when it can), driven by Playwright's Python package. Playwright's own browser
download is never used. Where no browser can be had, these tests skip with one line saying so."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SWITCHYARD_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Screenshots land here (build/ is gitignored); the README's two are copied from them into docs/.
SCREENSHOTS = Path(os.environ.get("SWITCHYARD_SCREENSHOTS", Path(__file__).parents[2] / "build" / "screenshots"))


def browser_missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return (f"no browser at {CHROMIUM}: scripts/ensure-browser (run by `make test`) installs Debian's chromium "
                f"as root with apt-get")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One browser for the module, on a fresh profile (--user-data-dir), 1280x800."""
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 800})
        context.set_default_timeout(20_000)
        try:
            yield context
        finally:
            context.close()
