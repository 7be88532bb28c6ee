"""Uploaded bytes -> RGB pixels, with the size limit checked before any pixel is decoded.

JPEG, the common case, goes through libjpeg-turbo (simplejpeg): it reads the header for
free and can decode at 1/2, 1/4 or 1/8 scale. Everything else, and the JPEGs libjpeg-turbo
cannot turn into RGB (CMYK/YCCK) or is strict about, goes through Pillow restricted to the
formats we accept. Every failure a client can cause is mapped to a ``VisionServeError``.
"""

from __future__ import annotations

import io
import math
import re
from typing import Final

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from visionserve.errors import ImageTooLarge, InvalidImage, MissingImage, VisionServeError
from visionserve.imaging.modes import to_rgb_array
from visionserve.imaging.orientation import (
    TRANSPOSING,
    apply_orientation,
    jpeg_exif_block,
    orientation_from_exif_block,
    orientation_of,
    oriented_size,
)
from visionserve.types import DecodedImage

# Pillow's own decompression-bomb guard is a process-wide fixed limit (warning at ~89 MP,
# error at ~179 MP). decode_image enforces the configurable per-call ``max_pixels`` from the
# header before any pixel is decoded, so Pillow's guard is switched off here, once, rather
# than toggled per call (which would race between threads).
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS: Final = 50_000_000

