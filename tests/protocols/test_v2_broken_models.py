"""Models that fail to load, over HTTP: the load API answers 400 as Triton does, and no
answer (load API, repository index, readiness, metadata, inference, /status) shows a server
file path or a library's internals; the server's log has the full account."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import start_server
from engine_helpers import copy_model

GOOD = "yolox-nano"
TRUNCATED = "truncated-onnx"  # configured: its ONNX file is cut in half
LATE = "late-onnx"  # the same, installed but not configured: loaded with the load API only
BROKEN_MANIFEST = "broken-manifest"  # installed, its manifest.json is not JSON
NO_FAMILY = "no-family"  # configured: its manifest names a model family that does not exist
NOT_ONNX = "the model file is not a valid ONNX graph"


@pytest.fixture(scope="module")
def broken_store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("broken-store")
    shutil.copytree(model_dir / GOOD, store / GOOD)
    for name in (TRUNCATED, LATE):
        folder = copy_model(store, model_dir / GOOD, name)
        onnx = next(folder.glob("*.onnx"))
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
        # Installed broken (its manifest records the broken file's sha256), so that it is
        # ONNX Runtime that finds it broken: a file changed since its install fails earlier.
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["sha256"] = hashlib.sha256(onnx.read_bytes()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    folder = copy_model(store, model_dir / GOOD, NO_FAMILY)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "family": "no-such-family"}))
    folder = copy_model(store, model_dir / GOOD, BROKEN_MANIFEST)
    (folder / "manifest.json").write_text('{"name": "broken-manifest", "family": ')
    return store


def _serve(store: Path, mirror: Path, folder: Path, models: tuple[str, ...], mode: str = "processes"):
    """A server for ``models`` that answers before they have loaded (some never will)."""
    config = folder / "config.toml"
    config.write_text("".join(f'[[models]]\nname = "{n}"\n\n' for n in models))
    srv = start_server(store, mirror, folder, "--config", str(config), wait_ready=False,
                       env={"VISIONSERVE_RUNTIME__WORKER_MODE": mode})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until every configured model has loaded or failed
        states = [m["state"] for m in httpx.get(srv.url + "/status").json()["models"]]
        if "loading" not in states and len(states) == len(models):
            break
        time.sleep(0.1)
    return srv


@pytest.fixture(scope="module", params=["processes", "threads"])
def broken_server(request, broken_store: Path, mirror: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = _serve(broken_store, mirror, tmp_path_factory.mktemp("broken-server"), (GOOD, TRUNCATED, NO_FAMILY), request.param)
    yield srv
    srv.stop()


def _no_server_internals(r: httpx.Response, store: Path) -> None:
    for secret in (str(store), str(store.parent), "Traceback", "ONNXRuntimeError", "Protobuf"):
        assert secret not in r.text, (secret, r.text)
    assert not re.search(r"/(tmp|home|root|work|var)/", r.text), r.text


def test_a_failed_load_is_400_naming_the_model_and_why(broken_server, broken_store):
    with broken_server.client() as c:
        for name, reason in [
            (TRUNCATED, NOT_ONNX),
            (LATE, NOT_ONNX),
            (BROKEN_MANIFEST, "the manifest.json of 'broken-manifest' is broken: not valid JSON (Expecting value"),
        ]:
            r = c.post(f"/v2/repository/models/{name}/load")
            assert r.status_code == 400, r.text
            assert list(r.json()) == ["error"]
            assert r.json()["error"].startswith(f"model {name!r} failed to load: {reason}"), r.text
            _no_server_internals(r, broken_store)
        # The model that loads still does.
        assert c.post(f"/v2/repository/models/{GOOD}/load").json() == {"name": GOOD, "version": "1", "load": True}


def test_no_answer_about_a_broken_model_shows_a_server_path(broken_server, broken_store, images):
    with broken_server.client() as c:
        c.post(f"/v2/repository/models/{LATE}/load")  # so that it has a state, not only a folder
        status = c.get("/status")
        _no_server_internals(status, broken_store)
        models = {m["name"]: m for m in status.json()["models"]}
        for name in (TRUNCATED, LATE):
            assert models[name]["state"] == "failed" and models[name]["error"] == NOT_ONNX, models[name]
        # Failing before its sessions (the family is looked up first) left it "loading" for ever.
        assert models[NO_FAMILY]["state"] == "failed", models[NO_FAMILY]
        assert models[NO_FAMILY]["error"].startswith("unknown model family 'no-such-family'")

        index = c.post("/v2/repository/index")
        assert index.status_code == 200, index.text
        _no_server_internals(index, broken_store)
        entries = {e["name"]: e for e in index.json()}
        assert entries[GOOD]["state"] == "READY"
        for name in (TRUNCATED, LATE, BROKEN_MANIFEST):
            assert entries[name]["state"] == "UNAVAILABLE" and entries[name]["reason"], entries[name]
        assert entries[TRUNCATED]["reason"] == entries[LATE]["reason"] == NOT_ONNX
        assert entries[BROKEN_MANIFEST]["reason"].startswith("the manifest.json of 'broken-manifest' is broken")

        dog = {"image": ("dog.jpg", (images / "dog.jpg").read_bytes())}
        infer = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
        for name in (TRUNCATED, BROKEN_MANIFEST, LATE):
            answers = [
                c.get(f"/v2/models/{name}/ready"),
                c.get(f"/v2/models/{name}"),  # a model that failed in loading still has metadata
                c.post(f"/v2/models/{name}/infer", json=infer),
                c.post(f"/predict/{name}", files=dog),
                c.post(f"/v1/vision/custom/{name}", files=dog),
            ]
            # A broken manifest fails before there is a model to serve: its failed load is
            # still what its readiness and inference report.
            assert [r.status_code for r in answers[:1] + answers[2:4]] == [503] * 3, [r.text for r in answers]
            # Readiness has one shape whatever the failure, with the reason inference gives.
            ready = answers[0].json()
            assert ready["name"] == name and ready["ready"] is False, ready
            assert ready["reason"].startswith(f"model {name!r} failed to load: "), ready
            for r in answers:
                _no_server_internals(r, broken_store)
        r = c.post(f"/v2/models/{TRUNCATED}/infer", json=infer)
        assert r.json() == {"error": f"model {TRUNCATED!r} failed to load: {NOT_ONNX}"}


def test_the_server_log_has_the_paths_and_the_libraries_words(broken_server, broken_store):
    with broken_server.client() as c:
        c.post(f"/v2/repository/models/{BROKEN_MANIFEST}/load")
    log = broken_server.output()
    assert str(broken_store / TRUNCATED) in log and "Protobuf parsing failed" in log
    assert str(broken_store / BROKEN_MANIFEST / "manifest.json") in log and "JSONDecodeError" in log


def test_a_configured_model_with_a_broken_manifest_leaves_the_server_serving_the_others(
    broken_store, mirror, tmp_path, images
):
    srv = _serve(broken_store, mirror, tmp_path, (GOOD, BROKEN_MANIFEST))
    try:
        with srv.client() as c:
            reason = "the manifest.json of 'broken-manifest' is broken: not valid JSON"
            # Not "still loading": loading has ended, and the answer says which model failed.
            readyz = c.get("/readyz")
            assert readyz.status_code == 503 and f"model 'broken-manifest' failed to load: {reason}" in readyz.text
            status = c.get("/status")
            _no_server_internals(status, broken_store)
            assert status.json()["status"] == "degraded"
            models = {m["name"]: m for m in status.json()["models"]}
            assert models[GOOD]["ready"] and models[BROKEN_MANIFEST]["error"].startswith(reason)
            ready = c.get(f"/v2/models/{BROKEN_MANIFEST}/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False and reason in ready.json()["reason"]
            for r in (ready, c.get(f"/v2/models/{BROKEN_MANIFEST}"), c.post(f"/v2/repository/models/{BROKEN_MANIFEST}/load")):
                _no_server_internals(r, broken_store)
            for r in (c.get(f"/v2/models/{BROKEN_MANIFEST}"), c.post(f"/v2/repository/models/{BROKEN_MANIFEST}/load")):
                assert r.status_code in (400, 503) and reason in r.json()["error"], r.text
            dog = (images / "dog.jpg").read_bytes()
            assert c.post("/predict", files={"image": ("dog.jpg", dog)}).status_code == 200
    finally:
        srv.stop()
