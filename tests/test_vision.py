"""Pure array functions: letterbox, box geometry, NMS."""

import numpy as np
import pytest

from visionserve.vision.boxes import box_iou, clip_boxes, cxcywh_to_xyxy
from visionserve.vision.letterbox import letterbox, padded_to, stretch, to_chw_tensor
from visionserve.vision.nms import batched_nms, nms


def test_letterbox_topleft_keeps_aspect_and_pads():
    img = np.full((100, 200, 3), 7, np.uint8)  # wide image
    out, p = letterbox(img, 416, 416, pad_value=114)
    assert out.shape == (416, 416, 3)
    assert p.scale_x == p.scale_y == pytest.approx(416 / 200)
    assert (p.pad_x, p.pad_y) == (0, 0)
    assert (out[:208] == 7).all() and (out[208:] == 114).all()


def test_letterbox_center_pads_both_sides_and_maps_back():
    img = np.zeros((200, 100, 3), np.uint8)  # tall image
    out, p = letterbox(img, 320, 320, align="center", pad_value=0)
    assert p.pad_x == 80 and p.pad_y == 0
    box = np.array([[80.0, 0.0, 240.0, 320.0]])  # the whole image area in network pixels
    np.testing.assert_allclose(p.to_image(box), [[0, 0, 100, 200]], atol=1e-4)


def test_letterbox_with_stride_pads_only_to_its_next_multiple():
    img = np.full((576, 768, 3), 7, np.uint8)  # 4:3, like dog.jpg
    out, p = letterbox(img, 416, 416, pad_value=114, stride=32)
    assert out.shape == (320, 416, 3) and p.net_size == (416, 320)  # 312 rows of image, 8 of padding
    assert p.scale_x == p.scale_y == pytest.approx(416 / 768) and (p.pad_x, p.pad_y) == (0, 0)
    assert (out[:312] == 7).all() and (out[312:] == 114).all()
    full, q = letterbox(img, 416, 416, pad_value=114)  # the same image placement, more padding
    assert q.net_size is None and (full[:320] == out).all()


def test_letterbox_with_stride_portrait_thin_and_exact_sizes():
    _, p = letterbox(np.zeros((640, 480, 3), np.uint8), 416, 416, stride=32)
    assert p.net_size == (320, 416)  # 312 columns -> 320
    out, p = letterbox(np.zeros((10, 1000, 3), np.uint8), 416, 416, stride=32)
    assert out.shape == (32, 416, 3) and p.net_size == (416, 32)  # 4 rows of image: one stride
    _, p = letterbox(np.zeros((500, 500, 3), np.uint8), 416, 416, stride=32)
    assert p.net_size is None  # square: the full size, as without a stride
    out, p = letterbox(np.zeros((240, 416, 3), np.uint8), 416, 416, stride=32)
    assert out.shape == (256, 416, 3) and p.scale_x == 1.0
    out, p = letterbox(np.zeros((100, 200, 3), np.uint8), 410, 410, stride=32)
    assert out.shape == (224, 410, 3)  # a side is never more than the full size, multiple or not


def test_letterbox_with_stride_centred_maps_back():
    img = np.zeros((600, 800, 3), np.uint8)
    out, p = letterbox(img, 416, 416, align="center", stride=32)
    assert out.shape == (320, 416, 3) and p.pad_y == 4  # 312 rows centred in 320
    box = np.array([[0.0, 4.0, 416.0, 316.0]])
    np.testing.assert_allclose(p.to_image(box), [[0, 0, 800, 600]], atol=1e-3)


def test_padded_to():
    assert [padded_to(n, 32) for n in (1, 31, 32, 33, 312, 416)] == [32, 32, 32, 64, 320, 416]


def test_stretch_ignores_aspect():
    img = np.zeros((50, 100, 3), np.uint8)
    out, p = stretch(img, 320, 320)
    assert out.shape == (320, 320, 3)
    assert (p.scale_x, p.scale_y) == (3.2, 6.4)
    np.testing.assert_allclose(p.to_image(np.array([[32.0, 64.0, 320.0, 320.0]])), [[10, 10, 100, 50]])


def test_to_chw_tensor_swaps_channels_and_scales():
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30
    t = to_chw_tensor(img, swap_rb=True, scale=0.5)
    assert t.shape == (3, 2, 3) and t.dtype == np.float32 and t.flags.c_contiguous
    assert (t[0] == 15).all() and (t[1] == 10).all() and (t[2] == 5).all()


def test_box_geometry():
    b = cxcywh_to_xyxy(np.array([[10.0, 10.0, 4.0, 2.0]]))
    np.testing.assert_allclose(b, [[8, 9, 12, 11]])
    a = np.array([[0.0, 0, 10, 10]])
    c = np.array([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(box_iou(a, c), [[50 / 150, 0.0, 1.0]])
    clipped = clip_boxes(np.array([[-5.0, -1, 700, 500]]), 640, 480)
    np.testing.assert_allclose(clipped, [[0, 0, 640, 480]])


def test_nms_keeps_best_of_overlapping_and_separate_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.6, 0.9, 0.5, 0.8], np.float32)
    keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [1, 2]  # 0 and 3 overlap box 1 (IoU 0.68 / 0.6) and go


def test_nms_threshold_and_limit():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 0, 110, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2]  # IoU 1/3 is below 0.5
    assert nms(boxes, scores, 0.3).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5, max_output=2).tolist() == [0, 1]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).size == 0


def test_batched_nms_never_suppresses_across_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    classes = np.array([0, 1, 0])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 1]


def test_nms_matches_opencv_on_random_boxes():
    import cv2

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (300, 2))
    wh = rng.uniform(5, 80, (300, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    ours = nms(boxes, scores, 0.45)
    theirs = cv2.dnn.NMSBoxes(np.concatenate([xy, wh], 1).tolist(), scores.tolist(), 0.0, 0.45)
    assert sorted(ours.tolist()) == sorted(np.asarray(theirs).ravel().tolist())
