"""Admission control and deadlines, against real servers with tiny capacities."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
import time

import httpx
import numpy as np
import pytest

from visionserve.config import QueueSettings, RuntimeSettings
from visionserve.errors import Overloaded
from visionserve.runtime.scheduler import Scheduler, reserve, unreserve
from visionserve.types import DecodedImage, Detections

from engine_helpers import (
    concurrent_posts, connect, metric, multipart_upload, post_image, read_response, wait_in_flight, wait_metric,
)

ONE_WORKER_NO_QUEUE = {"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "0"}


def test_flood_beyond_capacity_gets_503_with_retry_after_and_accepted_ones_succeed(server_factory, images):
    srv = server_factory(env=ONE_WORKER_NO_QUEUE)
    responses = concurrent_posts(srv.url, [images / "kite.jpg"] * 12)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    refused = [r for r in responses if r.status_code == 503]
    accepted = [r for r in responses if r.status_code == 200]
    assert refused and accepted, codes
    for r in refused:
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "overloaded"
    for r in accepted:
        assert "kite" in {d["label"] for d in r.json()["detections"]}
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "visionserve_rejected_requests_total", reason="queue_full") == len(refused)
    assert metric(text, "visionserve_capacity") == 1
    # Refusals do not leak places: once the flood is over, the server takes requests again.
    assert post_image(srv.url, images / "dog.jpg").status_code == 200


def test_deadline_header_already_passed_is_504_and_never_reaches_inference(server_factory, images):
    srv = server_factory()
    before = httpx.get(srv.url + "/metrics").text
    r = post_image(srv.url, images / "dog.jpg", headers={"x-timeout-ms": "0.001"})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    after = httpx.get(srv.url + "/metrics").text
    runs = lambda t: sum(metric(t, "visionserve_inference_runs_total", mode=m) for m in ("wide", "worker"))  # noqa: E731
    assert runs(after) == runs(before)
    assert metric(after, "visionserve_deadline_exceeded_total", stage="admission") == 1
    # A generous deadline changes nothing.
    ok = post_image(srv.url, images / "dog.jpg", headers={"x-timeout-ms": "60000"})
    assert ok.status_code == 200 and ok.json()["detections"]


DEADLINE_STAGES = ("admission", "queue", "inference", "worker")


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_requests_whose_deadline_passes_are_dropped_with_504_and_counted_once(server_factory, images, mode):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "8",
                              "VISIONSERVE_RUNTIME__WORKER_MODE": mode})
    # Three 1.4 MB images at once on one worker, with deadlines from too short for any to
    # too long to pass, so that they pass at different stages (which one is up to timing).
    codes = []
    for timeout_ms in (20, 60, 120, 200, 400):
        responses = concurrent_posts(srv.url, [images / "kite.jpg"] * 3, headers={"x-timeout-ms": str(timeout_ms)})
        codes += [r.status_code for r in responses]
    assert 504 in codes and set(codes) <= {200, 504}, codes
    text = httpx.get(srv.url + "/metrics").text
    # One count per 504, by where its deadline passed: a job the worker then skips (it was
    # already answered) is not counted again.
    counted = {s: metric(text, "visionserve_deadline_exceeded_total", stage=s) for s in DEADLINE_STAGES}
    assert sum(counted.values()) == codes.count(504), (counted, codes)
    assert metric(text, "visionserve_requests_in_flight") == 0


def test_clients_that_give_up_are_counted_as_cancelled_not_as_deadlines(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "8"})
    body = (images / "kite.jpg").read_bytes()

    def give_up() -> None:
        with httpx.Client(timeout=0.05) as c:
            try:
                c.post(srv.url + "/predict", files={"image": ("k.jpg", body, "image/jpeg")})
            except httpx.TimeoutException:
                pass

    threads = [threading.Thread(target=give_up) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_in_flight(srv.url, 0)  # until the server has dropped or finished them all
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "visionserve_cancelled_requests_total") >= 1
    assert sum(metric(text, "visionserve_deadline_exceeded_total", stage=s) for s in DEADLINE_STAGES) == 0


STALLED_RAW = "Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\nab"
STALLED_FORM = "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"


def stall(url: str, path: str, rest: str) -> socket.socket:
    """A connection that sends a detection request's headers and the start of its body, then stops."""
    s = connect(url, timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{rest}".encode())
    return s


def test_stalled_uploads_get_408_and_hold_no_place_once_others_need_it(server_factory, images):
    # Detection requests are admitted from their headers on. Clients that send headers
    # and then stall once held every place until the body timeout, and the server answered
    # everyone else 503: now an upload still arriving after queue.upload_hold_ms gives its
    # place to a newer request.
    server = server_factory(env={"VISIONSERVE_LIMITS__BODY_TIMEOUT_S": "5", "VISIONSERVE_QUEUE__UPLOAD_HOLD_MS": "1000"})
    stalled = [stall(server.url, path, rest) for path, rest in (
        ("/predict", STALLED_RAW), ("/predict", STALLED_FORM), ("/v1/vision/detection", STALLED_FORM),
    )]  # the three places
    try:
        wait_in_flight(server.url, 3)
        # Within the hold, an upload keeps its place: a newer request is refused.
        assert post_image(server.url, images / "dog.jpg").status_code == 503
        time.sleep(1.2)  # past the hold
        stalled.append(stall(server.url, "/predict", STALLED_RAW))
        wait_metric(server.url, "visionserve_slow_uploads_in_progress", 1)  # the fourth took a place given up
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "visionserve_slow_upload_places_given_up_total") == 1
        assert metric(text, "visionserve_requests_in_flight") == 3
        time.sleep(1.0)  # the fourth too is past the hold now
        responses = concurrent_posts(server.url, [images / "dog.jpg"] * 3)
        assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
        text = httpx.get(server.url + "/metrics").text
        # At least one more went aside for them (more when they ran at the same time).
        aside = metric(text, "visionserve_slow_uploads_in_progress")
        assert 2 <= aside <= 4 and metric(text, "visionserve_slow_upload_places_given_up_total") == aside
        answers = []
        for s in stalled:
            head, _, body = read_response(s).partition(b"\r\n\r\n")
            answers.append((head.split(b" ")[1], head.lower(), body))
        assert [status for status, _, _ in answers] == [b"408"] * 4
        assert all(b"connection: close" in head for _, head, _ in answers)
        assert b'"code":"request_timeout"' in answers[0][2] and b"within 5 s" in answers[0][2]
        assert b'"success":false' in answers[2][2]  # DeepStack's error shape
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "visionserve_slow_uploads_in_progress") == 0
        assert metric(text, "visionserve_requests_in_flight") == 0
    finally:
        for s in stalled:
            s.close()


