"""The DeepStack / CodeProject.AI detection API against a real server: deepstack-python,
the example script, what Frigate and Blue Iris rely on, and every error path over raw HTTP."""

from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import deepstack.core as ds
import numpy as np
import pytest

from visionserve.config import DeepStackSettings
from visionserve.errors import InvalidParameter
from visionserve.protocols.deepstack import (
    IncorrectApiKey,
    check_api_key,
    detection_response,
    parse_min_confidence,
)
from visionserve.types import DecodedImage, Detections, Prediction

MODEL = "yolox-nano"
REPO = Path(__file__).resolve().parents[2]
EXPECTED = {"dog", "bicycle", "car"}
DETECTION = "/v1/vision/detection"


def _port(server) -> int:
    return urlparse(server.url).port  # type: ignore[return-value]


@pytest.fixture(scope="module")
def dog(images) -> bytes:
    return (images / "dog.jpg").read_bytes()


# -- pure pieces -------------------------------------------------------------------------------


def _prediction(n: int) -> Prediction:
    rng = np.random.default_rng(0)
    scores = rng.random(n).astype(np.float32)  # deliberately unsorted
    xy = rng.random((n, 2)).astype(np.float32) * 100
    boxes = np.concatenate([xy, xy + 10.7], axis=1)
    d = Detections(boxes, scores, np.arange(n, dtype=np.int32) % 3, ["person", "car", "dog"])
    image = DecodedImage(np.zeros((4, 4, 3), np.uint8), 640, 480, "jpeg")
    return Prediction("m", "1", image, d, {"decode": 1.2, "preprocess": 2.0, "inference": 10.6, "postprocess": 0.4})


def test_detection_response_sorts_caps_and_truncates_to_integers():
    body = detection_response(_prediction(30), command="detect", max_detections=20, round_trip_ms=15.2)
    preds = body["predictions"]
    assert body["success"] is True and body["count"] == len(preds) == 20
    confidences = [p["confidence"] for p in preds]
    assert confidences == sorted(confidences, reverse=True)
    assert all(isinstance(p[k], int) for p in preds for k in ("x_min", "y_min", "x_max", "y_max"))
    assert all(p["x_max"] - p["x_min"] in (10, 11) for p in preds)
    assert body["inferenceMs"] == 11 and body["processMs"] == 14 and body["analysisRoundTripMs"] == 15
    assert body["code"] == 200 and body["command"] == "detect" and body["moduleId"] == "visionserve"


def test_detection_response_with_nothing_found():
    body = detection_response(_prediction(0), command="custom", max_detections=20, round_trip_ms=1)
    assert body["predictions"] == [] and body["count"] == 0 and body["message"] == "No objects found"


@pytest.mark.parametrize("value, expected", [(None, 0.4), ("", 0.4), ("  ", 0.4), ("0.25", 0.25), ("1", 1.0),
                                             ("-0.5", 0.0)])
def test_min_confidence_parsing(value, expected):
    assert parse_min_confidence(value, 0.4) == expected


@pytest.mark.parametrize("value, message", [("abc", "Invalid value"), ("nan", "Invalid value"),
                                            ("1.5", "cannot be greater than 1")])
def test_min_confidence_rejections(value, message):
    with pytest.raises(InvalidParameter, match=message):
        parse_min_confidence(value, 0.4)


def test_api_key_check():
    check_api_key(None, DeepStackSettings())  # no key configured: anything goes
    check_api_key("whatever", DeepStackSettings())
    keyed = DeepStackSettings(api_key="s3cret")
    check_api_key("s3cret", keyed)
    for wrong in (None, "", "S3CRET", "s3cret "):
        with pytest.raises(IncorrectApiKey):
            check_api_key(wrong, keyed)


# -- deepstack-python against the server ----------------------------------------------------


def test_deepstack_python_finds_dog_bicycle_car(server, dog):
    predictions = ds.DeepstackObject(ip="127.0.0.1", port=_port(server), timeout=30).detect(dog)
    assert EXPECTED <= set(ds.get_objects(predictions))
    assert ds.get_objects_summary(predictions)["dog"] == 1
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True)
    # deepstack-python sends min_confidence 0.45 by default
    assert min(confidences) >= 0.45
    dog_box = next(p for p in predictions if p["label"] == "dog")
    assert all(isinstance(dog_box[k], int) for k in ("x_min", "y_min", "x_max", "y_max"))
    assert abs(dog_box["x_min"] - 133) <= 12 and abs(dog_box["y_max"] - 542) <= 12


