"""The models visionserve knows by name: where each file lives publicly and how to use it.

Mirrors hold the same bytes laid out as ``<entry.folder>/<file.name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from visionserve.errors import ModelNotFound
from visionserve.store.labels import COCO_80, VOC_20


@dataclass(frozen=True, slots=True)
class CatalogFile:
    name: str
    url: str
    sha256: str | None  # None only where no hash was ever published; size is then checked
    size: int | None = None


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    family: str
    description: str
    folder: str  # folder in a mirror
    files: tuple[CatalogFile, ...]
    labels: tuple[str, ...]
    input_width: int
    input_height: int
    format: Literal["onnx", "darknet"] = "onnx"
    model_file: str = ""  # the ONNX file among ``files`` (format "onnx")
    version: str = "1"
    options: dict[str, Any] = field(default_factory=dict)
    min_confidence: float = 0.4
    iou: float = 0.45
    max_detections: int = 100
    license: str = ""
    homepage: str = ""


_YOLOX_NANO_URL = (
    "https://github.com/Kazuhito00/YOLOX-ONNX-TFLite-Sample/raw/"
    "0f785c070ce8da070aeaeef46c0da7904ff7012e/model/yolox_nano.onnx"
)
_TINY_YOLOV2_URL = (
    "https://github.com/onnx/models/raw/main/validated/vision/object_detection_segmentation/"
    "tiny-yolov2/model/tinyyolov2-8.onnx"
)

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            name="yolox-nano",
            family="yolox",
            description="YOLOX-Nano (Megvii), COCO 80 classes, 416x416, ONNX opset 11",
            folder="yolox_nano",
            files=(
                CatalogFile(
                    "yolox_nano.onnx",
                    _YOLOX_NANO_URL,
                    "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14",
                    3_660_092,
                ),
            ),
            model_file="yolox_nano.onnx",
            labels=COCO_80,
            input_width=416,
            input_height=416,
            options={"strides": [8, 16, 32]},
            license="Apache-2.0",
            homepage="https://github.com/Megvii-BaseDetection/YOLOX",
        ),
        CatalogEntry(
            name="tiny-yolov2-voc",
            family="yolov2-region",
            description="Tiny YOLOv2, Pascal VOC 20 classes, 416x416 (ONNX Model Zoo tinyyolov2-8)",
            folder="tiny_yolov2_voc",
            files=(
                CatalogFile(
                    "tinyyolov2-8.onnx",
                    _TINY_YOLOV2_URL,
                    "583fb7fdc948435ceac9fa82efc7708701efe8382a859a3dd46526b155f5f2ae",
                    63_480_982,
                ),
            ),
            model_file="tinyyolov2-8.onnx",
            labels=VOC_20,
            input_width=416,
            input_height=416,
            options={
                "anchors": [[1.08, 1.19], [3.42, 4.41], [6.63, 11.38], [9.42, 5.11], [16.62, 10.52]],
            },
            license="MIT",
            homepage="https://github.com/onnx/models",
        ),
    ]
}


def get_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelNotFound(
            f"no model named {name!r} in the catalog; known: {', '.join(sorted(CATALOG))}"
        ) from None
