"""Inference in worker processes (runtime.worker_mode): the same answers as in threads,
workers that start with the server, stop with it, and a lost worker that fails requests
instead of hanging them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from visionserve.runtime.shared_bytes import SLOT_BYTES

from engine_helpers import children, concurrent_posts, mapped_libraries, metric, post_image


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def answer(r: httpx.Response) -> list[tuple[str, float, tuple[float, ...]]]:
    assert r.status_code == 200, r.text
    return [(d["label"], d["confidence"], tuple(d["box"].values())) for d in r.json()["detections"]]


def test_processes_and_threads_give_the_same_detections(server_factory, images):
    two = {"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2", "VISIONSERVE_QUEUE__MAX_QUEUE": "8"}  # 6 at once below
    procs = server_factory(env={**two, "VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    threads = server_factory(env={**two, "VISIONSERVE_RUNTIME__WORKER_MODE": "threads"})
    # One process per worker (inference_processes = 0), as opposed to the default (one for all).
    apart = server_factory(env={**two, "VISIONSERVE_RUNTIME__WORKER_MODE": "processes",
                                "VISIONSERVE_RUNTIME__INFERENCE_PROCESSES": "0"})
    assert len(children(procs.process.pid)) == 1
    assert len(children(apart.process.pid)) == 2
    assert children(threads.process.pid) == []
    for name in ("dog.jpg", "horses.jpg", "kite.jpg"):
        expected = answer(post_image(threads.url, images / name))
        assert expected and answer(post_image(procs.url, images / name)) == expected
        assert answer(post_image(apart.url, images / name)) == expected
    # Several at once: run side by side on the single-threaded worker sessions.
    batch = concurrent_posts(procs.url, [images / "dog.jpg", images / "person.jpg"] * 3)
    assert [answer(r) for r in batch] == [answer(post_image(threads.url, images / n))
                                          for n in ("dog.jpg", "person.jpg") * 3]
    text = httpx.get(procs.url + "/metrics").text
    # Stage times measured in the workers reach the HTTP process's histograms.
    for stage in ("decode", "preprocess", "inference", "postprocess"):
        assert metric(text, "visionserve_stage_duration_seconds_count", model="yolox-nano", stage=stage) >= 9
    # Annotated images are drawn by the same code wherever the worker runs: the same bytes.
    drawn = [post_image(s.url, images / "horses.jpg", {"accept": "image/jpeg"}) for s in (procs, threads, apart)]
    assert all(r.status_code == 200 and r.headers["content-type"] == "image/jpeg" for r in drawn)
    assert drawn[0].content == drawn[1].content == drawn[2].content


def test_annotated_image_is_drawn_in_the_worker(server_factory, images):
    """The worker draws and encodes the annotated image: its pixels never cross to the HTTP
    process, which never loads OpenCV, and the drawing is timed as its own stage."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    body = (images / "dog.jpg").read_bytes()
    with srv.client() as c:
        r = c.post("/predict", params={"format": "png"}, files={"image": ("dog.jpg", body, "image/jpeg")})
        jpeg = c.post("/predict", files={"image": ("dog.jpg", body, "image/jpeg")}, headers={"accept": "image/jpeg"})
        text = c.get("/metrics").text
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert jpeg.status_code == 200 and jpeg.content.startswith(b"\xff\xd8\xff")
    import cv2
    import numpy as np

    drawn = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == original.shape
    # Boxes were drawn on the real pixels (not on a blank stand-in): mostly the photo, partly changed.
    same = np.mean(np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) < 40)
    assert 0.5 < same < 0.999
    stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert float(stages["render"]) > 0 and float(stages["total"]) > float(stages["render"])
    assert metric(text, "visionserve_stage_duration_seconds_count", model="yolox-nano", stage="render") == 2
    assert "cv2" not in mapped_libraries(srv.process.pid)


