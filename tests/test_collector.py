"""The garbage collector's pause while large request bodies are decoded, several at once."""

from __future__ import annotations

import gc

from visionserve.server.collector import collector_paused


def test_the_collector_runs_again_when_the_last_pause_ends():
    assert gc.isenabled()
    first, second = collector_paused(), collector_paused()
    first.__enter__()
    second.__enter__()  # two bodies decoded at once, in two threads
    assert not gc.isenabled()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the other one is still decoding
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_pause_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with collector_paused():
        pass
    assert gc.isenabled()