def test_with_no_slow_uploads_allowed_stalled_uploads_keep_their_places_until_408(server_factory, images):
    server = server_factory(env={
        "VISIONSERVE_LIMITS__BODY_TIMEOUT_S": "1", "VISIONSERVE_QUEUE__UPLOAD_HOLD_MS": "0",
        "VISIONSERVE_QUEUE__MAX_SLOW_UPLOADS": "0",
    })
    stalled = [stall(server.url, "/predict", STALLED_RAW) for _ in range(3)]
    try:
        wait_in_flight(server.url, 3)
        assert post_image(server.url, images / "dog.jpg").status_code == 503
        assert [read_response(s).split(b" ")[1] for s in stalled] == [b"408"] * 3
        r = post_image(server.url, images / "dog.jpg")  # the places are free again
        assert r.status_code == 200, r.text
    finally:
        for s in stalled:
            s.close()


def test_a_slow_upload_complete_while_full_gets_the_next_place_freed(server_factory, images):
    server = server_factory(env={"VISIONSERVE_QUEUE__UPLOAD_HOLD_MS": "1000", **ONE_WORKER_NO_QUEUE})
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    slow, held = connect(server.url), connect(server.url)
    try:
        slow.sendall(head + payload[:1000])
        wait_in_flight(server.url, 1)
        time.sleep(1.1)
        held.sendall(head + payload[:1000])  # takes the place the slow upload gives up
        wait_metric(server.url, "visionserve_slow_uploads_in_progress", 1)
        slow.sendall(payload[1000:])  # complete, while the place is held: it waits
        wait_metric(server.url, "visionserve_slow_uploads_in_progress", 0)  # waiting for a place, not aside
        assert metric(httpx.get(server.url + "/metrics").text, "visionserve_rejected_requests_total",
                      reason="queue_full") == 0
        held.sendall(payload[1000:])
        assert read_response(held).split(b" ")[1] == b"200"
        answer = read_response(slow)  # the place held freed: its own, ahead of anyone else
        assert answer.split(b" ")[1] == b"200" and b'"label":"dog"' in answer, answer[:300]
    finally:
        slow.close()
        held.close()


