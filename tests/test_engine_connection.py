"""Connection guards of the HTTP protocol (server/connection.py), against a real server over
raw sockets: the header deadline (slowloris) and the keep-alive wait, the size of a request's
head, requests that ask for an upgrade, and the lingering close of a connection answered
before its request's body arrived."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ServerProcess, start_server
from engine_helpers import connect, multipart_upload, read_response, read_responses, read_until_closed

HEADER_TIMEOUT_S = 1
# Far past the deadline: an unguarded connection stays open, and nothing here waits that long.
CLOSED_WITHIN_S = 8
H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"


@pytest.fixture(scope="module")
def srv(model_dir: Path, mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(model_dir, mirror, tmp_path_factory.mktemp("conn"),
                          env={"VISIONSERVE_LIMITS__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)})
    yield server
    server.stop()


def _split(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.lower(), body


def _closing_answer(url: str, sent: bytes, status: int) -> tuple[bytes, bytes]:
    """Sends ``sent`` on a new connection: the lower-cased head and the body of the JSON
    answer with ``status`` that the server gives before it closes the connection."""
    with connect(url) as s:
        s.sendall(sent)
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None, "still open"
    head, body = _split(answer)
    assert head.startswith(b"http/1.1 %d " % status) and b"connection: close" in head, answer[:300]
    assert b"content-type: application/json" in head and b"x-request-id: " in head
    return head, body


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
    head, body = _closing_answer(srv.url, sent, 408)
    if path.startswith("/v1/vision"):
        assert json.loads(body) == {"success": False, "code": 408,
                                    "error": f"the request headers did not arrive within {HEADER_TIMEOUT_S} s"}
    else:
        assert json.loads(body)["error"]["code"] == "request_timeout"
    if b"slow-1" in sent:
        assert b"x-request-id: slow-1" in head


def test_headers_trickled_in_without_end_are_cut_off_at_the_deadline(srv):
    # Slowloris: a byte every 50 ms, so a timeout per read would never fire and the whole
    # head would take 12 s to arrive. The deadline counts from the request's first byte.
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"
    with connect(srv.url) as s:
        started, sent, answer = time.monotonic(), 0, b""
        s.settimeout(0.05)
        try:
            while sent < len(request) and not answer:
                s.sendall(request[sent : sent + 1])
                sent += 1
                try:
                    answer = s.recv(65536)  # waits the 50 ms between bytes
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        answered_after = time.monotonic() - started
        rest = read_until_closed(s, CLOSED_WITHIN_S)
    assert rest is not None, "still open"
    assert (answer + rest).startswith(b"HTTP/1.1 408 "), answer + rest
    assert sent < len(request) and answered_after < HEADER_TIMEOUT_S + 1.5, (sent, answered_after)


def test_a_request_begun_on_a_kept_alive_connection_is_under_the_deadline_too(srv):
    with connect(srv.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # cancels uvicorn's keep-alive timer
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer


@pytest.mark.parametrize("first", ["get", "upload asking for h2c"])
def test_a_partial_request_sent_with_the_previous_one_gets_its_408_too(srv, images, first):
    """The next request's beginning may come in the same read as the request before it (or
    while that one runs): its headers are as partial as any, and get the 408."""
    if first == "get":
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    else:
        head, payload = multipart_upload((images / "dog.jpg").read_bytes())
        request = head.replace(b"Host: x\r\n", b"Host: x\r\n" + H2C) + payload
    with connect(srv.url) as s:
        s.sendall(request + b"POST /v1/vision/detection HTTP/1.1\r\nHost: x\r\nX-Request-ID: late-1\r\nContent-Le")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None, "still open"
    head, body = _split(answer)
    assert head.startswith(b"http/1.1 408 ") and b"x-request-id: late-1" in head, answer
    assert json.loads(body)["code"] == 408  # DeepStack's error shape: the partial request's path


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


# -- a keep-alive longer than the header deadline (behind a load balancer) -----------------

KEEP_ALIVE_S = 4
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def srv_kept(model_dir: Path, mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(model_dir, mirror, tmp_path_factory.mktemp("kept"),
                          env={"VISIONSERVE_LIMITS__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
                               "VISIONSERVE_LIMITS__KEEP_ALIVE_S": str(KEEP_ALIVE_S),
                               # and room for a URL longer than httptools can split (414, below)
                               "VISIONSERVE_LIMITS__MAX_HEADER_BYTES": "200000"})
    yield server
    server.stop()


def test_a_connection_idle_past_the_header_timeout_but_within_keep_alive_serves_its_next_request(srv_kept):
    """What a load balancer does with the connections it keeps: the next request may come
    any time within its own idle timeout, which the server's keep-alive is set to outlast."""
    with connect(srv_kept.url) as s:
        s.sendall(HEALTHZ)
        assert read_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT_S * 2)
        s.sendall(HEALTHZ)
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_an_idle_connection_is_closed_silently_once_keep_alive_s_have_passed(srv_kept):
    with connect(srv_kept.url) as s:
        s.sendall(HEALTHZ)
        assert read_response(s).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        assert read_until_closed(s, CLOSED_WITHIN_S) == b""
    assert time.monotonic() - answered > KEEP_ALIVE_S - 0.5


