"""Admission right after the headers (server/refusal.py): a request takes its place before
its body arrives, a full server answers each protocol's own 503 at once, and every place is
given back however the request ends."""

from __future__ import annotations

import httpx
import pytest

from engine_helpers import metric, post_image, read_response, start_upload, wait_in_flight

ONE_PLACE = {"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "0"}


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