def test_a_complete_slow_upload_waiting_for_a_place_past_its_body_deadline_gets_503_not_408(
    server_factory, images
):
    """Its body arrived in time: the wait for a place (queue.upload_hold_ms) ran under the
    body's time limit too, and a wait crossing it ended in 408 and a closed connection."""
    server = server_factory(env={
        "VISIONSERVE_LIMITS__BODY_TIMEOUT_S": "2", "VISIONSERVE_QUEUE__UPLOAD_HOLD_MS": "1000", **ONE_WORKER_NO_QUEUE,
    })
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    slow, held = connect(server.url), connect(server.url)
    try:
        slow.sendall(head + payload[:1000])
        wait_in_flight(server.url, 1)
        started = time.monotonic()
        time.sleep(1.1)
        held.sendall(head + payload[:1000])  # takes the place the slow upload gives up
        wait_metric(server.url, "visionserve_slow_uploads_in_progress", 1)
        time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
        slow.sendall(payload[1000:])  # complete at 1.5 s; waits for a place until 2.5 s
        answer = read_response(slow)
        assert answer.split(b" ")[1] == b"503" and b'"code":"overloaded"' in answer, answer[:300]
        held.sendall(payload[1000:])
        assert read_response(held).split(b" ")[1] == b"200"
    finally:
        slow.close()
        held.close()


def test_a_body_refused_by_its_declared_size_holds_no_place(server_factory, images):
    """413 from Content-Length is answered ahead of the admission gate: the place the HTTP
    protocol had taken at the headers was never given back, and each such request shrank the
    server's capacity for good."""
    server = server_factory(env=ONE_WORKER_NO_QUEUE)  # one place
    for _ in range(3):
        with connect(server.url) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 999999999\r\n\r\n")
            assert read_response(s).split(b" ")[1] == b"413"
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "visionserve_requests_in_flight") == 0
    # Counted under its route, as when the admission gate ran first.
    assert metric(text, "visionserve_http_requests_total", route="/predict", status="413") == 3
    assert post_image(server.url, images / "dog.jpg").status_code == 200


def test_a_slow_upload_that_gave_its_place_up_is_served_when_one_is_free_and_refused_when_none_is(
    server_factory, images
):
    server = server_factory(env={
        "VISIONSERVE_QUEUE__UPLOAD_HOLD_MS": "300", **ONE_WORKER_NO_QUEUE,  # one place
    })
    head, payload = multipart_upload((images / "dog.jpg").read_bytes())
    slow = connect(server.url)
    slow.sendall(head + payload[:1000])
    held = connect(server.url)
    try:
        wait_in_flight(server.url, 1)
        time.sleep(0.4)
        held.sendall(head + payload[:1000])  # takes the place the slow upload gives up
        wait_metric(server.url, "visionserve_slow_uploads_in_progress", 1)
        slow.sendall(payload[1000:])  # complete while the place is taken: refused
        answer = read_response(slow)
        assert answer.split(b" ")[1] == b"503" and b"retry-after:" in answer.lower(), answer[:300]
        assert b'"code":"overloaded"' in answer
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "visionserve_slow_uploads_in_progress") == 0
        assert metric(text, "visionserve_requests_in_flight") == 1
        # The connection stays open (the body was read) and the place frees up soon.
        held.sendall(payload[1000:])
        assert read_response(held).split(b" ")[1] == b"200"
        slow.sendall(head + payload[:1000])
        time.sleep(0.4)  # past the hold, but no other request needs the place: it keeps it
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "visionserve_slow_uploads_in_progress") == 0
        assert metric(text, "visionserve_slow_upload_places_given_up_total") == 1  # the first time only
        slow.sendall(payload[1000:])
        answer = read_response(slow)
        assert answer.split(b" ")[1] == b"200" and b'"label":"dog"' in answer, answer[:300]
    finally:
        slow.close()
        held.close()


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf", "-inf", "1e400"])
def test_bad_timeout_header_is_400(client, images, value):
    # float() reads "inf" and "1e400" (infinite) as numbers: a deadline must still be finite.
    r = client.post("/predict", files={"image": ("d.jpg", (images / "dog.jpg").read_bytes())}, headers={"x-timeout-ms": value})
    assert r.status_code == 400, r.text
    assert "x-timeout-ms must be a finite number of milliseconds above 0" in r.json()["error"]["message"]


