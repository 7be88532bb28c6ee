"""Darknet's grid-cell box decoding, shared by ``[region]`` (YOLOv2) and ``[yolo]`` (v3/v4) heads."""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def grid_boxes(
    p: np.ndarray, anchors: np.ndarray, net_size: tuple[int, int], scale_x_y: float = 1.0
) -> np.ndarray:
    """Boxes of a head laid out [A, 5 + C, H, W] -> [A*H*W, 4] x1y1x2y2 in network pixels.

    Darknet: x = (col + sigmoid(tx) * s - (s - 1) / 2) / W * net_w, w = exp(tw) * anchor_w
    (anchors [A, 2] in network pixels), likewise y and h; rows anchor-major, then row, then column.
    """
    _, _, gh, gw = p.shape
    net_w, net_h = net_size
    col = np.arange(gw, dtype=np.float32)[None, None, :]
    row = np.arange(gh, dtype=np.float32)[None, :, None]
    shift = (scale_x_y - 1.0) / 2.0
    cx = (col + sigmoid(p[:, 0]) * scale_x_y - shift) / gw * net_w
    cy = (row + sigmoid(p[:, 1]) * scale_x_y - shift) / gh * net_h
    w = np.exp(p[:, 2]) * anchors[:, 0, None, None]
    h = np.exp(p[:, 3]) * anchors[:, 1, None, None]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1).reshape(-1, 4)
