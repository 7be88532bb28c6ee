"""Interim annotation while the full drawing module lands."""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

from visionserve.types import Detections


def annotate(pixels: np.ndarray, detections: Detections) -> np.ndarray:
    out = pixels.copy()
    for (x1, y1, x2, y2), label in zip(detections.boxes.astype(int).tolist(), detections.label_names()):
        cv2.rectangle(out, (x1, y1), (x2, y2), (255, 0, 0), 2)
        cv2.putText(out, label, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 0, 0), 1)
    return out


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    if fmt == "jpeg":
        return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]))
    return buf.tobytes()