def test_default_timeout_from_config_applies(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_QUEUE__DEFAULT_TIMEOUT_MS": "0.001"})
    assert post_image(srv.url, images / "dog.jpg").status_code == 504


def _metrics_once_dropped(url: str) -> str:
    """/metrics once a dropped request is counted and none is in flight (30 s at most)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        if metric(text, "visionserve_requests_in_flight") == 0 and metric(text, "visionserve_cancelled_requests_total") > 0:
            break
        time.sleep(0.05)
    assert metric(text, "visionserve_cancelled_requests_total") >= 1
    return text


def test_work_of_a_disconnected_client_is_dropped(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "16"})
    host, port = srv.url.removeprefix("http://").split(":")
    head, payload = multipart_upload((images / "kite.jpg").read_bytes())
    # Twelve clients send and hang up at once; one worker can start only one of them at a time,
    # so most are still queued when their disconnect is noticed.
    socks = []
    for _ in range(12):
        s = socket.create_connection((host, int(port)))
        s.sendall(head + payload)
        socks.append(s)
    for s in socks:
        s.close()
    text = _metrics_once_dropped(srv.url)
    runs = sum(metric(text, "visionserve_inference_runs_total", mode=m) for m in ("wide", "worker"))
    assert runs < 12  # at least one dropped job never ran (warm-up runs are not counted)
    assert post_image(srv.url, images / "dog.jpg").status_code == 200


def test_a_v2_batch_whose_client_disconnects_is_dropped_without_an_error_in_the_log(server_factory, images):
    """The batch's detections are gathered; cancelled when the client went away, the gathering
    ended with a CancelledError that no one retrieved, and asyncio logged it as an ERROR with
    a traceback, once per disconnected V2 batch."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "16"})
    kite = (images / "kite.jpg").read_bytes()
    raw = b"".join(struct.pack("<I", len(kite)) + kite for _ in range(6))
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [6],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    body = header + raw
    head = (f"POST /v2/models/yolox-nano/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode()
    with connect(srv.url) as s:
        s.sendall(head + body)
        for _ in range(200):  # its images are admitted (they take a place each)
            if metric(httpx.get(srv.url + "/metrics").text, "visionserve_requests_in_flight") > 0:
                break
            time.sleep(0.02)
    _metrics_once_dropped(srv.url)
    assert post_image(srv.url, images / "dog.jpg").status_code == 200  # after the gathering was let go of
    log = srv.output()
    assert "never retrieved" not in log and "Traceback" not in log, log[-3000:]


def _v2_body(image_bytes: bytes, **parameters: object) -> dict:
    return {
        "parameters": parameters,
        "inputs": [{
            "name": "IMAGE", "datatype": "BYTES", "shape": [1],
            "parameters": {"content_type": "base64"}, "data": [base64.b64encode(image_bytes).decode()],
        }],
    }


def test_v2_timeout_parameter_is_a_deadline(client, images):
    body = (images / "dog.jpg").read_bytes()
    late = client.post("/v2/models/yolox-nano/infer", json=_v2_body(body, timeout=1))  # 1 microsecond
    assert late.status_code == 504, late.text
    ok = client.post("/v2/models/yolox-nano/infer", json=_v2_body(body, timeout=60_000_000))
    assert ok.status_code == 200, ok.text


def test_a_v2_batch_past_its_deadline_is_one_504_and_counted_once(client, images):
    # Its images are jobs of their own, and each used to count.
    encoded = base64.b64encode((images / "dog.jpg").read_bytes()).decode()
    batch = {"parameters": {"timeout": 1}, "inputs": [{
        "name": "IMAGE", "datatype": "BYTES", "shape": [3, 1], "parameters": {"content_type": "base64"},
        "data": [encoded] * 3}]}

    def counted() -> float:
        text = client.get("/metrics").text
        return sum(metric(text, "visionserve_deadline_exceeded_total", stage=s) for s in DEADLINE_STAGES)

    before = counted()
    assert client.post("/v2/models/yolox-nano/infer", json=batch).status_code == 504
    assert counted() == before + 1


def test_default_capacity_is_the_workers_and_one_queued_per_two(server_factory, images):
    """Without queue.max_queue, the workers run one request each and one more per two waits."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2"})
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "visionserve_capacity") == 3
    responses = concurrent_posts(srv.url, [images / "kite.jpg"] * 12)
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert "3 requests in progress" in refused.json()["error"]["message"]


@pytest.mark.parametrize(("workers", "max_queue", "capacity"), [(1, None, 2), (4, None, 6), (5, None, 7), (4, 0, 4), (2, 9, 11)])
def test_capacity_from_workers_and_max_queue(workers, max_queue, capacity):
    scheduler = Scheduler(
        RuntimeSettings(inference_workers=workers, worker_mode="threads"), QueueSettings(max_queue=max_queue)
    )
    try:
        assert scheduler.capacity == capacity
    finally:
        scheduler.shutdown()


def test_a_request_of_several_images_holds_the_free_places_it_needs():
    scheduler = Scheduler(RuntimeSettings(inference_workers=2, worker_mode="threads"), QueueSettings())
    try:
        assert scheduler.capacity == 3
        batch = scheduler.admit(images=16)  # idle: admitted, and holds every place
        assert (batch.places, scheduler.admitted) == (3, 3)
        with pytest.raises(Overloaded):
            scheduler.admit()
        batch.release()
        one = scheduler.admit()
        batch = scheduler.admit(images=4)  # one other request: the two places left
        assert (batch.places, scheduler.admitted) == (2, 3)
        one.release()
        batch.release()
        assert scheduler.admitted == 0
        two = [scheduler.admit(), scheduler.admit()]
        assert scheduler.admit(images=8).places == 1  # one place is enough to be let in
        with pytest.raises(Overloaded):
            scheduler.admit(images=2)
        assert scheduler.admitted == 3 and all(t.places == 1 for t in two)
    finally:
        scheduler.shutdown()


def test_a_slow_upload_going_past_slow_upload_bytes_gets_its_503_at_once(server_factory, images):
    server = server_factory(env={
        "VISIONSERVE_QUEUE__UPLOAD_HOLD_MS": "100", "VISIONSERVE_QUEUE__SLOW_UPLOAD_BYTES": "100000",
        "VISIONSERVE_LIMITS__BODY_TIMEOUT_S": "30", **ONE_WORKER_NO_QUEUE,
    })
    body = (images / "dog.jpg").read_bytes().ljust(200_000, b"\0")
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
    upload = connect(server.url, timeout=10)  # a 408 would come after 30 s: the read times out first
    upload.sendall(head.encode() + body[:60_000])
    filler = None
    try:
        wait_in_flight(server.url, 1)
        time.sleep(0.2)
        filler = stall(server.url, "/predict", STALLED_RAW)  # takes the place; the upload goes aside
        wait_metric(server.url, "visionserve_slow_uploads_in_progress", 1)
        try:
            upload.sendall(body[60_000:])  # past 100,000 bytes while aside
        except (BrokenPipeError, ConnectionResetError):
            pass
        head_in, _, answer = read_response(upload).partition(b"\r\n\r\n")
        assert head_in.split(b" ")[1] == b"503" and b"connection: close" in head_in.lower(), head_in
        assert json.loads(answer)["error"] == {"code": "overloaded", "message": "too many slow uploads at once; retry shortly"}
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "visionserve_rejected_requests_total", reason="slow_uploads") == 1
        assert metric(text, "visionserve_slow_uploads_in_progress") == 0
    finally:
        upload.close()
        if filler is not None:
            filler.close()


def uploads_under_way(scheduler: Scheduler, n: int) -> list:
    """``n`` requests admitted, as the admission gate admits them, and receiving their bodies."""
    tickets = [scheduler.admit() for _ in range(n)]
    for ticket in tickets:
        scheduler.receiving(ticket)
    return tickets


def slow_upload(scheduler: Scheduler):  # type: ignore[no-untyped-def]
    """An upload under way for long past ``upload_hold_ms``: a newer request may take its place."""
    (ticket,) = uploads_under_way(scheduler, 1)
    return went_slow(ticket)


def went_slow(ticket):  # type: ignore[no-untyped-def]
    ticket.receiving_since -= 10  # its body began to be awaited 10 s ago
    return ticket


def test_slow_uploads_give_their_places_up_oldest_first_within_their_bounds():
    queue = QueueSettings(max_queue=0, upload_hold_ms=0, max_slow_uploads=2, slow_upload_bytes=1000)
    scheduler = Scheduler(RuntimeSettings(inference_workers=2, worker_mode="threads"), queue)
    try:
        first, second = uploads_under_way(scheduler, 2)
        scheduler.receive_more(first, 300)
        third = scheduler.admit()  # full: the oldest upload gives its place up
        assert (first.aside, second.aside, scheduler.admitted, scheduler.aside) == (True, False, 2, 1)
        assert scheduler.aside_bytes == 300 and not scheduler.idle
        fourth = scheduler.admit()  # third is not receiving: second gives its place up
        assert (second.aside, scheduler.aside) == (True, 2)
        with pytest.raises(Overloaded):  # max_slow_uploads reached
            scheduler.receiving(third)
            scheduler.admit()
        # first's body is complete: third, receiving longer than the hold, gives it its place.
        asyncio.run(scheduler.received(first))
        assert (first.aside, third.aside, scheduler.aside, scheduler.admitted) == (False, True, 2, 2)
        assert scheduler.aside_bytes == 0
        with pytest.raises(Overloaded):  # second's too, no upload holds a place, none frees: refused
            asyncio.run(scheduler.received(second))
        assert (second.aside, scheduler.aside, scheduler.admitted) == (False, 1, 2)
        second.release()  # it holds nothing
        assert scheduler.admitted == 2
        fourth.release()
        asyncio.run(scheduler.received(third))  # a place is free: it takes it
        assert (third.aside, scheduler.aside, scheduler.admitted) == (False, 0, 2)
        first.release()
        third.release()
        assert scheduler.idle and scheduler.aside_bytes == 0 and not scheduler._receiving
    finally:
        scheduler.shutdown()


def run_scenario(queue: QueueSettings, scenario, workers: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Runs ``scenario(scheduler)`` on an event loop, the scheduler having ``workers`` worker
    threads (and, with ``queue.max_queue=0``, as many places)."""
    scheduler = Scheduler(RuntimeSettings(inference_workers=workers, worker_mode="threads"), queue)
    try:
        asyncio.run(scenario(scheduler))
    finally:
        scheduler.shutdown()


async def waiting_to_rejoin(scheduler: Scheduler, slow) -> asyncio.Future:  # type: ignore[no-untyped-def]
    """``slow``'s body is complete while the server is full: it waits for a place."""
    rejoining = asyncio.ensure_future(scheduler.received(slow))
    await asyncio.sleep(0.01)
    assert not rejoining.done()
    return rejoining


def test_a_complete_slow_upload_gets_the_next_place_freed_before_any_new_request():
    async def scenario(scheduler: Scheduler) -> None:
        slow = slow_upload(scheduler)
        newer = scheduler.admit()  # takes the place the slow upload gives up
        rejoining = await waiting_to_rejoin(scheduler, slow)
        with pytest.raises(Overloaded):  # a new request does not go ahead of it
            scheduler.admit()
        newer.release()
        await asyncio.wait_for(rejoining, 1)  # the freed place is its own
        assert scheduler.admitted == 1 and not slow.aside
        with pytest.raises(Overloaded):
            scheduler.admit()
        slow.release()
        assert scheduler.idle

    run_scenario(QueueSettings(max_queue=0, upload_hold_ms=5000), scenario)


def test_a_complete_slow_upload_waiting_gets_the_place_of_an_upload_that_went_slow_meanwhile():
    async def scenario(scheduler: Scheduler) -> None:
        slow = slow_upload(scheduler)
        (holder,) = uploads_under_way(scheduler, 1)  # takes the place the slow upload gives up
        rejoining = await waiting_to_rejoin(scheduler, slow)
        went_slow(holder)  # now a slow upload itself
        with pytest.raises(Overloaded):  # a newcomer: the holder gives its place, to the one waiting
            scheduler.admit()
        await asyncio.wait_for(rejoining, 1)
        assert holder.aside and not slow.aside and scheduler.admitted == 1
        slow.release()
        holder.release()
        assert scheduler.idle

    run_scenario(QueueSettings(max_queue=0, upload_hold_ms=5000), scenario)


def test_a_complete_slow_upload_that_waits_in_vain_is_refused_and_holds_nothing():
    async def scenario(scheduler: Scheduler) -> None:
        slow = slow_upload(scheduler)
        newer = scheduler.admit()
        with pytest.raises(Overloaded):
            await scheduler.received(slow)  # no place frees within the hold
        assert not scheduler._rejoining  # nor does anyone wait behind it now
        slow.release()  # holds nothing
        assert scheduler.admitted == 1
        newer.release()
        assert scheduler.idle and not scheduler._rejoining
        (again,) = uploads_under_way(scheduler, 1)  # and a place is free for anyone
        again.release()

    run_scenario(QueueSettings(max_queue=0, upload_hold_ms=50), scenario)


def test_slow_uploads_that_would_hold_more_than_slow_upload_bytes_together_are_refused():
    # Held back rather than refused, uploads over the bound waited for each other, and
    # stalled ones never finish: every one of them ended in a 408 (found by a probe).
    queue = QueueSettings(max_queue=0, upload_hold_ms=0, slow_upload_bytes=1000)
    scheduler = Scheduler(RuntimeSettings(inference_workers=2, worker_mode="threads"), queue)
    try:
        a, b = uploads_under_way(scheduler, 2)
        scheduler.receive_more(a, 900)
        scheduler.receive_more(b, 200)
        newer = scheduler.admit()  # a's 900 bytes fit among the slow uploads': it gives its place up
        assert (a.aside, b.aside, scheduler.aside_bytes) == (True, False, 900)
        with pytest.raises(Overloaded):  # b's 200 do not fit: it keeps its place
            scheduler.admit()
        assert not b.aside and scheduler.admitted == 2
        scheduler.receive_more(a, 100)  # 1000: within the bound
        with pytest.raises(Overloaded) as refused:  # past it
            scheduler.receive_more(a, 1)
        assert refused.value.headers["Connection"] == "close"  # its body is not read to the end
        a.release()
        assert (scheduler.aside, scheduler.aside_bytes, scheduler.admitted) == (0, 0, 2)
        newer.release()
        b.release()
        assert scheduler.idle and scheduler.in_progress == 0
    finally:
        scheduler.shutdown()


class HeldModel:
    """A stand-in model whose inference holds until ``release`` is set (``inferring`` says it
    has begun): a job that stays on its worker as long as a test needs."""

    name, labels, max_batch_size, has_wide_session = "stand-in", ["thing"], 1, False

    def __init__(self) -> None:
        self.release, self.inferring = threading.Event(), threading.Event()
        self.family = self

    def preprocess(self, pixels):
        return np.zeros((3, 2, 2), np.float32), None

    def postprocess(self, outputs, placement, size, thresholds):
        return Detections.empty(self.labels)

    def run(self, batch, wide):
        self.inferring.set()
        self.release.wait(10)
        return [np.zeros((1, 1), np.float32)]

    @staticmethod
    def prepare():
        return DecodedImage(np.zeros((2, 2, 3), np.uint8), 2, 2)


def test_a_worker_thread_is_handed_its_next_job_while_it_runs_one():
    """The pool's queue holds each worker's next job, so a worker thread never waits for the
    event loop (busy with other requests) between images. A stand-in model holds the first
    job in inference until the second has been handed over."""
    import asyncio

    model = HeldModel()

    async def two_jobs(scheduler):
        jobs = [asyncio.create_task(scheduler.run(model, model.prepare, None)) for _ in range(2)]
        while not model.inferring.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the loop has dispatched all it will
        handed = (scheduler.running, scheduler.queue_depth)
        model.release.set()
        outcomes = await asyncio.gather(*jobs)
        return handed, [o.detections for o, _ in outcomes]

    scheduler = Scheduler(RuntimeSettings(inference_workers=1, worker_mode="threads"), QueueSettings(max_queue=1))
    try:
        handed, detections = asyncio.run(two_jobs(scheduler))
    finally:
        model.release.set()
        scheduler.shutdown()
    assert handed == (2, 0)  # both with the one worker: running, and next in its queue
    assert all(d is not None and len(d) == 0 for d in detections)


def test_a_worker_thread_stuck_past_worker_timeout_s_makes_the_server_unhealthy():
    """A thread cannot be stopped: once one has spent longer than runtime.worker_timeout_s
    on one job, the scheduler says so (liveness fails), and stops saying so when it returns."""
    import asyncio

    model = HeldModel()

    async def one_stuck_job(scheduler):
        job = asyncio.create_task(scheduler.run(model, model.prepare, None))
        while not model.inferring.is_set():
            await asyncio.sleep(0.01)
        early = scheduler.stuck()
        await asyncio.sleep(0.3)
        late = scheduler.stuck()
        model.release.set()
        await job
        return early, late, scheduler.stuck()

    runtime = RuntimeSettings(inference_workers=1, worker_mode="threads", worker_timeout_s=0.2)
    scheduler = Scheduler(runtime, QueueSettings())
    try:
        early, late, after = asyncio.run(one_stuck_job(scheduler))
    finally:
        model.release.set()
        scheduler.shutdown()
    assert early is None and after is None
    assert late is not None and "worker_timeout_s = 0.2" in late and "restart the server" in late


def test_liveness_fails_while_a_job_outlasts_worker_timeout_s(server_factory):
    """End to end in the threads mode, with worker_timeout_s at 0.05 s and a 36 MP PNG (its
    decoding alone takes several times longer): /healthz and V2's live answer 503 while it
    runs, 200 after."""
    import cv2

    ramp = np.linspace(0, 255, 6000, dtype=np.uint8)
    pixels = np.dstack([np.tile(ramp, (6000, 1)), np.tile(ramp[:, None], (1, 6000)), np.full((6000, 6000), 90, np.uint8)])
    png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_TIMEOUT_S": "0.05",
                              "VISIONSERVE_LIMITS__MAX_BODY_BYTES": "100000000"})
    answers: list[httpx.Response] = []
    upload = threading.Thread(target=lambda: answers.append(
        httpx.post(srv.url + "/predict", files={"image": ("big.png", png, "image/png")}, timeout=120)))
    upload.start()
    unhealthy: dict[str, dict] = {}
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        while upload.is_alive():
            for path in ("/healthz", "/v2/health/live"):
                r = c.get(path)
                if r.status_code == 503 and path not in unhealthy:  # the first: well inside the window
                    unhealthy[path] = r.json()
                    if path == "/healthz":
                        status = c.get("/status").json()
                        unhealthy["status"] = {"status": status["status"], "stuck": bool(status["workers"]["stuck"])}
            time.sleep(0.005)
        upload.join()
        assert answers[0].status_code == 200, answers[0].text
        took = float(answers[0].headers["server-timing"].split("total;dur=")[1].split(",")[0])
        assert took > 150, took  # ms: enough for both probes to land while it is stuck
        assert c.get("/healthz").json() == {"status": "alive"} and c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/readyz").status_code == 200
    assert unhealthy["/v2/health/live"] == {"live": False}
    assert unhealthy["status"] == {"status": "unhealthy", "stuck": True}
    error = unhealthy["/healthz"]["error"]
    assert error["code"] == "unhealthy" and "worker_timeout_s = 0.05" in error["message"]
    assert "an inference worker has spent" in srv.output()


