"""Quality values of Accept and Accept-Encoding headers (protocols.weights), without a server."""

from __future__ import annotations

import pytest

from visionserve.protocols import weights


@pytest.mark.parametrize(("header", "expected"), [
    ("", {}),
    ("gzip", {"gzip": 1.0}),
    ("GZip;Q=0.5 , deflate", {"gzip": 0.5, "deflate": 1.0}),
    ("gzip;q=0", {"gzip": 0.0}),
    ("image/png;level=1;q=0.2, */*;q=0.1", {"image/png": 0.2, "*/*": 0.1}),
    ("gzip;q=abc, deflate;q=nan", {"gzip": 0.0, "deflate": 0.0}),  # no sense: accepts nothing
    ("gzip;q=7, deflate;q=-1", {"gzip": 1.0, "deflate": 0.0}),  # out of range: clamped
    (",, ;q=1, br", {"br": 1.0}),
])
def test_weights(header, expected):
    assert weights(header) == expected
