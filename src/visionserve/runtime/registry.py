"""The served models by name: resolving configuration to manifests, loading, readiness."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from visionserve.config import MODEL_NAME, ModelConfig, Settings
from visionserve.errors import (
    ModelError,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    VisionServeError,
    unexpected_error,
)
from visionserve.runtime.model import ModelState, ServedModel
from visionserve.runtime.onnx_file import read_onnx
from visionserve.store.labels import read_labels
from visionserve.store.manifest import ModelManifest
from visionserve.store.store import ModelStore, version_ref

if TYPE_CHECKING:
    from visionserve.runtime.workers import WorkerPool

log = logging.getLogger("visionserve.models")


def manifest_for(config: ModelConfig, store: ModelStore) -> ModelManifest:
    """The manifest a model config resolves to: a user's own file, or an installed/catalog model."""
    if config.path is not None:
        assert config.family is not None and config.labels is not None  # checked by ModelConfig
        width, height = config.input_width, config.input_height
        if width is None or height is None:
            width, height = _graph_input_size(config.path)
        manifest = ModelManifest(
            name=config.name,
            version=config.version or "1",
            family=config.family,
            file=str(Path(config.path).expanduser().resolve()),
            labels=read_labels(config.labels),
            input_width=width,
            input_height=height,
            options=config.options,
            source="file",
        )
    else:
        # A version derived in the store (``visionserve models optimize``) is served under the
        # model's own name: name "yolox-nano", version "int8" -> the folder yolox-nano@int8.
        derived = store.manifest(version_ref(config.name, config.version)) if config.version else None
        manifest = derived or store.ensure(config.name)
        if config.version and derived is None and config.version != manifest.version:
            # Serving the base model under a version it is not (an INT8 or OpenVINO one, say)
            # would answer with other detections and speed than the configuration asks for.
            raise ModelError(
                f"{version_ref(config.name, config.version)} is not installed (the store has {config.name} "
                f"version {manifest.version}); `visionserve models optimize {config.name}` makes versions"
            )
        store.check_unchanged(manifest)
        updates = {"options": {**manifest.options, **config.options}} if config.options else {}
        if config.version:
            updates["version"] = config.version
        manifest = manifest.model_copy(update=updates)
    overrides = {
        k: getattr(config, k) for k in ("min_confidence", "iou", "max_detections") if getattr(config, k) is not None
    }
    return manifest.model_copy(update=overrides) if overrides else manifest


