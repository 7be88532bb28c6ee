"""The darknet importer against an independent darknet implementation: OpenCV 4.x's readNetFromDarknet.

OpenCV names a convolution's own output ``conv_<layer index>``; a linear convolution without
batch norm ends there, so that is the raw tensor a [region] / [yolo] layer decodes. Its
``detection_out`` / ``yolo_<i>`` outputs are OpenCV's own decoding: rows ordered by grid row,
column, then anchor, holding cx, cy, w, h (relative), objectness and objectness x class score
(zeroed below the layer's ``thresh``; for [region], also zeroed by darknet's per-class NMS
at IoU 0.4).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from visionserve.darknet import import_darknet
from visionserve.darknet.weights import encode_header
from visionserve.families import get_family
from visionserve.families.darknet_yolo import decode_yolo_head
from visionserve.families.yolov2_region import decode_region
from visionserve.store.labels import VOC_20
from visionserve.types import Thresholds
from visionserve.vision.boxes import box_iou

if not hasattr(cv2.dnn, "readNetFromDarknet"):  # OpenCV 5 removed the darknet importer
    if os.environ.get("CI"):  # the test extra pins OpenCV < 5: there, a missing importer is a failure
        pytest.fail("needs opencv-python-headless<5 (readNetFromDarknet)", pytrace=False)
    pytest.skip("needs opencv-python-headless<5 (readNetFromDarknet)", allow_module_level=True)

VOC = list(VOC_20)


# -- helpers --------------------------------------------------------------------------------------


def random_weights(convs: list[tuple[int, int, int, int, bool]], seed: int, last_scale: float = 1.0) -> np.ndarray:
    """Darknet parameter order for convolutions (in_channels, filters, size, groups, batch_norm).

    Values keep activations in a sane range: He-scaled kernels, positive BN scales/variances.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for i, (cin, n, k, groups, bn) in enumerate(convs):
        fan_in = cin // groups * k * k
        parts.append(rng.normal(0, 0.1, n))
        if bn:
            parts += [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)]
        std = np.sqrt(2.0 / fan_in) * (last_scale if i == len(convs) - 1 else 1.0)
        parts.append(rng.normal(0, std, n * fan_in))
    return np.concatenate(parts).astype("<f4")


def write_weights(path: Path, body: np.ndarray, header: tuple[int, int, int]) -> Path:
    path.write_bytes(encode_header(*header, seen=64_000) + body.tobytes())
    return path


def onnx_outputs(model_path: Path, blob: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: blob})


def opencv_outputs(cfg: Path, weights: Path, blob: np.ndarray, names: list[str]) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(blob)
    return list(net.forward(names))


def blob_of(image: Path, width: int, height: int) -> np.ndarray:
    bgr = cv2.imread(str(image))
    return cv2.dnn.blobFromImage(bgr, 1 / 255.0, (width, height), swapRB=True, crop=False)


def opencv_rows(per_anchor: np.ndarray, anchors: int, gh: int, gw: int) -> np.ndarray:
    """Our anchor-major rows (a, row, col, ...) in OpenCV's order (row, col, a, ...)."""
    rest = per_anchor.shape[1:]
    return per_anchor.reshape(anchors, gh, gw, *rest).transpose(1, 2, 0, *range(3, 3 + len(rest))).reshape(-1, *rest)


def assert_same_decoding(ours_xyxy, ours_obj, ours_scores, theirs, net_w, net_h, anchors, gh, gw):
    """Compares our decoded head with OpenCV's decoded rows (boxes, objectness, class scores)."""
    boxes = opencv_rows(ours_xyxy, anchors, gh, gw)
    # Compare corners, not centres: a centre recovered from huge corners loses its precision.
    cx, cy, w, h = (theirs[:, i].astype(np.float64) for i in range(4))
    corners = np.stack([(cx - w / 2) * net_w, (cy - h / 2) * net_h, (cx + w / 2) * net_w, (cy + h / 2) * net_h], 1)
    # Raw outputs agree to ~1e-4, so a corner may move by that fraction of the box's size.
    size = np.stack([w * net_w, h * net_h, w * net_w, h * net_h], 1)
    assert np.all(np.abs(boxes - corners) <= 1e-3 * (1.0 + size)), np.abs(boxes - corners).max()
    obj = opencv_rows(ours_obj, anchors, gh, gw)
    np.testing.assert_allclose(obj, theirs[:, 4], rtol=1e-4, atol=1e-6)
    score = obj[:, None] * opencv_rows(ours_scores, anchors, gh, gw)
    kept = theirs[:, 5:] > 0
    assert kept.sum() > 0, "OpenCV kept no class score: the comparison would be empty"
    np.testing.assert_allclose(score[kept], theirs[:, 5:][kept], rtol=1e-3, atol=1e-6)
    return score


