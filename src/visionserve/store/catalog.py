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

_YOLO_FASTEST_URL = (
    "https://github.com/dog-qiuqiu/Yolo-Fastest/raw/8d018808f065fafbcd80e8c7bc6721b63253a42d/"
)
_DARKNET_URL = "https://github.com/pjreddie/darknet/raw/f6afaabcdf85f77e7aff2ec55c020c0e297c77f9/"

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
        # Darknet entries are imported to ONNX on pull (store INSTALLERS["darknet"]).
        CatalogEntry(
            name="yolo-fastest-xl-voc",
            family="darknet-yolo",
            description="Yolo-Fastest-XL (dog-qiuqiu), Pascal VOC 20 classes, 320x320, darknet cfg + weights",
            folder="yolo_fastest_xl_voc",
            files=(
                CatalogFile(
                    "yolo-fastest-xl.cfg",
                    _YOLO_FASTEST_URL + "Yolo-Fastest/VOC/yolo-fastest-xl.cfg",
                    "dd8b521a3d2af8e200a20f6bb963cfb1284db311323fd6af7fcbb4440a145a58",
                    9_659,
                ),
                CatalogFile(
                    "yolo-fastest-xl.weights",
                    _YOLO_FASTEST_URL + "Yolo-Fastest/VOC/yolo-fastest-xl.weights",
                    "0c40a803fd9f6032a21aa8954c9980992da6caf1a1384a5917531a1d9c75cc46",
                    3_488_044,
                ),
                CatalogFile(
                    "voc.names",
                    _YOLO_FASTEST_URL + "data/voc.names",
                    "f14861775969fd006b382e005f96dc811ef062ea4a37356efb70d7775e90f743",
                    135,
                ),
            ),
            format="darknet",
            labels=VOC_20,
            input_width=320,
            input_height=320,
            min_confidence=0.25,
            license="darknet public domain (YOLO LICENSE v2)",
            homepage="https://github.com/dog-qiuqiu/Yolo-Fastest",
        ),
        # The original darknet Tiny YOLOv2. Its mirror folder is darknet_cfg, which holds the cfg;
        # the weights were never published with a hash and come from pjreddie.com by size.
        CatalogEntry(
            name="yolov2-tiny-voc",
            family="yolov2-region",
            description="Tiny YOLOv2 (darknet original), Pascal VOC 20 classes, 416x416, darknet cfg + weights",
            folder="darknet_cfg",
            files=(
                CatalogFile(
                    "yolov2-tiny-voc.cfg",
                    _DARKNET_URL + "cfg/yolov2-tiny-voc.cfg",
                    "1e012b455b845579096378b0ab4a82f1d9cb53b3b1282724a6de5d45537cb7e6",
                    1_456,
                ),
                CatalogFile(
                    "yolov2-tiny-voc.weights",
                    "https://pjreddie.com/media/files/yolov2-tiny-voc.weights",
                    None,
                    63_471_556,
                ),
            ),
            format="darknet",
            labels=VOC_20,
            input_width=416,
            input_height=416,
            license="darknet public domain (YOLO LICENSE v2)",
            homepage="https://pjreddie.com/darknet/yolov2/",
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
