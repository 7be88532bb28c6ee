"""Darknet ``[yolo]`` heads (YOLOv3, YOLOv4-tiny, Yolo-Fastest...), decoded outside the graph.

Each output is one head's raw convolution, [A * (5 + C), H, W]: per masked anchor tx, ty,
tw, th, objectness and C class logits for every grid cell. Darknet decodes a cell (col, row)
as x = (col + sigmoid(tx) * s - (s - 1) / 2) / W (s = scale_x_y; likewise y with H),
w = exp(tw) * anchor_w / net_w (anchors in network pixels), objectness = sigmoid(to) and
class scores sigmoid(logit), independently per class; score = objectness x class score.

Options: ``heads``, one per output in output order: ``{"anchors": [[w, h], ...] (pixels),
"scale_x_y": float}``. Input defaults: RGB 0..1 (scale 1/255), plain resize, as darknet.
"""

from __future__ import annotations

from functools import cached_property
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

from visionserve.errors import ModelError
from visionserve.families import register
from visionserve.families.base import (
    Candidates, FamilyOptions, InputSpec, ModelFamily, input_spec_from, multilabel_candidates,
)
from visionserve.store.manifest import ModelManifest
from visionserve.vision.grid import grid_boxes, sigmoid


def decode_yolo_head(
    raw: np.ndarray, anchors: np.ndarray, num_classes: int, net_size: tuple[int, int], scale_x_y: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[A*(5+C), H, W] -> (boxes [A*H*W, 4] x1y1x2y2 in network pixels, objectness [A*H*W], class scores [A*H*W, C]).

    Anchors are in network pixels. Rows are ordered anchor-major, then row, then column, as darknet walks them.
    """
    _, gh, gw = raw.shape
    p = raw.reshape(anchors.shape[0], 5 + num_classes, gh, gw)
    boxes = grid_boxes(p, anchors, net_size, scale_x_y)
    objectness = sigmoid(p[:, 4]).reshape(-1)
    scores = sigmoid(p[:, 5:]).transpose(0, 2, 3, 1).reshape(-1, num_classes)
    return boxes, objectness, scores


class YoloHead(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    anchors: list[tuple[PositiveFloat, PositiveFloat]] = Field(min_length=1, description="(width, height) in pixels")
    scale_x_y: PositiveFloat = 1.0


class DarknetYoloOptions(FamilyOptions):
    heads: list[YoloHead] = Field(min_length=1, description="one per output, in output order")


@register
class DarknetYoloFamily(ModelFamily):
    name = "darknet-yolo"
    Options = DarknetYoloOptions
    options: DarknetYoloOptions

    @classmethod
    def input_spec(cls, manifest: ModelManifest) -> InputSpec:
        return input_spec_from(manifest, channel_order="RGB", resize="stretch", scale=1.0 / 255.0)

    @cached_property
    def heads(self) -> list[tuple[np.ndarray, float]]:
        """(anchors [A, 2] in network pixels, scale_x_y) per output."""
        return [(np.asarray(h.anchors, np.float32).reshape(-1, 2), h.scale_x_y) for h in self.options.heads]

    def validate_outputs(
        self, output_shapes: Sequence[Sequence[int | str | None]], net_size: tuple[int, int] | None = None
    ) -> None:
        if len(output_shapes) != len(self.heads):
            raise ModelError(f"the graph has {len(output_shapes)} outputs; the manifest describes {len(self.heads)} heads")
        for k, ((anchors, _), shape) in enumerate(zip(self.heads, output_shapes)):
            want = anchors.shape[0] * (5 + len(self.labels))
            shape = list(shape)
            if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != want):
                raise ModelError(
                    f"output {k} shape {shape} does not fit {anchors.shape[0]} anchors and "
                    f"{len(self.labels)} labels (want [N, {want}, H, W])"
                )

    def decode(
        self, outputs: Sequence[np.ndarray], min_confidence: float, net_size: tuple[int, int] | None = None
    ) -> Candidates:
        net_size = self.net_size(net_size)
        boxes, objectness, scores = [], [], []
        for raw, (anchors, scale_x_y) in zip(outputs, self.heads):
            b, o, s = decode_yolo_head(raw.astype(np.float32, copy=False), anchors, len(self.labels), net_size, scale_x_y)
            boxes.append(b)
            objectness.append(o)
            scores.append(s)
        return multilabel_candidates(
            np.concatenate(boxes), np.concatenate(objectness), np.concatenate(scores), min_confidence
        )
