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
    # The dog's box edge is drawn over the photo in the dog's class colour (COCO class 16),
    # where the photo itself is a dull brown.
    edge, colour = page.evaluate("""() => {
        const ctx = document.getElementById('canvas').getContext('2d');
        const cell = document.querySelectorAll('#results tbody tr');
        const row = [...cell].find(r => r.cells[0].textContent === 'dog');
        const [x1, y1, x2, y2] = row.cells[2].textContent.split(', ').map(Number);
        const hex = palette[16 % palette.length];
        const colour = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
        return [Array.from(ctx.getImageData(x1, Math.round((y1 + y2) / 2), 1, 1).data), colour];
    }""")
    assert edge[3] == 255 and all(abs(a - b) <= 8 for a, b in zip(edge[:3], colour)), (edge, colour)
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


def _open(browser, url: str):
    """A page at ``url`` whose console errors and page errors are collected."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_selector("#model option:not([disabled])", state="attached")
    return page, problems


def _upload(page, path) -> dict:
    """Uploads ``path`` with the Detect button; the server's JSON answer."""
    page.set_input_files("#file", str(path))
    with page.expect_response(lambda r: "/predict/" in r.url and "format=" not in r.url) as answer:
        page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent.includes('detection(s)')")
    return answer.value.json()


def test_the_time_shown_is_the_servers_total_and_the_page_logs_no_error(browser, server, images):
    page, problems = _open(browser, server.url)
    result = _upload(page, images / "dog.jpg")
    assert f"{result['timings_ms']['total']:.1f} ms" in page.locator("#status").inner_text()
    assert problems == []  # a favicon request that 404s was one


def test_a_failed_upload_clears_the_previous_result(browser, server, images, tmp_path):
    page, _ = _open(browser, server.url)
    _upload(page, images / "dog.jpg")
    bad = tmp_path / "text.jpg"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.locator("#results tbody tr").count() == 0
    assert page.evaluate("document.getElementById('canvas').width") == 0


def test_a_format_the_browser_cannot_show_is_drawn_by_the_server(browser, server, images, tmp_path):
    from PIL import Image

    tiff = tmp_path / "dog.tiff"
    Image.open(images / "dog.jpg").save(tiff)
    page, problems = _open(browser, server.url)
    _upload(page, tiff)
    assert {"dog", "bicycle", "car"} <= set(page.locator("#results tbody tr td:first-child").all_inner_texts())
    assert "drawn by the server" in page.locator("#status").inner_text()
    assert page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]") == [768, 576]
    assert page.locator("#error").inner_text() == "" and problems == []


def test_the_newest_upload_wins_over_one_still_running(browser, server, images, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"  # slow to upload and decode
    Image.open(images / "dog.jpg").resize((4000, 3000)).save(big, compress_level=1)
    page, _ = _open(browser, server.url)
    settled: list[tuple[str, bool]] = []  # (url, answered) of each detection request, in the order they end
    page.on("requestfinished", lambda r: "/predict" in r.url and settled.append((r.url, True)))
    page.on("requestfailed", lambda r: "/predict" in r.url and settled.append((r.url, False)))
    page.set_input_files("#file", str(big))
    page.evaluate("document.getElementById('form').requestSubmit()")  # as a drop does
    page.set_input_files("#file", str(images / "person.jpg"))
    page.evaluate("document.getElementById('form').requestSubmit()")
    page.wait_for_function("document.getElementById('status').textContent.includes('detection(s)')")
    for _ in range(400):  # both requests over, so a late first answer would have been drawn by now
        if len(settled) >= 2:
            break
        page.wait_for_timeout(50)
    assert [answered for _, answered in settled] == [False, True], settled  # the older one was aborted
    width, height = Image.open(images / "person.jpg").size
    assert page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]") == [width, height]
    assert f"{width}×{height}" in page.locator("#status").inner_text()


def test_the_slider_starts_from_each_models_own_threshold(browser, server_factory, model_dir, tmp_path):
    from visionserve.store.labels import COCO_80

    (tmp_path / "coco.names").write_text("\n".join(COCO_80) + "\n")
    config = tmp_path / "c.toml"
    config.write_text(
        '[[models]]\nname = "yolox-nano"\nmin_confidence = 0.33\n'
        f'[[models]]\nname = "second"\npath = "{model_dir / "yolox-nano" / "yolox_nano.onnx"}"\nfamily = "yolox"\n'
        f'labels = "{tmp_path / "coco.names"}"\nmin_confidence = 0.2\n'
    )
    srv = server_factory("--config", str(config))
    page, _ = _open(browser, srv.url)
    assert page.input_value("#conf") == "0.33"  # exactly: the slider once rounded it to 0.35
    page.select_option("#model", "second")
    assert page.input_value("#conf") == "0.2" and page.locator("#confv").inner_text() == "0.20"


