"""Every error path of the Open Inference Protocol over raw HTTP: the status code and the
``{"error": "..."}`` body the protocol specifies."""

from __future__ import annotations

import base64
import fcntl
import gzip
import json
import select
import socket
import struct
import termios

import numpy as np
import pytest

from engine_helpers import connect, read_response

MODEL = "yolox-nano"
INFER = f"/v2/models/{MODEL}/infer"


def _binary(header: dict, *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head)),
                                     "Content-Type": "application/octet-stream"}


def _image_input(data: bytes, shape=(1,)) -> dict:
    return {"name": "IMAGE", "datatype": "BYTES", "shape": list(shape), "parameters": {"content_type": "base64"},
            "data": [base64.b64encode(data).decode()]}


def _assert_error(r, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert fragment in body["error"], body["error"]


@pytest.fixture(scope="module")
def dog(images) -> bytes:
    return (images / "dog.jpg").read_bytes()


# -- models and routes -----------------------------------------------------------------------


@pytest.mark.parametrize("method, path, status, fragment", [
    ("GET", "/v2/models/nope", 404, "no model named 'nope'"),
    ("GET", "/v2/models/nope/ready", 404, "no model named 'nope'"),
    ("GET", f"/v2/models/{MODEL}/versions/9", 404, "no version '9'"),
    ("GET", f"/v2/models/{MODEL}/versions/9/ready", 404, "no version '9'"),
    ("POST", "/v2/models/nope/infer", 404, "no model named 'nope'"),
    ("POST", f"/v2/models/{MODEL}/versions/2/infer", 404, "no version '2'"),
    ("GET", "/v2/nothing/here", 404, "no route"),
    ("GET", INFER, 405, "not allowed"),
    ("DELETE", "/v2/health/live", 405, "not allowed"),
])
def test_unknown_models_versions_routes_and_methods(client, method, path, status, fragment):
    _assert_error(client.request(method, path), status, fragment)


# -- malformed inference requests ------------------------------------------------------------


@pytest.mark.parametrize("body, headers, fragment", [
    (b"", {}, "empty"),
    (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
    (b"[]", {"Content-Type": "application/json"}, "must be a JSON object"),
    (b'{"inputs": []}', {}, "'inputs' must be a non-empty list"),
    (b'{"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1]}]}', {}, "neither 'data' nor"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}, "must be an integer"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "500"}, "outside the"),
    (b'{"inputs": []}', {"Content-Encoding": "br"}, "unsupported Content-Encoding"),
    (b"definitely not gzip", {"Content-Encoding": "gzip"}, "cannot decompress"),
    (b"[" * 100_000 + b"]" * 100_000, {}, "not valid JSON: it is nested too deeply"),  # past the parser's recursion
    # In the client's terms, not Python's ("use sys.set_int_max_str_digits()", codec names):
    (b'{"inputs": ' + b"1" * 5000 + b"}", {}, "not valid JSON: a number has more than 4300 digits"),
    (b'{"inputs": "\xaf"}', {}, "not valid JSON: it is not UTF-8 text (byte 12)"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, "not valid JSON"),
])
def test_malformed_bodies(client, body, headers, fragment):
    _assert_error(client.post(INFER, content=body, headers=headers), 400, fragment)


def test_binary_data_size_mismatches(client, dog):
    packed = len(dog).to_bytes(4, "little") + dog
    too_big = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                           "parameters": {"binary_data_size": len(packed) + 10}}]}
    _assert_error(client.post(INFER, content=_binary(too_big, packed)[0], headers=_binary(too_big, packed)[1]),
                  400, "only")
    leftover = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                            "parameters": {"binary_data_size": len(packed)}}]}
    body, headers = _binary(leftover, packed, b"extra")
    _assert_error(client.post(INFER, content=body, headers=headers), 400, "no input claims")
    bad_prefix = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                              "parameters": {"binary_data_size": 4 + 3}}]}
    body, headers = _binary(bad_prefix, (99).to_bytes(4, "little") + b"abc")
    _assert_error(client.post(INFER, content=body, headers=headers), 400, "declares 99 bytes")
    wrong_pixels = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [2, 2, 3],
                                "parameters": {"binary_data_size": 11}}]}
    body, headers = _binary(wrong_pixels, bytes(11))
    _assert_error(client.post(INFER, content=body, headers=headers), 400, "does not match shape")
    impossible = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [0, 2**70, 3],
                              "parameters": {"binary_data_size": 0}}]}
    body, headers = _binary(impossible)
    _assert_error(client.post(INFER, content=body, headers=headers), 400, "too large")


