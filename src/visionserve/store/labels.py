"""Label lists of the public datasets the catalog's models were trained on (darknet spelling),
and reading a user's labels file."""

from __future__ import annotations

from pathlib import Path

from visionserve.errors import ModelError


def read_labels(labels: str | Path | list[str]) -> list[str]:
    """A list as given, or a labels file (darknet ``.names``): one label a line, blank lines ignored."""
    if isinstance(labels, list):
        return [str(x) for x in labels]
    try:
        text = Path(labels).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError("cannot read the model's labels file", detail=f"cannot read labels file {labels}: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


COCO_80 = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

VOC_20 = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
