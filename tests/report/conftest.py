"""Fixtures for the report/preview tests: real jobs over tiny models (one module-scoped set, shared by every
test), runtime metrics written in the documented format, and headless Chromium (Debian's package) to render
the pages.

Screenshots go to tests/artifacts/ (gitignored): one per page the tests render.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("SHARDWISE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright driving Debian's chromium; Playwright's own browsers are not used)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: these tests render the pages in headless Chromium. Install it with "
            "`apt-get install -y chromium` (.ci/run does), or point SHARDWISE_CHROMIUM at a Chromium binary"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Rendered:
    """A page opened from a file, with the console errors and page errors it raised."""

    def __init__(self, page: Any, errors: list[str]) -> None:
        self.page = page
        self.errors = errors


@pytest.fixture
def render(browser) -> Iterator[Any]:
    """render(html_file, screenshot_name) → Rendered; the screenshot lands in tests/artifacts/."""
    pages: list[Any] = []

    def _render(path: Path, shot: str) -> Rendered:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        pages.append(page)
        errors: list[str] = []
        page.on(
            "console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        # Anything the page asks the network for is a bug (the pages are self-contained): fail it loudly.
        page.route(
            "**/*",
            lambda route: (
                route.continue_()
                if route.request.url.startswith(("file:", "data:"))
                else (errors.append(f"network request: {route.request.url}"), route.abort())
            ),
        )
        page.goto(path.resolve().as_uri(), wait_until="load")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
        return Rendered(page, errors)

    yield _render
    for page in pages:
        page.close()


def copy_output(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
