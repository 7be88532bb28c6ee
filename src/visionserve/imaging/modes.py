"""Pillow image modes -> RGB uint8 arrays, scaling wide samples instead of clipping them."""

from __future__ import annotations

import numpy as np
from PIL import Image

# OpenCV is imported where it is used: the HTTP process imports this module, but the work
# runs in the inference process (worker_mode "processes"), and OpenCV would add about
# 20 MB to the HTTP process (docs/benchmarks.md).

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 HxWx3 pixels of a loaded Pillow image; alpha is dropped.

    Pillow's own ``convert("RGB")`` clips 16/32-bit and float samples at 255, which turns a
    16-bit photo white, so those modes are scaled here. 48/64-bit PNGs already arrive as
    RGB/RGBA holding each sample's high byte, a proper scaling (v // 256).
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in _SIXTEEN_BIT_MODES:
        gray = _scale_16bit(np.asarray(image))
    elif mode == "I":
        samples = np.asarray(image)
        gray = _scale_int32(samples.view(np.uint32) if _unsigned_32bit_tiff(image) else samples)
    elif mode == "F":
        gray = _scale_float(np.asarray(image))
    else:
        return np.asarray(image.convert("RGB"))
    import cv2

    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)


def _scale_16bit(samples: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (255/65535 = 1/257)."""
    wide = samples.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _unsigned_32bit_tiff(image: Image.Image) -> bool:
    """A TIFF of unsigned 32-bit samples: Pillow reads them as signed ("I"), so values over
    2**31 arrive negative, and stretching that range garbles the picture."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return False
    bits, sample_format = tags.get(258, ()), tags.get(339, (1,))  # BitsPerSample; SampleFormat (1 = unsigned)
    first = lambda v: v[0] if isinstance(v, tuple) and v else v  # noqa: E731
    return first(bits) == 32 and first(sample_format) == 1


def _scale_int32(samples: np.ndarray) -> np.ndarray:
    """32-bit integer samples: 16-bit data stored wide (e.g. 16-bit PNG/TIFF read as "I")
    keeps its meaning; anything outside 0..65535 has no standard white, so it is stretched."""
    lo, hi = int(samples.min()), int(samples.max())
    if lo >= 0 and hi <= 65535:
        return _scale_16bit(samples)
    return _stretch(samples.astype(np.float64), lo, hi)


def _scale_float(samples: np.ndarray) -> np.ndarray:
    """Float samples: 0..1 is the usual convention for white = 1; other ranges are stretched.
    NaN and infinities become black."""
    values = np.nan_to_num(samples.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    return _stretch(values, lo, hi)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] onto 0..255; a constant image maps to black."""
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