def test_a_model_still_loading_becomes_selectable_once_ready(browser, server):
    """The page asks /status again while a model loads (here the first answer says so)."""
    page = browser.new_page()
    first = {"done": False}

    def status(route):
        if first["done"]:
            return route.continue_()
        first["done"] = True
        body = route.fetch().json()
        for m in body["models"]:
            m.update(ready=False, state="loading")
        route.fulfill(json=body)

    page.route("**/status", status)
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value='yolox-nano'][disabled]", state="attached")
    page.wait_for_selector("#model option[value='yolox-nano']:not([disabled])", state="attached", timeout=10_000)


def test_an_unreachable_server_is_said_in_words(browser, server_factory, images):
    srv = server_factory()
    page, _ = _open(browser, srv.url)
    srv.stop()
    page.set_input_files("#file", str(images / "dog.jpg"))
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.locator("#error").inner_text() == "cannot reach the server"


def test_the_api_docs_render_with_no_request_off_the_server(browser, server, tmp_path):
    """/docs is Swagger UI from the server's own files: an air-gapped machine (like this one)
    shows it, and the page asks nothing of any other host."""
    page = browser.new_page()
    elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server.url) else elsewhere.append(r.url))
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock-summary-path[data-path='/predict']", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/predict", "/v1/vision/detection"} <= {p.strip() for p in paths}
    page.screenshot(path=str(tmp_path / "docs.png"))
    assert elsewhere == []


def test_a_request_that_never_answers_does_not_lock_the_form(browser, server, images):
    page, problems = _open(browser, server.url)
    held = []
    page.route("**/predict/**", lambda route: held.append(route) if not held else route.continue_())
    page.set_input_files("#file", str(images / "dog.jpg"))
    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent === 'detecting…'")
    assert page.is_enabled("#go")  # it was disabled until the answer, which never came
    page.set_input_files("#file", str(images / "person.jpg"))
    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent.includes('detection(s)')")
    assert "person" in page.locator("#results tbody tr td:first-child").all_inner_texts()
    assert problems == []


def test_a_status_that_fails_at_first_is_said_and_asked_again(browser, server):
    page = browser.new_page()
    calls = {"n": 0}

    def status(route):
        calls["n"] += 1
        if calls["n"] == 1:
            return route.fulfill(status=503, json={"error": {"code": "unavailable", "message": "busy"}})
        route.continue_()

    page.route("**/status", status)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.locator("#error").inner_text() == "the server's status is not available: busy"
    assert page.is_disabled("#go")  # no model to detect with
    page.wait_for_selector("#model option[value='yolox-nano']:not([disabled])", state="attached", timeout=10_000)
    assert page.is_enabled("#go") and page.locator("#error").inner_text() == ""


def test_a_large_image_is_drawn_at_display_size_with_its_boxes_in_place(browser, server, images, tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"  # 48 megapixels: the canvas held them all, 870 MB in the page
    Image.open(images / "dog.jpg").resize((8000, 6000)).save(big, quality=80)
    page, problems = _open(browser, server.url)
    page.set_input_files("#file", str(big))
    page.click("#go")
    page.wait_for_selector("#results tbody tr", timeout=60_000)
    assert page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]") == [2048, 1536]
    # The dog's box, given in the image's pixels, is drawn at the canvas's scale.
    edge, colour = page.evaluate("""() => {
        const ctx = document.getElementById('canvas').getContext('2d');
        const row = [...document.querySelectorAll('#results tbody tr')].find(r => r.cells[0].textContent === 'dog');
        const [x1, y1, x2, y2] = row.cells[2].textContent.split(', ').map(Number).map(v => v * 2048 / 8000);
        const hex = palette[16 % palette.length];
        const colour = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
        return [Array.from(ctx.getImageData(Math.round(x1) + 1, Math.round((y1 + y2) / 2), 1, 1).data), colour];
    }""")
    assert all(abs(a - b) <= 8 for a, b in zip(edge[:3], colour)), (edge, colour)
    assert problems == []


