"""Malformed cfg files and weights files of the wrong size are rejected with errors naming the cfg section and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from visionserve.darknet import DarknetError, import_darknet
from visionserve.darknet.cfg import parse_cfg_text
from visionserve.darknet.weights import encode_header, parse_weights
from visionserve.errors import ModelError

# Line numbers matter below: [net] is line 1.
SMALL_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=6
size=1
activation=linear

[region]
anchors=1,1
classes=1
num=1
softmax=1
"""
FIRST_CONV_LINE, SECOND_CONV_LINE, REGION_LINE = 6, 18, 23
# 3->4 3x3 conv with batch norm: 4 biases + 3*4 BN values + 4*3*9 weights; 4->6 1x1 conv: 6 + 6*4.
SMALL_PARAMS = (4 + 12 + 108) + (6 + 24)


def write(tmp_path: Path, cfg: str, floats: int, header: tuple[int, int, int] = (0, 2, 0), extra: bytes = b"") -> tuple[Path, Path]:
    cfg_path = tmp_path / "model.cfg"
    cfg_path.write_text(cfg)
    weights = tmp_path / "model.weights"
    body = np.random.default_rng(0).uniform(0.5, 1.0, floats).astype("<f4").tobytes()
    weights.write_bytes(encode_header(*header, seen=1) + body + extra)
    return cfg_path, weights


def import_small(tmp_path: Path, cfg: str = SMALL_CFG, floats: int = SMALL_PARAMS, **kw) -> None:
    cfg_path, weights = write(tmp_path, cfg, floats, **kw)
    import_darknet(cfg_path, weights, ["thing"], tmp_path / "out", "small")


def test_the_small_model_imports(tmp_path):
    import_small(tmp_path)
    assert (tmp_path / "out" / "small.onnx").is_file()
    assert (tmp_path / "out" / "manifest.json").is_file()


# -- cfg ---------------------------------------------------------------------------------------


def test_unknown_section_names_its_line(tmp_path):
    cfg = SMALL_CFG.replace("[maxpool]", "[avgpoolx]")
    with pytest.raises(DarknetError, match=r"\[avgpoolx\] at line 14: unsupported layer type") as e:
        import_small(tmp_path, cfg)
    assert isinstance(e.value, ModelError)
    assert (e.value.section, e.value.line) == ("avgpoolx", 14)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unsupported_option_names_section_and_option_line(tmp_path):
    cfg = SMALL_CFG.replace("filters=6\n", "filters=6\nflipped=1\n")
    with pytest.raises(DarknetError, match=rf"\[convolutional\] at line {SECOND_CONV_LINE}: .*flipped.*line 20.*unsupported option"):
        import_small(tmp_path, cfg)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("activation=leaky", "activation=tanh", r"line 6: .*activation.*unsupported activation"),
        ("filters=4", "filters=four", r"line 6: .*filters='four'.*not an integer"),
        ("stride=1\npad=1", "stride=1\npad=1\ndilation=2", r"line 6: .*dilated"),
        ("softmax=1", "softmax=0", r"\[region\] at line 23: .*softmax"),
        ("anchors=1,1", "anchors=1,1,2", r"\[region\] at line 23: .*anchor values"),
        ("classes=1", "classes=2", r"\[region\] at line 23: .*channels"),
        # A grayscale network imported, then failed in ONNX Runtime on every image (3 channels fed).
        ("channels=3", "channels=1", r"\[net\] at line 1: .*channels=1: only networks of 3 input channels"),
        ("[maxpool]\nsize=2\nstride=2", "[maxpool]\nsize=2\nstride=2\nantialiasing=1", r"\[maxpool\] at line 14: .*antialiasing"),
    ],
)
def test_bad_options(tmp_path, old, new, message):
    assert old in SMALL_CFG
    with pytest.raises(DarknetError, match=message):
        import_small(tmp_path, SMALL_CFG.replace(old, new))


