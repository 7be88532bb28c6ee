"""annotate / encode_image: boxes and tags land where they should, encodings round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from visionserve.errors import InvalidParameter
from visionserve.imaging import annotate, decode_image, encode_image
from visionserve.imaging.draw import class_color
from visionserve.types import Detections

LABELS = ["person", "bicycle", "car", "dog"]
GREY = 128


def detections(boxes, scores, class_ids) -> Detections:
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(scores, np.float32),
        np.asarray(class_ids, np.int32),
        LABELS,
    )


def grey(width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), GREY, np.uint8)


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(axis=2)


def ink_bbox(canvas: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x1, y1, x2, y2 inclusive) of near-black or near-white pixels: the cores
    of the tag's text strokes (the grey background and the saturated class colours, whose
    channels always spread by more than 100, are neither)."""
    ink = (canvas <= 35).all(axis=2) | (canvas >= 220).all(axis=2)
    ys, xs = np.nonzero(ink)
    assert len(xs), "no label text drawn"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_box_edges_are_drawn_in_the_class_colour_and_input_is_untouched() -> None:
    image = grey(200, 160)
    before = image.copy()
    out = annotate(image, detections([[40, 60, 150, 140]], [0.86], [3]))
    np.testing.assert_array_equal(image, before)
    assert out.shape == image.shape and out.dtype == np.uint8 and out is not image
    color = np.array(class_color(3))
    for x, y in [(40, 100), (150, 100), (95, 60), (95, 140)]:  # middle of each edge
        assert (out[y, x] == color).all(), (x, y, out[y, x])
    assert (out[100, 95] == GREY).all()  # inside the box
    assert (out[150, 190] == GREY).all()  # away from the box


def test_tag_says_label_and_confidence_above_the_box() -> None:
    image = grey(300, 200)
    out = annotate(image, detections([[100, 100, 250, 190]], [0.86], [3]))
    x1, y1, x2, y2 = ink_bbox(out)
    assert y2 < 100 and x1 >= 100  # above the box, starting at its left edge
    # "dog 0.86" is wider than "dog 0.8" would be and narrower than a longer label.
    wide = annotate(image, detections([[100, 100, 250, 190]], [0.86], [1]))  # "bicycle 0.86"
    assert ink_bbox(wide)[2] - ink_bbox(wide)[0] > x2 - x1


@pytest.mark.parametrize("box", [[0, 0, 60, 60], [250, 0, 299, 40], [280, 150, 299, 199],
                                 [-50, -50, 400, 400]])
def test_tags_stay_whole_inside_the_image(box) -> None:
    image = grey(300, 200)
    reference = ink_bbox(annotate(image, detections([[100, 100, 200, 190]], [0.86], [3])))
    ref_w, ref_h = reference[2] - reference[0], reference[3] - reference[1]
    x1, y1, x2, y2 = ink_bbox(annotate(image, detections([box], [0.86], [3])))
    # Same text extent as an unconstrained tag (nothing clipped), not touching the border.
    assert (x2 - x1, y2 - y1) == (ref_w, ref_h)
    assert x1 > 0 and y1 > 0 and x2 < 299 and y2 < 199


def test_classes_get_different_stable_colours() -> None:
    colors = {class_color(i) for i in range(80)}
    assert len(colors) == 80
    assert class_color(5) == class_color(5)
    out = annotate(grey(300, 200), detections([[20, 50, 120, 180], [160, 50, 280, 180]],
                                              [0.9, 0.8], [0, 2]))
    assert (out[120, 20] == class_color(0)).all()
    assert (out[120, 160] == class_color(2)).all()


def test_line_width_grows_with_image_size() -> None:
    def line_width(size: int) -> int:
        image = grey(size, size)
        out = annotate(image, detections([[size // 4, size // 4, 3 * size // 4, 3 * size // 4]],
                                         [0.5], [0]))
        row = changed(image, out)[size // 2]  # crosses the left and right edges only
        return int(row[: size // 2].sum())

    small, large = line_width(200), line_width(2000)
    assert small >= 1 and large >= 4 * small


def test_no_detections_gives_an_equal_copy() -> None:
    image = grey(50, 40)
    out = annotate(image, Detections.empty(LABELS))
    np.testing.assert_array_equal(out, image)
    assert out is not image


def test_odd_boxes_do_not_break_drawing() -> None:
    image = grey(100, 80)
    boxes = [[np.nan, 0, 10, 10], [-1e9, -1e9, 1e9, 1e9], [90, 70, 95, 75], [50, 50, 50, 50]]
    out = annotate(image, detections(boxes, [0.9, 0.8, 0.7, 0.6], [0, 1, 2, 99]))
    assert out.shape == image.shape
    assert changed(image, out).any()


def test_annotate_accepts_non_contiguous_views_and_rejects_non_rgb() -> None:
    base = grey(200, 100)
    view = base[:, ::2]  # 100x100, not contiguous
    out = annotate(view, detections([[10, 10, 90, 90]], [0.7], [0]))
    assert out.shape == (100, 100, 3) and changed(np.ascontiguousarray(view), out).any()
    with pytest.raises(ValueError):
        annotate(np.zeros((10, 10), np.uint8), Detections.empty(LABELS))


def smooth(width: int = 160, height: int = 120) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)],
                    axis=-1).astype(np.uint8)


def test_png_round_trip_is_exact() -> None:
    pixels = smooth()
    data = encode_image(pixels, "png")
    assert data.startswith(b"\x89PNG")
    decoded = decode_image(data)
    assert decoded.format == "png"
    np.testing.assert_array_equal(decoded.pixels, pixels)


@pytest.mark.parametrize("fmt", ["jpeg", "JPG"])
def test_jpeg_round_trip_is_close(fmt: str) -> None:
    pixels = smooth()
    data = encode_image(pixels[:, ::-1][:, ::-1], fmt, quality=95)  # a strided view
    assert data.startswith(b"\xff\xd8")
    decoded = decode_image(data)
    assert decoded.pixels.shape == pixels.shape
    assert np.abs(decoded.pixels.astype(int) - pixels).mean() < 2.0


@pytest.mark.parametrize("shape", [(1, 65_501), (65_501, 1)])
def test_an_image_too_wide_or_tall_for_jpeg_is_a_parameter_error(shape) -> None:
    pixels = np.zeros((*shape, 3), np.uint8)
    with pytest.raises(InvalidParameter, match="format=png"):
        encode_image(pixels, "jpeg")
    assert encode_image(pixels, "png").startswith(b"\x89PNG")
    assert encode_image(pixels[:, :65_500] if shape[0] == 1 else pixels[:65_500], "jpeg").startswith(b"\xff\xd8")


def test_jpeg_quality_changes_size() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    assert len(encode_image(pixels, "jpeg", quality=30)) < len(encode_image(pixels, "jpeg", 95))


def test_annotated_image_round_trips_through_png() -> None:
    out = annotate(smooth(), detections([[10, 20, 100, 110]], [0.86], [3]))
    np.testing.assert_array_equal(decode_image(encode_image(out, "png")).pixels, out)


@pytest.mark.parametrize("fmt,quality", [("gif", 90), ("webp", 90), ("jpeg", 0), ("jpeg", 101)])
def test_bad_encode_requests(fmt: str, quality: int) -> None:
    with pytest.raises(InvalidParameter) as caught:
        encode_image(smooth(), fmt, quality)
    assert caught.value.status == 422