def test_raw_pixels_run_in_a_worker(server_factory, images):
    """The V2 protocol's UINT8 tensors go to the workers as pixels, not as encoded bytes."""
    import cv2

    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    (engine,) = children(srv.process.pid)
    rgb = cv2.cvtColor(cv2.imread(str(images / "dog.jpg")), cv2.COLOR_BGR2RGB)
    payload = {"inputs": [{"name": "PIXELS", "shape": list(rgb.shape), "datatype": "UINT8",
                           "data": rgb.flatten().tolist()}]}
    r = httpx.post(srv.url + "/v2/models/yolox-nano/infer", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    labels = r.json()["outputs"]
    assert "dog" in str(labels)
    # The second time (the first imports what raw pixels need): through shared memory.
    before = read_chars(engine)
    assert httpx.post(srv.url + "/v2/models/yolox-nano/infer", json=payload, timeout=60).json() == r.json()
    assert read_chars(engine) - before < rgb.nbytes // 10


def test_sigterm_stops_the_workers_and_exits_0(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    workers = children(srv.process.pid)
    assert len(workers) >= 1 and all(alive(p) for p in workers)
    assert post_image(srv.url, images / "dog.jpg").status_code == 200
    assert srv.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers):
        assert time.monotonic() < deadline, "inference workers outlived the server"
        time.sleep(0.05)


def test_a_lost_worker_fails_requests_and_readiness_instead_of_hanging(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes",
                              "VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1"})
    (worker,) = children(srv.process.pid)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/readyz").status_code == 200:
        assert time.monotonic() < deadline, "still ready without its inference worker"
        time.sleep(0.05)
    r = post_image(srv.url, images / "dog.jpg")
    assert r.status_code >= 500 and "worker" in r.json()["error"]["message"]
    assert srv.stop(signal.SIGTERM) == 0


def read_chars(pid: int) -> int:
    """Bytes the process has read with read() and friends (pipes included)."""
    line = next(ln for ln in Path(f"/proc/{pid}/io").read_text().splitlines() if ln.startswith("rchar:"))
    return int(line.split()[1])


def test_uploads_reach_the_worker_through_shared_memory_not_its_pipe(server_factory, images):
    """runtime/shared_bytes.py: a typical upload is copied once into shared memory; only a
    small message goes down the worker's pipe. One too large for a slot still works, by pipe."""
    import cv2
    import numpy as np

    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    (engine,) = children(srv.process.pid)
    dog = images / "dog.jpg"
    assert post_image(srv.url, dog).status_code == 200
    before = read_chars(engine)
    for _ in range(5):
        r = post_image(srv.url, dog)
        assert r.status_code == 200 and "dog" in {d["label"] for d in r.json()["detections"]}
    assert read_chars(engine) - before < dog.stat().st_size  # five uploads, not one came by pipe
    # Over a slot's size: noise compresses badly, so a 1800x1800 JPEG of it is about 7 MB.
    pixels = np.random.default_rng(0).integers(0, 255, (1800, 1800, 3), dtype=np.uint8)
    big = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    assert len(big) > SLOT_BYTES
    before = read_chars(engine)
    r = httpx.post(srv.url + "/predict", files={"image": ("noise.jpg", big, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    assert read_chars(engine) - before >= len(big)


def test_the_http_process_holds_no_inference_libraries(server_factory, images):
    """With worker processes, ONNX Runtime and OpenCV live in the inference process only:
    the HTTP process stays small, and the one process hosts both workers."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2", "VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    assert post_image(srv.url, images / "dog.jpg").status_code == 200
    (engine,) = children(srv.process.pid)
    http_libs, engine_libs = mapped_libraries(srv.process.pid), mapped_libraries(engine)
    assert "onnxruntime" in engine_libs and "cv2" in engine_libs
    assert "onnxruntime" not in http_libs and "cv2" not in http_libs


def test_inference_process_gets_the_import_path_added_at_run_time(tmp_path, monkeypatch):
    """A server started by a script that put visionserve on sys.path itself (not installed)
    must start an inference process that finds the same code."""
    import sys

    from visionserve.runtime.workers import _child_env

    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    path = _child_env()["PYTHONPATH"].split(os.pathsep)
    assert path[0] == str(tmp_path)
    assert not any(p.startswith(sys.base_prefix) for p in path)


def test_inference_process_logs_in_the_servers_format(server_factory):
    """With --log-format json, the inference process's own lines are JSON too (here: the
    batching check that runs where the sessions are)."""
    import json

    srv = server_factory("--log-format", "json", "--log-level", "info",
                         env={"VISIONSERVE_QUEUE__MAX_BATCH_SIZE": "4", "VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2",
                              "VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    srv.stop()
    lines = [line for line in srv.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, from either process, is JSON
    batching = [r for r in records if "dynamic batching up to 4 images" in r["message"]]
    assert len(batching) == 2 and {r["logger"] for r in batching} == {"visionserve.models"}  # one per worker
