"""The darknet-yolo family's decoding on constructed tensors with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from visionserve.errors import ModelError
from visionserve.families import get_family
from visionserve.families.darknet_yolo import decode_yolo_head
from visionserve.store.manifest import ModelManifest
from visionserve.types import Thresholds
from visionserve.vision.letterbox import Placement

NEG = -30.0  # sigmoid(NEG) is ~1e-13: "nothing here"


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def empty_head(anchors: int, classes: int, gh: int, gw: int) -> np.ndarray:
    raw = np.zeros((anchors, 5 + classes, gh, gw), np.float32)
    raw[:, 4:] = NEG
    return raw


def manifest(heads, labels=("a", "b"), width=96, height=64, **options) -> ModelManifest:
    return ModelManifest(
        name="t", family="darknet-yolo", file="t.onnx", labels=list(labels),
        input_width=width, input_height=height, options={"heads": heads, **options},
    )


def test_one_cell_decodes_to_the_darknet_box():
    raw = empty_head(2, 2, 2, 3)  # 2 anchors, 2 classes, H=2, W=3
    a, row, col = 1, 1, 2
    raw[a, 0, row, col] = logit(0.25)  # tx
    raw[a, 1, row, col] = logit(0.75)  # ty
    raw[a, 2, row, col] = np.log(2.0)  # tw: twice the anchor
    raw[a, 3, row, col] = np.log(0.5)  # th: half the anchor
    raw[a, 4, row, col] = logit(0.8)  # objectness
    raw[a, 6, row, col] = logit(0.9)  # class 1
    anchors = np.array([[5, 5], [10, 16]], np.float32)
    boxes, obj, scores = decode_yolo_head(raw.reshape(-1, 2, 3), anchors, 2, (96, 64))
    i = (a * 2 + row) * 3 + col  # anchor-major, then row, then column
    cx, cy = (col + 0.25) / 3 * 96, (row + 0.75) / 2 * 64
    np.testing.assert_allclose(boxes[i], [cx - 10, cy - 4, cx + 10, cy + 4], rtol=1e-5)
    assert obj[i] == pytest.approx(0.8)
    np.testing.assert_allclose(scores[i], [0.0, 0.9], rtol=1e-5, atol=1e-9)
    assert np.all(np.delete(obj, i) < 1e-12)


@pytest.mark.parametrize("scale_x_y, p, expected_offset", [(1.0, 0.75, 0.75), (1.2, 0.75, 0.8), (2.0, 1.0, 1.5), (2.0, 0.0, -0.5), (1.05, 0.5, 0.5)])
def test_scale_x_y(scale_x_y, p, expected_offset):
    """offset = sigmoid(t) * s - (s - 1) / 2: boxes may reach past their cell when s > 1."""
    raw = empty_head(1, 1, 4, 4)
    raw[0, 0, 2, 1] = logit(p) if 0 < p < 1 else (40.0 if p == 1 else -40.0)
    raw[0, 1, 2, 1] = logit(p) if 0 < p < 1 else (40.0 if p == 1 else -40.0)
    boxes, _, _ = decode_yolo_head(raw.reshape(-1, 4, 4), np.array([[8, 8]], np.float32), 1, (64, 64), scale_x_y)
    i = 2 * 4 + 1
    centre = (boxes[i, :2] + boxes[i, 2:]) / 2
    np.testing.assert_allclose(centre, [(1 + expected_offset) * 16, (2 + expected_offset) * 16], rtol=1e-5)


def test_multilabel_candidates_and_threshold():
    raw = empty_head(1, 2, 1, 1)
    raw[0, 4] = logit(0.9)
    raw[0, 5] = logit(0.8)  # 0.72
    raw[0, 6] = logit(0.5)  # 0.45
    family = get_family("darknet-yolo")(manifest([{"anchors": [[10, 10]]}], width=32, height=32))
    cand = family.decode([raw.reshape(7, 1, 1)], 0.4)
    assert sorted(cand.class_ids.tolist()) == [0, 1]
    np.testing.assert_allclose(sorted(cand.scores.tolist()), [0.45, 0.72], rtol=1e-5)
    np.testing.assert_array_equal(cand.boxes[0], cand.boxes[1])
    assert family.decode([raw.reshape(7, 1, 1)], 0.5).class_ids.tolist() == [0]
    assert len(family.decode([raw.reshape(7, 1, 1)], 0.95).scores) == 0  # objectness alone is below


def test_two_heads_in_manifest_order_and_back_to_image_pixels():
    heads = [{"anchors": [[40, 20]], "scale_x_y": 1.0}, {"anchors": [[8, 4]], "scale_x_y": 1.0}]
    family = get_family("darknet-yolo")(manifest(heads))
    coarse, fine = empty_head(1, 2, 2, 3), empty_head(1, 2, 4, 6)
    coarse[0, 4, 0, 0] = coarse[0, 5, 0, 0] = 10.0  # class a, cell (0, 0) of the 2x3 grid
    fine[0, 4, 3, 5] = fine[0, 6, 3, 5] = 10.0  # class b, cell (3, 5) of the 4x6 grid
    outputs = [coarse.reshape(-1, 2, 3), fine.reshape(-1, 4, 6)]
    # The image was 192x256 (w x h) stretched to 96x64.
    placement = Placement(96 / 192, 64 / 256, 0.0, 0.0)
    dets = family.postprocess(outputs, placement, (192, 256), Thresholds(0.5, 0.45, 10))
    assert sorted(dets.label_names()) == ["a", "b"]
    by_label = dict(zip(dets.label_names(), dets.boxes.tolist()))
    # coarse: centre (0.5/3*96, 0.5/2*64) = (16, 16), 40x20 -> clipped at 0 after scaling.
    np.testing.assert_allclose(by_label["a"], [0, (16 - 10) * 4, (16 + 20) * 2, (16 + 10) * 4], rtol=1e-4)
    # fine: centre (5.5/6*96, 3.5/4*64) = (88, 56), 8x4.
    np.testing.assert_allclose(by_label["b"], [(88 - 4) * 2, (56 - 2) * 4, (88 + 4) * 2, (56 + 2) * 4], rtol=1e-4)


def test_input_spec_is_darknets():
    spec = get_family("darknet-yolo")(manifest([{"anchors": [[1, 1]]}])).input
    assert (spec.width, spec.height, spec.channel_order, spec.resize) == (96, 64, "RGB", "stretch")
    assert spec.scale == pytest.approx(1 / 255)
    boxed = get_family("darknet-yolo")(manifest([{"anchors": [[1, 1]]}], resize="letterbox", align="center", pad_value=128)).input
    assert (boxed.resize, boxed.align, boxed.pad_value) == ("letterbox", "center", 128)


def test_validate_outputs():
    family = get_family("darknet-yolo")(manifest([{"anchors": [[1, 1], [2, 2]]}, {"anchors": [[3, 3]]}]))
    family.validate_outputs([["N", 14, 2, 3], ["N", 7, 4, 6]])
    with pytest.raises(ModelError, match=r"output 0 shape .*want \[N, 14, H, W\]"):
        family.validate_outputs([["N", 7, 2, 3], ["N", 7, 4, 6]])
    with pytest.raises(ModelError, match="1 outputs"):
        family.validate_outputs([["N", 14, 2, 3]])


def test_missing_heads_option():
    with pytest.raises(ModelError, match="options.heads"):
        get_family("darknet-yolo")(manifest([])).decode([np.zeros((7, 1, 1), np.float32)], 0.5)
