"""Fitting an image to a network's input size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# OpenCV is imported where it is used: the HTTP process imports this module, but the work
# runs in the inference process (worker_mode "processes"), and OpenCV would add about
# 20 MB to the HTTP process (docs/benchmarks.md).


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the image landed in the network input: ``net = image * scale + pad``."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    # The network input's (width, height) when it is not the model's full size (minimal padding).
    net_size: tuple[int, int] | None = None

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Maps x1,y1,x2,y2 boxes from network-input pixels back to image pixels (new array)."""
        out = boxes.astype(np.float32, copy=True)
        out[:, 0::2] -= self.pad_x
        out[:, 1::2] -= self.pad_y
        out[:, 0::2] /= self.scale_x
        out[:, 1::2] /= self.scale_y
        return out


def letterbox(
    pixels: np.ndarray,
    width: int,
    height: int,
    *,
    align: Literal["topleft", "center"] = "topleft",
    pad_value: int = 114,
    stride: int = 0,
) -> tuple[np.ndarray, Placement]:
    """Resizes keeping the aspect ratio and pads to width x height (HxWxC uint8).

    With ``stride``, pads only to the next multiple of ``stride`` (at most width x height):
    a 4:3 photo fills 416x320 rather than 416x416, for a network that takes any size in
    steps of its largest stride. The scale is the same either way.
    """
    import cv2

    h, w = pixels.shape[:2]
    r = min(width / w, height / h)
    nw, nh = max(1, int(w * r)), max(1, int(h * r))
    net_size = None
    if stride > 0:
        padded = (min(width, padded_to(nw, stride)), min(height, padded_to(nh, stride)))
        if padded != (width, height):
            net_size = padded
            width, height = padded
    resized = pixels if (nw, nh) == (w, h) else cv2.resize(pixels, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if (nw, nh) == (width, height):
        return resized, Placement(r, r, 0.0, 0.0, net_size)
    canvas = np.full((height, width, pixels.shape[2]), pad_value, dtype=np.uint8)
    if align == "center":
        px, py = (width - nw) // 2, (height - nh) // 2
    else:
        px, py = 0, 0
    canvas[py : py + nh, px : px + nw] = resized
    return canvas, Placement(r, r, float(px), float(py), net_size)


def padded_to(size: int, stride: int) -> int:
    """The smallest multiple of ``stride`` that holds ``size``."""
    return -(-size // stride) * stride


def stretch(pixels: np.ndarray, width: int, height: int) -> tuple[np.ndarray, Placement]:
    """Resizes to exactly width x height, ignoring the aspect ratio (darknet's default)."""
    import cv2

    h, w = pixels.shape[:2]
    resized = pixels if (w, h) == (width, height) else cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized, Placement(width / w, height / h, 0.0, 0.0)


def to_chw_tensor(
    pixels: np.ndarray, *, swap_rb: bool = False, scale: float = 1.0
) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, optionally RGB<->BGR swapped and multiplied by scale."""
    src = pixels[..., ::-1] if swap_rb else pixels
    out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
    # One pass: the transpose view is read once and written contiguous.
    np.copyto(out, src.transpose(2, 0, 1), casting="unsafe")
    if scale != 1.0:
        out *= np.float32(scale)
    return out