def test_deepstack_python_custom_model(server, dog):
    custom = ds.DeepstackObject(ip="127.0.0.1", port=_port(server), timeout=30, custom_model=MODEL)
    assert EXPECTED <= set(ds.get_objects(custom.detect(dog)))
    missing = ds.DeepstackObject(ip="127.0.0.1", port=_port(server), timeout=30, custom_model="no-such-model")
    with pytest.raises(ds.DeepstackException, match="404"):
        missing.detect(dog)


def test_deepstack_example_script(server, images):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "deepstack_detect.py"), str(images / "dog.jpg"),
         "--ip", "127.0.0.1", "--port", str(_port(server))],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = {line.split()[0] for line in done.stdout.splitlines()[1:]}
    assert EXPECTED <= found, done.stdout


# -- what Frigate, Home Assistant and Blue Iris rely on ---------------------------------------


def test_default_min_confidence_is_deepstacks_0_4(client, dog):
    # Frigate sends only image and api_key.
    default = client.post(DETECTION, files={"image": ("dog.jpg", dog)}, data={"api_key": ""}).json()
    assert min(p["confidence"] for p in default["predictions"]) >= 0.4
    lower = client.post(DETECTION, files={"image": ("dog.jpg", dog)}, data={"min_confidence": "0.2"}).json()
    assert lower["count"] > default["count"]
    assert min(p["confidence"] for p in lower["predictions"]) < 0.4


def test_at_most_20_predictions_by_default(client, dog):
    # A low threshold finds far more than 20 boxes; Frigate's fixed (20, 6) array would overflow.
    r = client.post(DETECTION, files={"image": ("dog.jpg", dog)}, data={"min_confidence": "0.01"})
    body = r.json()
    assert body["count"] == len(body["predictions"]) == 20
    native = client.post("/predict?min_confidence=0.01", files={"image": ("dog.jpg", dog)}).json()
    assert len(native["detections"]) > 20  # so the cap, not the model, limited the answer
    confidences = [p["confidence"] for p in body["predictions"]]
    assert confidences == sorted(confidences, reverse=True)


def test_codeproject_fields(client, dog):
    body = client.post(DETECTION, files={"image": ("dog.jpg", dog)}).json()
    for key in ("count", "inferenceMs", "processMs", "analysisRoundTripMs", "moduleId", "command", "code",
                "duration", "message", "timestampUTC"):
        assert key in body, key
    assert body["count"] == len(body["predictions"]) and body["code"] == 200
    assert 0 < body["inferenceMs"] <= body["processMs"] <= body["analysisRoundTripMs"] + 1


def test_custom_list(client):
    for method in ("GET", "POST"):
        body = client.request(method, "/v1/vision/custom/list").json()
        assert body["success"] is True and MODEL in body["models"]


