"""Protocol-neutral values that flow between the layers.

request -> decode (DecodedImage) -> family.preprocess (tensor, PrepInfo) -> runtime ->
family.postprocess (Detections) -> protocol adapter (response).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """An image ready for a model: RGB uint8 pixels, HxWx3, EXIF orientation applied.

    ``width``/``height`` are the image's true size (after orientation). ``pixels`` may be
    smaller when the decoder scaled it down on the way (JPEG DCT scaling); boxes computed on
    ``pixels`` are scaled back with ``scale_x``/``scale_y``.
    """

    pixels: np.ndarray
    width: int
    height: int
    format: str = "raw"
    orientation: int = 1  # the EXIF orientation applied (1: none), for clients that draw the file

    @property
    def scale_x(self) -> float:
        return self.width / self.pixels.shape[1]

    @property
    def scale_y(self) -> float:
        return self.height / self.pixels.shape[0]


@dataclass(frozen=True, slots=True)
class PredictParams:
    """Per-request post-processing settings; ``None`` means "the model's default"."""

    min_confidence: float | None = None
    iou: float | None = None
    max_detections: int | None = None
    classes: frozenset[str] | None = None

    @staticmethod
    def parse_classes(value: str | Iterable[str] | None) -> frozenset[str] | None:
        """Labels to keep from ``"person, dog"`` or ``["person", "dog"]`` (blank entries
        ignored); None (no filter) stays None."""
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        return frozenset(c.strip() for c in items if c.strip())


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Resolved post-processing settings (request values over model defaults)."""

    min_confidence: float
    iou: float
    max_detections: int
    class_ids: np.ndarray | None = None  # int array of allowed class ids, None = all


@dataclass(frozen=True, slots=True)
class Detections:
    """Detections of one image as parallel arrays, sorted by score, highest first.

    ``boxes`` are float32 [K, 4] x1, y1, x2, y2 in the pixels of the image given to the family.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    labels: Sequence[str]

    @classmethod
    def empty(cls, labels: Sequence[str]) -> "Detections":
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), labels
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def label_names(self) -> list[str]:
        return [self.labels[i] for i in self.class_ids.tolist()]

    def scaled(self, sx: float, sy: float, width: int, height: int) -> "Detections":
        """Boxes mapped by (sx, sy) and clipped to a width x height image."""
        if sx == 1.0 and sy == 1.0:
            return self
        boxes = self.boxes * np.array([sx, sy, sx, sy], np.float32)
        np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
        return Detections(boxes, self.scores, self.class_ids, self.labels)


@dataclass(slots=True)
class Prediction:
    """What a model answered for one image, with where the time went (milliseconds)."""

    model: str
    version: str
    image: DecodedImage
    detections: Detections
    timings_ms: dict[str, float] = field(default_factory=dict)
    rendered: bytes | None = None  # the annotated image, encoded, when the caller asked for one