@pytest.mark.parametrize("inputs, fragment", [
    ([{"name": "FRAME", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "unknown input 'FRAME'"),
    ([{"name": "IMAGE", "datatype": "UINT8", "shape": [1], "data": [1]}], "must be BYTES"),
    ([{"name": "PIXELS", "datatype": "FP32", "shape": [1, 1, 3], "data": [1, 2, 3]}], "must be UINT8"),
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3, 4]}], "PIXELS must have shape"),
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1, 4], "data": [1, 2, 3, 4]}], "PIXELS must have shape"),
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [0, 4, 3], "data": []}], "pixels must be a non-empty"),
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [0, 2, 2, 3], "data": []}], "holds no image"),
    ([{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}], "IMAGE must have shape"),
    ([{"name": "IMAGE", "datatype": "BYTES", "shape": [0], "data": []}], "holds no image"),
    ([{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}], "image"),
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, 999]}], "out of range"),
    # Not 1 and 0: BOOL is a datatype of its own.
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, True, 3]}],
     "input 'PIXELS': 'data' holds true/false, not UINT8 numbers"),
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [[[[False, 0, 0]]]]}], "holds true/false"),
    # Empty, so the sizes agree, but no array can have such a dimension.
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [0, 2**70, 3], "data": []}], "too large"),
    # Not a shape PIXELS takes: refused from the shape, before the data is looked at.
    ([{"name": "PIXELS", "datatype": "UINT8", "shape": [0, 2**62, 2**62], "data": []}], "PIXELS must have shape"),
    ([{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["x"]},
      {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, 3]}], "exactly one input"),
])
def test_inputs_that_do_not_fit_the_model(client, inputs, fragment):
    _assert_error(client.post(INFER, json={"inputs": inputs}), 400, fragment)


@pytest.mark.parametrize("body, fragment", [
    # Unhashable datatypes once reached a set lookup and answered 500.
    (b'{"inputs":[{"name":"IMAGE","datatype":["BYTES"],"shape":[1],"data":["a"]}]}', "unsupported datatype"),
    (b'{"inputs":[{"name":"IMAGE","datatype":{"BYTES":1},"shape":[1],"data":["a"]}]}', "unsupported datatype"),
    # Python's JSON reader turns \ud800 into a lone surrogate, which has no UTF-8 form.
    (b'{"inputs":[{"name":"IMAGE","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', "lone UTF-16 surrogate"),
])
def test_wrongly_typed_or_unencodable_inputs_are_400(client, body, fragment):
    _assert_error(client.post(INFER, content=body), 400, fragment)


