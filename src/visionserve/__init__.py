"""visionserve: an inference server for image object detection."""

__version__ = "0.1.0"
