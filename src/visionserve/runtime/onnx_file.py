"""Reading ONNX model files, with errors that name no file (they can reach HTTP clients
through the load API and model status; the path goes to the server's log)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from visionserve.errors import ModelError

if TYPE_CHECKING:
    import onnx

NOT_ONNX = "the model file is not a valid ONNX graph"


def read_onnx(path: Path, *, external_data: bool = True) -> "onnx.ModelProto":
    """The parsed model file; ModelError when it cannot be read or parsed."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=external_data)
    except FileNotFoundError as e:
        raise ModelError("the model file is missing", detail=f"{path}: {e}") from None
    except Exception as e:  # protobuf's DecodeError, OSError, onnx's own checks
        raise ModelError(NOT_ONNX, detail=f"cannot read ONNX file {path}: {type(e).__name__}: {e}") from None
