"""/metrics and the Server-Timing header after real requests."""

from __future__ import annotations

import base64

from engine_helpers import metric

STAGES = ("queue", "decode", "preprocess", "inference", "postprocess", "total")


def test_server_timing_names_every_stage_in_every_protocols_detection(client, images):
    dog = (images / "dog.jpg").read_bytes()
    v2 = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2], "parameters": {"content_type": "base64"},
                      "data": [base64.b64encode(dog).decode()] * 2}]}
    for r in (client.post("/predict", files={"image": ("dog.jpg", dog, "image/jpeg")}),
              client.post("/predict?format=jpeg", files={"image": ("dog.jpg", dog, "image/jpeg")}),
              client.post("/v1/vision/detection", files={"image": ("dog.jpg", dog, "image/jpeg")}),
              client.post("/v2/models/yolox-nano/infer", json=v2)):  # a batch: its slowest image
        assert r.status_code == 200, r.text
        entries = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
        assert set(STAGES) <= set(entries), (r.url, entries)
        assert all(float(v) >= 0 for v in entries.values())
        assert float(entries["total"]) >= float(entries["inference"])


def test_metrics_count_requests_by_route_and_status_and_time_each_stage(client, images):
    before = client.get("/metrics").text
    body = (images / "dog.jpg").read_bytes()
    for _ in range(3):
        assert client.post("/predict", files={"image": ("dog.jpg", body, "image/jpeg")}).status_code == 200
    assert client.post("/predict/no-such-model", files={"image": ("dog.jpg", body)}).status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text

    def added(name: str, **labels: str) -> float:
        """How much this test's requests added to a series (the server is shared)."""
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert added("visionserve_http_requests_total", route="/predict", method="POST", status="200") == 3
    assert added("visionserve_http_requests_total", route="/predict/{model}", method="POST", status="404") == 1
    for stage in STAGES:  # the unknown model's request never reached a stage
        assert added("visionserve_stage_duration_seconds_count", model="yolox-nano", stage=stage) == 3, stage
    assert added("visionserve_batch_size_count", model="yolox-nano") == 3
    assert added("visionserve_http_request_duration_seconds_count", route="/predict") == 3
    for gauge in ("visionserve_queue_depth", "visionserve_requests_in_flight", "visionserve_capacity"):
        assert f"\n{gauge} " in text
    assert "visionserve_rejected_requests_total" in text and "visionserve_deadline_exceeded_total" in text


def test_starlette_routes_are_counted_under_their_own_path_not_as_unmatched(client):
    # /metrics and /openapi.json are Starlette routes, which do not name themselves in the
    # request's scope: they were counted with the 404s, as "unmatched".
    before = client.get("/metrics").text
    client.get("/openapi.json")
    assert client.get("/no-such-page").status_code == 404
    text = client.get("/metrics").text

    def added(**labels: str) -> float:
        return metric(text, "visionserve_http_requests_total", **labels) - metric(before, "visionserve_http_requests_total", **labels)

    assert added(route="/metrics", method="GET", status="200") == 1  # the first scrape
    assert added(route="/openapi.json", method="GET", status="200") == 1
    assert added(route="unmatched", method="GET", status="200") == 0
    assert added(route="unmatched", method="GET", status="404") == 1


def test_a_kept_series_is_the_one_its_labels_name_and_metrics_do_not_share_them():
    from visionserve.metrics import Metrics

    m = Metrics()
    m.observe_request("/predict", "POST", 200, 0.01)
    m.observe_request("/predict", "POST", 200, 0.02)
    m.observe_request("/predict", "POST", 503, 0.0)
    m.child(m.inference_runs, "yolox-nano", "worker").inc()
    m.child(m.inference_runs, "yolox-nano", "wide").inc(2)
    assert m.child(m.rejected, "queue_full") is m.child(m.rejected, "queue_full")
    text = m.render().decode()
    assert metric(text, "visionserve_http_requests_total", route="/predict", method="POST", status="200") == 2
    assert metric(text, "visionserve_http_requests_total", route="/predict", method="POST", status="503") == 1
    assert metric(text, "visionserve_http_request_duration_seconds_count", route="/predict") == 3
    assert metric(text, "visionserve_inference_runs_total", model="yolox-nano", mode="wide") == 2
    assert metric(text, "visionserve_inference_runs_total", model="yolox-nano", mode="worker") == 1
