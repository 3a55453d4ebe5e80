"""Debian's Chromium driven by Playwright, for the browser tests.

Playwright cannot download its own browsers here, so it drives the system's
`chromium` (apt) through `executable_path`. When it cannot start, the tests
skip, except under CI=true, where they fail. Every test keeps a screenshot
and its console log in $VMISHELL_ARTIFACTS/browser (default
test-artifacts/browser in the repository), whatever the outcome.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from labserver import ARTIFACTS, Console, unavailable


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium under Playwright (headless).

    Module-scoped: Playwright's synchronous API keeps an asyncio loop running
    in the main thread until it stops, and later tests (any `asyncio.run`)
    must not find it there.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install playwright)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        unavailable("Debian's chromium is not installed (apt install chromium)")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
            )
        except Exception as exc:  # Playwright's own error types vary by version
            unavailable(f"chromium did not start: {exc}")
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request) -> Iterator[tuple[Any, Console]]:
    """A fresh page; its console is recorded and a screenshot kept whatever the outcome."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    console = Console()
    page.on("console", lambda msg: console.messages.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.messages.append(f"pageerror: {exc}"))
    yield page, console
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    try:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        (ARTIFACTS / f"{name}.console.txt").write_text("\n".join(console.messages))
    finally:
        context.close()