def test_v2_batch_larger_than_the_capacity_is_served(server_factory, images):
    # Each image used to take a place of its own: on an idle server with 3 places a batch
    # of 4 was refused every time, though v2.max_batch_size allows 16.
    import base64

    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2"})
    names = ["dog.jpg", "horses.jpg", "scream.jpg", "kite.jpg", "dog.jpg", "eagle.jpg"]
    data = [base64.b64encode((images / n).read_bytes()).decode() for n in names]
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [len(data)],
                        "parameters": {"content_type": "base64"}, "data": data}]}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v2/models/yolox-nano/infer", json=body)
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        counts = outputs["NUM_DETECTIONS"]["data"]
        assert len(counts) == 6 and counts[2] == 0 and counts[0] == counts[4] >= 3
        # All places are free again afterwards.
        assert metric(c.get("/metrics").text, "visionserve_requests_in_flight") == 0


def test_a_v2_batch_with_one_bad_image_leaves_none_of_its_other_images_queued(server_factory, images):
    """The 400 for the bad image came at once, but the other images' jobs stayed queued and
    ran after the request had given its places back: 20 such requests left 12 jobs queued on
    a server of 3 places, and each later request waited behind them. Now they are dropped
    before the answer goes out."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2"})
    dog = base64.b64encode((images / "dog.jpg").read_bytes()).decode()
    broken = base64.b64encode((images / "dog.jpg").read_bytes()[:2000]).decode()
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [16],
                        "parameters": {"content_type": "base64"}, "data": [broken] + [dog] * 15}]}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(3):
            r = c.post("/v2/models/yolox-nano/infer", json=body)
            assert r.status_code == 400, r.text
            text = c.get("/metrics").text
            assert metric(text, "visionserve_queue_depth") == 0 and metric(text, "visionserve_requests_in_flight") == 0


class QuickModel(HeldModel):
    """A stand-in model that answers at once, batching up to ``max_batch_size`` images."""

    def __init__(self, name: str, max_batch_size: int) -> None:
        super().__init__()
        self.name, self.max_batch_size = name, max_batch_size
        self.batches: list[int] = []

    def run(self, batch, wide):
        self.batches.append(len(batch))
        return [np.zeros((len(batch), 1), np.float32)]


def test_a_batch_waiting_to_fill_holds_back_neither_other_models_nor_a_request_gone():
    """While one model's partial batch waited for more images (up to max_queue_delay_ms, 10 s
    here), a job of another model behind it waited too, with a worker free; and a request that
    left without a job still counted as one that might join, so the batch waited out its delay."""
    batched, single = QuickModel("batched", 4), QuickModel("single", 1)

    def job(scheduler: Scheduler, ticket, model: QuickModel) -> asyncio.Future:  # type: ignore[no-untyped-def]
        token = reserve(ticket)  # the job runs under its request's place, as in the server
        try:
            return asyncio.ensure_future(scheduler.run(model, model.prepare, None))
        finally:
            unreserve(token)

    async def scenario(scheduler: Scheduler) -> None:
        tickets = [scheduler.admit() for _ in range(3)]
        first = job(scheduler, tickets[0], batched)  # waits for the two others, which may still join its batch
        await asyncio.sleep(0.05)
        assert not first.done() and batched.batches == []
        await asyncio.wait_for(job(scheduler, tickets[1], single), 2)  # another model: at once
        tickets[1].release()
        tickets[2].release()  # gone without an image: none can join now
        await asyncio.wait_for(first, 2)  # not after the 10 s delay
        tickets[0].release()

    run_scenario(QueueSettings(max_queue=4, max_batch_size=4, max_queue_delay_ms=10_000), scenario, workers=2)
    assert batched.batches == [1] and single.batches == [1]
