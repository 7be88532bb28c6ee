"""Request parameters shared by every protocol and the CLI."""

from __future__ import annotations

from visionserve.types import PredictParams


def test_parse_classes_from_text_or_list():
    assert PredictParams.parse_classes(None) is None
    assert PredictParams.parse_classes(" person, dog ,,") == frozenset({"person", "dog"})
    assert PredictParams.parse_classes(["person", " dog", ""]) == frozenset({"person", "dog"})
    assert PredictParams.parse_classes("") == frozenset()  # given but empty: an empty filter, not "no filter"
