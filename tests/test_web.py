"""The web page in a real browser: the session's `coltran serve` (tests/served_app.py, shared with test_serve.py),
headless Debian Chromium driven by Playwright; the page asks for the API token once, then: upload a photo, see the
gray input and the colourings, download one."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image
from shared_data import in_ci, needs_shared_data

from coltran.imageio import decode_image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500" / "n01530575_brambling.JPEG"
ALL_LOADED = """n => { const imgs = [...document.querySelectorAll('#results img')];
    return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }"""

pytestmark = [pytest.mark.ray, pytest.mark.slow, needs_shared_data(PHOTO)]
INSTALL_WAIT_S = 1200  # scripts/test's background install (about two minutes on a fresh machine)


@pytest.fixture(scope="module", autouse=True)
def chromium() -> Path:
    """Debian's chromium; scripts/test installs it in the background when missing (its log in
    COLTRAN_CHROMIUM_INSTALL_LOG, the exit status in LOG.status at the end): wait for that install first."""
    log = os.environ.get("COLTRAN_CHROMIUM_INSTALL_LOG")
    if log and not CHROMIUM.exists():
        status, deadline = Path(f"{log}.status"), time.monotonic() + INSTALL_WAIT_S
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(1)
    if not CHROMIUM.exists():
        detail = f"; its install log {log}:\n{Path(log).read_text()[-2000:]}" if log and Path(log).exists() else ""
        (pytest.fail if in_ci() else pytest.skip)(
            f"Debian chromium is not installed at {CHROMIUM} (apt-get install -y chromium; scripts/test installs "
            f"it){detail}")
    return CHROMIUM


@pytest.fixture
def browser_page(served_app):
    """A fresh browser session on the page (no token stored yet)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.goto(f"{served_app.url}/")
            yield page
        finally:
            browser.close()


def enter_token(page, token: str) -> None:
    page.wait_for_selector("#auth", state="visible", timeout=60_000)  # the page asks: the service wants a token
    page.wait_for_selector("body[data-auth=checked]", state="attached", timeout=60_000)
    page.fill("#token", token)
    page.click("#save-token")
    assert page.is_hidden("#auth")


@pytest.fixture
def page(browser_page, served_app):
    """The page with the token entered once, as a user does."""
    enter_token(browser_page, served_app.token)
    return browser_page


def test_upload_shows_gray_input_and_colourings(page, tmp_path):
    height, width = decode_image(PHOTO.read_bytes()).size
    page.reload()  # the token is kept for the browser session: not asked again
    page.wait_for_selector("body[data-auth=checked]", state="attached", timeout=60_000)
    assert page.is_hidden("#auth")
    page.fill("#num_samples", "2")
    page.fill("#seed", "5")
    page.set_input_files("#file", str(PHOTO))  # choosing a file starts the request
    page.wait_for_function(ALL_LOADED, arg=3, timeout=300_000)
    sizes = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => [i.className, i.naturalWidth, "
                                      "i.naturalHeight])")
    assert sizes == [["gray", width, height], ["sample", width, height], ["sample", width, height]]
    assert "untrained" in page.inner_text("#warning") and page.is_visible("#warning")
    assert "seed 5" in page.inner_text("#status")
    with page.expect_download() as download:
        page.click("#results figure >> nth=1 >> text=download")
    assert download.value.suggested_filename == "n01530575_brambling_seed5_s0.png"
    saved = Image.open(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert (saved.format, saved.size) == ("PNG", (width, height))
    shot = tmp_path / "web-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_dropped_non_image_shows_the_error(page):
    """A file dropped on the drop zone goes up; the server's 415 and its reason appear on the page."""
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File(["just some notes\\n"], "notes.txt", { type: "text/plain" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: data }));
    }""")
    page.wait_for_selector("#status.error", timeout=60_000)
    status = page.inner_text("#status")
    assert "415" in status and "not_an_image" in status, status
    assert page.eval_on_selector_all("#results img", "imgs => imgs.length") == 0
    assert page.is_enabled("#run")


def test_wrong_token_is_refused_and_asked_again(browser_page, served_app):
    """A wrong token: the server's 401 shows on the page, the token is forgotten and asked for again; the right
    one then works."""
    enter_token(browser_page, "0" * 64)
    browser_page.set_input_files("#file", str(PHOTO))
    browser_page.wait_for_selector("#status.error", timeout=60_000)
    status = browser_page.inner_text("#status")
    assert "401" in status and "unauthorized" in status, status
    assert browser_page.is_visible("#auth")
    assert browser_page.evaluate("() => sessionStorage.getItem('coltran-api-token')") is None
    browser_page.select_option("#resolution", "256")
    browser_page.fill("#num_samples", "1")
    browser_page.fill("#token", served_app.token)
    browser_page.click("#save-token")  # with a photo chosen, saving the token colorizes it
    browser_page.wait_for_function(ALL_LOADED, arg=2, timeout=300_000)
    assert browser_page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.naturalWidth)") == [256, 256]
