"""End to end: the search page in Debian's Chromium (headless, through Playwright), against a server
on a free loopback port over a tiny index.

Needs the `playwright` Python package (its bundled driver only: no browser download) and
`/usr/bin/chromium` (`apt-get install -y chromium`). When either is missing and we are root, the test
installs it (set LEXVLA_E2E_NO_INSTALL=1 to forbid that); it skips, saying why, only when that fails.
Screenshots go to $LEXVLA_E2E_SCREENSHOTS, or to the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.search import build_tiny_index

CHROMIUM = Path(os.environ.get("LEXVLA_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000


def _install(command: list[str], what: str) -> str | None:
    """Run an install command; None on success, else why it failed."""
    if os.environ.get("LEXVLA_E2E_NO_INSTALL") == "1":
        return f"{what} is missing and LEXVLA_E2E_NO_INSTALL=1 forbids installing it"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"installing {what} failed: {err}"
    return None if done.returncode == 0 else f"installing {what} failed: {done.stderr[-500:]}"


def _ensure_browser() -> None:
    """Make sure playwright and chromium are there (installing them if we may), else skip."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = _install([sys.executable, "-m", "pip", "install", "-q", "playwright"], "playwright")
        if why:
            pytest.skip(f"{why}; install it with `pip install playwright`")
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(
                f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
            if done.returncode != 0:
                pytest.skip(f"cannot install chromium ({' '.join(command)}): {done.stderr[-300:]}")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The app on a free 127.0.0.1 port (uvicorn in a thread); yields (url, engine)."""
    import uvicorn

    from lexvla.search import SearchEngine
    from lexvla.serve.app import create_app

    _, index = build_tiny_index(tiny_model, tmp_path_factory.mktemp("e2e"))
    engine = SearchEngine.open(index, tiny_model)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no race for the port
    config = uvicorn.Config(create_app(engine, timeout=30), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.fixture(scope="module")
def page():
    _ensure_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.errors = []  # type: ignore[attr-defined]
        page.on("pageerror", lambda err: page.errors.append(str(err)))
        page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("LEXVLA_E2E_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _scores(page) -> list[str]:
    return page.locator("[data-testid=result]").evaluate_all(
        "cards => cards.map(c => c.dataset.doc + ':' + c.querySelector('.score').textContent)"
    )


def test_search_explain_steer_upload(server, page, shots):
    url, engine = server
    page.goto(url)
    page.wait_for_function("document.getElementById('info').textContent.includes('10 images')")

    # Search by text: results with the words that made each match.
    page.fill("#q", "a dog on the grass")
    page.press("#q", "Enter")
    cards = page.locator("[data-testid=result]")
    cards.first.wait_for()
    assert cards.count() == 10
    assert cards.first.locator(".tag").count() > 0
    assert page.locator("#query-words .chip").count() > 0
    page.screenshot(path=str(shots / "1-results.png"), full_page=True)

    # Click a result: its explanation, word cloud and heatmap.
    cards.first.click()
    page.locator("[data-testid=contribution]").first.wait_for()
    page.wait_for_function(
        "/patches|patch/.test(document.getElementById('heatmap-caption').textContent)"
    )
    assert page.locator("#doc-cloud span").count() > 10
    assert "score" in page.inner_text("#detail-score")
    page.screenshot(path=str(shots / "2-explanation.png"), full_page=True)
    word = page.locator("[data-testid=contribution]").first.get_attribute("data-word")
    page.locator("[data-testid=contribution]").first.click()  # that word's patches only
    page.wait_for_function(
        f"document.getElementById('heatmap-caption').textContent.includes('“{word}”')"
    )
    page.set_viewport_size({"width": 1360, "height": 1600})  # the whole panel, unscrolled
    page.locator("#detail").screenshot(path=str(shots / "2b-detail.png"))
    page.set_viewport_size({"width": 1360, "height": 900})

    # Steer: drop the word that adds most to the best match, and search again: the results change.
    before = _scores(page)
    dropped = cards.first.locator(".tag").first.inner_text()
    if page.locator("#more-words").is_visible():
        page.click("#more-words")  # show every query word
    page.locator(f'#query-words .chip[data-word="{dropped}"] [data-action=remove]').click()
    assert page.locator(f'#query-words .chip[data-word="{dropped}"]').count() == 0
    page.click("#research")
    page.wait_for_function(
        """before => JSON.stringify([...document.querySelectorAll('[data-testid=result]')]
           .map(c => c.dataset.doc + ':' + c.querySelector('.score').textContent))
           !== JSON.stringify(before)""",
        arg=before,
    )
    assert dropped not in page.locator("[data-testid=result] .tag").all_inner_texts()

    # Add a vocabulary word to the query.
    page.fill("#add-word", "dog")
    page.press("#add-word", "Enter")
    page.locator('#query-words .chip[data-word="dog"]').wait_for()

    # Search by an uploaded image: that image comes first.
    path = engine.document(3)["path"]
    page.set_input_files("#query-image", path)
    page.wait_for_function(
        "document.getElementById('query-source').textContent.startsWith('image:')"
    )
    page.wait_for_function("document.querySelector('[data-testid=result]').dataset.doc === '3'")

    # Look inside an uploaded image: image words and per-patch words.
    page.click(".tab[data-tab=inspect]")
    page.set_input_files("#inspect-image", path)
    page.locator("#image-cloud span").first.wait_for()
    page.hover("#inspect-grid")
    page.wait_for_function(
        "document.getElementById('patch-words').textContent.startsWith('Patch row')"
    )
    page.screenshot(path=str(shots / "3-inspect.png"), full_page=True)

    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    for name in ("1-results.png", "2-explanation.png", "2b-detail.png", "3-inspect.png"):
        assert (shots / name).stat().st_size > 10_000
