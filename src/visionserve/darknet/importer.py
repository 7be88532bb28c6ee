"""Darknet cfg + weights -> ``<name>.onnx`` + ``manifest.json`` in a model folder.

``import_darknet`` is the entry point for user files; ``install_darknet`` is the model
store's installer for catalog entries of format "darknet".
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from visionserve.darknet.cfg import parse_cfg
from visionserve.darknet.errors import DarknetError
from visionserve.darknet.network import Network, plan_network
from visionserve.darknet.onnx_graph import build_onnx
from visionserve.darknet.weights import read_weights
from visionserve.errors import ModelError
from visionserve.store.catalog import CatalogEntry
from visionserve.store.labels import read_labels
from visionserve.store.manifest import ModelManifest, write_atomic

REGION_FAMILY = "yolov2-region"
YOLO_FAMILY = "darknet-yolo"
# Darknet's letterbox fills with 0.5 of full scale.
LETTERBOX_PAD = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def import_darknet(
    cfg: Path, weights: Path, labels: Path | list[str], out_folder: Path, name: str
) -> ModelManifest:
    """Converts a darknet model and writes ``<name>.onnx`` and ``manifest.json`` into ``out_folder``.

    Raises ``DarknetError`` (a ``ModelError``) for an unsupported layer or option, a cfg or
    weights file that do not match, or labels that do not match the cfg's classes.
    """
    manifest = convert_darknet(cfg, weights, labels, out_folder, name)
    manifest.save(Path(out_folder))
    return ModelManifest.load(Path(out_folder))


def convert_darknet(
    cfg: Path, weights: Path, labels: Path | list[str], out_folder: Path, name: str
) -> ModelManifest:
    """Writes ``<name>.onnx`` into ``out_folder`` and returns its manifest, not yet saved: the
    catalog's installer completes it first, so that a store never holds a half-made one."""
    if not _NAME.match(name):
        raise DarknetError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    label_list = read_labels(labels)
    network = plan_network(parse_cfg(Path(cfg)))
    _check_labels(network, label_list)
    weights_file = read_weights(Path(weights))
    model, _ = build_onnx(network, weights_file, graph_name=name)
    data = model.SerializeToString()
    out_folder = Path(out_folder)
    onnx_name = f"{name}.onnx"
    write_atomic(out_folder / onnx_name, data)
    manifest = ModelManifest(
        name=name,
        family=YOLO_FAMILY if network.heads[0].kind == "yolo" else REGION_FAMILY,
        file=onnx_name,
        labels=label_list,
        input_width=network.net.width,
        input_height=network.net.height,
        options=manifest_options(network),
        sha256=hashlib.sha256(data).hexdigest(),
        source="darknet",
        description=(
            f"Imported from darknet {Path(cfg).name} + {Path(weights).name} "
            f"(weights v{weights_file.major}.{weights_file.minor}.{weights_file.revision}, "
            f"{network.param_count:,} parameters)"
        ),
    )
    return manifest


def manifest_options(network: Network) -> dict[str, Any]:
    """Family options: darknet's input preparation plus the heads' anchors."""
    options: dict[str, Any] = {"channel_order": "RGB", "scale": 1.0 / 255.0}
    if network.net.letter_box:
        options.update(resize="letterbox", align="center", pad_value=LETTERBOX_PAD)
    else:
        options["resize"] = "stretch"
    if network.heads[0].kind == "region":
        options["anchors"] = [list(a) for a in network.heads[0].anchors]
    else:
        options["heads"] = [
            {"anchors": [list(a) for a in head.anchors], "scale_x_y": head.scale_x_y}
            for head in network.heads
        ]
    return options


def _check_labels(network: Network, labels: list[str]) -> None:
    for head in network.heads:
        if head.classes != len(labels):
            section = network.layers[head.layer].section
            raise section.error(f"classes={head.classes}, but {len(labels)} labels were given")


def install_darknet(entry: CatalogEntry, folder: Path) -> ModelManifest:
    """The store's installer: imports the entry's downloaded cfg + weights (+ optional .names)."""
    def pick(suffix: str) -> Path | None:
        found = [f.name for f in entry.files if f.name.endswith(suffix)]
        if len(found) > 1:
            raise ModelError(f"catalog entry {entry.name!r} has several {suffix} files")
        return folder / found[0] if found else None

    cfg, weights, names = pick(".cfg"), pick(".weights"), pick(".names")
    if cfg is None or weights is None:
        raise ModelError(f"catalog entry {entry.name!r} needs a .cfg and a .weights file")
    labels: Path | list[str] = names if names is not None else list(entry.labels)
    manifest = convert_darknet(cfg, weights, labels, folder, entry.name)
    if entry.labels and list(entry.labels) != manifest.labels:
        raise ModelError(f"catalog entry {entry.name!r}: {names} does not hold the catalog's labels")
    if entry.family != manifest.family or (entry.input_width, entry.input_height) != (
        manifest.input_width, manifest.input_height
    ):
        raise ModelError(
            f"catalog entry {entry.name!r} says {entry.family} {entry.input_width}x{entry.input_height}, "
            f"the cfg gives {manifest.family} {manifest.input_width}x{manifest.input_height}"
        )
    return manifest.model_copy(
        update=dict(
            version=entry.version,
            options={**manifest.options, **entry.options},
            min_confidence=entry.min_confidence,
            iou=entry.iou,
            max_detections=entry.max_detections,
            source="catalog",
            description=entry.description or manifest.description,
        )
    )