def test_invalid_image_bytes_is_400(client):
    r = client.post(INFER, json={"inputs": [_image_input(b"\x89PNG but broken")]})
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("parameters, fragment", [
    ({"min_confidence": 2}, "min_confidence"),
    ({"min_confidence": "high"}, "min_confidence"),
    ({"iou": -0.1}, "iou"),
    ({"max_detections": 0}, "max_detections"),
    ({"classes": "dog,unicorn"}, "unicorn"),
    ({"classes": []}, "classes names no label"),
    ({"classes": " , "}, "classes names no label"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": False}, "timeout"),
    ({"timeout": float("nan")}, "timeout"),
    # Infinity is a bare token Python's JSON reader accepts; an integer can have any length
    # (once an OverflowError, 500). A deadline must be finite.
    ({"timeout": float("inf")}, "parameter timeout must be a finite number of microseconds (0: none)"),
    ({"timeout": 10**400}, "parameter timeout must be a finite number of microseconds (0: none), got 1000000000"),
    ({"timeout": "5"}, "parameter timeout must be a finite number"),
    ({"min_confidence": float("nan")}, "min_confidence"),
    # JSON true is not a number (pydantic's lax mode read it as 1), nor a string one.
    ({"min_confidence": True}, "min_confidence"),
    ({"max_detections": True}, "max_detections"),
    ({"iou": "0.5"}, "iou"),
])
def test_bad_parameters_are_400_not_422(client, dog, parameters, fragment):
    # json.dumps writes NaN as the bare token NaN, which the server's JSON parser accepts.
    body = json.dumps({"parameters": parameters, "inputs": [_image_input(dog)]})
    _assert_error(client.post(INFER, content=body), 400, fragment)


def test_an_error_quoting_a_lone_surrogate_is_still_a_json_400(client, dog):
    # The messages repeat the label and the parameter name; JSON escapes make them lone surrogates.
    body = b'{"parameters":{"classes":"\\ud800"},"inputs":[{"name":"IMAGE","datatype":"BYTES","shape":[1],"data":["a"]}]}'
    _assert_error(client.post(INFER, content=body), 400, "\ufffd")
    r = client.post(f"/v2/repository/models/{MODEL}/unload", content=b'{"parameters":{"\\ud800":1}}')
    _assert_error(r, 400, "unsupported parameter(s): \ufffd")


def test_bad_requested_outputs(client, dog):
    r = client.post(INFER, json={"inputs": [_image_input(dog)], "outputs": [{"name": "MASKS"}]})
    _assert_error(r, 400, "unknown output 'MASKS'")
    # tritonclient's InferRequestedOutput(class_count=3) sends "classification": 3.
    for key in ("classification", "class_count"):
        r = client.post(INFER, json={"inputs": [_image_input(dog)],
                                     "outputs": [{"name": "LABELS", "parameters": {key: 3}}]})
        _assert_error(r, 400, f"the classification extension ({key}) is not supported")
    # An output to a shared-memory region this server does not have: the client would read
    # the region, not the answer.
    r = client.post(INFER, json={"inputs": [_image_input(dog)], "outputs": [
        {"name": "SCORES", "parameters": {"shared_memory_region": "out0", "shared_memory_byte_size": 64}}]})
    _assert_error(r, 400, "the shared-memory extensions (shared_memory_region) is not supported")


def test_timeout_0_is_no_timeout_and_an_empty_output_list_means_all_outputs(client, dog):
    # Both as in Triton: 0 microseconds is its default (none), and with no output named
    # every output comes back.
    r = client.post(INFER, json={"inputs": [_image_input(dog)], "parameters": {"timeout": 0}, "outputs": []})
    assert r.status_code == 200, r.text
    names = [o["name"] for o in r.json()["outputs"]]
    assert names == ["BOXES", "SCORES", "CLASS_IDS", "LABELS", "NUM_DETECTIONS"]
    assert "dog" in r.json()["outputs"][3]["data"]


def test_batch_limit(client):
    inputs = [{"name": "IMAGE", "datatype": "BYTES", "shape": [17], "data": ["x"] * 17}]
    _assert_error(client.post(INFER, json={"inputs": inputs}), 400, "the limit is 16")


def test_a_huge_declared_batch_is_refused_from_its_shape(client):
    # 4.9 million BYTES elements in binary form: refused from the shape, before they are unpacked.
    count = 4_900_000
    header = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [count],
                          "parameters": {"binary_data_size": 4 * count}}]}
    body, headers = _binary(header, bytes(4 * count))
    _assert_error(client.post(INFER, content=body, headers=headers), 400, f"{count} images in one request; the limit is 16")
    inputs = [{"name": "PIXELS", "datatype": "UINT8", "shape": [17, 1, 1, 3], "data": [0] * 51}]
    _assert_error(client.post(INFER, json={"inputs": inputs}), 400, "17 images in one request; the limit is 16")


def _readable(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0)[0])


def _wait_until_received(s: socket.socket) -> None:
    """Until the peer's kernel has acknowledged every byte sent (Linux: TIOCOUTQ is 0); the
    server reads from its buffer far faster than it decodes JSON."""
    while struct.unpack("I", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]:
        select.select([], [], [], 0.005)


def _answer_after_healthz(url: str, body: bytes, held_up: str) -> bytes:
    """Sends ``body`` to the infer route, then GET /healthz once the server has it all: asserts
    that /healthz is answered first (decoding the body did not hold up the event loop; the
    message says what did) and returns the infer request's answer."""
    big, health = connect(url, timeout=60), connect(url, timeout=60)
    try:
        big.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_until_received(big)  # so /healthz arrives while the server decodes, not while it reads
        health.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(health).startswith(b"HTTP/1.1 200")
        assert not _readable(big), held_up
        return read_response(big)
    finally:
        big.close()
        health.close()


def test_the_server_answers_others_while_it_decodes_a_large_json_body(server):
    """Millions of JSON numbers are decoded off the event loop: /healthz, asked for once the
    large body is sent, is answered before the large request (which fails only once decoded,
    and would otherwise be answered first, the loop having been busy decoding it)."""
    count = 4_500_000  # ~9 MB of JSON; the shape asks for fewer, so the answer is a 400 once decoded
    head = b'{"inputs":[{"name":"PIXELS","datatype":"UINT8","shape":[1000,1000,3],"data":['
    body = head + b"1," * (count - 1) + b"1]}]}"
    answer = _answer_after_healthz(
        server.url, body, "the large request was answered first: its decoding held up the event loop"
    )
    assert answer.startswith(b"HTTP/1.1 400") and b"its shape [1000, 1000, 3] needs 3000000" in answer


