"""Inference in worker processes (runtime.worker_mode): the same answers as in threads,
workers that start with the server, stop with it, and a lost worker process that fails its
requests at once and starts again with its models."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path

import httpx
import pytest

from visionserve.config import RuntimeSettings
from visionserve.imaging.decode import decode_image
from visionserve.runtime import workers
from visionserve.runtime.shared_bytes import SLOT_BYTES
from visionserve.runtime.workers import RESTART_DELAYS_S, WorkerPool, restart_delay
from visionserve.store.manifest import ModelManifest
from visionserve.store.store import ModelStore
from visionserve.types import Thresholds

from engine_helpers import children, concurrent_posts, copy_model, mapped_libraries, metric, post_image, thread_policies


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


@pytest.fixture()
def manifest(model_dir: Path, mirror: Path) -> ModelManifest:
    return ModelStore(model_dir, mirror).ensure("yolox-nano")


async def back_up(pool: WorkerPool) -> None:
    """Waits until ``pool``'s worker 0 takes jobs again (its process started and loaded)."""
    deadline = time.monotonic() + 30
    while not pool.up(0):
        assert time.monotonic() < deadline, "the worker did not come back"
        await asyncio.sleep(0.02)


def submit_job(pool: WorkerPool, prepare) -> asyncio.Future:  # type: ignore[no-untyped-def]
    """Hands one job on yolox-nano to ``pool``'s worker 0 (on its event loop, running);
    the future gets the worker's reply."""
    future = asyncio.get_running_loop().create_future()
    spec = ("yolox-nano", prepare, Thresholds(0.3, 0.45, 100), None, time.perf_counter(), None, pool.slot())
    pool.submit(0, [spec], False, future.set_result)
    return future


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
    # Minimal padding is decided where the sessions load; /status tells it either way.
    for srv in (procs, threads, apart):
        model = httpx.get(srv.url + "/status").json()["models"][0]
        assert model["input"] == {"width": 416, "height": 416, "padded_to_multiple_of": 32}
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


def test_a_killed_inference_process_starts_again_with_its_models(server_factory, images):
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes",
                              "VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2"})
    expected = answer(post_image(srv.url, images / "dog.jpg"))
    (first,) = children(srv.process.pid)
    assert httpx.get(srv.url + "/status").json()["workers"] == {
        "mode": "processes", "count": 2, "cpu_policy": "batch", "processes": [first], "restarts": 0, "down": None}
    # runtime.cpu_policy holds in the inference process too (it sets its own threads).
    assert thread_policies(first) == {os.SCHED_BATCH}
    os.kill(first, signal.SIGKILL)
    seen_unready = False
    deadline = time.monotonic() + 30
    while True:  # not ready while it starts again and loads the model, then ready
        ready = httpx.get(srv.url + "/readyz").status_code == 200
        seen_unready |= not ready
        if ready and seen_unready:
            break
        assert time.monotonic() < deadline, "not ready again within 30 s of losing its inference process"
        time.sleep(0.02)
    (second,) = children(srv.process.pid)
    assert second != first and not alive(first)
    assert answer(post_image(srv.url, images / "dog.jpg")) == expected
    batch = concurrent_posts(srv.url, [images / "dog.jpg"] * 3)  # both workers are back (capacity 3)
    assert [answer(r) for r in batch] == [expected] * 3
    assert metric(httpx.get(srv.url + "/metrics").text, "visionserve_inference_process_restarts_total") == 1
    status = httpx.get(srv.url + "/status").json()
    assert status["status"] == "ready" and status["workers"]["processes"] == [second]
    assert status["workers"]["restarts"] == 1 and status["workers"]["down"] is None
    assert srv.stop(signal.SIGTERM) == 0
    out = srv.output()
    assert f"inference process {first} exited (code -9)" in out
    assert f"inference process {second} started again (restart 1), with yolox-nano" in out
    assert "Traceback" not in out