def test_dropping_text_keeps_the_chosen_file(browser, server, images):
    page, problems = _open(browser, server.url)
    page.set_input_files("#file", str(images / "dog.jpg"))
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.setData('text/plain', 'not a file');
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    }""")
    assert page.evaluate("[...document.getElementById('file').files].map(f => f.name)") == ["dog.jpg"]
    assert problems == []


_GRID = """() => {
    // The canvas's colours averaged over a 16 x 12 grid: enough to tell a picture turned.
    const c = document.getElementById('canvas'), data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const out = [];
    for (let gy = 0; gy < 12; gy++) for (let gx = 0; gx < 16; gx++) {
        const x0 = Math.floor(gx * c.width / 16), y0 = Math.floor(gy * c.height / 12);
        const x1 = Math.floor((gx + 1) * c.width / 16), y1 = Math.floor((gy + 1) * c.height / 12);
        const sum = [0, 0, 0];
        for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) for (let k = 0; k < 3; k++) sum[k] += data[(y * c.width + x) * 4 + k];
        out.push(...sum.map(v => v / ((x1 - x0) * (y1 - y0))));
    }
    return out;
}"""


def _drawn(page, path) -> list[float]:
    page.evaluate("document.getElementById('conf').value = 1")  # no boxes: the picture alone
    page.set_input_files("#file", str(path))
    page.evaluate("document.getElementById('status').textContent = ''")
    page.click("#go")
    page.wait_for_function("document.getElementById('status').textContent.includes('detection(s)')")
    return page.evaluate(_GRID)


@pytest.mark.parametrize("fmt, orientation", [("webp", 6), ("webp", 3), ("png", 8), ("jpeg", 6)])
def test_a_photo_with_an_exif_orientation_is_drawn_turned_as_the_server_saw_it(
    browser, server, images, tmp_path, fmt, orientation
):
    """Chromium does not turn a WebP (or a PNG whose orientation follows its pixels) by its
    EXIF orientation; the server does, and the page drew the boxes of the turned picture on
    the unturned one. The picture drawn must be the one the server saw."""
    from PIL import Image

    upright = Image.open(images / "dog.jpg").convert("RGB")
    # Stored turned the other way, so that the orientation shows it upright again.
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    turned = tmp_path / f"turned.{fmt}"
    options = {"quality": 100} if fmt == "jpeg" else {"lossless": True} if fmt == "webp" else {}
    upright.transpose(undo).save(turned, exif=exif.tobytes(), **options)
    plain = tmp_path / f"plain.{fmt}"
    upright.save(plain, **options)
    page, problems = _open(browser, server.url)
    expected = _drawn(page, plain)
    drawn = _drawn(page, turned)
    assert page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]") == [768, 576]
    assert max(abs(a - b) for a, b in zip(drawn, expected)) < 8
    assert problems == []


def test_an_answer_that_is_not_json_is_said_in_words(browser, server, images):
    # The browser's own words were shown: Unexpected token '<', "<html>logi"... is not valid JSON.
    page, _ = _open(browser, server.url)
    page.route("**/predict/**", lambda route: route.fulfill(status=200, body="<html>login</html>", content_type="text/html"))
    page.set_input_files("#file", str(images / "dog.jpg"))
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.locator("#error").inner_text() == "the answer is not the server's JSON (a proxy in between?)"
    assert page.locator("#status").inner_text() == ""


def test_asking_for_the_status_again_leaves_a_detections_error_shown(browser, server, images):
    """While a model loads the page asks /status every 2 s; each answer used to clear the
    error line, a detection's error with it."""
    def status_with_a_model_loading(route):
        body = route.fetch().json()
        loading = {**body["models"][0], "name": "later", "ready": False, "state": "loading", "default": False}
        route.fulfill(json={**body, "models": [loading, *body["models"]]})

    page = browser.new_page()
    page.route("**/status", status_with_a_model_loading)
    page.route("**/predict/**", lambda route: route.fulfill(status=400, json={"error": {"code": "invalid_image", "message": "no good"}}))
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value='yolox-nano']:not([disabled])", state="attached")
    page.set_input_files("#file", str(images / "dog.jpg"))
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent === 'no good'")
    with page.expect_request("**/status", timeout=10_000):  # the next poll
        pass
    page.wait_for_timeout(300)  # its answer handled
    assert page.locator("#error").inner_text() == "no good"


def _refuse(route, retry_after: str | None, message: str = "the server is at capacity") -> None:
    """Answers an intercepted request as a full server does (without Retry-After: as one draining)."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    route.fulfill(status=503, headers=headers, json={"error": {"code": "overloaded", "message": message}})


def _detect_dog(page, images, answer) -> list[str]:
    """Uploads dog.jpg with ``answer`` handling its requests; the URLs it was asked."""
    asked: list[str] = []
    page.route("**/predict/**", lambda route: (asked.append(route.request.url), answer(route, len(asked))))
    page.set_input_files("#file", str(images / "dog.jpg"))
    page.click("#go")
    return asked


def test_a_busy_server_is_asked_again_after_its_retry_after(browser, server, images):
    """A full server answers 503 with Retry-After: the page used to show the error and stop."""
    page, problems = _open(browser, server.url)
    asked = _detect_dog(page, images, lambda route, n: _refuse(route, "1") if n == 1 else route.continue_())
    page.wait_for_function("document.getElementById('status').textContent === 'the server is busy: trying again in 1 s…'")
    page.wait_for_function("document.getElementById('status').textContent.includes('detection(s)')", timeout=10_000)
    assert "dog" in page.locator("#results tbody tr td:first-child").all_inner_texts()
    assert page.locator("#error").inner_text() == "" and len(asked) == 2
    assert problems == ["Failed to load resource: the server responded with a status of 503 (Service Unavailable)"]


def test_a_server_that_stays_busy_is_said_in_words_after_a_few_tries(browser, server, images):
    page, _ = _open(browser, server.url)
    asked = _detect_dog(page, images, lambda route, n: _refuse(route, "0"))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.locator("#error").inner_text() == "the server is at capacity"
    assert len(asked) == 4  # the first, and asked again three times
    assert page.locator("#status").inner_text() == ""


def test_a_503_without_retry_after_is_not_asked_again(browser, server, images):
    page, _ = _open(browser, server.url)
    asked = _detect_dog(page, images, lambda route, n: _refuse(route, None, "draining"))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.locator("#error").inner_text() == "draining" and len(asked) == 1
