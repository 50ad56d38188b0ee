"""The web page in a real browser: `coltran serve` (its own local Ray) in a subprocess, headless Debian
Chromium driven by Playwright; upload a photo, see the gray input and the colourings, download one."""

from __future__ import annotations

import io
import re
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from services import VENV_BIN, free_port, log_tail, service_env, stop_marked, wait_until
from shared_data import in_ci, needs_shared_data

from coltran.imageio import decode_image
from coltran.init_models import init_models

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500" / "n01530575_brambling.JPEG"
ALL_LOADED = """n => { const imgs = [...document.querySelectorAll('#results img')];
    return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }"""

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists() and not in_ci(), reason="Debian chromium is not installed "
                                 "(apt-get install -y chromium; scripts/test installs it)"),
              needs_shared_data(PHOTO)]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, service_mark):
    """`coltran serve` as a user runs it; the URL it prints once the app is ready."""
    root = tmp_path_factory.mktemp("web")
    models = init_models(root / "models", "test")
    log, mark = root / "serve.log", f"{service_mark}/serve-web"
    cmd = [str(VENV_BIN / "coltran"), "serve", "--models", str(models), "--port", str(free_port()),
           "--num-cpus", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=service_env(mark, {"RAY_USAGE_STATS_ENABLED": "0"}), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def printed_url() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"coltran serve exited with {proc.returncode}\n{log_tail(log)}")
        found = re.search(r"ColTran is serving at (http://127\.0\.0\.1:\d+/)", log.read_text(errors="replace"))
        return found.group(1) if found else None

    try:
        wait_until(lambda: printed_url() is not None, 300, "coltran serve", lambda: log_tail(log))
        yield printed_url()
    finally:
        proc.send_signal(signal.SIGINT)  # the verb shuts Serve and its Ray down itself
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        stop_marked(mark, "coltran serve")  # and anything of its Ray that outlived it


@pytest.fixture
def page(server_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.goto(server_url)
            yield page
        finally:
            browser.close()


def test_upload_shows_gray_input_and_colourings(page, tmp_path):
    height, width = decode_image(PHOTO.read_bytes()).size
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