def test_a_small_body_of_many_json_arrays_is_decoded_off_the_event_loop(server):
    """Under 1 MB, but 100k nested arrays (a 100k-pixel PIXELS tensor nested as its shape):
    the parser makes arrays without a pause, so such a body is decoded in a worker thread
    like a large one, and /healthz is answered first (its last pixel is short: a 400 once
    decoded, which the event loop would otherwise answer first, having been busy decoding)."""
    rows = ",".join(["[" + ",".join(["[1,2,3]"] * 1000) + "]"] * 100)
    body = ('{"inputs":[{"name":"PIXELS","datatype":"UINT8","shape":[1,101,1000,3],"data":[[' + rows
            + ",[" + ",".join(["[1,2,3]"] * 999) + ",[1,2]]]]}]}").encode()
    assert len(body) < 1 << 20 and body.count(b"[") > 100_000
    answer = _answer_after_healthz(
        server.url, body, "the request of many arrays was answered first: it was decoded on the event loop"
    )
    assert answer.startswith(b"HTTP/1.1 400") and b"ragged" in answer


@pytest.mark.parametrize("unit", [b"[" * 500 + b"]" * 500, b"[]", b'"x"', b"{}"])
def test_a_body_of_millions_of_json_arrays_objects_or_strings_is_refused_before_parsing(client, unit):
    # Made in C without a pause, millions of them held the GIL for seconds (4.6 s for ~20 MB
    # of nested arrays) while parsed, garbage-collected and freed; counted in the raw bytes.
    data = b"[" + b",".join([unit] * (19_000_000 // (len(unit) + 1))) + b"]"
    body = b'{"inputs":[{"name":"PIXELS","datatype":"UINT8","shape":[1,1,1,3],"data":' + data + b"}]}"
    r = client.post(INFER, content=body)
    _assert_error(r, 400, "JSON arrays, objects and strings; at most 1048576 are taken: send large tensors as flat")


def test_true_or_false_among_the_pixels_of_a_large_body_is_400(client):
    # Over 1 MB: decoded in a worker thread, a slice at a time; one true among 600k numbers.
    pixels = np.full((1, 200, 1000, 3), 7, np.uint8).tolist()
    pixels[0][199][999][2] = True
    body = json.dumps({"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 200, 1000, 3], "data": pixels}]})
    assert len(body) > 1 << 20
    _assert_error(client.post(INFER, content=body), 400, "input 'PIXELS': 'data' holds true/false, not UINT8 numbers")


def test_body_over_the_limit_is_413_in_v2_form(client):
    r = client.post(INFER, content=b"{" + b" " * 21_000_000 + b"}")
    _assert_error(r, 413, "exceeds the limit")


def test_gzip_bomb_is_413(client):
    bomb = gzip.compress(b" " * 30_000_000)
    r = client.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
    _assert_error(r, 413, "decompressed request body exceeds")


# -- model repository ------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, status, fragment", [
    ("/v2/repository/index", b"{oops", 400, "not valid JSON"),
    ("/v2/repository/index", b'{"ready": "yes"}', 400, "'ready' must be a boolean"),
    ("/v2/repository/index", b"[1]", 400, "must be a JSON object"),
    ("/v2/repository/models/no-such-model/load", b"", 404, "no-such-model"),
    ("/v2/repository/models/no-such-model/unload", b"", 404, "no-such-model"),
    ("/v2/repository/models/.hidden/load", b"", 404, ".hidden"),  # not a model name: never a store path
    ("/v2/repository/models/a%20b/load", b"", 404, "a b"),
    ("/v2/repository/models/" + "a" * 300 + "/load", b"", 404, "a" * 300),  # longer than a file name may be
    ("/v2/repository/index", b"[" * 100_000, 400, "not valid JSON"),
    (f"/v2/repository/models/{MODEL}/load", b'{"a":' * 50_000, 400, "not valid JSON"),
    (f"/v2/repository/models/{MODEL}/load", b'{"parameters": {"config": "{}"}}', 400, "unsupported parameter"),
    (f"/v2/repository/models/{MODEL}/unload", b'{"parameters": 5}', 400, "must be a JSON object"),
])
def test_repository_errors(client, path, body, status, fragment):
    _assert_error(client.post(path, content=body), status, fragment)


def test_loading_an_unknown_model_does_not_tell_clients_where_the_store_is(client, model_dir):
    r = client.post("/v2/repository/models/nope/load")
    _assert_error(r, 404, "model 'nope' is neither installed in the model store nor in the catalog")
    assert str(model_dir) not in r.text and model_dir.name not in r.text


def test_failed_load_of_an_unknown_name_leaves_it_unknown(client):
    _assert_error(client.post("/v2/repository/models/never-heard-of-it/load"), 404, "never-heard-of-it")
    _assert_error(client.get("/v2/models/never-heard-of-it"), 404, "no model named 'never-heard-of-it'")
