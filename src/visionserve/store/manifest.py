"""A model as the server sees it: an ONNX file plus what is needed to use it.

Every model in the local store has a ``manifest.json`` beside its files; catalog pulls,
darknet imports and user-configured files all end up as a ``ModelManifest``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_NAME = "manifest.json"


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = "1"
    family: str
    file: str = Field(description="ONNX file, relative to the manifest's folder or absolute")
    backend: str = Field(
        default="onnxruntime",
        description="engine that runs the file: 'onnxruntime', or 'openvino' (optional: pip install visionserve[openvino])",
    )
    backend_options: dict[str, str] = Field(
        default_factory=dict, description="engine settings, e.g. OpenVINO's INFERENCE_PRECISION_HINT = bf16"
    )
    labels: list[str]
    input_width: int
    input_height: int
    options: dict[str, Any] = Field(default_factory=dict, description="family-specific settings")
    min_confidence: float = 0.4
    iou: float = 0.45
    max_detections: int = 100
    sha256: str | None = None
    source: str = "catalog"
    description: str = ""

    @field_validator("backend_options", mode="before")
    @classmethod
    def _numbers_as_text(cls, value: Any) -> Any:
        # Engines take their settings as text; a hand-edited manifest may write 2 for "2".
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in value.items()}
        return value

    # Set when loaded from disk; not serialised.
    folder: Path | None = Field(default=None, exclude=True)

    @property
    def path(self) -> Path:
        p = Path(self.file)
        if p.is_absolute() or self.folder is None:
            return p
        return self.folder / p

    @classmethod
    def load(cls, folder: Path) -> "ModelManifest":
        data = json.loads((folder / MANIFEST_NAME).read_text())
        return cls.model_validate({**data, "folder": folder})

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / MANIFEST_NAME
        data = self.model_dump()
        if data["backend"] == "onnxruntime" and not data["backend_options"]:
            # Written only where they say something, so that older visionserve releases (whose
            # manifests forbid unknown keys) still read the ONNX Runtime models of a shared store.
            del data["backend"], data["backend_options"]
        write_atomic(target, (json.dumps(data, indent=2) + "\n").encode())
        return target


def write_atomic(target: Path, data: bytes) -> None:
    """Writes a file so that readers see the old content or the new, never a part."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; models may be served by another user
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