def test_answers_carry_content_length_never_chunked(server, dog):
    boundary = "visionserveboundary"
    payload = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"dog.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + dog + f"\r\n--{boundary}--\r\n".encode()
    for path, body in ((DETECTION, payload), ("/v1/vision/custom/no-such", payload), (DETECTION, b"")):
        conn = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=30)
        conn.request("POST", path, body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        assert response.getheader("Transfer-Encoding") is None
        assert int(response.getheader("Content-Length")) == len(data)


# -- error paths -------------------------------------------------------------------------------


def _assert_failure(r, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["success"] is False and fragment in body["error"], body
    assert body["code"] == status


@pytest.mark.parametrize("kwargs, status, fragment", [
    ({}, 400, "No valid image file found"),
    ({"data": {"min_confidence": "0.5"}}, 400, "No valid image file found"),
    ({"json": {"image": "aGVsbG8="}}, 400, "No valid image file found"),
    ({"content": b"\xff\xd8\xff raw jpeg", "headers": {"Content-Type": "image/jpeg"}}, 400, "No valid image"),
    ({"files": {"image": ("empty.jpg", b"")}}, 400, "No valid image file found"),
    ({"files": {"picture": ("dog.jpg", b"\xff\xd8\xff")}}, 400, "No valid image file found"),
    ({"files": {"image": ("x.jpg", b"not an image at all")}}, 400, "image"),
    ({"files": {"image": ("x.jpg", b"x")}, "data": {"min_confidence": "abc"}}, 400, "Invalid value for min_confidence"),
    ({"files": {"image": ("x.jpg", b"x")}, "data": {"min_confidence": "1.5"}}, 400, "cannot be greater than 1"),
    ({"content": b"--b\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400, ""),
])
def test_bad_requests(client, kwargs, status, fragment):
    _assert_failure(client.post(DETECTION, **kwargs), status, fragment)


def test_unknown_custom_model_route_and_method(client, dog):
    _assert_failure(client.post("/v1/vision/custom/no-such-model", files={"image": ("d.jpg", dog)}), 404,
                    "no-such-model")
    _assert_failure(client.post("/v1/vision/scene", files={"image": ("d.jpg", dog)}), 404, "no route")
    _assert_failure(client.get(DETECTION), 405, "not allowed")


def test_too_large_is_413(client):
    r = client.post(DETECTION, files={"image": ("big.jpg", b"\xff" * 21_000_000)})
    _assert_failure(r, 413, "exceeds the limit")


def test_api_key(server_factory, dog):
    srv = server_factory(env={"VISIONSERVE_DEEPSTACK__API_KEY": "s3cret", "VISIONSERVE_DEEPSTACK__MAX_DETECTIONS": "2"})
    port = _port(srv)
    with pytest.raises(ds.DeepstackException, match="401"):
        ds.DeepstackObject(ip="127.0.0.1", port=port, timeout=30).detect(dog)
    predictions = ds.DeepstackObject(ip="127.0.0.1", port=port, api_key="s3cret", timeout=30).detect(dog)
    assert [p["label"] for p in predictions] == ["dog", "bicycle"]  # the configured cap of 2, best first
    with srv.client() as c:
        _assert_failure(c.post(DETECTION, files={"image": ("d.jpg", dog)}, data={"api_key": "wrong"}), 401,
                        "Incorrect api key")
        _assert_failure(c.post("/v1/vision/custom/list"), 401, "Incorrect api key")
        assert c.get("/v1/vision/custom/list", params={"api_key": "s3cret"}).json()["success"] is True
        # An empty form field is no key: the query's counts (Frigate sends api_key="" without one).
        ok = c.post(DETECTION, files={"image": ("d.jpg", dog)}, data={"api_key": ""}, params={"api_key": "s3cret"})
        assert ok.json()["success"] is True, ok.text
        # other protocols are not affected by DeepStack's key
        assert c.post("/predict", files={"image": ("d.jpg", dog)}).status_code == 200


def test_fields_come_from_the_form_first_then_the_query_and_the_first_image_counts(client, dog, images):
    # As Go's FormValue / FormFile read them in DeepStack.
    strict = client.post(DETECTION, files={"image": ("d.jpg", dog)}, params={"min_confidence": "0.85"}).json()
    assert [p["label"] for p in strict["predictions"]] == ["dog"], strict
    form_wins = client.post(DETECTION, files={"image": ("d.jpg", dog)}, data={"min_confidence": "0.4"},
                            params={"min_confidence": "0.85"}).json()
    assert len(form_wins["predictions"]) == 3, form_wins
    alone = client.post(DETECTION, files={"image": ("d.jpg", dog)}).json()["predictions"]
    two = client.post(DETECTION, files=[("image", ("d.jpg", dog)), ("image", ("h.jpg", (images / "horses.jpg").read_bytes()))])
    assert two.json()["predictions"] == alone, two.text  # the dog's alone: nothing of the horses


def test_detection_honours_the_timeout_header(client, dog):
    r = client.post(DETECTION, files={"image": ("d.jpg", dog)}, headers={"x-timeout-ms": "0.001"})
    _assert_failure(r, 504, "deadline")
    _assert_failure(client.post(DETECTION, files={"image": ("d.jpg", dog)}, headers={"x-timeout-ms": "soon"}),
                    400, "x-timeout-ms")
    assert client.post(DETECTION, files={"image": ("d.jpg", dog)}, headers={"x-timeout-ms": "60000"}).json()["success"]
