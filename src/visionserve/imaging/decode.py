"""Interim decoder (OpenCV) while the full intake module (formats, EXIF, limits) lands."""

from __future__ import annotations

import cv2
import numpy as np

from visionserve.errors import InvalidImage, MissingImage
from visionserve.types import DecodedImage


def decode_image(data: bytes, *, max_pixels: int = 50_000_000, min_size: tuple[int, int] | None = None) -> DecodedImage:
    if not data:
        raise MissingImage("the image is empty")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidImage("the data is not an image that can be decoded")
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    return DecodedImage(rgb, rgb.shape[1], rgb.shape[0], "unknown")
