"""Admission right after the headers (server/refusal.py): a request takes its place before
its body arrives, a full server answers each protocol's own 503 at once, and every place is
given back however the request ends."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Iterator

import httpx
import pytest

from conftest import ServerProcess
from visionserve.config import Limits
from engine_helpers import (
    connect, metric, post_image, read_response, read_until_closed, start_upload, wait_in_flight,
)

# One place, which a half-sent upload keeps however long it takes (no slow upload gives its
# place up): these tests hold the server full that way.
ONE_PLACE = {
    "VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "0",
    "VISIONSERVE_QUEUE__MAX_SLOW_UPLOADS": "0",
}
KEEP_ALIVE_S = Limits().keep_alive_s  # the default, which these servers keep


@pytest.mark.parametrize("held", ["/predict", "/v1/vision/detection"])
def test_a_request_holds_its_place_from_its_headers_and_others_get_503_at_once(server_factory, images, held):
    """Whichever protocol the held upload speaks (native, DeepStack), it is admitted from its headers."""
    srv = server_factory(env=ONE_PLACE)
    dog = (images / "dog.jpg").read_bytes()
    s, rest = start_upload(srv.url, dog, path=held)
    try:
        wait_in_flight(srv.url, 1)  # admitted with half its body still to come
        r = httpx.post(srv.url + "/predict", files={"image": ("d.jpg", dog, "image/jpeg")},
                       headers={"X-Request-ID": "refused-1"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.headers["x-request-id"] == "refused-1"
        assert r.json()["error"]["code"] == "overloaded"
        # Another protocol's route: its own error shape.
        d = httpx.post(srv.url + "/v1/vision/detection", files={"image": ("d.jpg", dog, "image/jpeg")})
        assert d.status_code == 503 and d.json()["success"] is False and d.json()["code"] == 503
        # Other routes are not gated.
        assert httpx.get(srv.url + "/healthz").status_code == 200
        # The held request completes normally.
        s.sendall(rest)
        answer = read_response(s)
        assert answer.startswith(b"HTTP/1.1 200") and b'"dog"' in answer
    finally:
        s.close()
    wait_in_flight(srv.url, 0)
    assert post_image(srv.url, images / "dog.jpg").status_code == 200
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "visionserve_rejected_requests_total", reason="queue_full") == 2
    assert metric(text, "visionserve_http_requests_total", route="/predict", method="POST", status="503") == 1
    assert metric(text, "visionserve_http_requests_total", route="/v1/vision/detection", method="POST", status="503") == 1


def test_places_are_given_back_when_requests_fail_or_clients_leave(server_factory, images):
    srv = server_factory(env=ONE_PLACE)
    dog = (images / "dog.jpg").read_bytes()
    # Fails before any detection (unknown model, bad parameter): the place comes back.
    assert httpx.post(srv.url + "/predict/nope", files={"image": ("d.jpg", dog, "image/jpeg")}).status_code == 404
    assert httpx.post(srv.url + "/predict", params={"min_confidence": "2"},
                      files={"image": ("d.jpg", dog, "image/jpeg")}).status_code == 422
    # A client that leaves halfway through its upload.
    s, _ = start_upload(srv.url, dog)
    wait_in_flight(srv.url, 1)
    s.close()
    wait_in_flight(srv.url, 0)
    for _ in range(3):
        assert post_image(srv.url, images / "dog.jpg").status_code == 200


def test_every_detection_route_is_gated_before_routing(model_dir, mirror):
    # The early refusal and the gate match the detection routes themselves, before the app
    # routes the request; a matcher that finds none silently leaves refusals to the
    # handlers, after the whole ASGI stack (as happened when FastAPI 0.165 began to nest
    # included routers).
    from visionserve.config import load_settings
    from visionserve.server.app import create_app

    app = create_app(load_settings(None, model_dir=model_dir, model_mirror=str(mirror)))
    routes = app.state.refusals.routes
    for path in ("/predict", "/predict/yolox-nano", "/v1/vision/detection", "/v1/vision/custom/yolox-nano",
                 "/v2/models/yolox-nano/infer", "/v2/models/yolox-nano/versions/1/infer"):
        route = routes.match("POST", path)
        assert route is not None and route.path_regex.match(path), path
    assert routes.match("GET", "/predict") is None and routes.match("POST", "/status") is None
    assert routes.match("POST", "/v2/models/yolox-nano/ready") is None


@contextlib.contextmanager
def _full_server(server_factory, images, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A one-place server whose place a half-sent upload holds; afterwards, the place is
    given back and a detection succeeds."""
    srv = server_factory(env={**ONE_PLACE, **(env or {})})
    held, _ = start_upload(srv.url, (images / "dog.jpg").read_bytes())
    try:
        wait_in_flight(srv.url, 1)
        yield srv
    finally:
        held.close()
    wait_in_flight(srv.url, 0)
    assert post_image(srv.url, images / "dog.jpg").status_code == 200