def test_missing_net_section():
    with pytest.raises(DarknetError, match=r"\[convolutional\] at line 1: the cfg must start with a \[net\]"):
        parse_cfg_text(SMALL_CFG.replace("[net]\nwidth=32\nheight=32\nchannels=3\n\n", ""))


def test_second_net_section(tmp_path):
    with pytest.raises(DarknetError, match=r"\[net\] at line 14: a second \[net\]"):
        import_small(tmp_path, SMALL_CFG.replace("[maxpool]", "[net]"))


def test_net_needs_a_size(tmp_path):
    with pytest.raises(DarknetError, match=r"\[net\] at line 1: .*positive width"):
        import_small(tmp_path, SMALL_CFG.replace("width=32\n", ""))


@pytest.mark.parametrize(
    "text, message",
    [
        ("width=3\n[net]\n", r"line 1: option 'width=3' before any \[section\]"),
        ("[net\nwidth=3\n", r"line 1: malformed section header"),
        ("[net]\nwidth\n", r"\[net\] at line 1: expected key=value"),
        ("[net]\nwidth=3\nwidth=4\n", r"\[net\] at line 1: option 'width' given twice \(lines 2 and 3\)"),
        ("# only a comment\n", r"no sections"),
    ],
)
def test_malformed_cfg_text(text, message):
    with pytest.raises(DarknetError, match=message):
        parse_cfg_text(text)


def test_darknet_whitespace_and_comments_are_accepted():
    sections = parse_cfg_text("# c\n; c\n[net]\n  width = 4 \nheight=4\n\tchannels=3\n[conv]\nfilters = 2\n")
    assert [(s.name, s.kind, s.line) for s in sections] == [("net", "net", 3), ("conv", "convolutional", 7)]
    assert sections[0].options == {"width": "4", "height": "4", "channels": "3"}


def test_route_to_a_missing_layer(tmp_path):
    cfg = SMALL_CFG.replace("[convolutional]\nfilters=6", "[route]\nlayers=-9\n\n[convolutional]\nfilters=6")
    with pytest.raises(DarknetError, match=r"\[route\] at line 18: .*layers='-9'.*does not exist"):
        import_small(tmp_path, cfg)


def test_no_detection_layer(tmp_path):
    cfg = SMALL_CFG[: SMALL_CFG.index("[region]")]
    with pytest.raises(DarknetError, match=r"no \[region\] or \[yolo\] layer"):
        import_small(tmp_path, cfg)


def test_labels_must_match_classes(tmp_path):
    cfg_path, weights = write(tmp_path, SMALL_CFG, SMALL_PARAMS)
    with pytest.raises(DarknetError, match=rf"\[region\] at line {REGION_LINE}: classes=1, but 2 labels"):
        import_darknet(cfg_path, weights, ["a", "b"], tmp_path / "out", "small")


def test_bad_model_name(tmp_path):
    cfg_path, weights = write(tmp_path, SMALL_CFG, SMALL_PARAMS)
    with pytest.raises(DarknetError, match="model name"):
        import_darknet(cfg_path, weights, ["a"], tmp_path / "out", "../evil")


# -- weights -----------------------------------------------------------------------------------


def test_truncated_in_the_last_layer(tmp_path):
    with pytest.raises(DarknetError, match=rf"\[convolutional\] at line {SECOND_CONV_LINE}: weights file is truncated") as e:
        import_small(tmp_path, floats=SMALL_PARAMS - 1)
    assert f"{20 + 4 * SMALL_PARAMS:,}" in str(e.value)  # the size the cfg implies
    assert not (tmp_path / "out" / "small.onnx").exists()


def test_truncated_in_the_first_layer(tmp_path):
    with pytest.raises(DarknetError, match=rf"\[convolutional\] at line {FIRST_CONV_LINE}: weights file is truncated"):
        import_small(tmp_path, floats=100)


