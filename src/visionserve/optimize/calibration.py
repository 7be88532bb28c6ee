"""Calibration data: the user's images, a few simple variants of each, preprocessed by the model's family."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from visionserve.errors import InvalidImage, VisionServeError
from visionserve.families.base import ModelFamily
from visionserve.imaging.decode import decode_image


def load_rgb(path: Path, role: str = "image") -> np.ndarray:
    """An image file as RGB uint8 HxWx3, decoded the way the server decodes uploads; a file
    that does not decode is an InvalidImage naming it and its ``role`` ("calibration image")."""
    try:
        return decode_image(Path(path).read_bytes()).pixels
    except VisionServeError as e:
        raise InvalidImage(f"{role} {path}: {e.message}") from None
    except OSError as e:
        raise InvalidImage(f"{role} {path}: cannot be read ({e.strerror or e})") from None


def variants(rgb: np.ndarray) -> list[np.ndarray]:
    """The image, mirrored, a centre crop and a half-size copy: more activation statistics
    from few images (objects at other positions and scales)."""
    h, w = rgb.shape[:2]
    crop = rgb[h // 8 : h - h // 8, w // 8 : w - w // 8]
    half = cv2.resize(rgb, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    return [rgb, np.ascontiguousarray(rgb[:, ::-1]), np.ascontiguousarray(crop), half]


def calibration_tensors(family: ModelFamily, images: Iterable[Path], *, augment: bool = True) -> np.ndarray:
    """[N, C, H, W] float32 network inputs for calibration."""
    tensors = []
    for path in images:
        rgb = load_rgb(path, "calibration image")
        for pixels in variants(rgb) if augment else [rgb]:
            tensors.append(family.preprocess(pixels)[0])
    if not tensors:
        raise ValueError("no calibration images")
    return np.stack(tensors)


class TensorReader(CalibrationDataReader):
    """Feeds prepared tensors one at a time to ONNX Runtime's calibrator."""

    def __init__(self, input_name: str, tensors: np.ndarray) -> None:
        self._input_name = input_name
        self._tensors = tensors
        self._it: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        t = next(self._it, None)
        return None if t is None else {self._input_name: t[None]}

    def rewind(self) -> None:
        self._it = iter(self._tensors)