def test_while_the_only_inference_process_loads_its_models_again_requests_get_503_at_once(server_factory, images):
    """Jobs were written to the restarted process's pipe, behind the loading of its models,
    and waited for as long as that took: forever, for a process stopped while loading."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"})
    (first,) = children(srv.process.pid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not (kids := [k for k in children(srv.process.pid) if k != first]):
        assert time.monotonic() < deadline, "no inference process started again"
        time.sleep(0.002)
    (second,) = kids
    os.kill(second, signal.SIGSTOP)  # while it loads the model (it takes most of a second)
    try:
        with httpx.Client(timeout=10) as c:
            r = c.post(srv.url + "/predict", files={"image": ("dog.jpg", (images / "dog.jpg").read_bytes())})
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        assert "starting again" in r.json()["error"]["message"]
    finally:
        os.kill(second, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while httpx.get(srv.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready again within 30 s"
        time.sleep(0.05)
    assert post_image(srv.url, images / "dog.jpg").status_code == 200


def test_a_model_a_restarted_process_cannot_load_again_fails_alone(server_factory, images, model_dir, tmp_path):
    """Its process was killed and started again, in a loop, and every model got 503 while
    /status said them all ready; now the others serve on and it is marked failed."""
    store = tmp_path / "store"
    store.mkdir()
    copy_model(store, model_dir / "yolox-nano", "yolox-nano")
    spare = copy_model(store, model_dir / "yolox-nano", "spare")
    srv = server_factory(env={
        "VISIONSERVE_RUNTIME__WORKER_MODE": "processes", "VISIONSERVE_MODEL_DIR": str(store),
        "VISIONSERVE_MODELS": '[{"name": "yolox-nano"}, {"name": "spare"}]',
    })
    assert post_image(srv.url, images / "dog.jpg", path="/predict/spare").status_code == 200
    (first,) = children(srv.process.pid)
    for onnx in spare.glob("*.onnx"):
        onnx.rename(onnx.with_suffix(".gone"))
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (status := httpx.get(srv.url + "/status").json())["workers"]["down"] is not None or first in status[
        "workers"]["processes"]:
        assert time.monotonic() < deadline, f"not back within 30 s:\n{srv.output()}"
        time.sleep(0.05)
    models = {m["name"]: m for m in status["models"]}
    assert models["yolox-nano"]["state"] == "ready" and models["spare"]["state"] == "failed", models
    assert status["status"] == "degraded" and status["workers"]["restarts"] == 1
    assert answer(post_image(srv.url, images / "dog.jpg"))  # the default model serves on
    lost = post_image(srv.url, images / "dog.jpg", path="/predict/spare")
    assert lost.status_code == 503 and "lost when its inference process started again" in lost.text, lost.text
    time.sleep(1.5)  # no restart loop
    assert children(srv.process.pid) == status["workers"]["processes"]
    assert srv.stop(signal.SIGTERM) == 0


def test_a_model_whose_load_the_lost_process_took_down_loads_again(server_factory, images):
    """Killed as the server starts: whether the model's load was under way in it, sent to it
    dead, or sent after it was back, the server becomes ready (the pool-level test below
    takes each path on purpose)."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes"}, wait_ready=None)
    deadline = time.monotonic() + 30
    while not (kids := children(srv.process.pid)):  # started before the HTTP stack imports
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(kids[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(srv.url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"never ready after its inference process was lost:\n{srv.output()}"
        time.sleep(0.05)
    assert "dog" in {label for label, _, _ in answer(post_image(srv.url, images / "dog.jpg"))}
    assert f"inference process {kids[0]} exited" in srv.output()
    assert srv.stop(signal.SIGTERM) == 0


def test_an_inference_process_that_keeps_exiting_starts_again_after_a_delay(server_factory, images):
    """A crash loop does not spin: the second exit soon after a start waits RESTART_DELAYS_S[0]
    (1 s) before the next start, and SIGTERM during that wait still stops the server cleanly."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes",
                              "VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1"})
    (first,) = children(srv.process.pid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (kids := [p for p in children(srv.process.pid) if p != first]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(kids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while f"inference process {kids[0]} exited" not in srv.output():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "starts again in 1 s" in srv.output()
    # Down, waiting for the delay: detection requests get 503 with Retry-After, not a hang.
    r = post_image(srv.url, images / "dog.jpg")
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "starting again" in r.json()["error"]["message"]
    status = httpx.get(srv.url + "/status").json()
    assert status["status"] == "restarting" and f"inference process {kids[0]} exited" in status["workers"]["down"]
    assert children(srv.process.pid) == [] and status["workers"]["processes"] == []  # none runs, none is listed
    assert srv.stop(signal.SIGTERM) == 0
    assert "Traceback" not in srv.output()


def test_while_one_inference_process_is_down_the_others_take_every_request(server_factory, images):
    """One process per worker; worker 0's process exits twice in a row, so it stays down for
    the 1 s restart delay. Requests meanwhile all go to the other worker, the lone ones too
    (they would run on worker 0's all-cores session): none fails."""
    srv = server_factory(env={"VISIONSERVE_RUNTIME__WORKER_MODE": "processes", "VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "2",
                              "VISIONSERVE_RUNTIME__INFERENCE_PROCESSES": "0"})
    expected = answer(post_image(srv.url, images / "dog.jpg"))
    first, other = httpx.get(srv.url + "/status").json()["workers"]["processes"]  # in the order of their workers
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (new := [p for p in children(srv.process.pid) if p not in (first, other)]):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(new[0], signal.SIGKILL)
    while f"inference process {new[0]} exited" not in srv.output():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with httpx.Client() as c:
        for _ in range(5):
            r = c.post(srv.url + "/predict", files={"image": ("dog.jpg", (images / "dog.jpg").read_bytes(), "image/jpeg")},
                       timeout=30)
            assert answer(r) == expected
    # Several at once (the capacity: 3) run on the workers' single sessions: all on worker 1.
    assert [answer(r) for r in concurrent_posts(srv.url, [images / "dog.jpg"] * 3)] == [expected] * 3
    assert children(srv.process.pid) == [other]  # still waiting out the delay
    assert srv.stop(signal.SIGTERM) == 0


def test_jobs_of_a_lost_inference_process_fail_at_once(manifest, images):
    """The job a process was running when it exited fails with 500 (it may be what killed it),
    the one waiting behind it with 503 and Retry-After; once started again with its models,
    the worker answers jobs as before."""
    dog = partial(decode_image, (images / "dog.jpg").read_bytes())

    async def main() -> None:
        pool = WorkerPool(1, RuntimeSettings(worker_mode="processes"))
        pool.start()
        try:
            await asyncio.to_thread(pool.load, manifest, 1)
            status, (results, ran) = await submit_job(pool, dog)
            assert status == "ok" and ran
            assert results[0][0] is None
            labels = results[0][2][2].tolist()
            (pid,) = pool.pids
            running, waiting = submit_job(pool, dog), submit_job(pool, dog)
            os.kill(pid, signal.SIGKILL)
            (s1, e1), (s2, e2) = await asyncio.wait_for(asyncio.gather(running, waiting), 10)
            assert (s1, e1.status) == ("error", 500) and "exited while running this request" in e1.message
            assert (s2, e2.status, e2.headers["Retry-After"]) == ("error", 503, "1")
            assert pool.broken and not pool.up(0)
            await back_up(pool)
            assert pool.broken is None and pool.restarts == 1 and pool.pids != [pid]
            status, (results, ran) = await submit_job(pool, dog)
            assert status == "ok" and results[0][2][2].tolist() == labels
        finally:
            pool.close()

    asyncio.run(main())


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


def test_a_model_load_cut_short_by_a_lost_process_loads_again_once_it_is_back(manifest, caplog):
    """Both ways a load meets a dead process: sent to it after it died (the pipe is broken
    before the event loop has seen the exit), and under way in it when it is killed."""

    async def main() -> None:
        pool = WorkerPool(1, RuntimeSettings(worker_mode="processes"))
        pool.start()
        loop = asyncio.get_running_loop()
        try:
            (pid,) = pool.pids
            os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.005)
            # The loop is held (this sleep) while the load is sent: it meets the dead process.
            sent_dead = loop.run_in_executor(None, pool.load, manifest, 1)
            time.sleep(0.5)
            report = await asyncio.wait_for(sent_dead, 60)
            assert report["max_batch_size"] == 1 and pool.restarts == 1
            # Under way: the process is killed while it loads (about 0.2 s of work).
            (pid,) = pool.pids
            under_way = loop.run_in_executor(None, pool.load, manifest, 1)
            await asyncio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            assert (await asyncio.wait_for(under_way, 60))["max_batch_size"] == 1
            assert pool.restarts == 2 and pool.broken is None and pool.up(0)
        finally:
            pool.close()

    with caplog.at_level(logging.INFO, logger="visionserve.workers"):
        asyncio.run(main())
    retries = [r for r in caplog.records if "loading it again once it is back" in r.getMessage()]
    assert len(retries) == 2


def test_a_job_that_outlasts_worker_timeout_s_stops_its_process_but_a_load_does_not(manifest, images):
    """runtime.worker_timeout_s, here 0.05 s: a model load (longer than that: two sessions
    made and warmed) is left alone, first time and on the restart; a job stuck in the
    worker gets 500 when its process is stopped, the job behind it 503."""
    dog = partial(decode_image, (images / "dog.jpg").read_bytes())

    async def main() -> None:
        pool = WorkerPool(1, RuntimeSettings(worker_mode="processes", worker_timeout_s=0.05))
        pool.start()
        try:
            started = time.monotonic()
            await asyncio.to_thread(pool.load, manifest, 1)
            assert time.monotonic() - started > 0.05 and pool.restarts == 0
            replies = [submit_job(pool, partial(time.sleep, 3600)), submit_job(pool, dog)]  # stuck, one behind it
            (s1, stuck), (s2, behind) = await asyncio.wait_for(asyncio.gather(*replies), 10)
            assert (s1, stuck.status) == ("error", 500) and "longer than 0.05 s" in stuck.message
            assert (s2, behind.status) == ("error", 503)
            await back_up(pool)
            await asyncio.sleep(0.2)  # several watchdog rounds after the reload
            assert pool.restarts == 1 and pool.broken is None
        finally:
            pool.close()

    asyncio.run(main())


def test_a_restarts_reload_that_hangs_is_stopped_even_with_no_limit_on_jobs(
    model_dir, mirror, tmp_path, monkeypatch, caplog
):
    """runtime.worker_timeout_s = 0 lifts the limit on one job, not the one on a restart's
    reload (LOAD_TIMEOUT_S, here 0.5 s): it turned the watchdog off, and a reload stuck in
    the restarted process (here reading a model file that became a FIFO nobody writes to)
    left the worker down for good."""
    store = tmp_path / "store"
    store.mkdir()
    copy_model(store, model_dir / "yolox-nano", "yolox-nano")
    manifest = ModelStore(store, mirror).ensure("yolox-nano")

    async def main() -> None:
        pool = WorkerPool(1, RuntimeSettings(worker_mode="processes", worker_timeout_s=0))
        pool.start()
        try:
            await asyncio.to_thread(pool.load, manifest, 1)
            monkeypatch.setattr(workers, "LOAD_TIMEOUT_S", 0.5)  # after the client's load, which it limits too
            onnx = store / "yolox-nano" / manifest.file
            onnx.unlink()
            os.mkfifo(onnx)
            (pid,) = pool.pids
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while pool.restarts < 2:  # the reload hung, its process was stopped, and started again
                assert time.monotonic() < deadline, f"a hung reload was never stopped: {pool.restarts} restart(s)"
                await asyncio.sleep(0.05)
        finally:
            pool.close()

    with caplog.at_level(logging.ERROR, logger="visionserve.workers"):
        asyncio.run(main())
    assert any("loading its models again" in r.getMessage() for r in caplog.records)


def test_restart_delays_grow_only_for_a_process_that_keeps_exiting():
    assert restart_delay(1) == 0.0  # one exit: at once
    assert [restart_delay(n) for n in range(2, 2 + len(RESTART_DELAYS_S))] == list(RESTART_DELAYS_S)
    assert restart_delay(100) == RESTART_DELAYS_S[-1]
    assert list(RESTART_DELAYS_S) == sorted(RESTART_DELAYS_S)
