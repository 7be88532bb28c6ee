"""decode_image / probe_image on images generated here with Pillow (and dog.jpg from the mirror)."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from visionserve.errors import ImageTooLarge, InvalidImage, MissingImage
from visionserve.imaging import decode_image, probe_image
from visionserve.types import DecodedImage

REPO = Path(__file__).resolve().parents[1]

RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    a = np.empty((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    a[:h2, :w2], a[:h2, w2:], a[h2:, :w2], a[h2:, w2:] = RED, GREEN, BLUE, YELLOW
    return Image.fromarray(a)


def quadrant_colors(pixels: np.ndarray) -> list[np.ndarray]:
    """Colours at the centres of the four quadrants (TL, TR, BL, BR)."""
    h, w = pixels.shape[:2]
    ys, xs = (h // 4, 3 * h // 4), (w // 4, 3 * w // 4)
    return [pixels[ys[0], xs[0]], pixels[ys[0], xs[1]], pixels[ys[1], xs[0]], pixels[ys[1], xs[1]]]


def assert_upright_quadrants(pixels: np.ndarray, tol: int = 40) -> None:
    for got, want in zip(quadrant_colors(pixels), (RED, GREEN, BLUE, YELLOW)):
        assert np.abs(got.astype(int) - want).max() <= tol, (got, want)


def assert_well_formed(image: DecodedImage) -> None:
    p = image.pixels
    assert p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3
    assert p.flags.c_contiguous


# How a camera stores an upright scene for each EXIF orientation (EXIF 2.32, 4.6.4):
# the stored pixels are the upright ones put through the inverse of the display transform.
STORED_FROM_UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # displayed by turning 90 degrees clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # displayed by turning 90 degrees counter-clockwise
}


def stored_with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    op = STORED_FROM_UPRIGHT[orientation]
    stored = upright if op is None else upright.transpose(op)
    if fmt == "TIFF":
        return encode(stored, fmt, tiffinfo={0x0112: orientation})
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    return encode(stored, fmt, exif=exif.tobytes(), **options)


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_puts_pixels_upright(fmt: str, orientation: int) -> None:
    upright = quadrants(64, 48)
    data = stored_with_orientation(upright, orientation, fmt)
    # The test's own table agrees with Pillow's reading of the tag.
    oracle = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert_upright_quadrants(oracle)

    image = decode_image(data)

    assert_well_formed(image)
    assert (image.width, image.height) == (64, 48)
    assert image.pixels.shape == (48, 64, 3)
    assert_upright_quadrants(image.pixels)
    assert probe_image(data) == (fmt.lower(), 64, 48)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_orientation_matches_pillow_pixel_for_pixel(orientation: int) -> None:
    data = stored_with_orientation(quadrants(64, 48), orientation, "JPEG")
    oracle = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    diff = np.abs(decode_image(data).pixels.astype(int) - oracle)
    assert diff.mean() < 1.0


# ---------------------------------------------------------------- formats and modes


def test_jpeg_rgb_and_format() -> None:
    image = decode_image(encode(quadrants(), "JPEG", quality=95))
    assert image.format == "jpeg"
    assert_well_formed(image)
    assert_upright_quadrants(image.pixels)


@pytest.mark.parametrize(
    "fmt,options",
    [("PNG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 90}), ("BMP", {}),
     ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("GIF", {})],
)
def test_other_formats_decode(fmt: str, options: dict) -> None:
    image = decode_image(encode(quadrants(), fmt, **options))
    assert image.format == fmt.lower()
    assert (image.width, image.height) == (64, 48)
    assert_well_formed(image)
    assert image.pixels.flags.writeable
    assert_upright_quadrants(image.pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_becomes_equal_rgb_channels(fmt: str) -> None:
    gray = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)))
    image = decode_image(encode(gray, fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    p = image.pixels.astype(int)
    assert p.shape == (16, 64, 3)
    assert (p[..., 0] == p[..., 1]).all() and (p[..., 1] == p[..., 2]).all()
    assert np.abs(p[..., 0] - np.asarray(gray)).max() <= 3


def test_bilevel_png() -> None:
    bits = Image.fromarray(np.array([[0, 255] * 8] * 4, np.uint8)).convert("1")
    p = decode_image(encode(bits, "PNG")).pixels
    assert p[0, 0].tolist() == [0, 0, 0] and p[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_colour_kept(mode: str) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = np.arange(8, dtype=np.uint8)[:, None] * 30  # row 0 fully transparent
    image = Image.fromarray(rgba).convert(mode)
    p = decode_image(encode(image, "PNG")).pixels
    expected = (200, 100, 50) if mode == "RGBA" else (np.asarray(image)[0, 0, 0],) * 3
    assert (p == np.array(expected, np.uint8)).all()


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30, 240, 120, 0] + [0] * (3 * 254))
    pal.paste(1, (4, 0, 8, 8))
    data = encode(pal, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    p = decode_image(data).pixels
    assert p[0, 0].tolist() == [10, 20, 30] and p[0, 7].tolist() == [240, 120, 0]


def test_cmyk_jpeg_colours_survive_adobe_inversion() -> None:
    rgb = quadrants(64, 48)
    data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    # Pillow writes inverted CMYK with an Adobe marker: the case libjpeg-turbo can't do.
    assert simplejpeg.decode_jpeg_header(data)[2] == "CMYK" and b"Adobe" in data
    image = decode_image(data)
    assert image.format == "jpeg" and image.pixels.shape == (48, 64, 3)
    assert_upright_quadrants(image.pixels, tol=20)
    assert np.abs(image.pixels.astype(int) - np.asarray(rgb)).mean() < 8


def test_16bit_grayscale_png_is_scaled_not_clipped() -> None:
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)  # 0..65535
    ramp = np.tile(ramp, (4, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    p = decode_image(data).pixels
    assert p.shape == (4, 256, 3)
    np.testing.assert_array_equal(p[0, :, 0], np.arange(256))
    assert (p[..., 0] == p[..., 2]).all()


def test_48bit_rgb_png_is_scaled_per_channel() -> None:
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32896, 1028  # ~255, 128, 4 in 8 bits
    ok, data = cv2.imencode(".png", rgb16[..., ::-1])  # OpenCV writes BGR
    assert ok and data[24] == 16  # IHDR bit depth
    p = decode_image(data.tobytes()).pixels
    assert np.abs(p[0, 0].astype(int) - (255, 128, 4)).max() <= 1


def test_16bit_tiff_is_scaled() -> None:
    ramp = np.tile((np.arange(64, dtype=np.uint32) * 1040).astype(np.uint16), (2, 1))
    p = decode_image(encode(Image.fromarray(ramp), "TIFF")).pixels
    np.testing.assert_array_equal(p[0, :, 1], np.rint(ramp[0] / 257).astype(np.uint8))


def test_32bit_int_tiff_outside_16bit_range_is_stretched() -> None:
    values = np.tile(np.linspace(-1_000_000, 3_000_000, 64).astype(np.int32), (2, 1))
    p = decode_image(encode(Image.fromarray(values), "TIFF")).pixels
    assert p[0, 0, 0] == 0 and p[0, -1, 0] == 255
    assert (np.diff(p[0, :, 0].astype(int)) >= 0).all()


def gray_tiff(samples: np.ndarray, sample_format: int) -> bytes:
    """An uncompressed one-strip grayscale TIFF of ``samples`` as they are, with the
    SampleFormat given (1 unsigned, 2 signed): Pillow always writes 32-bit ones as signed."""
    height, width = samples.shape
    data = samples.astype(samples.dtype.newbyteorder("<")).tobytes()
    tags = [(256, 4, width), (257, 4, height), (258, 3, samples.dtype.itemsize * 8), (259, 3, 1), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(data)), (339, 3, sample_format)]
    ifd_size = 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, 8 + ifd_size)  # the pixels follow the directory
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in tags
    ) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + data


def test_unsigned_32bit_tiff_keeps_its_tones() -> None:
    """Pillow reads unsigned 32-bit samples as signed: the bright half came out dark."""
    ramp = np.tile(np.linspace(0, 2**32 - 1, 64).astype(np.uint32), (2, 1))
    p = decode_image(gray_tiff(ramp, sample_format=1)).pixels
    assert p[0, 0, 0] == 0 and p[0, -1, 0] == 255
    assert (np.diff(p[0, :, 0].astype(int)) >= 0).all()  # brighter left to right throughout
    signed = decode_image(gray_tiff(ramp.view(np.int32), sample_format=2)).pixels  # the same bits, signed
    assert signed[0, -1, 0] < signed[0, 31, 0]


@pytest.mark.parametrize("scale,expected_white", [(1.0, 255), (4000.0, 255)])
def test_float_tiff(scale: float, expected_white: int) -> None:
    values = np.tile(np.linspace(0, 1, 64, dtype=np.float32) * scale, (2, 1))
    values[1, 0] = np.nan
    p = decode_image(encode(Image.fromarray(values), "TIFF")).pixels
    assert p[0, 0, 0] == 0 and p[0, -1, 0] == expected_white
    assert abs(int(p[0, 32, 0]) - 130) <= 2
    assert p[1, 0, 0] == 0  # NaN -> black


def test_animated_gif_gives_first_frame() -> None:
    first, second = Image.new("RGB", (20, 10), RED), Image.new("RGB", (20, 10), BLUE)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    p = decode_image(data).pixels
    assert p.shape == (10, 20, 3)
    assert np.abs(p.astype(int) - RED).max() <= 8


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode(quadrants(), "PNG")
    for view in (bytearray(data), memoryview(data)):
        assert_upright_quadrants(decode_image(view).pixels)


def test_jpeg_with_benign_libjpeg_warning_still_decodes() -> None:
    good = encode(quadrants(), "JPEG", quality=95)
    # Stray bytes before EOI: libjpeg warns "extraneous bytes before marker"; not an error.
    noisy = good[:-2] + b"\x00\x00" + good[-2:]
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(noisy)
    np.testing.assert_array_equal(decode_image(noisy).pixels, decode_image(good).pixels)


# ---------------------------------------------------------------- dog.jpg


def test_dog_jpg_matches_pillow(images: Path) -> None:
    path = images / "dog.jpg"
    data = path.read_bytes()
    image = decode_image(data)
    assert (image.width, image.height, image.format) == (768, 576, "jpeg")
    assert image.pixels.shape == (576, 768, 3)
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(image.pixels.astype(int) - reference).mean() < 1.0
    assert probe_image(data) == ("jpeg", 768, 576)


# ---------------------------------------------------------------- DCT-scaled decoding


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(quadrants(1600, 1200), "JPEG", quality=90)


@pytest.mark.parametrize(
    "min_size,decoded",
    [(None, (1600, 1200)), ((200, 150), (200, 150)), ((201, 150), (400, 300)),
     ((400, 300), (400, 300)), ((401, 300), (800, 600)), ((800, 601), (1600, 1200)),
     ((5000, 5000), (1600, 1200))],
)
def test_min_size_decodes_smaller_and_reports_true_size(
    big_jpeg: bytes, min_size: tuple[int, int] | None, decoded: tuple[int, int]
) -> None:
    image = decode_image(big_jpeg, min_size=min_size)
    assert (image.width, image.height) == (1600, 1200)
    assert image.pixels.shape == (decoded[1], decoded[0], 3)
    assert (image.scale_x, image.scale_y) == (1600 / decoded[0], 1200 / decoded[1])
    assert_upright_quadrants(image.pixels)


def test_min_size_is_in_displayed_terms_for_rotated_jpeg() -> None:
    data = stored_with_orientation(quadrants(1200, 1600), 6, "JPEG")  # stored 1600x1200
    quarter = decode_image(data, min_size=(300, 400))
    assert (quarter.width, quarter.height) == (1200, 1600)
    assert quarter.pixels.shape == (400, 300, 3)
    assert_upright_quadrants(quarter.pixels)
    half = decode_image(data, min_size=(300, 401))
    assert half.pixels.shape == (800, 600, 3)


def test_min_size_does_not_shrink_other_formats() -> None:
    image = decode_image(encode(quadrants(1600, 1200), "PNG"), min_size=(100, 100))
    assert image.pixels.shape == (1200, 1600, 3)


# ---------------------------------------------------------------- limits


def test_pixel_limit_on_real_image() -> None:
    data = encode(quadrants(100, 50), "JPEG")
    assert decode_image(data, max_pixels=5000).width == 100  # exactly at the limit is fine
    with pytest.raises(ImageTooLarge) as caught:
        decode_image(data, max_pixels=4999)
    assert caught.value.status == 413 and caught.value.code == "image_too_large"
    assert "100x50" in caught.value.message and "4999" in caught.value.message


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG (correct CRCs) whose header claims width x height but which
    holds only a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(quadrants(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(quadrants(16, 16), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(quadrants(16, 16), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    desc = data.index(b"\x2c")  # image descriptor
    data[desc + 5 : desc + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def test_huge_header_claims_are_rejected_before_decoding_in_bounded_memory(tmp_path: Path) -> None:
    """Run in a child process whose address space is capped 1 GiB above what it already
    uses: an attempt to allocate a 100000x100000 image (30 GB) there would raise
    MemoryError instead of ImageTooLarge."""
    samples = {
        "png": png_claiming(100_000, 100_000),
        "jpeg": jpeg_claiming(60_000, 60_000),
        "bmp": bmp_claiming(100_000, 100_000),
        "gif": gif_claiming(65_535, 65_535),
    }
    for name, blob in samples.items():
        (tmp_path / name).write_bytes(blob)
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from pathlib import Path
        import numpy as np
        from visionserve.imaging import decode_image, probe_image
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
        cap = vm * 1024 + (1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        result = {{}}
        try:
            np.ones(3 << 30, np.uint8)
            result["cap_works"] = False
        except MemoryError:
            result["cap_works"] = True
        for name in {sorted(samples)!r}:
            data = Path({str(tmp_path)!r}, name).read_bytes()
            try:
                decode_image(data)
                result[name] = "decoded"
            except Exception as exc:
                result[name] = [type(exc).__name__, str(exc), list(probe_image(data))]
        print(json.dumps(result))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("cap_works") is True
    claimed = {"png": (100_000, 100_000), "jpeg": (60_000, 60_000), "bmp": (100_000, 100_000),
               "gif": (65_535, 65_535)}
    for name, (kind, message, probed) in result.items():
        w, h = claimed[name]
        assert kind == "ImageTooLarge", (name, kind, message)
        assert f"{w}x{h}" in message and "50000000" in message
        assert probed == [name, w, h]


# ---------------------------------------------------------------- bad input


def progressive_gray_jpeg(size: int, scans: int) -> bytes:
    """A valid grayscale progressive JPEG: one DC scan, then ``scans`` AC scans that each
    end every block at once (one EOB run). Tiny, however many scans it has."""

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    blocks = (-(-size // 8)) ** 2
    one_code = bytes([1] + [0] * 15)  # a Huffman table with a single 1-bit code
    out = b"\xff\xd8" + segment(0xDB, b"\x00" + b"\x01" * 64)
    out += segment(0xC2, struct.pack(">BHHB", 8, size, size, 1) + b"\x01\x11\x00")
    out += segment(0xC4, b"\x00" + one_code + b"\x00")  # DC: difference 0
    out += segment(0xC4, b"\x10" + one_code + b"\xe0")  # AC: EOB run of 2^14 + 14 bits
    out += segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + bytes(-(-blocks // 8))  # DC scan
    for _ in range(scans):
        out += segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + bytes(2)  # AC 1..63, all blocks end
    return out + b"\xff\xd9"


def test_progressive_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    # Each scan is decoded over the whole image: thousands of near-empty ones in a small
    # upload would keep a worker busy for minutes.
    fine = decode_image(progressive_gray_jpeg(64, 90))
    assert (fine.width, fine.height) == (64, 64) and fine.pixels.shape == (64, 64, 3)
    bomb = progressive_gray_jpeg(64, 1000)
    assert simplejpeg.decode_jpeg(bomb, "RGB").shape == (64, 64, 3)  # libjpeg-turbo would decode it
    with pytest.raises(InvalidImage, match="JPEG with more than 100 scans: at most 100"):
        decode_image(bomb)
    # Real progressive files stay well under the limit.
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 90)).save(buf, "JPEG", progressive=True)
    assert decode_image(buf.getvalue()).width == 640


def test_data_after_the_end_of_a_jpeg_is_not_counted_as_scans(images) -> None:
    """A motion photo (a JPEG, then a video) was refused: every FF DA pair in the video's
    bytes (one in 64 kB of random data) was counted as a scan."""
    dog = (images / "dog.jpg").read_bytes()
    video = np.random.default_rng(1).integers(0, 256, 8_000_000, dtype=np.uint8).tobytes()
    assert video.count(b"\xff\xda") > 100
    motion_photo = dog + b"\x00\x00\x00\x1cftypmp42" + video
    assert decode_image(motion_photo).pixels.tobytes() == decode_image(dog).pixels.tobytes()
    with pytest.raises(InvalidImage, match="more than 100 scans"):  # a bomb's scans still count
        decode_image(progressive_gray_jpeg(64, 1000) + video)


def test_scans_after_a_segment_holding_an_end_of_image_marker_still_count() -> None:
    """The walk skips a segment by its length: an FF D9 inside a comment ends nothing."""
    bomb = progressive_gray_jpeg(64, 1000)
    second_scan = bomb.index(b"\xff\xda", bomb.index(b"\xff\xda") + 2)
    comment = b"\xff\xfe" + struct.pack(">H", 6) + b"\xff\xd9\xff\xd9"
    with pytest.raises(InvalidImage, match="more than 100 scans"):
        decode_image(bomb[:second_scan] + comment + bomb[second_scan:])


def test_scans_hidden_from_the_walk_by_junk_it_would_read_as_a_segment_still_count() -> None:
    """libjpeg passes over FF 00 between segments as junk; the walk read it as a marker with
    a length and jumped over the scans behind it to an end-of-image marker: 0 scans counted,
    1000 decoded (by Pillow, strict TurboJPEG refusing the junk), 13 s of a worker."""
    bomb = progressive_gray_jpeg(64, 1000)
    first_scan = bomb.index(b"\xff\xda")
    scans = bomb[first_scan:-2]
    hidden = bomb[:first_scan] + b"\xff\x00" + struct.pack(">H", 2 + len(scans[:60_000]))
    hidden += scans[:60_000] + b"\xff\xd9\x00\x00" + scans[60_000:] + b"\xff\xd9"
    with pytest.raises(InvalidImage, match="more than 100 scans"):
        decode_image(hidden)


@pytest.mark.parametrize("junk", [b"\xff\x00", b"\x00"])
def test_a_jpeg_header_full_of_junk_is_refused_before_pillow_walks_it_byte_by_byte(images, junk) -> None:
    """TurboJPEG refuses junk between segments strictly, and Pillow's JPEG reader then steps
    through it in Python, a byte at a time: 19 MB took 1-3 s of a worker."""
    dog = (images / "dog.jpg").read_bytes()
    at = 4 + struct.unpack(">H", dog[4:6])[0]  # past APP0
    with pytest.raises(InvalidImage, match="JPEG with over 65536 bytes of junk in its header"):
        decode_image(dog[:at] + junk * (2_000_000 // len(junk)) + dog[at:])
    # A little junk is only junk: Pillow decodes the image.
    assert decode_image(dog[:at] + junk * (1000 // len(junk)) + dog[at:]).width == 768


def test_fill_bytes_are_read_at_native_speed_or_refused() -> None:
    """Fill bytes before a marker are legal: TurboJPEG reads them (milliseconds). A file that
    goes to Pillow with megabytes of them (no frame header here) is refused first: 19 MB took
    Pillow 5 s."""
    with pytest.raises(InvalidImage, match="JPEG with over 65536 bytes of junk in its header"):
        decode_image(b"\xff\xd8" + b"\xff" * 5_000_000 + b"\xff\xd9")


def test_scan_markers_inside_a_segment_before_the_end_of_the_image_are_not_scans() -> None:
    """The walk stopped one marker short of an end-of-image marker in the file's last two
    bytes (the usual place), so 150 FF DA pairs in a comment refused a baseline JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
    plain = buf.getvalue()
    comment = b"\xff\xda" * 150
    commented = plain[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment + plain[2:]
    assert commented.endswith(b"\xff\xd9") and decode_image(commented).width == 64


@pytest.mark.parametrize("empty", [b"", bytearray(), memoryview(b"")])
def test_empty_upload_is_missing_image(empty) -> None:
    with pytest.raises(MissingImage) as caught:
        decode_image(empty)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "data", [b"hello world", b"%PDF-1.4 not an image", bytes(range(256)) * 4, b"\x00",
             b"<svg xmlns='http://www.w3.org/2000/svg'/>"],
)
def test_non_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage) as caught:
        decode_image(data)
    assert caught.value.status == 400 and "JPEG, PNG" in caught.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images_are_rejected_not_grey_filled(fmt: str, keep: float) -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8))
    data = encode(noisy, fmt)
    with pytest.raises(InvalidImage) as caught:
        decode_image(data[: int(len(data) * keep)])
    assert caught.value.status == 400 and fmt in caught.value.message.upper()