def test_after_an_idle_wait_the_headers_are_due_header_timeout_s_after_the_first_byte(srv_kept):
    with connect(srv_kept.url) as s:
        s.sendall(HEALTHZ)
        assert read_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT_S * 2)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        begun = time.monotonic()
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    # Not the keep-alive wait and the header timeout from the answer: that is 3 s from here.
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - begun < HEADER_TIMEOUT_S + 1.2


# -- the size of a request's head ----------------------------------------------------------

MAX_HEADER_BYTES = 65536  # limits.max_header_bytes, the default
# About 61 KB of headers: under the limit, and more than it together with a body's bytes.
LONG_HEADERS = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"d" * 1000) for i in range(60))
assert 55_000 < len(LONG_HEADERS) < MAX_HEADER_BYTES


def _rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.parametrize(("path", "head"), [
    ("/predict", b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Request-ID: big-1\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n"),
    ("/v1/vision/detection", b"POST /v1/vision/detection?q=" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
])
def test_a_head_over_the_limit_gets_a_431_in_the_paths_shape_and_the_connection_closes(srv, path, head):
    head_out, body = _closing_answer(srv.url, head, 431)
    message = f"the request's headers exceed the limit of {MAX_HEADER_BYTES} bytes"
    if path.startswith("/v1/vision"):
        assert json.loads(body) == {"success": False, "code": 431, "error": message}
    else:
        assert json.loads(body)["error"] == {"code": "header_too_large", "message": message}
        assert b"x-request-id: big-1" in head_out
    assert httpx.get(srv.url + "/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/predict", "/v1/vision/detection"])
def test_with_a_raised_header_limit_a_url_too_long_to_route_gets_a_414(srv_kept, path):
    """httptools cannot split a URL over 65,535 bytes; under the default header limit the
    whole head is refused first (431), but an operator may raise that limit."""
    query = b"?q=" + b"q" * (65_535 - len(path) - 3)
    fits = path.encode() + query
    assert len(fits) == 65_535
    with connect(srv_kept.url) as s:  # the longest URL still reaches its route: no image, it says
        s.sendall(b"POST " + fits + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 400 ") and b"image" in _split(answer)[1], answer[:300]
    _, body = _closing_answer(srv_kept.url, b"POST " + fits + b"q HTTP/1.1\r\nHost: x\r\n\r\n", 414)
    message = "the request's URL exceeds 65535 bytes"
    if path.startswith("/v1/vision"):
        assert json.loads(body) == {"success": False, "code": 414, "error": message}
    else:
        assert json.loads(body)["error"] == {"code": "uri_too_long", "message": message}
    assert httpx.get(srv_kept.url + "/healthz").status_code == 200


@pytest.mark.parametrize(("size", "status"), [(MAX_HEADER_BYTES, b"200"), (MAX_HEADER_BYTES + 1, b"431")])
def test_the_limit_counts_the_head_to_the_byte(srv, size, status):
    """Request line and headers, through the blank line that ends them; one read or several."""
    start, end = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    head = start + b"p" * (size - len(start) - len(end)) + end
    assert len(head) == size
    for pieces in ([head], [head[:40_000], head[40_000:]]):
        with connect(srv.url) as s:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(0.1)
            answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 " + status), (len(pieces), answer[:200])


def test_headers_over_the_limit_sent_across_many_reads_get_a_431(srv):
    line = b"X-Pad: " + b"b" * 990 + b"\r\n"
    with connect(srv.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(20):  # 100 KB, 5 KB at a time
                s.sendall(line * 5)
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431 "), answer


def test_a_header_sent_without_end_is_cut_off_and_not_held(srv):
    """httptools gathers a header's value until its line ends: unguarded, the server held
    all of it (30 MB here), and the header deadline bounds only the time it may take."""
    pid = srv.process.pid
    before = _rss_mb(pid)
    chunk = b"c" * (1 << 20)
    with connect(srv.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            for _ in range(30):
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        grew = _rss_mb(pid) - before
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431 "), answer
    assert grew < 10, f"the server grew by {grew:.0f} MB"


def test_heads_under_the_limit_are_served_also_when_they_follow_a_body_in_one_read(srv, images):
    """The count takes only reads that are all head: a read that ends an upload's body and
    begins the next request's long head is not counted, or the body's bytes would be taken
    for head and the request refused."""
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    upload = head.replace(b"Host: x\r\n", b"Host: x\r\n" + LONG_HEADERS) + payload
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + LONG_HEADERS + b"\r\n"
    with connect(srv.url) as s:
        s.sendall(upload + second[: len(second) * 2 // 3])
        time.sleep(0.2)
        s.sendall(second[len(second) * 2 // 3 :])
        first, then = read_responses(s, 2)
    assert {"dog", "bicycle", "car"} <= _labels(first)
    assert then.startswith(b"HTTP/1.1 200"), then[:300]


# -- requests that ask for an upgrade -----------------------------------------------------


def _chunked(payload: bytes) -> bytes:
    step = 50_000
    return b"".join(b"%x\r\n%s\r\n" % (len(payload[i : i + step]), payload[i : i + step])
                    for i in range(0, len(payload), step)) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("body_sent", ["with the headers", "later"])
def test_an_upload_asking_for_h2c_is_served_over_http11_with_its_body(srv, images, framing, body_sent):
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    head = head.replace(b"Host: x\r\n", b"Host: x\r\n" + H2C)
    if framing == "chunked":
        head = head.replace(b"Content-Length: %d\r\n" % len(payload), b"Transfer-Encoding: chunked\r\n")
        payload = _chunked(payload)
    with connect(srv.url) as s:
        if body_sent == "later":
            s.sendall(head)
            time.sleep(0.3)
            s.sendall(payload)
        else:
            s.sendall(head + payload)
        answer = read_response(s)
        assert {"dog", "bicycle", "car"} <= _labels(answer)
        assert b"upgrade" not in _split(answer)[0]
        # Still HTTP/1.1 afterwards.
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_a_connection_idle_after_an_upload_asking_for_h2c_is_closed_without_an_answer(srv, images):
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    with connect(srv.url) as s:
        s.sendall(head.replace(b"Host: x\r\n", b"Host: x\r\n" + H2C) + payload)
        assert {"dog", "bicycle", "car"} <= _labels(read_response(s))
        assert read_until_closed(s, CLOSED_WITHIN_S) == b""


def test_requests_pipelined_after_one_asking_for_an_upgrade_are_answered(srv, images):
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    upload = head.replace(b"Host: x\r\n", b"Host: x\r\n" + H2C) + payload
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + H2C + b"\r\n"
    with connect(srv.url) as s:
        s.sendall(get + upload + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second, third = read_responses(s, 3)
    assert json.loads(_split(first)[1]) == {"status": "alive"}
    assert {"dog", "bicycle", "car"} <= _labels(second)
    assert json.loads(_split(third)[1]) == {"status": "alive"}


def test_a_body_the_parser_cannot_read_after_an_upgrade_request_is_a_json_400(srv):
    with connect(srv.url) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n" + H2C + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None
    # The request may be answered first (its body cut short), then the parser's 400.
    assert b"HTTP/1.1 400 " in answer and b'"code":"bad_request"' in answer, answer


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_http2_upload_gets_its_detections(srv, images):
    features = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    if "HTTP2" not in features:
        pytest.skip("curl without HTTP/2")
    done = subprocess.run(
        ["curl", "-sS", "--http2", "-F", f"image=@{images / 'dog.jpg'}", "-w", "\n%{http_version}",
         srv.url + "/predict"],
        capture_output=True, text=True, timeout=30,
    )
    body, _, version = done.stdout.rpartition("\n")
    assert done.returncode == 0 and version == "1.1", done
    assert {"dog", "bicycle", "car"} <= {d["label"] for d in json.loads(body)["detections"]}


# -- lingering close -----------------------------------------------------------------------

OVER_THE_LIMIT = 30_000_000  # bytes; the server's body limit is 20 MB, and the loopback
# socket buffers hold a few MB: the client is still sending when the 413 comes


def test_a_client_still_sending_its_body_reads_the_early_answer(srv):
    """urllib sends a 30 MB upload whole before it reads: the 413, answered after the headers,
    reached it only because the server read on after answering. Closed at once, the
    connection reset under it (URLError: connection reset, every time)."""
    body = b"\xff\xd8\xff" + bytes(OVER_THE_LIMIT)
    request = urllib.request.Request(srv.url + "/predict", data=body, headers={"Content-Type": "image/jpeg"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error"]["code"] == "payload_too_large"


def test_a_connection_answered_early_is_half_closed_then_closed(srv):
    """After the 413 the server sends end-of-file and reads on: the client sends its whole
    body without a reset, and the connection closes once the client closes its side."""
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {OVER_THE_LIMIT}\r\n\r\n"
    chunk = bytes(1 << 20)
    with connect(srv.url) as s:
        s.sendall(head.encode())
        for _ in range(OVER_THE_LIMIT // len(chunk)):
            s.sendall(chunk)  # no broken pipe or reset
        s.shutdown(socket.SHUT_WR)
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in answer.lower() and b"payload_too_large" in answer


def test_a_lingering_connection_whose_client_stops_sending_is_closed(srv):
    """Reading on after the answer is bounded in time (server/connection.py, LINGER_S)."""
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {OVER_THE_LIMIT}\r\n\r\n"
    with connect(srv.url) as s:
        s.sendall(head.encode() + bytes(100_000))  # then nothing more
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None and answer.startswith(b"HTTP/1.1 413")


# -- an unreadable request after readable ones ----------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"\x00\x01 NOT HTTP\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
    # The parser fails in the pipelined request's own body: it must never start.
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_requests_pipelined_before_an_unreadable_one_are_answered_first_then_its_400(srv, images, garbage):
    # uvicorn wrote its 400 and closed at once, and the answers to the requests before it,
    # still running, were lost.
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    with connect(srv.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + head + payload + garbage)
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None, "still open"
    first, second, third = read_answers(answer)
    assert json.loads(_split(first)[1]) == {"status": "alive"}
    assert {"dog", "bicycle", "car"} <= _labels(second)
    third_head, third_body = _split(third)
    assert third_head.startswith(b"http/1.1 400 ") and b"connection: close" in third_head, third[:300]
    assert json.loads(third_body)["error"]["code"] == "bad_request"


def read_answers(data: bytes) -> list[bytes]:
    """The answers (each with a Content-Length) in everything read from one connection."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        answers.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return answers



def slow_upload() -> bytes:
    """A detection request that stays running for a few hundred ms after it is read: a
    36-megapixel PNG of 105 kB, slow to decode."""
    png = io.BytesIO()
    Image.fromarray(np.zeros((6000, 6000, 3), np.uint8)).save(png, format="PNG")
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(png.getvalue())}\r\n\r\n").encode() + png.getvalue()


def test_bytes_after_an_unreadable_pipelined_request_do_not_cut_the_answer_before_it(srv):
    # The parser fails again on each read after its first failure: the 400 waits all the same.
    broken = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    with connect(srv.url) as s:
        s.sendall(slow_upload() + broken)
        time.sleep(0.15)
        s.sendall(b"0\r\n\r\n")
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None, "still open"
    detections, refusal = read_answers(answer)
    assert _split(detections)[0].startswith(b"http/1.1 200 "), detections[:300]
    assert _split(refusal)[0].startswith(b"http/1.1 400 "), refusal[:300]


def test_a_head_over_the_limit_pipelined_behind_a_request_still_running_gets_its_431_after_its_answer(srv):
    # The slow upload keeps running long after the oversized head that follows it has begun
    # a read of its own.
    first = slow_upload()
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    with connect(srv.url) as s:
        s.sendall(first)
        time.sleep(0.1)  # read in full, and decoding
        s.sendall(big)
        answer = read_until_closed(s, CLOSED_WITHIN_S)
    assert answer is not None, "still open"
    detections, refusal = read_answers(answer)  # uvicorn's immediate close lost the first
    assert _split(detections)[0].startswith(b"http/1.1 200 "), detections[:300]
    assert json.loads(_split(detections)[1])["image"] == {"width": 6000, "height": 6000, "orientation": 1}
    head, body = _split(refusal)
    assert head.startswith(b"http/1.1 431 ") and b"connection: close" in head, refusal[:300]
    assert json.loads(body)["error"]["code"] == "header_too_large"
