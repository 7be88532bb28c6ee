"""Image intake (decode with limits, EXIF orientation) and annotation (drawing, encoding)."""
