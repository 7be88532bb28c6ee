"""YOLOX (Megvii) exported to ONNX with its head's sigmoid applied but boxes not decoded.

Contract: input float32 [N, 3, H, W], BGR, letterboxed top-left with pad 114, raw 0..255.
Output [N, sum(H/s * W/s for s in strides), 5 + C]: cx, cy, w, h (grid units, log-space
w/h), objectness, C class scores. Boxes decode as xy = (xy + cell) * stride,
wh = exp(wh) * stride; score = objectness x class score.
"""

from __future__ import annotations

from functools import cached_property
from typing import Sequence

import numpy as np

from visionserve.errors import ModelError
from visionserve.families import register
from visionserve.families.base import Candidates, InputSpec, ModelFamily, input_spec_from, multilabel_candidates
from visionserve.store.manifest import ModelManifest
from visionserve.vision.boxes import cxcywh_to_xyxy


@register
class YoloxFamily(ModelFamily):
    name = "yolox"

    @classmethod
    def input_spec(cls, manifest: ModelManifest) -> InputSpec:
        return input_spec_from(
            manifest, channel_order="BGR", resize="letterbox", align="topleft", pad_value=114, scale=1.0
        )

    @property
    def strides(self) -> list[int]:
        return list(self.manifest.options.get("strides", [8, 16, 32]))

    @cached_property
    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(cell x,y offsets [N, 2], stride per row [N, 1]) for this input size."""
        cells, strides = [], []
        for s in self.strides:
            gh, gw = self.input.height // s, self.input.width // s
            xv, yv = np.meshgrid(np.arange(gw), np.arange(gh))
            cells.append(np.stack((xv, yv), axis=2).reshape(-1, 2))
            strides.append(np.full((gh * gw, 1), s))
        return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)

    def validate_outputs(self, output_shapes: Sequence[Sequence[int | str | None]]) -> None:
        rows = self._grid[0].shape[0]
        shape = list(output_shapes[0]) if output_shapes else []
        if len(shape) != 3 or shape[1] not in (rows, None) or (
            isinstance(shape[2], int) and shape[2] != 5 + len(self.labels)
        ):
            raise ModelError(
                f"YOLOX output shape {shape} does not fit {self.input.width}x{self.input.height} input "
                f"with strides {self.strides} and {len(self.labels)} labels (want [N, {rows}, {5 + len(self.labels)}])"
            )

    def decode(self, outputs: Sequence[np.ndarray], min_confidence: float) -> Candidates:
        out = outputs[0]
        cells, strides = self._grid
        xy = (out[:, :2] + cells) * strides
        wh = np.exp(out[:, 2:4]) * strides
        boxes = cxcywh_to_xyxy(np.concatenate([xy, wh], axis=1))
        return multilabel_candidates(boxes, out[:, 4], out[:, 5:], min_confidence)
