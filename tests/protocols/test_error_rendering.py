"""Error bodies of every protocol render whatever the message quotes."""

from __future__ import annotations

import json

import pytest

from visionserve.protocols import discover


@pytest.mark.parametrize("protocol", discover(), ids=lambda p: p.name)
def test_a_message_with_a_lone_surrogate_still_renders_as_json(protocol):
    # Python's JSON reader gives "\ud800" for the escape \ud800; UTF-8 has no form for it.
    response = protocol.render_error(400, "bad_request", "unknown label '\ud800' or 'é'", {"X-Test": "1"})
    assert response.status_code == 400 and response.headers["x-test"] == "1"
    text = json.dumps(json.loads(response.body.decode("utf-8")), ensure_ascii=False)
    assert "unknown label '\ufffd' or 'é'" in text


def test_the_protocol_without_a_prefix_is_mounted_first_and_the_others_claim_disjoint_prefixes():
    found = discover()
    assert found[0].prefix == "" and found[0].name == "native"
    prefixed = [p.prefix.rstrip("/") + "/" for p in found[1:]]
    assert all(p != "/" for p in prefixed)
    # No prefix lies inside another, and no route of the first protocol lies under one:
    # so the mounting order decides no match.
    assert not any(a != b and a.startswith(b) for a in prefixed for b in prefixed)
    assert not any(route.path.startswith(p) for route in found[0].router.routes for p in prefixed)
