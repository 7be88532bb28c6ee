"""The native HTTP API over real HTTP on loopback: every route and every error path."""

from __future__ import annotations

import io
import json
import os
import socket
import time
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from visionserve.runtime.cpus import cpu_count, cpu_policy_in_force

from engine_helpers import connect, metric, read_response, thread_policies


def jpeg_of(images, name="dog.jpg") -> bytes:
    return (images / name).read_bytes()


def converted(images, fmt: str, mode: str = "RGB", **save) -> bytes:
    img = Image.open(images / "dog.jpg").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in r.text
    return body


def labels(r: httpx.Response) -> set[str]:
    return {d["label"] for d in r.json()["detections"]}


# -- status and health --------------------------------------------------------------------

def test_status_lists_models_with_readiness(client):
    body = client.get("/status").json()
    assert body["status"] == "ready" and body["version"] and body["uptime_s"] >= 0
    (model,) = body["models"]
    assert model["name"] == "yolox-nano" and model["ready"] is True and model["labels"] == 80
    assert body["workers"] == {"mode": "threads", "count": cpu_count(), "cpu_policy": "batch", "stuck": None}


def test_every_thread_of_the_server_runs_under_the_batch_policy(server, client, images):
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        pytest.skip("the tests run under another CPU policy, which the server would inherit")
    assert client.post("/predict", files={"image": jpeg_of(images)}).status_code == 200  # the workers exist
    assert thread_policies(server.process.pid) == {os.SCHED_BATCH}


