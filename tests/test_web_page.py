"""The browser page, driven in a real headless Chromium: upload dog.jpg, see the detections."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium (.ci/run installs Debian's chromium package)")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    if os.environ.get("CI"):  # playwright is in the test extra: missing there is a failure
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield b
        b.close()


def test_upload_shows_boxes_and_table(browser, server, images, tmp_path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value='yolox-nano']", state="attached")
    page.set_input_files("#file", str(images / "dog.jpg"))
    page.click("#go")
    page.wait_for_selector("#results tbody tr")
    rows = page.locator("#results tbody tr td:first-child").all_inner_texts()
    assert {"dog", "bicycle", "car"} <= set(rows)
    assert "detection(s)" in page.locator("#status").inner_text()
    size = page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]")
    assert size == [768, 576]
    # the dog's box edge is drawn in its class colour over the photo
    edge = page.evaluate("""() => {
        const ctx = document.getElementById('canvas').getContext('2d');
        const cell = document.querySelectorAll('#results tbody tr');
        const row = [...cell].find(r => r.cells[0].textContent === 'dog');
        const [x1, y1, x2, y2] = row.cells[2].textContent.split(', ').map(Number);
        return Array.from(ctx.getImageData(x1, Math.round((y1 + y2) / 2), 1, 1).data);
    }""")
    assert edge[:3] != [0, 0, 0] and edge[3] == 255
    page.screenshot(path=str(tmp_path / "page.png"))
    assert errors == []


def test_server_error_is_shown(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server.url + "/")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#file", str(bad))
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "image" in page.locator("#error").inner_text().lower()