def _closed_by(s: socket.socket, deadline: float) -> bool:
    """Whether the server has closed ``s`` by ``deadline`` (time.monotonic())."""
    return _closed_within(s, max(0.01, deadline - time.monotonic()))


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``s`` within ``seconds`` (whatever it still sends is read)."""
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_refused_connections_are_bounded_in_time_and_size(server_factory, images):
    """A refused request's body is thrown away as it comes, under the same limits as any
    body: the connection then idles under the keep-alive timeout, and one whose body stalls
    or runs over the size limit is closed."""
    env = {"VISIONSERVE_LIMITS__BODY_TIMEOUT_S": "2", "VISIONSERVE_LIMITS__MAX_BODY_BYTES": "300000"}
    with _full_server(server_factory, images, env) as srv:
        head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n{}\r\n"
        # Body sent after the 503, then idle: closed by the keep-alive timeout (5 s), as
        # after any answer. (The timer used to be cancelled by the body and never re-armed.)
        idle = connect(srv.url)
        idle.sendall(head.format(10, "X-Request-ID: first\r\nX-Request-ID: last\r\n").encode())
        answer = read_response(idle)
        assert answer.startswith(b"HTTP/1.1 503") and b"x-request-id: last" in answer.lower()
        idle.sendall(b"0123456789")
        idle_since = time.monotonic()
        # A body that stalls: closed after the body timeout (2 s here).
        stalled = connect(srv.url)
        stalled.sendall(head.format(1000, "").encode() + b"x")
        stalled_since = time.monotonic()
        assert read_response(stalled).startswith(b"HTTP/1.1 503")
        # A body over the size limit: closed once it runs over. Chunked: one that says its
        # size up front gets 413 at once (and takes no place), full server or not.
        huge = connect(srv.url)
        huge.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert read_response(huge).startswith(b"HTTP/1.1 503")
        try:
            for _ in range(100):
                huge.sendall(b"2710\r\n" + bytes(10_000) + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        declared = connect(srv.url)
        declared.sendall(head.format(10_000_000, "").encode())
        assert read_response(declared).startswith(b"HTTP/1.1 413")
        declared.close()
        assert _closed_within(huge, 5)
        # Each within its own limit of its last byte, with 1.5 s to spare (the header
        # deadline, 10 s, would close them too, later).
        assert _closed_by(stalled, stalled_since + 2 + 1.5)
        assert _closed_by(idle, idle_since + KEEP_ALIVE_S + 1.5)


def test_a_refused_request_whose_body_cannot_be_parsed_gets_its_503_and_no_second_answer(server_factory, images):
    with _full_server(server_factory, images) as srv:
        with connect(srv.url) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            answer = read_until_closed(s, 8)
    assert answer is not None, "still open"
    assert answer.startswith(b"HTTP/1.1 503 ") and answer.count(b"HTTP/1.1 ") == 1, answer


def test_a_refused_connection_is_read_again_only_after_the_pause(server_factory, images):
    """A client that re-sends at once after its 503, ignoring Retry-After, gets its next
    answer only after ``queue.refusal_pause_ms``: a refusal storm costs one refusal per pause
    and connection, not one per round trip. Other connections are answered meanwhile."""
    with _full_server(server_factory, images, {"VISIONSERVE_QUEUE__REFUSAL_PAUSE_MS": "2000"}) as srv:
        request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 4\r\n\r\nabcd"
        with connect(srv.url) as storm, connect(srv.url) as other:
            storm.sendall(request)
            assert read_response(storm).startswith(b"HTTP/1.1 503")
            storm.sendall(request)  # at once
            storm.settimeout(0.6)
            with pytest.raises(TimeoutError):
                storm.recv(1)  # not read yet: no answer
            # The pause is this connection's: another one is refused at once, and the server
            # answers everything else.
            other.sendall(request)
            assert read_response(other).startswith(b"HTTP/1.1 503")
            assert httpx.get(srv.url + "/healthz").status_code == 200
            storm.settimeout(10)
            assert read_response(storm).startswith(b"HTTP/1.1 503")  # after the pause
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "visionserve_rejected_requests_total", reason="queue_full") == 3


def test_a_refused_upload_that_closes_its_connection_gets_its_503(server_factory, images):
    """urllib (HTTP/1.1 with ``Connection: close``) sends a 30 MB upload whole before it reads:
    the 503, answered after the headers, reaches it because the connection reads on after
    answering (server/connection.py's lingering close) instead of resetting under it."""
    import json
    import urllib.error
    import urllib.request

    with _full_server(server_factory, images, {"VISIONSERVE_LIMITS__MAX_BODY_BYTES": "40000000"}) as srv:
        body = b"\xff\xd8\xff" + bytes(30_000_000)
        request = urllib.request.Request(srv.url + "/predict", data=body, headers={"Content-Type": "image/jpeg"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "1"
        assert json.loads(caught.value.read())["error"]["code"] == "overloaded"


def test_a_client_that_does_not_read_its_refusals_is_not_read_either(server_factory, images):
    # Pipelined requests, refused one after another, whose answers the client never reads:
    # the server stops reading when its writes back up, instead of holding every 503.
    with _full_server(server_factory, images) as srv, connect(srv.url) as flood:
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        before = _rss_mb(srv.process.pid)
        batch = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" * 2000
        flood.settimeout(0.5)
        sent, deadline = 0, time.monotonic() + 6
        while time.monotonic() < deadline and sent < 40_000_000:
            try:
                sent += flood.send(batch)
            except TimeoutError:
                pass  # the kernel buffers are full: the server is not reading just now
        grown = _rss_mb(srv.process.pid) - before
        # Unbounded, 25 MB of requests held about 180 MB of answers here.
        assert sent < 10_000_000 and grown < 60, (sent, grown)


def test_a_refusal_of_a_request_expecting_100_continue_closes_the_connection(server_factory, images):
    # Its client waits to be told to send the body; after a 503 it may send the body
    # anyway or not, so the connection cannot be read further.
    with _full_server(server_factory, images) as srv, connect(srv.url) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n")
        answer = read_response(s).lower()
        assert answer.startswith(b"http/1.1 503") and b"connection: close" in answer
        assert b"100 continue" not in answer


def _rss_mb(pid: int) -> float:
    """The HTTP process's resident memory."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_refused_body_is_under_the_body_timeout_and_the_next_headers_under_the_header_deadline(
    server_factory, images
):
    # The header deadline ends with the refused request's headers: a body that comes after
    # it (within the body timeout) is discarded as usual, and the connection serves the next
    # request; the deadline applies again from the end of that body.
    env = {"VISIONSERVE_LIMITS__HEADER_TIMEOUT_S": "1", "VISIONSERVE_LIMITS__BODY_TIMEOUT_S": "10"}
    with _full_server(server_factory, images, env) as srv, connect(srv.url) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 10\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 503")
        time.sleep(2)
        s.sendall(b"0123456789GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 4\r\n\r\nabcd")
        assert read_response(s).startswith(b"HTTP/1.1 503")
        s.sendall(b"GET /heal")
        answer = read_until_closed(s, 8)
        assert answer is not None, "still open"
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower(), answer
