"""Image intake and output: decoding uploads to RGB pixels, drawing detections, encoding.

Pure functions over bytes and arrays; no HTTP, no model knowledge.
"""

from visionserve.imaging.decode import decode_image, probe_image
from visionserve.imaging.draw import annotate, encode_image

__all__ = ["annotate", "decode_image", "encode_image", "probe_image"]
