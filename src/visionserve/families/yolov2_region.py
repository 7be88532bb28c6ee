"""YOLOv2 / Tiny YOLOv2: darknet's ``[region]`` layer.

The network's last convolution gives [A * (5 + C), H, W]: for each of A anchors, tx, ty, tw,
th, objectness and C class logits per grid cell. Darknet decodes it as
x = (col + sigmoid(tx)) / W, w = exp(tw) * anchor_w / W (likewise y, h), objectness =
sigmoid(to), class probabilities = softmax(logits), score = objectness x probability.
Anchors are in grid-cell units.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pydantic import Field, PositiveFloat

from visionserve.errors import ModelError
from visionserve.families import register
from visionserve.families.base import (
    Candidates, FamilyOptions, InputSpec, ModelFamily, input_spec_from, multilabel_candidates,
)
from visionserve.store.manifest import ModelManifest
from visionserve.vision.grid import grid_boxes, sigmoid

# Tiny YOLOv2 VOC's anchors (yolov2-tiny-voc.cfg), in 32-pixel grid cells.
TINY_YOLOV2_VOC_ANCHORS = [(1.08, 1.19), (3.42, 4.41), (6.63, 11.38), (9.42, 5.11), (16.62, 10.52)]


def decode_region(
    raw: np.ndarray, anchors: np.ndarray, num_classes: int, net_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[A*(5+C), H, W] -> (boxes [A*H*W, 4] x1y1x2y2 in network pixels, objectness [A*H*W], class probs [A*H*W, C]).

    Anchors are in grid cells. Rows are ordered anchor-major, then row, then column, as darknet walks them.
    """
    num_anchors = anchors.shape[0]
    _, gh, gw = raw.shape
    p = raw.reshape(num_anchors, 5 + num_classes, gh, gw)
    net_w, net_h = net_size
    boxes = grid_boxes(p, anchors * np.array([net_w / gw, net_h / gh], np.float32), net_size)
    objectness = sigmoid(p[:, 4]).reshape(-1)
    logits = p[:, 5:]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (e / e.sum(axis=1, keepdims=True)).transpose(0, 2, 3, 1).reshape(-1, num_classes)
    return boxes, objectness, probs


class RegionOptions(FamilyOptions):
    anchors: list[tuple[PositiveFloat, PositiveFloat]] = Field(
        default=TINY_YOLOV2_VOC_ANCHORS, min_length=1, description="(width, height) pairs in grid cells"
    )


@register
class YoloV2RegionFamily(ModelFamily):
    """Options: ``anchors`` (pairs, grid units; Tiny YOLOv2 VOC's by default)."""

    name = "yolov2-region"
    Options = RegionOptions
    options: RegionOptions

    @classmethod
    def input_spec(cls, manifest: ModelManifest) -> InputSpec:
        # ONNX Model Zoo's tinyyolov2: RGB 0..255, plain resize. Darknet imports set scale 1/255.
        return input_spec_from(manifest, channel_order="RGB", resize="stretch", scale=1.0)

    @property
    def anchors(self) -> np.ndarray:
        return np.asarray(self.options.anchors, np.float32).reshape(-1, 2)

    def validate_outputs(
        self, output_shapes: Sequence[Sequence[int | str | None]], net_size: tuple[int, int] | None = None
    ) -> None:
        want = self.anchors.shape[0] * (5 + len(self.labels))
        shape = list(output_shapes[0]) if output_shapes else []
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != want):
            raise ModelError(
                f"region output shape {shape} does not fit {self.anchors.shape[0]} anchors and "
                f"{len(self.labels)} labels (want [N, {want}, H, W])"
            )

    def decode(
        self, outputs: Sequence[np.ndarray], min_confidence: float, net_size: tuple[int, int] | None = None
    ) -> Candidates:
        boxes, obj, probs = decode_region(
            outputs[0].astype(np.float32, copy=False), self.anchors, len(self.labels), self.net_size(net_size)
        )
        return multilabel_candidates(boxes, obj, probs, min_confidence)