def test_the_normal_cpu_policy_leaves_the_threads_as_they_started(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__CPU_POLICY": "normal"})
    with srv.client() as c:
        assert c.post("/predict", files={"image": jpeg_of(images)}).status_code == 200
        assert c.get("/status").json()["workers"]["cpu_policy"] == cpu_policy_in_force()
    assert thread_policies(srv.process.pid) == {os.sched_getscheduler(0)}  # as the tests run: SCHED_OTHER in CI


def test_health_and_ready(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200


def test_openapi_and_docs(client):
    from openapi_spec_validator import validate

    spec = client.get("/openapi.json").json()
    validate(spec)  # a valid OpenAPI document: unique operation ids, resolvable schemas
    assert "/predict" in spec["paths"] and "/predict/{model}" in spec["paths"]
    params = {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]}
    assert {"min_confidence", "iou", "max_detections", "classes", "format"} <= params
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    responses = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "404", "413", "415", "422", "503", "504"} <= set(responses)
    error = responses["422"]["content"]["application/json"]["schema"]
    assert error["properties"]["error"]["required"] == ["code", "message"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# -- predictions --------------------------------------------------------------------------

def test_predict_multipart_dog(client, images):
    r = client.post("/predict", files={"image": ("dog.jpg", jpeg_of(images), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "yolox-nano", "version": "1"}
    assert body["image"] == {"width": 768, "height": 576, "orientation": 1}
    dets = body["detections"]
    assert {"dog", "bicycle", "car"} <= {d["label"] for d in dets if d["confidence"] >= 0.6}
    assert [d["confidence"] for d in dets] == sorted((d["confidence"] for d in dets), reverse=True)
    dog = next(d for d in dets if d["label"] == "dog")
    assert dog["class_id"] == 16
    b = dog["box"]
    assert 120 < b["x1"] < 145 and 195 < b["y1"] < 220 and 315 < b["x2"] < 335 and 530 < b["y2"] < 555
    assert {"decode", "inference"} <= set(body["timings_ms"])
    assert "inference;dur=" in r.headers["server-timing"]


def test_predict_field_named_file_and_raw_bodies(client, images):
    data = jpeg_of(images)
    assert labels(client.post("/predict", files={"file": ("x", data, "image/jpeg")})) >= {"dog", "car"}
    for ctype in ("image/jpeg", "application/octet-stream", "image/anything"):
        r = client.post("/predict", content=data, headers={"content-type": ctype})
        assert r.status_code == 200 and "dog" in labels(r)
    r = client.post("/predict", content=data)  # no Content-Type at all
    assert r.status_code == 200 and "dog" in labels(r)
    # curl --data-binary @dog.jpg sends application/x-www-form-urlencoded: the image is sniffed
    r = client.post("/predict", content=data, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and "dog" in labels(r)


def test_every_accepted_format_is_sniffed_in_a_form_encoded_body(client, images):
    """curl --data-binary sends any file as a url-encoded form: a WebP was "missing image"."""
    picture = Image.open(io.BytesIO(jpeg_of(images)))
    for fmt in ("WEBP", "PNG", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        picture.save(buf, fmt)
        r = client.post("/predict", content=buf.getvalue(), headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, (fmt, r.text)


def test_of_two_image_parts_the_first_is_detected_as_deepstack_does(client, images):
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    parts = [("image", ("dog.jpg", jpeg_of(images), "image/jpeg")), ("image", ("tiny.png", tiny.getvalue(), "image/png"))]
    native = client.post("/predict", files=parts)
    assert native.status_code == 200 and native.json()["image"]["width"] == 768, native.text
    deepstack = client.post("/v1/vision/detection", files=parts)
    assert {p["label"] for p in deepstack.json()["predictions"]} == labels(native)


@pytest.mark.parametrize("path, status", [("/predict", 415), ("/v1/vision/detection", 400)])  # DeepStack's 400
def test_an_upload_in_a_content_coding_is_refused_not_a_broken_image(client, images, path, status):
    gzipped = zlib.compress(jpeg_of(images), wbits=31)
    r = client.post(path, files={"image": ("dog.jpg", gzipped, "image/jpeg")}, headers={"content-encoding": "gzip"})
    assert r.status_code == status and "unsupported Content-Encoding 'gzip'" in r.text, r.text
    r = client.post(path, files={"image": ("dog.jpg", jpeg_of(images), "image/jpeg")}, headers={"content-encoding": "identity"})
    assert r.status_code == 200


def test_predict_named_model(client, images):
    r = client.post("/predict/yolox-nano", files={"image": ("d.jpg", jpeg_of(images), "image/jpeg")})
    assert r.status_code == 200 and "bicycle" in labels(r)


def test_parameters_from_query_and_form(client, images):
    data = jpeg_of(images)
    r = client.post("/predict?min_confidence=0.81", files={"image": ("d.jpg", data)})
    assert [d["label"] for d in r.json()["detections"]] == ["dog"]
    r = client.post("/predict", files={"image": ("d.jpg", data)}, data={"classes": "car,bicycle", "max_detections": "1"})
    assert [d["label"] for d in r.json()["detections"]] == ["bicycle"]
    r = client.post("/predict?min_confidence=0.3&iou=0.99", files={"image": ("d.jpg", data)})
    assert len(r.json()["detections"]) >= 4  # with NMS barely active, overlapping boxes stay


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG", "TIFF"])
def test_the_answer_says_which_exif_orientation_was_applied(client, images, fmt):
    # A client that draws the file itself (the web page) turns it the same way, or asks for
    # the server's drawing: browsers do not turn every format.
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(images / "dog.jpg").transpose(Image.Transpose.ROTATE_90).save(buf, format=fmt, exif=exif.tobytes())
    r = client.post("/predict", files={"image": ("x", buf.getvalue())})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 768, "height": 576, "orientation": 6}
    assert {"dog", "bicycle", "car"} <= labels(r)


@pytest.mark.parametrize("fmt,mode,save", [
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "L", {}), ("PNG", "P", {}), ("WEBP", "RGB", {"quality": 95}),
    ("BMP", "RGB", {}), ("GIF", "P", {}), ("TIFF", "RGB", {}), ("TIFF", "CMYK", {}), ("JPEG", "CMYK", {}),
    ("JPEG", "L", {}),
])
def test_odd_formats_and_modes(client, images, fmt, mode, save):
    r = client.post("/predict", files={"image": ("x", converted(images, fmt, mode, **save))})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 768, "height": 576, "orientation": 1}
    if mode not in ("L",):
        assert "dog" in labels(r)


def test_annotated_image_by_format_and_accept(client, images):
    data = jpeg_of(images)
    r = client.post("/predict?format=jpeg", files={"image": ("d.jpg", data)})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    drawn = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.int16)
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert drawn.shape == plain.shape
    assert np.abs(drawn - plain).mean() > 1  # boxes and labels were drawn
    r = client.post("/predict", files={"image": ("d.jpg", data)}, headers={"accept": "image/png"})
    assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    r = client.post("/predict", files={"image": ("d.jpg", data)}, headers={"accept": "image/*"})
    assert r.headers["content-type"] == "image/jpeg"
    r = client.post("/predict", files={"image": ("d.jpg", data)}, headers={"accept": "*/*"})
    assert r.headers["content-type"] == "application/json"
    r = client.post("/predict", files={"image": ("d.jpg", data)}, headers={"accept": "application/json, image/png;q=0.5"})
    assert r.headers["content-type"] == "application/json"


def test_an_annotated_big_jpeg_comes_back_at_its_own_size(client, images):
    """Big JPEGs decode at reduced scale for the model; one drawn on is decoded whole."""
    buf = io.BytesIO()
    Image.open(images / "dog.jpg").resize((3072, 2304)).save(buf, "JPEG", quality=90)
    r = client.post("/predict?format=jpeg", files={"image": ("big.jpg", buf.getvalue())})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (3072, 2304)
    r = client.post("/predict", files={"image": ("big.jpg", buf.getvalue())})
    assert r.json()["image"] == {"width": 3072, "height": 2304, "orientation": 1} and "dog" in labels(r)


# -- errors -----------------------------------------------------------------------------

def test_an_image_too_wide_for_an_annotated_jpeg_gets_a_422_not_a_500(client):
    buf = io.BytesIO()
    Image.new("RGB", (65_501, 1)).save(buf, "PNG")
    r = client.post("/predict?format=jpeg", files={"image": ("wide.png", buf.getvalue())})
    assert_error(r, 422, "invalid_parameter")
    assert "format=png" in r.json()["error"]["message"]
    assert client.post("/predict?format=png", files={"image": ("wide.png", buf.getvalue())}).status_code == 200


def test_unknown_routes_are_json_404(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.post("/nope", content=b"x"), 404, "not_found")
    assert_error(client.get("/predict/yolox-nano/extra"), 404, "not_found")
    # A trailing slash is another path, not a redirect (whose Location would come from the
    # client's own Host header).
    for path in ("/predict/", "/status/", "/predict/yolox-nano/"):
        r = client.post(path, content=b"x", headers={"host": "evil.example"}, follow_redirects=False)
        assert r.status_code in (404, 405) and "location" not in r.headers, (path, r.status_code)
        assert r.json()["error"]["code"] in ("not_found", "method_not_allowed")


def test_wrong_method_is_405(client):
    r = client.get("/predict")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    r = client.delete("/status")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, HEAD"
    # A path with a route per method: all of them (Starlette names the first route's only).
    r = client.request("OPTIONS", "/v1/vision/custom/list")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize("path", [
    "/status", "/readyz", "/healthz", "/", "/metrics", "/openapi.json", "/v1/vision/custom/list",
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/yolox-nano", "/v2/models/yolox-nano/ready",
    "/v2/models/yolox-nano/versions/1", "/v2/models/nope", "/nope",
])
def test_head_answers_wherever_get_does(client, path):
    # Load balancers probe with HEAD; HTTP requires it wherever GET is allowed.
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path not in ("/status", "/metrics", "/nope"):  # changing bodies; a 404 message names the method
        assert head.headers["content-length"] == str(len(get.content))


def test_head_is_still_405_where_get_is(client):
    r = client.head("/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""


def test_missing_image_is_400(client):
    assert_error(client.post("/predict"), 400, "missing_image")
    assert_error(client.post("/predict", files={"other": ("x", b"abc")}), 400, "missing_image")
    assert_error(client.post("/predict", data={"image": "not a file"}, files={"x": ("x", b"1")}), 400, "missing_image")
    assert_error(client.post("/predict", files={"image": ("x.jpg", b"", "image/jpeg")}), 400, "missing_image")
    assert_error(client.post("/predict", data={"min_confidence": "0.5"}), 400, "missing_image")


@pytest.mark.parametrize("payload", [
    b"this is not an image",
    b"\xff\xd8\xff\xe0" + b"\x00" * 50,  # a JPEG header and nothing else
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,
    bytes(range(256)) * 8,
])
def test_undecodable_images_are_400(client, payload):
    assert_error(client.post("/predict", files={"image": ("x.jpg", payload, "image/jpeg")}), 400, "invalid_image")


def test_truncated_jpeg_is_400(client, images):
    data = jpeg_of(images)
    assert_error(client.post("/predict", files={"image": ("x.jpg", data[: len(data) // 2])}), 400, "invalid_image")


def test_unsupported_media_type_is_415(client):
    assert_error(client.post("/predict", json={"image": "abc"}), 415, "unsupported_media_type")
    assert_error(client.post("/predict", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type")


@pytest.mark.parametrize("query", [
    "min_confidence=2", "min_confidence=abc", "iou=-0.1", "max_detections=0", "format=gif", "classes=dog,unicorn",
    "classes=,", "classes=%20",  # names no label: not a filter that keeps nothing
])
def test_bad_parameters_are_422(client, images, query):
    r = client.post(f"/predict?{query}", files={"image": ("d.jpg", jpeg_of(images))})
    body = assert_error(r, 422, "invalid_parameter")
    assert query.split("=")[0] in body["error"]["message"]


def test_unknown_model_is_404(client, images):
    body = assert_error(client.post("/predict/nope", files={"image": ("d.jpg", jpeg_of(images))}), 404, "model_not_found")
    assert "nope" in body["error"]["message"]
    # Known before the upload is read: with no image at all, and with most of one unsent.
    assert_error(client.post("/predict/nope", content=b"", headers={"content-type": "image/jpeg"}), 404, "model_not_found")
    with connect(str(client.base_url)) as s:
        s.sendall(b"POST /predict/nope HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 5000000\r\n\r\n" + b"\xff" * 1000)
        assert read_response(s).startswith(b"HTTP/1.1 404")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_huge_dimensions_are_413_before_decoding(client):
    body = assert_error(client.post("/predict", files={"image": ("bomb.png", png_header_only(100_000, 100_000))}),
                        413, "image_too_large")
    assert "pixels" in body["error"]["message"]


def test_request_id_is_echoed_or_made(client):
    r = client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 32


def test_server_survives_garbage_and_keeps_serving(server, images):
    host, port = server.url.removeprefix("http://").split(":")
    junk = [
        b"GARBAGE\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort",
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
        b"Content-Length: 30\r\n\r\n--zz\r\nnonsense without end",
        b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for payload in junk:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass
    with server.client() as c:
        r = c.post("/predict", files={"image": ("d.jpg", jpeg_of(images))})
        assert r.status_code == 200 and "dog" in labels(r)
    assert server.process.poll() is None


@pytest.mark.parametrize("request_bytes, shape", [
    (b"FOO /predict HTTP/1.1\r\nHost: x\r\n\r\n", {"error": {"code": "bad_request", "message": "malformed HTTP request"}}),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", None),
    (b"POST /predict?q=\xff HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", None),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40) + b"\r\n\r\n", None),  # TLS to a plain port
    (b"POST /v2/models/yolox-nano/infer HTTP/1.1\r\nContent-Length: -5\r\n\r\n", {"error": "malformed HTTP request"}),
    (b"POST /v1/vision/detection HTTP/1.1\r\nContent-Length: x\r\n\r\n",
     {"success": False, "error": "malformed HTTP request", "code": 400}),
])
def test_unparsable_http_is_a_json_400_in_the_protocols_shape(server, request_bytes, shape):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(request_bytes)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head.lower()
    assert b"\r\nx-request-id: " in head.lower()  # as on every other answer, for the logs
    assert json.loads(body) == (shape or {"error": {"code": "bad_request", "message": "malformed HTTP request"}})


def test_a_websocket_upgrade_is_answered_as_plain_http(server):
    # No route takes a WebSocket: the request gets the route's usual JSON answer, not the
    # handshake's bare 403.
    with connect(server.url, timeout=10) as s:
        s.sendall(b"GET /predict HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        answer = read_response(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), answer
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert "Unsupported upgrade request" not in server.output()


def test_client_hanging_up_mid_body_is_a_499_not_an_unhandled_500(server_factory):
    srv = server_factory()
    host, port = srv.url.removeprefix("http://").split(":")
    paths = ["/predict", "/v1/vision/detection", "/v2/models/yolox-nano/infer"]
    routes = ["/predict", "/v1/vision/detection", "/v2/models/{name}/infer"]  # as the metrics name them
    for path in paths:  # the body is cut short: the server is still reading it when the client goes
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                      "Content-Length: 1000\r\n\r\n--zz\r\n".encode())
            time.sleep(0.2)  # let the request reach the app before the hang-up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(srv.url + "/metrics").text
        if sum(metric(text, "visionserve_http_requests_total", route=r, status="499") for r in routes) == 3:
            break
        time.sleep(0.1)
    for route in routes:
        assert metric(text, "visionserve_http_requests_total", route=route, status="499") == 1, text
        assert metric(text, "visionserve_http_requests_total", route=route, status="500") == 0
    assert "unhandled error" not in srv.output()


# -- limits (their own server, with small limits) ---------------------------------------------

def test_body_limit_413_from_header_and_while_streaming(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_LIMITS__MAX_BODY_BYTES": "100000"})
    data = jpeg_of(images)  # 164 kB
    with srv.client() as c:
        assert_error(c.post("/predict", content=data, headers={"content-type": "image/jpeg"}), 413, "payload_too_large")

        def chunks():  # no Content-Length: the limit must trip while the body streams in
            for i in range(0, len(data), 16384):
                yield data[i:i + 16384]
        r = c.post("/predict", content=chunks(), headers={"content-type": "image/jpeg"})
        assert_error(r, 413, "payload_too_large")
        small = converted(images, "JPEG", quality=30)
        assert len(small) < 100_000
        assert c.post("/predict", content=small, headers={"content-type": "image/jpeg"}).status_code == 200


def test_pixel_limit_is_configurable(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_LIMITS__MAX_IMAGE_PIXELS": "400000"})
    with srv.client() as c:
        assert_error(c.post("/predict", files={"image": ("d.jpg", jpeg_of(images))}), 413, "image_too_large")
        assert c.post("/predict", files={"image": ("p.jpg", jpeg_of(images, "scream.jpg"))}).status_code == 200


def test_not_ready_is_503(server_factory, tmp_path, images):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a\nb\n")
    config = tmp_path / "c.toml"
    config.write_text(
        '[[models]]\nname = "yolox-nano"\n\n'
        f'[[models]]\nname = "broken"\npath = "{broken}"\nfamily = "yolox"\nlabels = "{labels_file}"\n'
        "input_width = 416\ninput_height = 416\n"
    )
    srv = server_factory("--config", str(config), wait_ready=False)
    with srv.client() as c:
        for _ in range(100):
            if any(m["state"] == "failed" for m in c.get("/status").json()["models"]):
                break
            time.sleep(0.1)
        status = {m["name"]: m for m in c.get("/status").json()["models"]}
        assert status["broken"]["state"] == "failed" and "error" in status["broken"]
        assert status["yolox-nano"]["ready"] is True
        assert_error(c.get("/readyz"), 503, "model_not_ready")
        assert_error(c.post("/predict/broken", files={"image": ("d.jpg", jpeg_of(images))}), 503, "model_not_ready")
        assert c.post("/predict", files={"image": ("d.jpg", jpeg_of(images))}).status_code == 200


def test_a_path_cannot_forge_a_line_in_the_text_log(server):
    with connect(server.url) as s:
        s.sendall(b"GET /%0aFAKE-LOG-LINE%0d%00%7f HTTP/1.1\r\nHost: x\r\nX-Request-ID: forge-1\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 404")
    deadline = time.monotonic() + 5
    while "forge-1" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.02)  # the access line is written once the answer is out
    lines = server.output().splitlines()
    assert not any(line.startswith("FAKE-LOG-LINE") for line in lines)
    entry = next(line for line in lines if "forge-1" in line)
    assert "visionserve.access" in entry and "GET /\\x0aFAKE-LOG-LINE\\x0d\\x00\\x7f 404" in entry, entry


def test_printable_escapes_control_characters_only():
    from visionserve.server.logs import printable

    assert printable("/a\nb\rc\x00\x1b[31m\x7f\x85") == "/a\\x0ab\\x0dc\\x00\\x1b[31m\\x7f\\x85"
    assert printable("/prédire/狗 ok") == "/prédire/狗 ok"


def test_json_access_log_carries_request_id(server_factory, images):
    srv = server_factory("--log-format", "json")
    with srv.client() as c:
        c.post("/predict", files={"image": ("d.jpg", jpeg_of(images))}, headers={"x-request-id": "req-42"})
        c.get("/nope", headers={"x-request-id": "req-43"})
    srv.stop()
    lines = [json.loads(line) for line in srv.output().splitlines() if line.startswith("{")]
    access = {e["request_id"]: e for e in lines if e.get("logger") == "visionserve.access"}
    assert access["req-42"]["status"] == 200 and access["req-42"]["path"] == "/predict"
    assert access["req-42"]["method"] == "POST" and access["req-42"]["duration_ms"] > 0
    assert access["req-43"]["status"] == 404
    assert all("ts" in e and "level" in e for e in lines)
