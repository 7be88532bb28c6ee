"""Drawing detections onto an image and encoding the result for a response."""

from __future__ import annotations

from functools import cache

import numpy as np
import simplejpeg

from visionserve.errors import InvalidParameter
from visionserve.types import DecodedImage, Detections

# OpenCV is imported where it is used: only annotated responses need it, and it would add
# about 20 MB to the HTTP process that never draws otherwise (docs/benchmarks.md).


@cache
def _palette(size: int = 256) -> np.ndarray:
    """Distinct saturated RGB colours; hues step by the golden ratio so that neighbouring
    class ids land far apart on the colour wheel."""
    import cv2

    hues = (np.arange(size) * 0.618033988749895 % 1.0 * 180).astype(np.uint8)  # OpenCV hue 0..179
    hsv = np.stack([hues, np.full(size, 200, np.uint8), np.full(size, 240, np.uint8)], axis=-1)
    return cv2.cvtColor(hsv[np.newaxis], cv2.COLOR_HSV2RGB)[0]



def class_color(class_id: int) -> tuple[int, int, int]:
    """The RGB colour boxes of this class are drawn in (stable across calls)."""
    palette = _palette()
    r, g, b = palette[class_id % len(palette)]
    return int(r), int(g), int(b)


def annotate(pixels: np.ndarray, detections: Detections) -> np.ndarray:
    """A copy of ``pixels`` (RGB uint8 HxWx3) with each detection drawn as a box and a
    "label 0.86" tag. Boxes are x1, y1, x2, y2 in the coordinates of ``pixels``."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 HxWx3 pixels, got {pixels.dtype} {pixels.shape}")
    import cv2

    canvas = np.array(pixels, order="C", copy=True)
    height, width = canvas.shape[:2]
    if len(detections) == 0:
        return canvas

    # Line and text size follow the image size so tags stay legible on big photos.
    line = max(1, round((width + height) / 2 * 0.003))
    font_scale = max(0.4, line / 3)
    text_thickness = max(1, line - 1)
    pad = max(1, line)

    boxes = np.asarray(detections.boxes, np.float64)
    finite = np.isfinite(boxes).all(axis=1)
    corners = np.rint(boxes[finite]).astype(np.int64)
    np.clip(corners[:, 0::2], 0, width - 1, out=corners[:, 0::2])
    np.clip(corners[:, 1::2], 0, height - 1, out=corners[:, 1::2])
    scores = np.asarray(detections.scores)[finite]
    class_ids = np.asarray(detections.class_ids)[finite]

    # Drawn worst first so the best detection's box and tag end up on top.
    for i in range(len(corners) - 1, -1, -1):
        x1, y1, x2, y2 = (int(v) for v in corners[i])
        class_id = int(class_ids[i])
        color = class_color(class_id)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, line, cv2.LINE_8)
        text = f"{_label(detections, class_id)} {float(scores[i]):.2f}"
        _draw_tag(canvas, text, x1, y1, color, font_scale, text_thickness, pad)
    return canvas


def _label(detections: Detections, class_id: int) -> str:
    labels = detections.labels
    return labels[class_id] if 0 <= class_id < len(labels) else f"class {class_id}"


def _draw_tag(
    canvas: np.ndarray,
    text: str,
    x: int,
    y: int,
    color: tuple[int, int, int],
    font_scale: float,
    thickness: int,
    pad: int,
) -> None:
    """A filled tag with the text, above the box's top-left corner, or just inside the box
    when there is no room above; always shifted to lie within the image."""
    import cv2

    height, width = canvas.shape[:2]
    (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    tag_w, tag_h = text_w + 2 * pad, text_h + baseline + 2 * pad
    left = min(max(x, 0), max(width - tag_w, 0))
    top = y - tag_h if y - tag_h >= 0 else y
    top = min(max(top, 0), max(height - tag_h, 0))
    cv2.rectangle(canvas, (left, top), (left + tag_w - 1, top + tag_h - 1), color, cv2.FILLED)
    # Dark text on light tags, white on dark ones (ITU-R BT.601 luma).
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luma > 150 else (255, 255, 255)
    origin = (left + pad, top + pad + text_h)
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, ink, thickness, cv2.LINE_AA)


def output_format(fmt: str) -> str:
    """``fmt`` as encode_image takes it: 'jpeg' (also 'jpg') or 'png', any case;
    InvalidParameter for anything else (callers check before the work that leads to it)."""
    name = fmt.lower()
    name = "jpeg" if name == "jpg" else name
    if name not in ("jpeg", "png"):
        raise InvalidParameter(f"unsupported output format {fmt!r}: use 'jpeg' or 'png'")
    return name


# libjpeg's JPEG_MAX_DIMENSION: no JPEG is wider or taller.
JPEG_MAX_SIDE = 65_500


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """RGB uint8 HxWx3 pixels -> JPEG (libjpeg-turbo, 4:2:0) or PNG bytes."""
    if output_format(fmt) == "jpeg":
        if not 1 <= quality <= 100:
            raise InvalidParameter(f"JPEG quality must be 1-100, got {quality}")
        height, width = pixels.shape[:2]
        if max(width, height) > JPEG_MAX_SIDE:
            raise InvalidParameter(
                f"a {width}x{height} image cannot be returned as JPEG (at most {JPEG_MAX_SIDE:,} pixels a side): "
                "ask for format=png"
            )
        return simplejpeg.encode_jpeg(
            np.ascontiguousarray(pixels), quality=quality, colorspace="RGB", colorsubsampling="420"
        )
    import cv2

    # zlib level 1: large images encode several times faster for a few percent more bytes.
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return encoded.tobytes()


def render_annotated(image: DecodedImage, detections: Detections, fmt: str) -> bytes:
    """``image`` with ``detections`` drawn on it, encoded as ``fmt`` ('jpeg' or 'png').
    The boxes are in the coordinates of ``image.pixels``, as a model family's post-processing
    gives them, so that a DCT-scaled JPEG is drawn at the size it was decoded."""
    return encode_image(annotate(image.pixels, detections), fmt)
