"""EXIF orientation: finding it in a JPEG cheaply and applying it to pixel arrays."""

from __future__ import annotations

import numpy as np
from PIL import Image

# OpenCV is imported where it is used: the HTTP process imports this module, but the work
# runs in the inference process (worker_mode "processes"), and OpenCV would add about
# 20 MB to the HTTP process (docs/benchmarks.md).

ORIENTATION_TAG = 0x0112

# Orientations 5-8 store the picture transposed: its displayed width is the stored height.
TRANSPOSING = frozenset({5, 6, 7, 8})

_APP1 = 0xE1
_EXIF_HEADER = b"Exif\x00\x00"
# Markers after which no APPn segment can follow: start of frame/scan, end of image.
_STOP_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB,
                           0xCD, 0xCE, 0xCF, 0xDA, 0xD9})


def jpeg_exif_block(data: bytes) -> bytes | None:
    """The EXIF payload of a JPEG's APP1 segment, found by walking the segment headers.

    Cheaper than opening the file with Pillow (which also parses tables the fast decoder
    reads again); only the few header segments before the frame are visited.
    """
    pos, end = 2, len(data)  # after SOI
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STOP_MARKERS:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        if marker == _APP1 and data.startswith(_EXIF_HEADER, pos + 4):
            return data[pos + 4 : pos + 2 + length]
        pos += 2 + length
    return None


def orientation_from_exif_block(block: bytes | None) -> int:
    """The orientation (1-8) an EXIF block declares; 1 when absent, unreadable or out of range.

    A damaged EXIF block does not make the image undecodable, so it is ignored, not reported.
    """
    if not block:
        return 1
    try:
        exif = Image.Exif()
        exif.load(block)
        value = exif.get(ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened Pillow image; 1 when absent or unreadable."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The displayed (width, height) of a stored width x height image."""
    return (height, width) if orientation in TRANSPOSING else (width, height)


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turns stored pixels into displayed pixels (new C-contiguous array unless orientation 1).

    EXIF 2.32 section 4.6.4: the value says where the stored 0th row and column belong, so
    e.g. 6 (0th row on the right) needs a clockwise quarter turn to display.
    """
    if orientation == 1:
        return pixels
    import cv2

    if orientation == 2:
        return cv2.flip(pixels, 1)
    if orientation == 3:
        return cv2.rotate(pixels, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(pixels, 0)
    if orientation == 5:
        return cv2.transpose(pixels)
    if orientation == 6:
        return cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(pixels), -1)
    if orientation == 8:
        return cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return pixels