def opencv_detections(rows: np.ndarray, width: int, height: int, threshold: float, iou: float):
    """(boxes x1y1x2y2 in image pixels, scores, class ids) from OpenCV's decoded rows, NMS per class."""
    r, c = np.nonzero(rows[:, 5:] > threshold)
    scores = rows[r, 5 + c]
    cx, cy, w, h = (rows[r, i] for i in range(4))
    boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    # One NMSBoxes call per class: NMSBoxesBatched shifts classes apart by the largest
    # coordinate only, so boxes reaching below 0 can suppress another class's boxes.
    keep = []
    for cls in np.unique(c):
        idx = np.flatnonzero(c == cls)
        xywh = [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes[idx]]
        kept = cv2.dnn.NMSBoxes(xywh, scores[idx].tolist(), threshold, iou)
        keep += idx[np.asarray(kept, int).reshape(-1)].tolist()
    keep = np.asarray(keep, int)
    return np.clip(boxes[keep], 0, [width, height, width, height]), scores[keep], c[keep]


def assert_same_detections(ours, theirs_boxes, theirs_scores, theirs_classes):
    """Every OpenCV detection has one of ours with the same class, score (1e-3) and box (IoU >= 0.9)."""
    assert len(ours) == len(theirs_scores), (ours.label_names(), theirs_classes)
    matched = set()
    for box, score, cls in zip(theirs_boxes, theirs_scores, theirs_classes):
        same_class = np.flatnonzero(ours.class_ids == cls)
        assert len(same_class), f"OpenCV found class {cls}, we did not"
        best = same_class[int(np.argmin(np.abs(ours.scores[same_class] - score)))]
        assert abs(float(ours.scores[best]) - float(score)) < 1e-3, (cls, score, ours.scores[same_class])
        iou = box_iou(box[None].astype(np.float32), ours.boxes[best : best + 1])[0, 0]
        assert iou >= 0.9, (box, ours.boxes[best])
        matched.add(int(best))
    assert len(matched) == len(ours)


# -- the real Yolo-Fastest-XL VOC model ---------------------------------------------------------


@pytest.fixture(scope="module")
def fastest(tmp_path_factory, mirror):
    src = mirror / "yolo_fastest_xl_voc"
    folder = tmp_path_factory.mktemp("fastest")
    manifest = import_darknet(
        src / "yolo-fastest-xl.cfg", src / "yolo-fastest-xl.weights", src / "voc.names", folder, "yolo-fastest-xl-voc"
    )
    net = cv2.dnn.readNetFromDarknet(str(src / "yolo-fastest-xl.cfg"), str(src / "yolo-fastest-xl.weights"))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    session = ort.InferenceSession(str(manifest.path), providers=["CPUExecutionProvider"])
    return manifest, net, session


def test_fastest_manifest(fastest):
    manifest = fastest[0]
    assert manifest.family == "darknet-yolo"
    assert (manifest.input_width, manifest.input_height) == (320, 320)
    assert manifest.labels == VOC and len(VOC) == 20
    heads = manifest.options["heads"]
    assert [h["anchors"] for h in heads] == [[[189, 126], [137, 236], [265, 259]], [[26, 48], [67, 84], [72, 175]]]
    assert manifest.options["resize"] == "stretch" and manifest.options["scale"] == pytest.approx(1 / 255)
    shapes = [o.shape for o in fastest[2].get_outputs()]
    assert shapes == [["N", 75, 10, 10], ["N", 75, 20, 20]]


