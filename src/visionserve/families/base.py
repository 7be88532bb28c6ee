"""What every model family provides: pre-processing and output decoding for one kind of model.

A family turns a ``DecodedImage`` into the network's input tensor and the network's raw
outputs into ``Detections`` in image pixels. It knows nothing of HTTP or of how inference
is scheduled; the runtime only moves tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from visionserve.errors import ModelError
from visionserve.store.manifest import ModelManifest
from visionserve.types import Detections, Thresholds
from visionserve.vision.boxes import clip_boxes
from visionserve.vision.letterbox import Placement, letterbox, stretch, to_chw_tensor
from visionserve.vision.nms import batched_nms


@dataclass(frozen=True, slots=True)
class InputSpec:
    """How pixels become the network's input."""

    width: int
    height: int
    channel_order: Literal["RGB", "BGR"] = "RGB"
    resize: Literal["letterbox", "stretch"] = "letterbox"
    align: Literal["topleft", "center"] = "topleft"
    pad_value: int = 114
    scale: float = 1.0  # multiplier applied to 0..255 values
    # Letterbox only: 0 pads to width x height; N pads to the next multiple of N instead (the
    # runtime sets it when the loaded graph takes such sizes: ``variable_input_stride``).
    pad_stride: int = 0


@dataclass(frozen=True, slots=True)
class Candidates:
    """Decoded boxes before NMS, in network-input pixels."""

    boxes: np.ndarray  # float32 [K, 4] x1 y1 x2 y2
    scores: np.ndarray  # float32 [K]
    class_ids: np.ndarray  # int32 [K]


class FamilyOptions(BaseModel):
    """A manifest's ``options`` (the catalog's, an import's, and a config's ``[[models]]
    options`` over them): the input keys every family takes. A family with keys of its own
    subclasses this and names the subclass as its ``Options``; keys no family takes are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel_order: Literal["RGB", "BGR"] | None = None
    resize: Literal["letterbox", "stretch"] | None = None
    align: Literal["topleft", "center"] | None = None
    pad_value: int | None = Field(None, ge=0, le=255)
    scale: float | None = Field(None, gt=0, allow_inf_nan=False)


INPUT_OPTION_KEYS = tuple(FamilyOptions.model_fields)


def checked_options(options_type: type[FamilyOptions], options: Mapping[str, Any], model: str) -> FamilyOptions:
    """``options`` (a manifest's) as ``options_type``; ModelError naming each bad key."""
    try:
        return options_type.model_validate(options)
    except ValidationError as e:
        problems = "; ".join(f"options.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ModelError(f"model {model!r}: {problems}") from None


def input_spec_from(manifest: ModelManifest, **defaults: object) -> InputSpec:
    """The family's input defaults, overridden by any input keys in the manifest's options."""
    given = checked_options(
        FamilyOptions, {k: v for k, v in manifest.options.items() if k in INPUT_OPTION_KEYS}, manifest.name
    )
    overrides = given.model_dump(exclude_none=True)
    return InputSpec(
        width=manifest.input_width, height=manifest.input_height, **{**defaults, **overrides}
    )


def multilabel_candidates(
    boxes: np.ndarray, objectness: np.ndarray, class_scores: np.ndarray, min_confidence: float
) -> Candidates:
    """Every (box, class) pair whose objectness x class score passes the threshold.

    boxes [N, 4], objectness [N], class_scores [N, C]. A class score is at most 1, so rows
    whose objectness alone is below the threshold are dropped before the product.
    """
    rows = np.flatnonzero(objectness > min_confidence)
    scores = objectness[rows, None] * class_scores[rows]
    r, c = np.nonzero(scores > min_confidence)
    return Candidates(
        boxes[rows[r]].astype(np.float32, copy=False),
        scores[r, c].astype(np.float32, copy=False),
        c.astype(np.int32),
    )


class ModelFamily(ABC):
    """Base class: subclasses set ``name``, build their ``InputSpec`` and implement ``decode``."""

    name: ClassVar[str]
    Options: ClassVar[type[FamilyOptions]] = FamilyOptions

    def __init__(self, manifest: ModelManifest) -> None:
        self.manifest = manifest
        self.options = checked_options(self.Options, manifest.options, manifest.name)
        self.labels: list[str] = list(manifest.labels)
        self.input = self.input_spec(manifest)

    @classmethod
    @abstractmethod
    def input_spec(cls, manifest: ModelManifest) -> InputSpec:
        """The pre-processing this family (and this manifest's options) asks for."""

    @abstractmethod
    def decode(
        self, outputs: Sequence[np.ndarray], min_confidence: float, net_size: tuple[int, int] | None = None
    ) -> Candidates:
        """Raw outputs of one image (batch dimension removed) -> candidate boxes above threshold.
        ``net_size``: the input's (width, height) when it was not the full size."""

    def validate_outputs(
        self, output_shapes: Sequence[Sequence[int | str | None]], net_size: tuple[int, int] | None = None
    ) -> None:
        """Raises ``ModelError`` when the ONNX graph's outputs do not fit this family (for an
        input of ``net_size``, by default the full size)."""

    @property
    def variable_input_stride(self) -> int | None:
        """The step in which this family can take input sizes below the full one (letterboxed
        images padded only to a multiple of it), or None: it decodes the full size only."""
        return None

    def net_size(self, given: tuple[int, int] | None = None) -> tuple[int, int]:
        """The network input's (width, height): ``given``, else the full size."""
        return given or (self.input.width, self.input.height)

    # -- shared pipeline ---------------------------------------------------------------

    def preprocess(self, pixels: np.ndarray) -> tuple[np.ndarray, Placement]:
        """RGB HxWx3 uint8 -> (3xHxW float32 input, where the image landed)."""
        spec = self.input
        if spec.resize == "letterbox":
            fitted, placement = letterbox(
                pixels, spec.width, spec.height, align=spec.align, pad_value=spec.pad_value, stride=spec.pad_stride
            )
        else:
            fitted, placement = stretch(pixels, spec.width, spec.height)
        tensor = to_chw_tensor(fitted, swap_rb=spec.channel_order == "BGR", scale=spec.scale)
        return tensor, placement

    def postprocess(
        self,
        outputs: Sequence[np.ndarray],
        placement: Placement,
        image_size: tuple[int, int],
        thresholds: Thresholds,
    ) -> Detections:
        """Raw outputs of one image -> final detections in image pixels, best first."""
        cand = self.decode(outputs, thresholds.min_confidence, placement.net_size)
        boxes, scores, class_ids = cand.boxes, cand.scores, cand.class_ids
        if thresholds.class_ids is not None and len(scores):
            allowed = np.isin(class_ids, thresholds.class_ids)
            boxes, scores, class_ids = boxes[allowed], scores[allowed], class_ids[allowed]
        if not len(scores):
            return Detections.empty(self.labels)
        keep = batched_nms(boxes, scores, class_ids, thresholds.iou, thresholds.max_detections)
        width, height = image_size
        out_boxes = clip_boxes(placement.to_image(boxes[keep]), width, height)
        return Detections(
            out_boxes,
            scores[keep].astype(np.float32, copy=False),
            class_ids[keep].astype(np.int32, copy=False),
            self.labels,
        )
