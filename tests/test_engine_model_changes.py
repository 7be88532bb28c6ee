"""Loading and unloading models while the server serves (the V2 repository API), with the
workers in threads and in an inference process: what each answer reports must be what
serves, whatever the order in which loads, unloads and requests meet."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from PIL import Image

from conftest import ServerProcess, start_server
from engine_helpers import concurrent_posts, copy_model, wait_in_flight

SPARE = "spare"  # a copy of yolox-nano under its own name, loaded and unloaded by the tests


@pytest.fixture(scope="module")
def store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("changes-store")
    shutil.copytree(model_dir / "yolox-nano", root / "yolox-nano")
    copy_model(root, model_dir / "yolox-nano", SPARE)
    return root


@pytest.fixture(scope="module", params=["threads", "processes"])
def srv(request, store: Path, mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(store, mirror, tmp_path_factory.mktemp("changes"),
                          env={"VISIONSERVE_RUNTIME__WORKER_MODE": request.param})
    yield server
    server.stop()


@pytest.fixture()
def spare_loaded(srv: ServerProcess) -> Iterator[None]:
    assert httpx.post(f"{srv.url}/v2/repository/models/{SPARE}/load", timeout=60).status_code == 200
    yield
    httpx.post(f"{srv.url}/v2/repository/models/{SPARE}/unload", timeout=60)


def _detect(srv: ServerProcess, images: Path, data: bytes | None = None) -> httpx.Response:
    body = data if data is not None else (images / "dog.jpg").read_bytes()
    return httpx.post(f"{srv.url}/predict/{SPARE}", files={"image": ("d.jpg", body)}, timeout=60)


def _ready(srv: ServerProcess) -> bool:
    return httpx.get(f"{srv.url}/v2/models/{SPARE}/ready").status_code == 200


def test_a_failed_reload_leaves_the_version_served_serving(srv, store, images, spare_loaded):
    onnx = next((store / SPARE).glob("*.onnx"))
    good = onnx.read_bytes()
    onnx.write_bytes(good[:100_000])  # the file is replaced by a broken one, then reloaded
    try:
        r = httpx.post(f"{srv.url}/v2/repository/models/{SPARE}/load", timeout=60)
        # Caught by its sha256 before ONNX Runtime would find it broken.
        assert r.status_code == 400 and "its file has changed since it was installed" in r.text, r.text
        # With the broken file still on disk, the sessions already made go on: ready, and
        # answering several requests at once (so on more than one worker session).
        assert _ready(srv)
        for r in concurrent_posts(srv.url, [images / "dog.jpg"] * 3, path=f"/predict/{SPARE}"):  # 3: all admitted
            assert r.status_code == 200 and "dog" in {d["label"] for d in r.json()["detections"]}, r.text
    finally:
        onnx.write_bytes(good)


def _spare_state(srv: ServerProcess) -> str | None:
    return {m["name"]: m["state"] for m in httpx.get(srv.url + "/status").json()["models"]}.get(SPARE)


@pytest.mark.parametrize("delay_s", [0.0, 0.05])
def test_an_unload_sent_while_a_load_runs_wins(srv, images, delay_s):
    """The unload comes second, so the model ends unloaded, and says so."""
    loaded: list[httpx.Response] = []
    load = threading.Thread(
        target=lambda: loaded.append(httpx.post(f"{srv.url}/v2/repository/models/{SPARE}/load", timeout=60))
    )
    load.start()
    for _ in range(500):  # until /status shows the load under way
        if _spare_state(srv) == "loading" or not load.is_alive():
            break
        time.sleep(0.005)
    time.sleep(delay_s)
    still_loading = load.is_alive()
    unloaded = httpx.post(f"{srv.url}/v2/repository/models/{SPARE}/unload", timeout=60)
    load.join()
    assert still_loading, "the load ended before the unload was sent: nothing overlapped"
    assert loaded[0].status_code == 200 and unloaded.status_code == 200, (loaded[0].text, unloaded.text)
    assert not _ready(srv)
    assert _detect(srv, images).status_code == 503
    status = {m["name"]: m for m in httpx.get(srv.url + "/status").json()["models"]}
    assert status[SPARE]["state"] == "unloaded", status[SPARE]


def test_unloading_fails_no_request_in_flight_with_a_500(srv, images, spare_loaded):
    buf = io.BytesIO()
    Image.open(images / "dog.jpg").resize((3072, 2304)).save(buf, "PNG", compress_level=1)  # slow to decode
    big = buf.getvalue()
    for delay_s in (0.01, 0.05, 0.1):
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(_detect(srv, images, big)))
        sender.start()
        wait_in_flight(srv.url, 1)  # admitted: the unload meets it in flight, at one stage or another
        time.sleep(delay_s)
        assert httpx.post(f"{srv.url}/v2/repository/models/{SPARE}/unload", timeout=60).status_code == 200
        sender.join()
        # Answered, or refused as not ready (503): never a server fault.
        assert answers[0].status_code in (200, 503), answers[0].text
        assert httpx.post(f"{srv.url}/v2/repository/models/{SPARE}/load", timeout=60).status_code == 200


def test_a_model_whose_load_failed_before_it_was_a_model_reports_why(srv, store, images):
    """A broken manifest fails before a model is built; readiness, inference and /status
    still give the reason, as for any model that fails to load, until it is unloaded."""
    broken = store / "broken-manifest"
    broken.mkdir(exist_ok=True)
    (broken / "manifest.json").write_text('{"name": "broken-manifest", ')
    r = httpx.post(f"{srv.url}/v2/repository/models/broken-manifest/load", timeout=60)
    assert r.status_code == 400
    reason = "the manifest.json of 'broken-manifest' is broken: not valid JSON"
    for answer in (httpx.get(f"{srv.url}/v2/models/broken-manifest/ready"),
                   httpx.post(f"{srv.url}/predict/broken-manifest", files={"image": ("d.jpg", b"x")})):
        assert answer.status_code == 503 and reason in answer.text, answer.text
    status = {m["name"]: m for m in httpx.get(srv.url + "/status").json()["models"]}
    assert status["broken-manifest"]["state"] == "failed" and status["broken-manifest"]["error"].startswith(reason)
    # Unloaded, it is forgotten; the server's own models were never concerned.
    assert httpx.post(f"{srv.url}/v2/repository/models/broken-manifest/unload").status_code == 200
    assert httpx.get(f"{srv.url}/v2/models/broken-manifest/ready").status_code == 404
    assert httpx.get(srv.url + "/readyz").status_code == 200
