"""Model families decode constructed output tensors whose right answer is known."""

import math

import numpy as np
import pytest

from visionserve.errors import ModelError
from visionserve.families import family_names, get_family
from visionserve.store.manifest import ModelManifest
from visionserve.types import Thresholds
from visionserve.vision.letterbox import Placement


def manifest(family: str, labels: list[str], size: int, **options) -> ModelManifest:
    return ModelManifest(name="t", family=family, file="x.onnx", labels=labels,
                         input_width=size, input_height=size, options=options)


def test_registry_lists_families_and_rejects_unknown():
    assert {"yolox", "yolov2-region"} <= set(family_names())
    with pytest.raises(ModelError):
        get_family("nope")


# -- YOLOX ------------------------------------------------------------------------------

def yolox_output(num_classes: int, size: int) -> np.ndarray:
    rows = sum((size // s) ** 2 for s in (8, 16, 32))
    out = np.zeros((rows, 5 + num_classes), np.float32)
    out[:, 2:4] = 0.0
    return out


def test_yolox_decodes_a_known_cell():
    fam = get_family("yolox")(manifest("yolox", ["a", "b"], 64))
    out = yolox_output(2, 64)
    row = 2 * 8 + 3  # stride-8 grid, cell x=3, y=2
    out[row, :4] = [0.5, 0.5, math.log(2), math.log(3)]
    out[row, 4] = 0.9
    out[row, 5:] = [0.1, 0.8]
    cand = fam.decode([out], min_confidence=0.3)
    np.testing.assert_allclose(cand.boxes, [[20, 8, 36, 32]], atol=1e-5)  # cx 28, cy 20, w 16, h 24
    np.testing.assert_allclose(cand.scores, [0.72], atol=1e-6)
    assert cand.class_ids.tolist() == [1]


def test_yolox_second_stride_and_multilabel():
    fam = get_family("yolox")(manifest("yolox", ["a", "b"], 64))
    out = yolox_output(2, 64)
    row = 64 + 1 * 4 + 2  # stride-16 grid starts after 8x8 rows; cell x=2, y=1
    out[row, 4] = 1.0
    out[row, 5:] = [0.6, 0.7]
    cand = fam.decode([out], min_confidence=0.5)
    np.testing.assert_allclose(cand.boxes, [[24, 8, 40, 24]] * 2, atol=1e-5)  # cx 32, cy 16, w=h=16
    assert sorted(cand.class_ids.tolist()) == [0, 1]


def test_yolox_decodes_an_input_smaller_than_its_full_size():
    """Minimal padding: a 64x32 input of a 64x64 model has 8x4 + 4x2 + 2x1 rows, and a cell's
    row and position follow that grid, not the full one."""
    fam = get_family("yolox")(manifest("yolox", ["a", "b"], 64))
    assert fam.variable_input_stride == 32
    out = np.zeros((42, 7), np.float32)
    row = 32 + 1 * 4 + 2  # stride-16 grid (4 wide, 2 high) starts after 8x4 rows; cell x=2, y=1
    out[row, 4] = 1.0
    out[row, 5:] = [0.1, 0.9]
    cand = fam.decode([out], min_confidence=0.5, net_size=(64, 32))
    np.testing.assert_allclose(cand.boxes, [[24, 8, 40, 24]], atol=1e-5)  # cx 32, cy 16, w=h=16
    fam.validate_outputs([[1, 42, 7]], (64, 32))
    fam.validate_outputs([[1, "rows", 7]], (64, 32))  # symbolic: only a run can tell
    with pytest.raises(ModelError, match="64x32"):
        fam.validate_outputs([[1, 84, 7]], (64, 32))
    placement = Placement(1.0, 1.0, 0.0, 0.0, net_size=(64, 32))
    found = fam.postprocess([out], placement, (64, 20), Thresholds(0.5, 0.45, 10))
    np.testing.assert_allclose(found.boxes, [[24, 8, 40, 20]], atol=1e-5)  # clipped to the image


def test_yolox_postprocess_maps_to_image_pixels_and_filters():
    fam = get_family("yolox")(manifest("yolox", ["a", "b"], 64))
    out = yolox_output(2, 64)
    out[19, :4] = [0.5, 0.5, math.log(2), math.log(3)]
    out[19, 4], out[19, 5:] = 0.9, [0.1, 0.8]
    out[20, :4] = [0.0, 0.5, math.log(2), math.log(3)]  # neighbour cell, box 4 px to the right: IoU 0.6
    out[20, 4], out[20, 5:] = 0.9, [0.0, 0.7]
    placement = Placement(0.5, 0.5, 0, 0)  # a 128x128 image letterboxed to 64x64
    dets = fam.postprocess([out], placement, (128, 128), Thresholds(0.3, 0.45, 100))
    assert len(dets) == 1 and dets.label_names() == ["b"]  # NMS dropped the weaker neighbour
    np.testing.assert_allclose(dets.boxes, [[40, 16, 72, 64]], atol=1e-4)
    assert len(fam.postprocess([out], placement, (128, 128), Thresholds(0.3, 0.7, 100))) == 2
    none = fam.postprocess([out], placement, (128, 128), Thresholds(0.3, 0.45, 100, np.array([0])))
    assert len(none) == 0


def test_yolox_rejects_a_graph_of_the_wrong_shape():
    fam = get_family("yolox")(manifest("yolox", ["a", "b"], 64))
    fam.validate_outputs([[1, 84, 7]])
    with pytest.raises(ModelError):
        fam.validate_outputs([[1, 85, 7]])


# -- YOLOv2 region ------------------------------------------------------------------------

def test_region_decodes_a_known_cell_with_softmax_classes():
    anchors = [[1.0, 1.0], [2.0, 3.0]]
    fam = get_family("yolov2-region")(manifest("yolov2-region", ["a", "b", "c"], 64, anchors=anchors))
    raw = np.full((2 * 8, 2, 2), 0.0, np.float32)
    raw[4::8] = -10.0  # every objectness logit low
    a, row, col = 1, 1, 0
    base = a * 8
    raw[base + 0, row, col] = 0.0  # sigmoid -> 0.5
    raw[base + 1, row, col] = 0.0
    raw[base + 2, row, col] = 0.0  # exp -> 1
    raw[base + 3, row, col] = math.log(0.5)
    raw[base + 4, row, col] = 2.0
    raw[base + 5: base + 8, row, col] = [0.0, 2.0, 0.0]
    cand = fam.decode([raw], min_confidence=0.3)
    obj = 1 / (1 + math.exp(-2))
    prob = math.exp(2) / (math.exp(2) + 2)
    # cx = (0 + .5)/2*64 = 16, cy = (1 + .5)/2*64 = 48, w = 2/2*64 = 64, h = 3*.5/2*64 = 48
    np.testing.assert_allclose(cand.boxes, [[-16, 24, 48, 72]], atol=1e-4)
    np.testing.assert_allclose(cand.scores, [obj * prob], rtol=1e-5)
    assert cand.class_ids.tolist() == [1]


def test_region_default_anchors_are_tiny_yolov2_voc_and_input_is_rgb_stretch():
    fam = get_family("yolov2-region")(manifest("yolov2-region", [str(i) for i in range(20)], 416))
    np.testing.assert_allclose(fam.anchors[0], [1.08, 1.19])
    np.testing.assert_allclose(fam.anchors[4], [16.62, 10.52])
    assert (fam.input.channel_order, fam.input.resize) == ("RGB", "stretch")
    fam.validate_outputs([["N", 125, 13, 13]])
    with pytest.raises(ModelError):
        fam.validate_outputs([[1, 85, 13, 13]])


def test_region_full_grid_against_a_loop_reference():
    """The vectorised decode equals darknet's per-cell formula on a random 13x13 output."""
    rng = np.random.default_rng(1)
    labels = [str(i) for i in range(20)]
    fam = get_family("yolov2-region")(manifest("yolov2-region", labels, 416))
    raw = rng.normal(0, 1.5, (125, 13, 13)).astype(np.float32)
    cand = fam.decode([raw], min_confidence=0.2)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = []
    for a, (aw, ah) in enumerate(fam.anchors.tolist()):
        for r in range(13):
            for c in range(13):
                v = raw[a * 25:(a + 1) * 25, r, c].astype(np.float64)
                x, y = (c + sig(v[0])) / 13 * 416, (r + sig(v[1])) / 13 * 416
                w, h = math.exp(v[2]) * aw / 13 * 416, math.exp(v[3]) * ah / 13 * 416
                e = np.exp(v[5:] - v[5:].max())
                probs = sig(v[4]) * e / e.sum()
                for k in np.flatnonzero(probs > 0.2):
                    expected.append((x - w / 2, y - h / 2, x + w / 2, y + h / 2, probs[k], k))
    assert len(expected) == len(cand.scores) > 0
    got = sorted(zip(*cand.boxes.T.tolist(), cand.scores.tolist(), cand.class_ids.tolist()), key=lambda t: t[4])
    np.testing.assert_allclose(np.array(got), np.array(sorted(expected, key=lambda t: t[4])), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("family", "options", "says"), [
    ("yolox", {"pad_value": "abc"}, "options.pad_value: Input should be a valid integer"),
    ("yolox", {"pad_value": 300}, "options.pad_value"),
    ("yolox", {"scale": "x"}, "options.scale"),
    ("yolox", {"scale": float("inf")}, "options.scale"),
    ("yolox", {"channel_order": "XYZ"}, "options.channel_order"),
    ("yolox", {"resize": 5}, "options.resize"),
    ("yolox", {"strides": "abc"}, "options.strides"),
    ("yolox", {"strides": [0]}, "options.strides.0"),
    ("yolox", {"bogus": 1}, "options.bogus: Extra inputs are not permitted"),
    ("yolov2-region", {"anchors": [[1.0]]}, "options.anchors.0"),
    ("yolov2-region", {"anchors": [[1.0, -2.0]]}, "options.anchors.0.1"),
    ("darknet-yolo", {"heads": [{"anchors": [[1, 1]], "scale_x_y": "big"}]}, "options.heads.0.scale_x_y"),
])
def test_bad_options_name_the_key_when_the_family_is_made(family, options, says):
    """A config's [[models]] options (over the catalog's) are checked before any loading: a
    wrong type, range or key is a ModelError naming it, not a failure deep in decoding."""
    bad = ModelManifest(name="m", family=family, file="m.onnx", labels=["a"], input_width=32, input_height=32,
                        options=options)
    with pytest.raises(ModelError) as e:
        get_family(family)(bad)
    assert says in e.value.message and e.value.message.startswith("model 'm': "), e.value.message
