"""The Open Inference Protocol against a real server, with the real client libraries:
tritonclient.http (binary and JSON), KServe's InferenceRESTClient, and raw HTTP for the
conventions the clients do not exercise (base64 JSON, no Content-Type, compressed bodies)."""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

import tritonclient.http as httpclient  # the test extra installs it
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "yolox-nano"
REPO = Path(__file__).resolve().parents[2]
EXPECTED = {"dog", "bicycle", "car"}


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(url=urlparse(server.url).netloc, network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def dog_bytes(images) -> bytes:
    return (images / "dog.jpg").read_bytes()


@pytest.fixture(scope="module")
def dog_pixels(images) -> np.ndarray:
    with Image.open(images / "dog.jpg") as im:
        return np.asarray(im.convert("RGB"))


def _labels(result) -> list[str]:
    return [b.decode() for b in result.as_numpy("LABELS").reshape(-1)]


# -- health and metadata ---------------------------------------------------------------------


def test_health_and_readiness(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert triton.is_model_ready(MODEL, model_version="1")
    assert not triton.is_model_ready("no-such-model")


def test_health_bodies_are_json(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    r = client.get(f"/v2/models/{MODEL}/ready")
    assert r.status_code == 200 and r.json() == {"name": MODEL, "ready": True}


def test_server_metadata_lists_extensions(triton):
    meta = triton.get_server_metadata()
    assert meta["name"] == "visionserve"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata(triton):
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"IMAGE": "BYTES", "PIXELS": "UINT8"}
    assert [o["name"] for o in meta["outputs"]] == ["BOXES", "SCORES", "CLASS_IDS", "LABELS", "NUM_DETECTIONS"]
    assert triton.get_model_metadata(MODEL, model_version="1") == meta
    with pytest.raises(InferenceServerException, match="no version '7'"):
        triton.get_model_metadata(MODEL, model_version="7")


# -- inference with tritonclient -------------------------------------------------------------


def test_encoded_image_binary_mode(triton, dog_bytes):
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([dog_bytes], dtype=object), binary_data=True)
    result = triton.infer(MODEL, [image])  # no outputs named: all of them, binary
    labels = _labels(result)
    assert EXPECTED <= set(labels)
    boxes, scores = result.as_numpy("BOXES"), result.as_numpy("SCORES")
    assert boxes.shape == (len(labels), 4) and boxes.dtype == np.float32
    assert scores.dtype == np.float32 and list(scores) == sorted(scores, reverse=True)
    assert result.as_numpy("CLASS_IDS").dtype == np.int32
    assert result.as_numpy("NUM_DETECTIONS").tolist() == [len(labels)]
    dog = boxes[labels.index("dog")]
    assert np.allclose(dog, [133, 207, 325, 542], atol=12)  # PROVENANCE.md's reference box, in image pixels
    assert result.get_response()["model_name"] == MODEL and result.get_response()["model_version"] == "1"


def test_pixel_tensor_binary_mode(triton, dog_pixels):
    pixels = httpclient.InferInput("PIXELS", list(dog_pixels.shape), "UINT8")
    pixels.set_data_from_numpy(dog_pixels, binary_data=True)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("LABELS", "SCORES", "BOXES")]
    result = triton.infer(MODEL, [pixels], outputs=outputs, request_id="dog-1")
    assert EXPECTED <= set(_labels(result))
    assert result.get_response()["id"] == "dog-1"
    assert [o["name"] for o in result.get_response()["outputs"]] == ["LABELS", "SCORES", "BOXES"]


def test_pixel_tensor_json_mode(triton, dog_pixels):
    pixels = httpclient.InferInput("PIXELS", list(dog_pixels.shape), "UINT8")
    pixels.set_data_from_numpy(dog_pixels, binary_data=False)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("LABELS", "SCORES", "BOXES")]
    result = triton.infer(MODEL, [pixels], outputs=outputs)
    response = result.get_response()
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    labels = [str(x) for x in result.as_numpy("LABELS")]
    assert EXPECTED <= set(labels)
    assert result.as_numpy("BOXES").shape == (len(labels), 4)


def test_binary_and_json_outputs_mixed(triton, dog_bytes):
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([dog_bytes], dtype=object))
    outputs = [httpclient.InferRequestedOutput("SCORES", binary_data=True),
               httpclient.InferRequestedOutput("CLASS_IDS", binary_data=False)]
    result = triton.infer(MODEL, [image], outputs=outputs)
    out = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "binary_data_size" in out["SCORES"]["parameters"] and "data" in out["CLASS_IDS"]
    assert set(out) == {"SCORES", "CLASS_IDS"}
    assert len(result.as_numpy("SCORES")) == len(result.as_numpy("CLASS_IDS")) >= 3