@pytest.mark.parametrize("image", ["dog.jpg", "person.jpg", "horses.jpg", "eagle.jpg", "scream.jpg"])
def test_fastest_matches_opencv(fastest, images, image):
    manifest, net, session = fastest
    bgr = cv2.imread(str(images / image))
    height, width = bgr.shape[:2]
    blob = cv2.dnn.blobFromImage(bgr, 1 / 255.0, (320, 320), swapRB=True, crop=False)
    net.setInput(blob)
    raw_10, raw_20, yolo_10, yolo_20 = net.forward(["conv_114", "conv_124", "yolo_115", "yolo_125"])
    ours = session.run(None, {"input": blob})
    np.testing.assert_allclose(ours[0], raw_10, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(ours[1], raw_20, rtol=1e-4, atol=2e-4)

    # Our family, end to end from RGB pixels, against OpenCV's own yolo decoding + per-class NMS.
    family = get_family(manifest.family)(manifest)
    tensor, placement = family.preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    np.testing.assert_allclose(tensor, blob[0], atol=1e-6)
    outputs = session.run(None, {"input": tensor[None]})
    dets = family.postprocess([o[0] for o in outputs], placement, (width, height), Thresholds(0.25, 0.45, 100))
    ref = opencv_detections(np.concatenate([yolo_10, yolo_20]), width, height, 0.25, 0.45)
    assert_same_detections(dets, *ref)
    if image == "dog.jpg":
        assert {"dog", "bicycle", "car"} <= set(dets.label_names())
    if image == "scream.jpg":
        assert len(dets) == 0


def test_fastest_dog_detections_match_provenance(fastest, images):
    """OpenCV's reference detections recorded in PROVENANCE.md (threshold 0.25, NMS 0.45)."""
    manifest, _, session = fastest
    rgb = cv2.cvtColor(cv2.imread(str(images / "dog.jpg")), cv2.COLOR_BGR2RGB)
    family = get_family(manifest.family)(manifest)
    tensor, placement = family.preprocess(rgb)
    outputs = session.run(None, {"input": tensor[None]})
    dets = family.postprocess([o[0] for o in outputs], placement, rgb.shape[1::-1], Thresholds(0.25, 0.45, 100))
    expected = [
        ("car", 0.996, [452, 77, 679, 172]),
        ("bicycle", 0.996, [113, 144, 603, 453]),
        ("dog", 0.948, [106, 233, 331, 532]),
        ("car", 0.252, [400, 94, 465, 153]),
    ]
    names = dets.label_names()
    assert len(dets) == len(expected)
    for label, score, box in expected:
        matches = [i for i, n in enumerate(names) if n == label and abs(dets.scores[i] - score) < 2e-3]
        assert matches, (label, score, names, dets.scores)
        assert np.abs(dets.boxes[matches[0]] - box).max() <= 2.0  # PROVENANCE rounds to whole pixels


def test_fastest_dynamic_batch(fastest, images):
    _, _, session = fastest
    blob = np.concatenate([blob_of(images / "dog.jpg", 320, 320), blob_of(images / "eagle.jpg", 320, 320)])
    batched = session.run(None, {"input": blob})
    single = session.run(None, {"input": blob[1:]})
    assert batched[0].shape == (2, 75, 10, 10)
    np.testing.assert_allclose(batched[1][1:], single[1], rtol=1e-5, atol=1e-5)


# -- yolov2-tiny-voc.cfg with random weights --------------------------------------------------


TINY_CHANNELS = [3, 16, 32, 64, 128, 256, 512, 1024, 1024]
TINY_CONVS = [(TINY_CHANNELS[i], TINY_CHANNELS[i + 1], 3, 1, True) for i in range(8)] + [(1024, 125, 1, 1, False)]


@pytest.mark.parametrize("header", [(0, 1, 0), (0, 2, 5)], ids=["seen32", "seen64"])
def test_tiny_yolov2_random_weights_match_opencv(tmp_path, mirror, images, header):
    body = random_weights(TINY_CONVS, seed=header[1], last_scale=1.5)
    assert body.size == 15_867_885  # PROVENANCE: 63,471,556 bytes with a 16-byte header
    weights = write_weights(tmp_path / "tiny.weights", body, header)
    assert weights.stat().st_size == (63_471_556 if header[1] == 1 else 63_471_560)
    # OpenCV zeroes class scores below the region's thresh (.6, a training value); lower it so
    # that there is something to compare.
    cfg = tmp_path / "yolov2-tiny-voc.cfg"
    cfg.write_text((mirror / "darknet_cfg" / "yolov2-tiny-voc.cfg").read_text().replace("thresh = .6", "thresh = .1"))
    manifest = import_darknet(cfg, weights, VOC, tmp_path / "model", "tiny")
    assert manifest.family == "yolov2-region"
    anchors = np.asarray(manifest.options["anchors"], np.float32)
    np.testing.assert_allclose(anchors, [[1.08, 1.19], [3.42, 4.41], [6.63, 11.38], [9.42, 5.11], [16.62, 10.52]])

    rgb = cv2.cvtColor(cv2.imread(str(images / "dog.jpg")), cv2.COLOR_BGR2RGB)
    family = get_family(manifest.family)(manifest)
    tensor, placement = family.preprocess(rgb)
    blob = tensor[None]
    (ours,) = onnx_outputs(manifest.path, blob)
    raw, decoded = opencv_outputs(cfg, weights, blob, ["conv_14", "detection_out"])
    assert ours.shape == raw.shape == (1, 125, 13, 13)
    np.testing.assert_allclose(ours, raw, rtol=1e-4, atol=1e-4)

    boxes, obj, probs = decode_region(ours[0], anchors, 20, (416, 416))
    assert_same_decoding(boxes, obj, probs, decoded, 416, 416, 5, 13, 13)

    # OpenCV's region layer already ran darknet's per-class NMS (IoU 0.4) on its scores; a
    # second NMS at 0.4 keeps them all, so use 0.4 on our side too.
    height, width = rgb.shape[:2]
    dets = family.postprocess([ours[0]], placement, (width, height), Thresholds(0.3, 0.4, 1000))
    ref = opencv_detections(decoded, width, height, 0.3, 0.4)
    assert len(ref[1]) > 5, len(ref[1])
    assert_same_detections(dets, *ref)


# -- every supported layer and option, on a non-square input ----------------------------------

KITCHEN_SINK_CFG = """
[net]
batch=1
width=104
height=72
channels=3

# 0
[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=mish

# 1
[maxpool]
size=2
stride=2

# 2
[convolutional]
batch_normalize=1
filters=32
size=3
stride=1
pad=1
activation=swish

# 3 depthwise
[convolutional]
batch_normalize=1
filters=32
groups=32
size=3
stride=1
pad=1
activation=relu

# 4
[shortcut]
from=-2
activation=leaky

# 5
[route]
layers=-1
groups=2
group_id=1

# 6
[convolutional]
filters=32
size=1
stride=1
activation=logistic

# 7
[maxpool]
size=3
stride=1

# 8 -> 128 x 18 x 26
[reorg]
stride=2

# 9
[route]
layers=-2

# 10 -> 32 x 18 x 26
[convolutional]
batch_normalize=1
filters=32
size=5
stride=2
pad=1
activation=leaky

# 11 -> 160 x 18 x 26
[route]
layers=-1,8

# 12
[dropout]
probability=.1

# 13
[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

# 14
[yolo]
mask = 3,4,5
anchors = 10,14,  23,27,  37,58,  81,82,  35,50, 64,40
classes=2
num=6
scale_x_y = 1.1
ignore_thresh = .7

# 15
[route]
layers = -4

# 16
[convolutional]
batch_normalize=1
filters=16
size=1
stride=1
pad=1
activation=leaky

# 17 -> 16 x 36 x 52
[upsample]
stride=2

# 18 -> 48 x 36 x 52
[route]
layers = -1, 6

# 19
[maxpool]
size=2
stride=1

# 20
[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

# 21
[yolo]
mask = 0,1,2
anchors = 10,14,  23,27,  37,58,  81,82,  35,50, 64,40
classes=2
num=6
"""
KITCHEN_SINK_CONVS = [
    (3, 16, 3, 1, True), (16, 32, 3, 1, True), (32, 32, 3, 32, True), (16, 32, 1, 1, False),
    (32, 32, 5, 1, True), (160, 21, 1, 1, False), (160, 16, 1, 1, True), (48, 21, 1, 1, False),
]


def test_every_layer_matches_opencv(tmp_path):
    cfg = tmp_path / "sink.cfg"
    cfg.write_text(KITCHEN_SINK_CFG)
    weights = write_weights(tmp_path / "sink.weights", random_weights(KITCHEN_SINK_CONVS, seed=7, last_scale=3.0), (0, 2, 0))
    manifest = import_darknet(cfg, weights, ["a", "b"], tmp_path / "model", "sink")
    assert manifest.options["heads"] == [
        {"anchors": [[81, 82], [35, 50], [64, 40]], "scale_x_y": 1.1},
        {"anchors": [[10, 14], [23, 27], [37, 58]], "scale_x_y": 1.0},
    ]
    blob = np.random.default_rng(3).uniform(0, 1, (2, 3, 72, 104)).astype(np.float32)
    ours = onnx_outputs(manifest.path, blob)
    names = ["conv_13", "conv_20", "yolo_14", "yolo_21"]
    raw_a, raw_b, yolo_a, yolo_b = opencv_outputs(cfg, weights, blob, names)
    assert ours[0].shape == raw_a.shape == (2, 21, 18, 26)
    assert ours[1].shape == raw_b.shape == (2, 21, 36, 52)
    np.testing.assert_allclose(ours[0], raw_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours[1], raw_b, rtol=1e-4, atol=1e-4)
    # OpenCV stacks the batch's rows image after image; compare the first image's decoding.
    for out, theirs, head, (gh, gw) in zip(ours, (yolo_a, yolo_b), manifest.options["heads"], [(18, 26), (36, 52)]):
        rows = theirs.reshape(2, -1, 7)[0]
        decoded = decode_yolo_head(out[0], np.asarray(head["anchors"], np.float32), 2, (104, 72), head["scale_x_y"])
        assert_same_decoding(*decoded, rows, 104, 72, 3, gh, gw)


POOLS_CFG = """
[net]
width=13
height=11
channels=3

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=3
stride=2

[maxpool]
size=2
stride=1

[convolutional]
size=1
stride=1
pad=1
filters=14
activation=linear

[region]
anchors = 1,1, 2,3
classes=2
coords=4
num=2
softmax=1
thresh=.1
"""


def test_darknet_maxpool_padding_matches_opencv(tmp_path):
    """Odd sizes: darknet pads size-1 in total (the extra at the end) and rounds down."""
    cfg = tmp_path / "pools.cfg"
    cfg.write_text(POOLS_CFG)
    weights = write_weights(
        tmp_path / "pools.weights", random_weights([(3, 8, 3, 1, True), (8, 14, 1, 1, False)], seed=1), (0, 1, 0)
    )
    manifest = import_darknet(cfg, weights, ["a", "b"], tmp_path / "model", "pools")
    blob = np.random.default_rng(5).uniform(0, 1, (1, 3, 11, 13)).astype(np.float32)
    (ours,) = onnx_outputs(manifest.path, blob)
    raw, decoded = opencv_outputs(cfg, weights, blob, ["conv_4", "detection_out"])
    # 13x11 -> 7x6 (2/2) -> 4x3 (3/2) -> 4x3 (2/1)
    assert ours.shape == raw.shape == (1, 14, 3, 4)
    np.testing.assert_allclose(ours, raw, rtol=1e-4, atol=1e-5)
    boxes, obj, probs = decode_region(ours[0], np.asarray(manifest.options["anchors"], np.float32), 2, (13, 11))
    assert_same_decoding(boxes, obj, probs, decoded, 13, 11, 2, 3, 4)