def test_a_cut_jpeg_with_an_end_marker_added_is_rejected_and_stray_bytes_are_not() -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)), "JPEG")
    with pytest.raises(InvalidImage, match="premature end"):
        decode_image(data[: len(data) // 2] + b"\xff\xd9")
    # Stray bytes before the end marker: libjpeg warns, the image is whole, it decodes.
    assert decode_image(data[:-2] + b"\x00\x00\xff\xd9").pixels.shape == (96, 128, 3)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the cut TIFF tags
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_cut_headers_get_a_readable_message(fmt: str) -> None:
    data = encode(quadrants(), fmt)[:20]
    for call in (decode_image, probe_image):
        with pytest.raises(InvalidImage) as caught:
            call(data)
        assert caught.value.message.startswith("cannot ") and fmt in caught.value.message
        assert "<_io" not in caught.value.message  # no object reprs leak to clients


def test_probe_rejects_non_images() -> None:
    with pytest.raises(MissingImage):
        probe_image(b"")
    with pytest.raises(InvalidImage):
        probe_image(b"plain text")


def test_zero_size_png_is_invalid() -> None:
    with pytest.raises(InvalidImage):
        decode_image(png_claiming(0, 10))


def test_exotic_formats_are_not_handed_to_pillow() -> None:
    # Pillow could open these, but they are not among the accepted formats.
    for fmt in ("ICO", "PPM", "TGA"):
        with pytest.raises(InvalidImage):
            decode_image(encode(quadrants(16, 16), fmt))


ALLOWED = (InvalidImage, ImageTooLarge, MissingImage)


def mutations(data: bytes, rng: random.Random, count: int):
    for _ in range(count):
        kind = rng.randrange(4)
        b = bytearray(data)
        if kind == 0:  # flip a few bytes, often in the header
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(min(len(b), 200)) if rng.random() < 0.6 else rng.randrange(len(b))
                b[i] = rng.randrange(256)
        elif kind == 1:  # truncate
            del b[rng.randrange(1, len(b)):]
        elif kind == 2:  # insert junk
            i = rng.randrange(len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 64))
        else:  # keep the magic, randomise the rest
            b[12:] = rng.randbytes(len(b) - 12)
        yield bytes(b)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt metadata
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_fuzzed_bytes_only_raise_service_errors(fmt: str) -> None:
    rng = random.Random(f"visionserve-{fmt}")
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 32, 3), np.uint8))
    base = encode(noisy, fmt)
    outcomes: dict[str, int] = {}
    for data in mutations(base, rng, 250):
        try:
            image = decode_image(data, max_pixels=4_000_000)
        except ALLOWED as exc:
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        else:
            assert_well_formed(image)
            assert image.pixels.shape[:2] in ((image.height, image.width),)
            outcomes["decoded"] = outcomes.get("decoded", 0) + 1
        for junk in (rng.randbytes(rng.randint(1, 300)),):
            with pytest.raises(ALLOWED):
                decode_image(junk)
    assert outcomes.get("InvalidImage", 0) > 0  # the mutations did hit broken images
