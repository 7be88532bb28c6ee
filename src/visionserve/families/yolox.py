"""YOLOX (Megvii) exported to ONNX with its head's sigmoid applied but boxes not decoded.

Contract: input float32 [N, 3, H, W], BGR, letterboxed top-left with pad 114, raw 0..255.
Output [N, sum(H/s * W/s for s in strides), 5 + C]: cx, cy, w, h (grid units, log-space
w/h), objectness, C class scores. Boxes decode as xy = (xy + cell) * stride,
wh = exp(wh) * stride; score = objectness x class score.

The network is fully convolutional, so any input whose sides are multiples of the largest
stride works; the grid follows the input's size (``variable_input_stride``).
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Sequence

import numpy as np
from pydantic import Field, PositiveInt

from visionserve.errors import ModelError
from visionserve.families import register
from visionserve.families.base import (
    Candidates, FamilyOptions, InputSpec, ModelFamily, input_spec_from, multilabel_candidates,
)
from visionserve.store.manifest import ModelManifest
from visionserve.vision.boxes import cxcywh_to_xyxy


class YoloxOptions(FamilyOptions):
    strides: list[PositiveInt] = Field(default=[8, 16, 32], min_length=1, description="the heads' strides, in output order")


@register
class YoloxFamily(ModelFamily):
    name = "yolox"
    Options = YoloxOptions
    options: YoloxOptions

    @classmethod
    def input_spec(cls, manifest: ModelManifest) -> InputSpec:
        return input_spec_from(
            manifest, channel_order="BGR", resize="letterbox", align="topleft", pad_value=114, scale=1.0
        )

    @cached_property
    def strides(self) -> tuple[int, ...]:
        # Read once: decode (once per image) keys the grid cache by it.
        return tuple(self.options.strides)

    @property
    def variable_input_stride(self) -> int:
        return max(self.strides)

    def validate_outputs(
        self, output_shapes: Sequence[Sequence[int | str | None]], net_size: tuple[int, int] | None = None
    ) -> None:
        width, height = self.net_size(net_size)
        rows = yolox_grid(self.strides, width, height)[0].shape[0]
        shape = list(output_shapes[0]) if output_shapes else []
        # A dimension that is not an int is symbolic (any size): only the run can tell.
        if len(shape) != 3 or (isinstance(shape[1], int) and shape[1] != rows) or (
            isinstance(shape[2], int) and shape[2] != 5 + len(self.labels)
        ):
            raise ModelError(
                f"YOLOX output shape {shape} does not fit {width}x{height} input "
                f"with strides {list(self.strides)} and {len(self.labels)} labels (want [N, {rows}, {5 + len(self.labels)}])"
            )

    def decode(
        self, outputs: Sequence[np.ndarray], min_confidence: float, net_size: tuple[int, int] | None = None
    ) -> Candidates:
        out = outputs[0]
        cells, strides = yolox_grid(self.strides, *self.net_size(net_size))
        xy = (out[:, :2] + cells) * strides
        wh = np.exp(out[:, 2:4]) * strides
        boxes = cxcywh_to_xyxy(np.concatenate([xy, wh], axis=1))
        return multilabel_candidates(boxes, out[:, 4], out[:, 5:], min_confidence)


@lru_cache(maxsize=64)  # one entry per input size: at most a few dozen with minimal padding
def yolox_grid(strides: tuple[int, ...], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell x,y offsets [N, 2], stride per row [N, 1]) for a width x height input, rows in
    the network's order: stride by stride, row-major."""
    cells, steps = [], []
    for s in strides:
        gh, gw = height // s, width // s
        xv, yv = np.meshgrid(np.arange(gw), np.arange(gh))
        cells.append(np.stack((xv, yv), axis=2).reshape(-1, 2))
        steps.append(np.full((gh * gw, 1), s))
    out = np.concatenate(cells).astype(np.float32), np.concatenate(steps).astype(np.float32)
    for a in out:
        a.flags.writeable = False  # shared by every caller
    return out
