"""Start-up readiness and graceful drain on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from PIL import Image

from engine_helpers import children, connect, metric, post_image, read_until_closed, wait_in_flight
from visionserve.config import Settings
from visionserve.errors import ModelNotReady
from visionserve.runtime.model import ServedModel
from visionserve.runtime.registry import ModelRegistry
from visionserve.store.store import ModelStore


def test_sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_0(server_factory, images, tmp_path):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "8"})
    # A 10-megapixel PNG takes a few hundred ms to decode, so four of them on one worker are
    # surely still in flight when the test has seen them all arrive.
    big = tmp_path / "big.png"
    Image.open(images / "kite.jpg").resize((4000, 2664)).save(big, compress_level=1)
    results: list[httpx.Response] = []

    def send() -> None:
        results.append(post_image(srv.url, big))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while metric(httpx.get(srv.url + "/metrics").text, "visionserve_requests_in_flight") < 4:
        assert time.monotonic() < deadline, "requests never arrived"
        time.sleep(0.005)
    srv.process.send_signal(signal.SIGTERM)
    # While draining (the four uploads keep it busy for a second or more): still listening,
    # new detections and readiness refused.
    late = post_image(srv.url, images / "dog.jpg")
    ready = httpx.get(srv.url + "/readyz")
    v2_ready = httpx.get(srv.url + "/v2/health/ready")
    status = httpx.get(srv.url + "/status")
    still_running = sum(t.is_alive() for t in threads)
    for t in threads:
        t.join(60)
    assert still_running > 0, "the drain ended before the checks: they prove nothing"
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["detections"] for r in results)
    assert late.status_code == 503 and late.json()["error"]["code"] == "overloaded"
    assert ready.status_code == 503
    assert (v2_ready.status_code, v2_ready.json()) == (503, {"ready": False})
    assert status.json()["status"] == "draining"
    assert srv.process.wait(30) == 0
    assert "draining" in srv.output()


def test_sigterm_when_idle_exits_0_at_once(server_factory):
    srv = server_factory()
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(15) == 0


def test_not_ready_until_warm(model_dir, monkeypatch):
    """A loaded model is not ready, and no detection is sent to it, until its warm-up (a run
    of each of its sessions) has finished: the warm-up is held here until the test has looked."""
    entered, release, warmed = threading.Event(), threading.Event(), []
    real_warm_up = ServedModel.warm_up

    def held_warm_up(model: ServedModel) -> None:
        entered.set()
        assert release.wait(30)
        real_warm_up(model)
        warmed.append(model.name)

    monkeypatch.setattr(ServedModel, "warm_up", held_warm_up)
    settings = Settings(model_dir=model_dir, models=[{"name": "yolox-nano"}])
    registry = ModelRegistry(settings, ModelStore(model_dir))
    loading = threading.Thread(target=registry.load_configured)
    loading.start()
    try:
        assert entered.wait(60), "the warm-up never began"
        assert not registry.ready
        assert registry.status()[0]["state"] == "loading" and not registry.status()[0]["ready"]
        with pytest.raises(ModelNotReady):
            registry.get("yolox-nano")
    finally:
        release.set()
        loading.join(60)
    assert registry.ready and registry.get("yolox-nano").state.value == "ready"
    assert warmed == ["yolox-nano"]


def test_a_second_sigterm_stops_at_once_and_the_request_cut_short_gets_a_json_answer(server_factory):
    srv = server_factory()
    with connect(srv.url, timeout=15) as s:
        # A request whose body never comes: it holds the drain until the second signal.
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
                  + b"\xff" * 100)
        time.sleep(0.3)
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        srv.process.send_signal(signal.SIGTERM)
        answer = read_until_closed(s, 15)
    assert answer is not None, "the connection was still open 15 s after the second SIGTERM"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"content-type: application/json" in head.lower(), answer[:300]
    assert json.loads(body)["error"] == {"code": "overloaded", "message": "the server stopped before answering"}
    assert srv.process.wait(15) == 0
    out = srv.output()
    assert "second SIGTERM: stopping without waiting" in out and "Traceback" not in out


def test_a_drain_held_by_a_stuck_inference_process_ends_drain_timeout_s_after_sigterm(server_factory, images):
    """The drain's limit once counted twice (uvicorn's graceful shutdown got it again) and
    closing the inference processes added 5 s: 2 x drain_timeout_s + 5 s in all, past a
    Kubernetes grace period of drain_timeout_s + a little."""
    drain_s = 3
    srv = server_factory(env={
        "VISIONSERVE_RUNTIME__WORKER_MODE": "processes", "VISIONSERVE_QUEUE__DRAIN_TIMEOUT_S": str(drain_s),
    })
    (child,) = children(srv.process.pid)
    os.kill(child, signal.SIGSTOP)  # a job will never finish
    answers: list[httpx.Response] = []
    try:
        sender = threading.Thread(target=lambda: answers.append(post_image(srv.url, images / "dog.jpg")))
        sender.start()
        wait_in_flight(srv.url, 1)
        start = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(30) == 0
        took = time.monotonic() - start
        sender.join(10)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The drain's 3 s, then at most 1 s for answers under way and 2 s for the processes, and
    # some room for a busy machine: before, 2 x 3 + 5 = 11 s.
    assert drain_s <= took < drain_s + 5, took
    assert answers and answers[0].status_code == 503, answers
    assert answers[0].json()["error"]["message"] == "the server stopped before answering"



def test_sigterm_while_the_model_loads_exits_0_at_once(server_factory):
    srv = server_factory(wait_ready=False)
    ready = httpx.get(srv.url + "/readyz")
    assert ready.status_code == 503 and "still loading" in ready.text, ready.text  # the signal comes while it loads
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(15) == 0
    assert "Traceback" not in srv.output()


def test_sigterm_while_an_inference_process_loads_the_model_exits_0_at_once(server_factory):
    """The load waited for an answer the stopped inference process never gave: the exit
    came LOAD_TIMEOUT_S (300 s) later, with a traceback. The process is stopped as soon as
    the server listens, so that the load is under way, unanswered, when the signal comes."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"}, wait_ready=False)
    (child,) = children(srv.process.pid)
    os.kill(child, signal.SIGSTOP)
    try:
        time.sleep(0.3)
        ready = httpx.get(srv.url + "/readyz")
        assert ready.status_code == 503 and "still loading" in ready.text, ready.text
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(15) == 0
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "Traceback" not in srv.output()


def test_after_the_drain_other_requests_in_progress_get_what_is_left_of_drain_timeout_s(server_factory):
    """The drain waits for detection requests only; uvicorn then waits for the others. Cut
    after 1 s, a repository load whose body was still coming got 503 under a 30 s drain."""
    srv = server_factory()
    body = b'{"parameters": {}}'
    with connect(srv.url, timeout=15) as s:
        s.sendall(b"POST /v2/repository/models/yolox-nano/load HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(2.5)
        s.sendall(body[5:])
        answer = read_until_closed(s, 15)
    assert answer is not None and answer.startswith(b"HTTP/1.1 200 "), answer
    assert srv.process.wait(15) == 0
