"""Greedy non-maximum suppression, vectorised per step.

Each iteration keeps the best remaining box and drops, in one array operation, every box
that overlaps it too much; the loop runs once per *kept* box and stops at ``max_output``.
"""

from __future__ import annotations

import numpy as np

from visionserve.vision.boxes import box_area


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_output: int | None = None
) -> np.ndarray:
    """Indices of the boxes kept, highest score first."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    limit = boxes.shape[0] if max_output is None else max_output
    order = np.argsort(-scores, kind="stable")
    areas = box_area(boxes)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou_threshold: float,
    max_output: int | None = None,
) -> np.ndarray:
    """Per-class NMS in one pass: boxes of different classes are shifted apart so they never overlap."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.intp)
    span = float(boxes.max() - min(0.0, float(boxes.min()))) + 1.0
    shifted = boxes + (class_ids.astype(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_output)
