"""Detection without a server, for ``visionserve detect``: same decode, families and runtime."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from visionserve.config import ModelConfig, Settings
from visionserve.errors import InputError, MissingImage, OutputError, VisionServeError, unexpected_error
from visionserve.imaging.decode import decode_image
from visionserve.imaging.draw import render_annotated
from visionserve.protocols.native import prediction_json
from visionserve.runtime.model import ServedModel
from visionserve.runtime.registry import manifest_for
from visionserve.store.store import ModelStore
from visionserve.types import PredictParams, Prediction


class OfflineDetector:
    def __init__(self, settings: Settings, model: str | None, progress: Callable[[str], Any] | None = None) -> None:
        name = model or settings.default_model or settings.models[0].name
        config = next((m for m in settings.models if m.name == name), ModelConfig(name=name))
        store = ModelStore(settings.model_dir, settings.model_mirror)
        if config.path is None and store.manifest(name) is None:
            store.pull(name, progress=progress)
        self.settings = settings
        self.model = ServedModel(manifest_for(config, store), settings.runtime)
        try:
            self.model.load()
        except VisionServeError:
            raise
        except Exception as e:  # the engine's own (a graph whose input does not fit the family, say)
            raise unexpected_error(e, f"loading model {name!r}", details_in=None) from None

    def detect_file(self, path: Path, params: PredictParams, annotate_to: Path | None = None) -> dict[str, Any]:
        """The image's prediction as the server's JSON answer, with ``file`` (and ``annotated``:
        where its drawing was written, when ``annotate_to`` names a file)."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        if not data:  # decode_image would speak of an upload
            raise MissingImage("the file is empty")
        t0 = time.perf_counter()
        min_size = self.model.decode_min_size(drawn=annotate_to is not None)
        image = decode_image(data, max_pixels=self.settings.limits.max_image_pixels, min_size=min_size)
        # The stages the server reports, but for its queue: decode, preprocess, inference, postprocess.
        timings: dict[str, float] = {"decode": (time.perf_counter() - t0) * 1e3}
        detections = self.model.predict(image.pixels, self.model.thresholds(params), timings)
        pred = Prediction(self.model.name, self.model.version, image,
                          detections.scaled(image.scale_x, image.scale_y, image.width, image.height), timings)
        record = {"file": str(path), **prediction_json(pred)}
        if annotate_to is not None:
            try:
                annotate_to.parent.mkdir(parents=True, exist_ok=True)
                annotate_to.write_bytes(render_annotated(image, detections, "jpeg"))
            except OSError as e:
                raise OutputError(f"cannot write {annotate_to}: {e.strerror or e}") from None
            record["annotated"] = str(annotate_to)
        return record