def _graph_input_size(path: Path) -> tuple[int, int]:
    graph = read_onnx(path, external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
    if len(dims) != 4 or not dims[2].dim_value or not dims[3].dim_value:
        raise ModelError(
            "the graph's input size is not fixed; set input_width and input_height",
            detail=f"{path}: input dimensions {[d.dim_value or d.dim_param for d in dims]}",
        )
    return dims[3].dim_value, dims[2].dim_value


class ModelRegistry:
    def __init__(self, settings: Settings, store: ModelStore, workers: "WorkerPool | None" = None) -> None:
        """``workers``: inference worker processes that hold the models' sessions; without
        them, sessions live in this process."""
        self.settings = settings
        self.workers = workers
        self.store = store
        self.default_name: str = settings.default_model or settings.models[0].name
        self._configs = {m.name: m for m in settings.models}
        self._models: dict[str, ServedModel] = {}
        self._failures: dict[str, str] = {}  # models whose manifest could not be resolved
        self._lock = threading.Lock()
        if workers is not None:
            workers.on_model_lost = self._lost_in_restart
        # One load or unload at a time: a load and an unload of one model that overlap would
        # otherwise leave it reported ready where it is gone, or loaded after an unload said 200.
        self._changing = threading.Lock()

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self._configs, *self._models, *self._failures]))

    def serving(self) -> list[str]:
        """The models that answer detections now (loaded and ready), in ``names`` order."""
        return [n for n in self.names() if (m := self._models.get(n)) is not None and m.state is ModelState.READY]

    def get(self, name: str | None = None) -> ServedModel:
        """The ready model by name (default model for None)."""
        name = name or self.default_name
        model = self._models.get(name)
        if model is None:
            if name in self._failures:
                raise ModelNotReady(f"model {name!r} failed to load: {self._failures[name]}")
            if name in self._configs:
                raise ModelNotReady(f"model {name!r} is still loading")
            raise ModelNotFound(f"no model named {name!r}; served: {', '.join(self.serving()) or 'none now'}")
        if model.state is ModelState.FAILED:
            raise ModelNotReady(f"model {name!r} failed to load: {model.error}")
        if model.state is not ModelState.READY:
            detail = f": {model.error}" if model.error else ""
            raise ModelNotReady(f"model {name!r} is {model.state.value}{detail}")
        return model

    def find(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    @property
    def ready(self) -> bool:
        """Whether every configured model is loaded and warm, or was unloaded on purpose (the
        workers' own state is the scheduler's: DetectionService.not_ready combines both).

        A model unloaded by a repository call does not count, as in Triton: unready, the
        server would be taken out of service, and no client could reach it to load it again."""
        return all(
            (m := self._models.get(n)) is not None and m.state in (ModelState.READY, ModelState.UNLOADED)
            for n in self._configs
        )

    def failed(self) -> dict[str, str]:
        """Configured models that failed to load, with why (as ``status`` tells them); each
        stays so until loaded again."""
        return {
            e["name"]: e.get("error", "unknown error")
            for e in self.status() if e["state"] == ModelState.FAILED.value and e["name"] in self._configs
        }

    def load(self, name: str) -> ServedModel:
        """Loads (or reloads) a configured, installed or catalog model; blocking.

        A model that fails to load raises ModelLoadFailed, whose message (kept as the
        model's error for its status) names no server file; the full account is logged. A
        failed reload leaves the version already served serving."""
        with self._changing:
            return self._load(name)

    def _load(self, name: str) -> ServedModel:
        config = self._configs.get(name)
        if config is None:
            if not MODEL_NAME.fullmatch(name):  # also keeps names like ".." out of the store's paths
                raise ModelNotFound(f"no model named {name!r}")
            config = ModelConfig(name=name)
        model: ServedModel | None = None
        try:
            manifest = manifest_for(config, self.store)
            model = ServedModel(manifest, self.settings.runtime, max_batch_size=self.settings.queue.max_batch_size)
            with self._lock:
                previous = self._models.get(name)
                serving = previous is not None and previous.state is ModelState.READY
                if not serving:
                    self._models[name] = model  # shows "loading" while it loads
            if self.workers is not None:
                try:
                    model.attach_workers(self.workers.load(manifest, self.settings.queue.max_batch_size))
                except Exception:
                    # A worker whose load failed kept what it had: the version served goes
                    # on. With none served, unload it where it did load.
                    if not serving:
                        self.workers.unload(name)
                    raise
            else:
                model.load()
        except ModelNotFound as e:  # neither installed nor in the catalog: 404, as for any unknown model
            if name in self._configs:  # an unknown name asked for at run time stays unknown
                log.error("model %s failed to load: %s (model store %s)", name, e.message, self.store.root)
                self._failures[name] = e.message
            raise
        except Exception as e:
            raise self._failed(name, model, e) from None
        self._failures.pop(name, None)
        with self._lock:
            self._models[name] = model
        log.info("model %s (version %s, family %s) ready", name, model.version, model.manifest.family)
        return model

    def _failed(self, name: str, model: ServedModel | None, e: Exception) -> ModelLoadFailed:
        """Records why a model failed to load, in words fit for clients, logs the full
        account (file paths, the library's words), and returns the error to raise."""
        unexpected = not isinstance(e, VisionServeError)
        error = unexpected_error(e, "loading the model") if unexpected else e
        log.error(
            "model %s failed to load: %s (model store %s)", name, error.detail or error.message, self.store.root,
            exc_info=e if unexpected else None,
        )
        reason = error.message
        if model is not None:
            model.state, model.error = ModelState.FAILED, reason
        with self._lock:
            current = self._models.get(name)
            if current is not None and current.state is not ModelState.READY:
                current.state, current.error = ModelState.FAILED, reason
            elif current is None:  # failed before it was a model (its manifest, its download)
                self._failures[name] = reason
        return ModelLoadFailed(f"model {name!r} failed to load: {reason}")

    def _lost_in_restart(self, name: str, reason: str) -> None:
        """A restarted inference process could not load ``name`` again: it serves no more
        (its requests get 503 with the reason) until a client loads it again."""
        with self._lock:
            model = self._models.get(name)
            if model is not None and model.state is ModelState.READY:
                model.state, model.error = ModelState.FAILED, f"lost when its inference process started again: {reason}"

    def load_configured(self) -> None:
        """Loads every configured model; a failing one is logged (by load) and stays failed."""
        for name in self._configs:
            try:
                self.load(name)
            except VisionServeError:
                pass  # logged by load

    def unload(self, name: str) -> None:
        with self._changing:
            with self._lock:
                model = self._models.get(name)
                if model is None:
                    if name in self._failures and name not in self._configs:
                        del self._failures[name]  # a failed load, forgotten as Triton does
                        return
                    raise ModelNotFound(f"no model named {name!r}")
                model.unload()
            if self.workers is not None:
                self.workers.unload(name)

    def status(self) -> list[dict]:
        out = []
        for name in self.names():
            m = self._models.get(name)
            if m is None:
                failed = name in self._failures
                entry = {"name": name, "state": (ModelState.FAILED if failed else ModelState.LOADING).value, "ready": False}
                if failed:
                    entry["error"] = self._failures[name]
                out.append(entry)
                continue
            entry = {"name": name, "state": m.state.value, "ready": m.state is ModelState.READY}
            entry |= {
                "version": m.version,
                "family": m.manifest.family,
                "backend": m.manifest.backend,
                "labels": len(m.labels),
                # padded_to_multiple_of: minimal padding's step (a 4:3 photo runs at 416x320), or null
                "input": {
                    "width": m.family.input.width, "height": m.family.input.height,
                    "padded_to_multiple_of": m.family.input.pad_stride or None,
                },
                # The defaults a request's parameters override (the web page starts from them).
                "min_confidence": m.manifest.min_confidence,
                "iou": m.manifest.iou,
                "max_detections": m.manifest.max_detections,
                "default": name == self.default_name,
            }
            if m.error:
                entry["error"] = m.error
            out.append(entry)
        return out