def test_request_parameters_reach_the_model(triton, dog_bytes):
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([dog_bytes], dtype=object))
    one = triton.infer(MODEL, [image], parameters={"max_detections": 1})
    assert _labels(one) == ["dog"]
    strict = triton.infer(MODEL, [image], parameters={"min_confidence": 0.99})
    assert _labels(strict) == [] and strict.as_numpy("BOXES").shape == (0, 4)
    only_cars = triton.infer(MODEL, [image], parameters={"classes": "car,truck"})
    assert set(_labels(only_cars)) <= {"car", "truck"} and "car" in _labels(only_cars)


def test_batch_of_encoded_images(triton, dog_bytes, images):
    scream = (images / "scream.jpg").read_bytes()
    image = httpclient.InferInput("IMAGE", [2, 1], "BYTES")
    image.set_data_from_numpy(np.array([[dog_bytes], [scream]], dtype=object))
    result = triton.infer(MODEL, [image])
    counts = result.as_numpy("NUM_DETECTIONS").tolist()
    assert counts[0] >= 3 and counts[1] == 0  # scream.jpg is a painting with nothing to find
    k = max(counts)
    assert result.as_numpy("BOXES").shape == (2, k, 4)
    assert result.as_numpy("SCORES").shape == (2, k) and result.as_numpy("LABELS").shape == (2, k)
    assert EXPECTED <= {b.decode() for b in result.as_numpy("LABELS")[0]}
    assert result.as_numpy("CLASS_IDS")[1].tolist() == [-1] * k  # padding


def test_batch_of_pixel_tensors(triton, dog_pixels):
    batch = np.stack([dog_pixels, dog_pixels[:, ::-1]])  # the dog and its mirror image
    pixels = httpclient.InferInput("PIXELS", list(batch.shape), "UINT8")
    pixels.set_data_from_numpy(np.ascontiguousarray(batch))
    result = triton.infer(MODEL, [pixels])
    labels = result.as_numpy("LABELS")
    assert labels.shape[0] == 2
    for row, n in zip(labels, result.as_numpy("NUM_DETECTIONS")):
        assert EXPECTED <= {b.decode() for b in row[:n]}


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(triton, dog_bytes, algorithm):
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([dog_bytes], dtype=object))
    result = triton.infer(
        MODEL, [image], request_compression_algorithm=algorithm, response_compression_algorithm=algorithm
    )
    assert EXPECTED <= set(_labels(result))


@pytest.mark.parametrize(("accept_encoding", "expected"), [
    ("gzip", "gzip"),
    ("deflate", "deflate"),
    ("gzip;q=0.5, deflate", "deflate"),
    ("gzip;q=0", None),  # q=0: not acceptable (RFC 9110)
    ("gzip;q=0, deflate;q=0, identity", None),
    ("identity", None),
])
def test_response_compression_follows_the_quality_values(server, dog_bytes, accept_encoding, expected):
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(dog_bytes).decode()]}]}
    raw = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers={"Accept-Encoding": accept_encoding})
    assert raw.status_code == 200, raw.text
    assert raw.headers.get("content-encoding") == expected
    assert raw.json()["outputs"]  # httpx undoes what was applied


def test_repository_index(triton):
    index = triton.get_model_repository_index()
    assert {"name": MODEL, "version": "1", "state": "READY", "reason": ""} in index


# -- conventions beyond tritonclient: raw HTTP -----------------------------------------------


def test_base64_json_bytes_mlserver_convention(client, dog_bytes):
    body = {
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"},
                    "data": [base64.b64encode(dog_bytes).decode()]}],
    }
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and "inference-header-content-length" not in r.headers
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert EXPECTED <= set(out["LABELS"]["data"])
    assert len(out["BOXES"]["data"]) == 4 * out["NUM_DETECTIONS"]["data"][0]


def test_request_without_content_type(server, dog_bytes):
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(dog_bytes)}}],
                         "outputs": [{"name": "LABELS"}]}).encode()
    body = header + len(dog_bytes).to_bytes(4, "little") + dog_bytes
    request = httpx.Request("POST", f"{server.url}/v2/models/{MODEL}/infer", content=body,
                            headers={"Inference-Header-Content-Length": str(len(header))})
    assert "content-type" not in request.headers
    with httpx.Client(timeout=30) as c:
        r = c.send(request)
    assert r.status_code == 200, r.text
    assert EXPECTED <= set(r.json()["outputs"][0]["data"])


