"""Importing darknet models (``.cfg`` + ``.weights``) as ONNX graphs with a manifest."""

from visionserve.darknet.errors import DarknetError
from visionserve.darknet.importer import import_darknet, install_darknet

__all__ = ["DarknetError", "import_darknet", "install_darknet"]