def test_truncated_inside_a_float(tmp_path):
    with pytest.raises(DarknetError, match=rf"line {SECOND_CONV_LINE}: weights file is truncated"):
        import_small(tmp_path, floats=SMALL_PARAMS - 1, extra=b"\0\0")


@pytest.mark.parametrize("extra", [b"\0" * 4, b"\0" * 2, b"\0" * 4000])
def test_oversized(tmp_path, extra):
    with pytest.raises(DarknetError, match=rf"\[convolutional\] at line {SECOND_CONV_LINE}: weights file is {len(extra):,} bytes too long"):
        import_small(tmp_path, extra=extra)


@pytest.mark.parametrize("position, value, message", [(13, -1.0, "negative batch-norm variance"), (100, np.nan, "NaN")])
def test_impossible_values(tmp_path, position, value, message):
    cfg_path, weights = write(tmp_path, SMALL_CFG, SMALL_PARAMS)
    data = bytearray(weights.read_bytes())
    data[20 + 4 * position : 24 + 4 * position] = np.array([value], "<f4").tobytes()  # floats 12..15 are the variances
    weights.write_bytes(bytes(data))
    with pytest.raises(DarknetError, match=rf"\[convolutional\] at line {FIRST_CONV_LINE}: .*{message}"):
        import_darknet(cfg_path, weights, ["a"], tmp_path / "out", "small")


def test_wrong_header_form_is_a_size_mismatch(tmp_path):
    """A 64-bit seen written under a version that means 32-bit shifts everything by 4 bytes."""
    cfg_path = tmp_path / "model.cfg"
    cfg_path.write_text(SMALL_CFG)
    weights = tmp_path / "model.weights"
    header = np.array([0, 1, 0], "<i4").tobytes() + np.array([7], "<u8").tobytes()
    weights.write_bytes(header + np.zeros(SMALL_PARAMS, "<f4").tobytes())
    with pytest.raises(DarknetError, match="4 bytes too long"):
        import_darknet(cfg_path, weights, ["a"], tmp_path / "out", "small")


def test_header_too_short(tmp_path):
    cfg_path = tmp_path / "model.cfg"
    cfg_path.write_text(SMALL_CFG)
    weights = tmp_path / "model.weights"
    weights.write_bytes(b"\0" * 10)
    with pytest.raises(DarknetError, match="too short for a darknet weights header"):
        import_darknet(cfg_path, weights, ["a"], tmp_path / "out", "small")


@pytest.mark.parametrize(
    "version, header_bytes",
    [((0, 1, 0), 16), ((0, 2, 5), 20), ((1, 0, 0), 20), ((0, 0, 0), 16), ((1000, 1, 0), 16), ((0, 1000, 0), 16)],
)
def test_header_forms(version, header_bytes):
    body = np.arange(5, dtype="<f4").tobytes()
    parsed = parse_weights(encode_header(*version, seen=123_456) + body)
    assert (parsed.major, parsed.minor, parsed.revision) == version
    assert parsed.header_bytes == header_bytes
    assert parsed.seen == 123_456
    np.testing.assert_array_equal(parsed.params, np.arange(5, dtype=np.float32))
    assert parsed.file_bytes == header_bytes + 20


def test_64bit_seen_is_read_whole():
    data = np.array([0, 2, 0], "<i4").tobytes() + np.array([2**40 + 3], "<u8").tobytes()
    assert parse_weights(data).seen == 2**40 + 3


def test_a_binary_file_given_as_the_cfg_is_said_to_be_one(tmp_path):
    from visionserve.darknet.cfg import parse_cfg

    weights = tmp_path / "model.weights"
    weights.write_bytes(encode_header(0, 2, 0, 0) + np.zeros(64, np.float32).tobytes())
    with pytest.raises(DarknetError) as e:
        parse_cfg(weights)
    assert "is not a darknet cfg" in str(e.value) and "\\x00" not in str(e.value) and len(str(e.value)) < 200
