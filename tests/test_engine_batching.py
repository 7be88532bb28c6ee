"""Dynamic batching: a batch-capable YOLOX-Nano made from the fixed-batch export, and the
same detections batched as unbatched."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from engine_helpers import concurrent_posts, metric

IMAGES = ["dog.jpg", "person.jpg", "horses.jpg", "eagle.jpg", "giraffe.jpg", "scream.jpg", "dog.jpg", "person.jpg"]


@pytest.fixture(scope="module")
def manifest(model_dir):
    from visionserve.store.store import ModelStore

    return ModelStore(model_dir).manifest("yolox-nano")


def test_fixed_batch_graph_gets_a_dynamic_batch_dimension_with_identical_outputs(manifest, images):
    from visionserve.config import RuntimeSettings
    from visionserve.imaging.decode import decode_image
    from visionserve.runtime.model import ServedModel

    single = ServedModel(manifest, RuntimeSettings())
    single.load()
    batched = ServedModel(manifest, RuntimeSettings(), max_batch_size=4)
    batched.load()
    assert single.max_batch_size == 1 and batched.max_batch_size == 4
    tensors = np.stack([
        batched.family.preprocess(decode_image((images / n).read_bytes()).pixels)[0] for n in IMAGES[:4]
    ])
    out = batched.run(tensors)[0]
    assert out.shape[0] == 4
    for i in range(4):
        ref = single.run(tensors[i : i + 1])[0]
        np.testing.assert_allclose(out[i : i + 1], ref, atol=1e-4)


def _by_label(response: httpx.Response) -> list[tuple[str, tuple[float, ...], float]]:
    return sorted((d["label"], tuple(d["box"].values()), d["confidence"]) for d in response.json()["detections"])


def test_batched_server_answers_as_the_unbatched_one(server_factory, images):
    one_worker = {"VISIONSERVE_RUNTIME__INFERENCE_WORKERS": "1", "VISIONSERVE_QUEUE__MAX_QUEUE": "16"}
    srv = server_factory(env={
        **one_worker, "VISIONSERVE_QUEUE__MAX_BATCH_SIZE": "4", "VISIONSERVE_QUEUE__MAX_QUEUE_DELAY_MS": "50",
    })
    # Images in one batch share one size: batching pads to the full size, so the reference does too.
    reference = server_factory(env={**one_worker, "VISIONSERVE_RUNTIME__MINIMAL_PADDING": "false"})
    paths = [images / n for n in IMAGES]
    batched = concurrent_posts(srv.url, paths)
    unbatched = concurrent_posts(reference.url, paths)
    for b, u, name in zip(batched, unbatched, IMAGES):
        assert b.status_code == u.status_code == 200, name
        got, want = _by_label(b), _by_label(u)
        assert [g[0] for g in got] == [w[0] for w in want], name
        for g, w in zip(got, want):
            assert np.allclose(g[1], w[1], atol=0.05) and abs(g[2] - w[2]) < 1e-3, name
    text = httpx.get(srv.url + "/metrics").text
    images_run = metric(text, "visionserve_batch_size_sum", model="yolox-nano")
    runs = metric(text, "visionserve_batch_size_count", model="yolox-nano")
    assert images_run == len(IMAGES) and runs < len(IMAGES)  # some images shared an inference