# Pillow plugin per accepted format: Image.open is restricted to these so that no other
# plugin (EPS via Ghostscript, for one) ever sees client bytes.
_PILLOW_FORMATS: Final = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "gif": "GIF",
    "tiff": "TIFF",
}
_ACCEPTED = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# libjpeg-turbo hands these to us only as raw CMYK; Pillow converts (and un-inverts Adobe's).
_JPEG_NEEDS_PILLOW: Final = frozenset({"CMYK", "YCCK"})
_DCT_SCALES: Final = (8, 4, 2)  # denominators, smallest output first
# A progressive JPEG may hold any number of scans, and libjpeg decodes each over the whole
# image: a few hundred kB of near-empty scans can keep a worker busy for minutes. Encoders
# write about 10 (libjpeg's default script) and rarely more than a few dozen.
MAX_JPEG_SCANS: Final = 100
_SOS: Final = b"\xff\xda"  # start of scan; in entropy-coded data 0xFF is always followed by 0x00


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if data.startswith(b"BM"):
        return "bmp"
    return None


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decodes an uploaded image to RGB uint8 HxWx3 C-contiguous pixels, EXIF-oriented.

    ``max_pixels`` bounds width*height, checked from the header before decoding
    (``ImageTooLarge``). ``min_size=(w, h)`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale
    while the (oriented) result stays at least w x h; ``width``/``height`` always report
    the true oriented size. Raises ``MissingImage`` for no bytes and ``InvalidImage`` for
    anything that is not a complete image in an accepted format.
    """
    buf = _as_bytes(data)
    fmt = _require_format(buf)
    try:
        if fmt == "jpeg":
            return _decode_jpeg(buf, max_pixels, min_size)
        return _decode_with_pillow(buf, fmt, max_pixels)
    except (VisionServeError, MemoryError):
        raise
    except Exception as exc:  # any library failure on client bytes is the client's bad image
        raise InvalidImage(f"cannot decode {fmt.upper()} image: {_describe(exc)}") from exc


def probe_image(data: bytes | bytearray | memoryview) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; the size is the EXIF-oriented one."""
    buf = _as_bytes(data)
    fmt = _require_format(buf)
    try:
        if fmt == "jpeg":
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(buf)
            except ValueError:
                return _probe_with_pillow(buf, fmt)
            orientation = orientation_from_exif_block(jpeg_exif_block(buf))
            width, height = oriented_size(width, height, orientation)
            _check_nonempty(width, height)
            return fmt, width, height
        return _probe_with_pillow(buf, fmt)
    except (VisionServeError, MemoryError):
        raise
    except Exception as exc:
        raise InvalidImage(f"cannot read {fmt.upper()} header: {_describe(exc)}") from exc


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"image data must be bytes-like, not {type(data).__name__}")


def _require_format(buf: bytes) -> str:
    if not buf:
        raise MissingImage("no image data: the upload is empty")
    fmt = sniff_format(buf)
    if fmt is None:
        raise InvalidImage(f"not a recognised image: expected {_ACCEPTED} data")
    return fmt


def _check_nonempty(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    _check_nonempty(width, height)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} pixels"
        )


def _check_scans(buf: bytes) -> None:
    scans = _jpeg_scans(buf)
    if scans > MAX_JPEG_SCANS:
        raise InvalidImage(f"JPEG with more than {MAX_JPEG_SCANS} scans: at most {MAX_JPEG_SCANS} are accepted")


_MAX_SEGMENTS: Final = 4 * MAX_JPEG_SCANS + 1000  # markers walked before counting the old way
# Segments libjpeg skips or reads by their length: SOFn, DHT, DAC (C0-CF), SOS, DQT, DNL, DRI,
# DHP, EXP, APPn, COM. Any other code (reserved, or 00 where a marker should be, which
# libjpeg passes over as junk) stops the walk: it would not skip that as the walk would.
_SEGMENTS_WITH_LENGTH: Final = frozenset([*range(0xC0, 0xD0), *range(0xDA, 0xF0), 0xFE])
_NOT_FF: Final = re.compile(rb"[^\xff]")


def _standalone(marker: int) -> bool:
    """RST0-7 and TEM: markers with no segment after them."""
    return 0xD0 <= marker <= 0xD7 or marker == 0x01


def _segment_end(buf: bytes, pos: int) -> int:
    """Where the segment of the marker at ``pos`` ends, by its length field."""
    return pos + 2 + int.from_bytes(buf[pos + 2:pos + 4], "big")


def _jpeg_scans(buf: bytes) -> int:
    """The JPEG's scans, counted up to its end-of-image marker (MAX_JPEG_SCANS + 1 at most).

    Data after that marker is not the image's (a phone's motion photo appends a video), and an
    EXIF thumbnail's scans are inside an APP segment: the walk skips segments by their length
    and entropy-coded data to its next marker, as libjpeg reads them, so neither counts. The
    markers are found vectorised, the walk goes over them only. Anything the walk would not
    read as libjpeg does (junk between segments, an unknown marker, a length running off,
    thousands of segments) has every FF DA pair counted instead: never fewer than its scans.
    """
    data = np.frombuffer(buf, np.uint8)
    ff = data[:-1] == 0xFF
    # The bytes after each FF only: a few thousand in a photo, against its every byte.
    every_sos = int(np.count_nonzero(data[1:][ff] == _SOS[1]))
    if every_sos <= MAX_JPEG_SCANS:
        return every_sos  # the usual case: no walk needed
    # FF then a marker code: in entropy-coded data a 0xFF is followed by 0x00 (stuffing), a
    # restart marker (D0-D7) or a marker that ends the scan. FF FF is fill.
    code = data[1:]
    markers = np.flatnonzero(ff & (code != 0x00) & (code != 0xFF) & ((code < 0xD0) | (code > 0xD7)))
    del ff, code
    n, pos, scans = len(buf), 2, 0  # past SOI
    for _ in range(_MAX_SEGMENTS):
        if pos + 1 < n and buf[pos] == 0xFF and buf[pos + 1] == 0xFF:
            past_fill = _NOT_FF.search(buf, pos)  # fill bytes before a marker (at C speed)
            if past_fill is None:
                return every_sos
            pos = past_fill.start() - 1
        if pos + 1 >= n or buf[pos] != 0xFF:
            return every_sos  # not where a marker should be
        marker = buf[pos + 1]
        if marker == 0xD9:  # end of image (the file's last two bytes, usually)
            return scans
        if _standalone(marker):
            pos += 2
            continue
        if marker not in _SEGMENTS_WITH_LENGTH or pos + 3 >= n:
            return every_sos
        end = _segment_end(buf, pos)
        if marker != _SOS[1]:
            pos = end
            continue
        if pos + 4 >= n or end != pos + 2 + 6 + 2 * buf[pos + 4]:  # libjpeg refuses any other SOS length
            return every_sos
        scans += 1
        if scans > MAX_JPEG_SCANS:
            return scans
        following = int(np.searchsorted(markers, end))  # the scan's data runs to the next marker
        if following == len(markers):
            return scans  # the data runs to the end of the file (truncated): the decoder says so
        pos = int(markers[following])
    return every_sos


_MAX_HEADER_JUNK: Final = 65536  # bytes outside any segment before the first scan
_NEXT_MARKER: Final = re.compile(rb"\xff[^\x00\xff]")


def _decode_jpeg_with_pillow(buf: bytes, max_pixels: int) -> DecodedImage:
    """Pillow's JPEG reader walks the header up to the first scan in Python, a byte at a time
    through anything that is not a segment (fill bytes, junk): 19 MB of them took it 3-5 s.
    Those bytes are counted first, at C speed, and a header with more is refused."""
    junk, pos, n = 0, 2, len(buf)
    for _ in range(_MAX_SEGMENTS):
        found = _NEXT_MARKER.search(buf, pos)
        if found is None:
            break  # no scan at all: Pillow says what is wrong, quickly
        junk += found.start() - pos
        pos, marker = found.start(), buf[found.start() + 1]
        if junk > _MAX_HEADER_JUNK:
            raise InvalidImage(f"JPEG with over {_MAX_HEADER_JUNK} bytes of junk in its header")
        if marker in (_SOS[1], 0xD9) or pos + 3 >= n:
            break
        pos = pos + 2 if _standalone(marker) else _segment_end(buf, pos)
    return _decode_with_pillow(buf, "jpeg", max_pixels)


def _decode_jpeg(
    buf: bytes, max_pixels: int, min_size: tuple[int, int] | None
) -> DecodedImage:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(buf)
    except ValueError:
        # Headers libjpeg-turbo's TurboJPEG layer cannot classify (odd subsampling) may
        # still be fine for libjpeg proper; Pillow decides, or explains what is wrong.
        _check_scans(buf)
        return _decode_jpeg_with_pillow(buf, max_pixels)
    _check_pixels(width, height, max_pixels)
    _check_scans(buf)
    if colorspace in _JPEG_NEEDS_PILLOW:
        return _decode_jpeg_with_pillow(buf, max_pixels)

    orientation = orientation_from_exif_block(jpeg_exif_block(buf))
    stored_min = _stored_min_size(min_size, orientation)
    denom = _dct_denominator(width, height, stored_min)
    try:
        if denom == 1:
            pixels = simplejpeg.decode_jpeg(buf, "RGB")
        else:
            # Pinning both the minimum size and the minimum factor selects exactly 1/denom.
            pixels = simplejpeg.decode_jpeg(
                buf,
                "RGB",
                min_width=-(-width // denom),
                min_height=-(-height // denom),
                min_factor=float(denom),
            )
    except ValueError as exc:
        # Strict mode rejects truncation, and also benign warnings such as stray bytes
        # between markers, which Pillow tolerates. Pillow rejects a file that just stops,
        # but not one whose data stops early at a marker (cut, then an end-of-image marker
        # added): it fills the rest with grey, so libjpeg's "premature end" is final here.
        if "premature end" in str(exc).lower():
            raise InvalidImage(f"cannot decode JPEG image: {exc}") from exc
        return _decode_jpeg_with_pillow(buf, max_pixels)
    true_w, true_h = oriented_size(width, height, orientation)
    return DecodedImage(apply_orientation(pixels, orientation), true_w, true_h, "jpeg", orientation)


def _stored_min_size(min_size: tuple[int, int] | None, orientation: int) -> tuple[int, int] | None:
    """min_size is asked in displayed terms; the decoder scales the stored image."""
    if min_size is None:
        return None
    w, h = min_size
    return (h, w) if orientation in TRANSPOSING else (w, h)


def _dct_denominator(width: int, height: int, min_size: tuple[int, int] | None) -> int:
    """The largest of 8, 4, 2 whose scaled decode stays at least min_size; else 1."""
    if min_size is None:
        return 1
    min_w, min_h = min_size
    for denom in _DCT_SCALES:
        if math.ceil(width / denom) >= min_w and math.ceil(height / denom) >= min_h:
            return denom
    return 1


def _decode_with_pillow(buf: bytes, fmt: str, max_pixels: int) -> DecodedImage:
    with Image.open(io.BytesIO(buf), formats=[_PILLOW_FORMATS[fmt]]) as image:
        width, height = image.size
        _check_pixels(width, height, max_pixels)
        # Pillow's TIFF reader applies the orientation itself while loading, then drops
        # the tag: read before, for the answer (the server draws TIFFs for browsers anyway).
        applied = orientation_of(image) if fmt == "tiff" else None
        image.load()  # GIF/TIFF/WebP: the first frame; raises on truncated data
        orientation = orientation_of(image)  # what is left to do
        pixels = to_rgb_array(image)
    pixels = apply_orientation(pixels, orientation)
    if not (pixels.flags.c_contiguous and pixels.flags.writeable):
        # Pillow's arrays are read-only views of its bytes; match the JPEG path's arrays.
        pixels = np.array(pixels, order="C")
    height, width = pixels.shape[:2]
    return DecodedImage(pixels, width, height, fmt, applied or orientation)


def _probe_with_pillow(buf: bytes, fmt: str) -> tuple[str, int, int]:
    with Image.open(io.BytesIO(buf), formats=[_PILLOW_FORMATS[fmt]]) as image:
        width, height = image.size
        _check_nonempty(width, height)
        orientation = _header_orientation(image, fmt)
    width, height = oriented_size(width, height, orientation)
    return fmt, width, height


def _header_orientation(image: Image.Image, fmt: str) -> int:
    """The orientation still to apply to ``image.size``, without decoding pixels."""
    if fmt == "tiff":
        return 1  # Pillow's TIFF reader already reports (and decodes) the oriented size
    if fmt == "png":
        # PngImageFile.getexif() decodes the image when no eXIf chunk preceded the pixels;
        # such a late chunk is not seen here.
        return orientation_from_exif_block(image.info.get("exif"))
    return orientation_of(image)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        # Pillow's message names an in-memory file object; say what it means instead.
        return "its header is damaged, incomplete or of an unsupported variant"
    text = str(exc).strip()
    return text if text else type(exc).__name__
