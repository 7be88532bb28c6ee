"""Connection guards of the HTTP protocol (server/connection.py), against a real server over
raw sockets: the header deadline (slowloris)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import ServerProcess, start_server
from engine_helpers import connect, multipart_upload, read_response, read_until_closed

HEADER_TIMEOUT_S = 1
# Far past the deadline: an unguarded connection stays open, and nothing here waits that long.
CLOSED_WITHIN_S = 8


@pytest.fixture(scope="module")
def srv(model_dir: Path, mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(model_dir, mirror, tmp_path_factory.mktemp("conn"),
                          env={"VISIONSERVE_LIMITS__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)})
    yield server
    server.stop()


def _split(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.lower(), body


def _labels(answer: bytes) -> set[str]:
    head, body = _split(answer)
    assert head.startswith(b"http/1.1 200"), answer[:300]
    return {d["label"] for d in json.loads(body)["detections"]}


# -- the header deadline ------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(srv):
    with connect(srv.url) as s:
        assert read_until_closed(s, CLOSED_WITHIN_S) == b""


@pytest.mark.parametrize(("path", "sent"), [
    ("/predict", b"POST /pre"),  # part of the request line
    ("/predict", b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow-1\r\nContent-Le"),  # part of the headers
    ("/v1/vision/detection", b"POST /v1/vision/detection HTTP/1.1\r\nHost: x\r\n"),  # DeepStack's error shape
])
def test_headers_that_stall_get_a_408_in_the_paths_shape_and_the_connection_closes(srv, path, sent):
    with connect(srv.url) as s:
        s.sendall(sent)
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None, "still open"
    head, body = _split(answer)
    assert head.startswith(b"http/1.1 408 ") and b"connection: close" in head, answer
    assert b"content-type: application/json" in head and b"x-request-id: " in head
    if path.startswith("/v1/vision"):
        assert json.loads(body) == {"success": False, "code": 408,
                                    "error": f"the request headers did not arrive within {HEADER_TIMEOUT_S} s"}
    else:
        assert json.loads(body)["error"]["code"] == "request_timeout"
    if b"slow-1" in sent:
        assert b"x-request-id: slow-1" in head


def test_headers_trickled_in_without_end_are_cut_off_at_the_deadline(srv):
    # Slowloris: every read brings a byte, so no per-read timeout would ever fire.
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"
    with connect(srv.url) as s:
        started, sent = time.monotonic(), 0
        try:
            while sent < len(request) and time.monotonic() - started < CLOSED_WITHIN_S:
                s.sendall(request[sent : sent + 1])
                sent += 1
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < len(request)  # cut off before the end
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer


def test_the_deadline_counts_from_the_previous_answer_on_a_kept_alive_connection(srv):
    with connect(srv.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # cancels uvicorn's keep-alive timer
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer


def test_an_idle_kept_alive_connection_is_closed_without_an_answer(srv):
    with connect(srv.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        assert read_until_closed(s, CLOSED_WITHIN_S) == b""


def test_requests_whose_headers_arrive_in_time_are_served_however_slow_their_body(srv, images):
    # The deadline ends with the headers: the body is under limits.body_timeout_s (10 s).
    head, body = multipart_upload((images / "dog.jpg").read_bytes())
    with connect(srv.url) as s:
        s.sendall(head[:20])
        time.sleep(HEADER_TIMEOUT_S / 3)
        s.sendall(head[20:])
        time.sleep(HEADER_TIMEOUT_S * 2)
        s.sendall(body)
        assert {"dog", "bicycle", "car"} <= _labels(read_response(s))
        # The connection serves the next request.
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_many_stalled_connections_are_all_let_go(srv):
    """What slowloris does: each connection holds a socket and a file descriptor in the
    server until its headers' deadline."""
    pid = srv.process.pid
    before = len(os.listdir(f"/proc/{pid}/fd"))
    stalled = [connect(srv.url) for _ in range(100)]
    try:
        for i, s in enumerate(stalled):
            if i % 2:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        httpx.get(srv.url + "/healthz")  # all accepted by now
        assert len(os.listdir(f"/proc/{pid}/fd")) >= before + 90
        for s in stalled:
            assert read_until_closed(s, CLOSED_WITHIN_S) is not None
    finally:
        for s in stalled:
            s.close()
    deadline = time.monotonic() + 5
    while len(os.listdir(f"/proc/{pid}/fd")) > before + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= before + 5
