"""Reading darknet ``.weights`` files: a small header, then float32 parameters in layer order.

The header is three int32 (major, minor, revision) and a ``seen`` counter of images trained
on. Darknet writes ``seen`` as 64 bits when ``major * 10 + minor >= 2`` and both major and
minor are below 1000, else as 32 bits; the parameters start right after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionserve.darknet.errors import DarknetError

_HEADER_INTS = 3


def seen_bytes(major: int, minor: int) -> int:
    """Width of the ``seen`` field for a header version, by darknet's rule."""
    return 8 if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000 else 4


@dataclass(frozen=True, slots=True)
class DarknetWeights:
    major: int
    minor: int
    revision: int
    seen: int
    header_bytes: int
    file_bytes: int
    params: np.ndarray  # float32, every whole parameter after the header, in file order


def read_weights(path: Path) -> DarknetWeights:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DarknetError(f"cannot read weights {path}: {e}") from None
    return parse_weights(data, str(path))


def parse_weights(data: bytes, name: str = "weights") -> DarknetWeights:
    if len(data) < 4 * _HEADER_INTS + 4:
        raise DarknetError(f"{name}: {len(data)} bytes is too short for a darknet weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(data, "<i4", _HEADER_INTS))
    width = seen_bytes(major, minor)
    header = 4 * _HEADER_INTS + width
    if len(data) < header:
        raise DarknetError(f"{name}: {len(data)} bytes is too short for a version {major}.{minor} header")
    seen = int(np.frombuffer(data, "<u8" if width == 8 else "<i4", 1, 4 * _HEADER_INTS)[0])
    # A size that is not header + 4 * (what the cfg needs) is reported by the graph builder,
    # which knows which cfg section the data runs out in.
    params = np.frombuffer(data, "<f4", (len(data) - header) // 4, header)
    return DarknetWeights(major, minor, revision, seen, header, len(data), params)


def encode_header(major: int, minor: int, revision: int, seen: int) -> bytes:
    """The header darknet would write for this version (used to make test files)."""
    head = np.array([major, minor, revision], "<i4").tobytes()
    return head + np.array([seen], "<u8" if seen_bytes(major, minor) == 8 else "<i4").tobytes()