def test_gzip_json_request_by_hand(client, dog_bytes):
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(dog_bytes).decode()]}], "outputs": [{"name": "LABELS"}]}
    r = client.post(f"/v2/models/{MODEL}/versions/1/infer", content=gzip.compress(json.dumps(body).encode()),
                    headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert EXPECTED <= set(r.json()["outputs"][0]["data"])


def test_openapi_covers_every_protocol(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/predict", "/v2", "/v2/health/ready", "/v2/models/{name}/infer",
                 "/v2/models/{name}/versions/{version}/infer", "/v2/repository/index",
                 "/v2/repository/models/{name}/load", "/v1/vision/detection", "/v1/vision/custom/{model}",
                 "/v1/vision/custom/list"):
        assert path in paths, path
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    detection = paths["/v1/vision/detection"]["post"]
    assert "image" in detection["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


# -- the model repository extension on a server of its own ----------------------------------


def test_repository_unload_and_load(server_factory):
    srv = server_factory()
    client = httpclient.InferenceServerClient(url=urlparse(srv.url).netloc, network_timeout=120)
    try:
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        # Unloaded on purpose, it does not make the server unready (as in Triton): unready,
        # the server would be taken out of service, and no client could load it again.
        assert client.is_server_ready()
        index = client.get_model_repository_index()
        assert {"name": MODEL, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        image = httpclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([b"x"], dtype=object))
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL, [image])
        assert e.value.status() == "503"
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL) and client.is_server_ready()
    finally:
        client.close()
    with srv.client() as raw:
        ready_only = raw.post("/v2/repository/index", json={"ready": True}).json()
        assert [m["name"] for m in ready_only] == [MODEL]
        raw.post(f"/v2/repository/models/{MODEL}/unload")
        assert raw.post("/v2/repository/index", json={"ready": True}).json() == []
        assert raw.get("/readyz").status_code == 200
        assert raw.get("/status").json()["status"] == "ready"
        # Lists of what serves leave it out until it is loaded again.
        assert raw.get("/v1/vision/custom/list").json()["models"] == []
        nope = raw.post("/predict/nope", content=b"x", headers={"content-type": "image/jpeg"})
        assert nope.status_code == 404 and nope.json()["error"]["message"] == "no model named 'nope'; served: none now"
        raw.post(f"/v2/repository/models/{MODEL}/load")
        assert raw.get("/v1/vision/custom/list").json()["models"] == [MODEL]


# -- KServe's client, from its own virtual environment ---------------------------------------
# kserve pins protobuf<7 and would downgrade the test environment's protobuf, so its client
# runs from a virtual environment of its own: KSERVE_CLIENT_PYTHON if set, else one
# built once under .venv-kserve/ (pip install kserve pillow; needs PyPI the first time).

KSERVE_VENV = REPO / ".venv-kserve"


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    if os.environ.get("KSERVE_CLIENT_PYTHON"):
        return Path(os.environ["KSERVE_CLIENT_PYTHON"])
    python = KSERVE_VENV / "bin" / "python"
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "kserve", "pillow"], check=True, timeout=900,
                           capture_output=True)
        except (subprocess.SubprocessError, OSError) as e:
            message = f"cannot build a virtual environment with kserve in {KSERVE_VENV}: {e}"
            if os.environ.get("CI"):  # CI reaches PyPI: a missing client there is a failure, not a skip
                pytest.fail(message)
            pytest.skip(message)
    return python


def test_kserve_inference_rest_client(server, images, kserve_python):
    script = Path(__file__).with_name("kserve_client_check.py")
    done = subprocess.run(
        [str(kserve_python), str(script), server.url, MODEL, str(images / "dog.jpg")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["live"] is True and report["ready"] is True and report["model_ready"] is True
    for mode in ("binary", "base64", "pixels"):
        assert EXPECTED <= set(report[mode]), (mode, report)


# -- the example scripts, unchanged ----------------------------------------------------------


def test_tritonclient_example_script(server, images):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "tritonclient_detect.py"), str(images / "dog.jpg"),
         "--url", urlparse(server.url).netloc],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = {line.split()[0] for line in done.stdout.splitlines()}
    assert EXPECTED <= found, done.stdout
