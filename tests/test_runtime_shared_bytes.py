"""Uploads through shared memory (runtime/shared_bytes.py): what goes through a slot and
what stays in the pickle, slot reuse, and pages given back."""

from __future__ import annotations

import os
import pickle

import numpy as np

from visionserve.runtime.shared_bytes import KEEP_BYTES, MIN_BYTES, SharedBytes, SharedBytesReader


def pair(slots: int, slot_bytes: int = 1 << 20) -> tuple[SharedBytes, SharedBytesReader]:
    shared = SharedBytes(slots, slot_bytes)
    return shared, SharedBytesReader(shared.fd, slots, slot_bytes)


def test_large_bytes_go_through_a_slot_and_small_ones_stay_in_the_pickle():
    shared, reader = pair(2)
    upload, small = os.urandom(200_000), os.urandom(MIN_BYTES - 1)
    message = ("run", [("yolox-nano", upload, small, 0.5)], False)
    data, taken = shared.dumps(message)
    assert taken == [0]
    assert len(data) < 2 * MIN_BYTES  # the upload is not in the pickle
    assert reader.loads(data) == message
    # A plain unpickler cannot read it: the upload really is elsewhere.
    try:
        pickle.loads(data)
    except pickle.UnpicklingError:
        pass
    else:
        raise AssertionError("the pickle held the upload")


def test_arrays_go_through_a_slot_and_come_back_equal_and_writable():
    shared, reader = pair(3)
    pixels = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    scores = np.linspace(0, 1, 10_000, dtype=">f4")  # byte order kept
    strided = pixels[:, ::2]  # not contiguous: NumPy pickles it as a byte string, which takes a slot
    data, taken = shared.dumps((pixels, scores, strided))
    assert taken == [0, 1, 2] and len(data) < 4096
    got_pixels, got_scores, got_strided = reader.loads(data)
    assert np.array_equal(got_pixels, pixels) and got_pixels.flags.writeable
    assert got_scores.dtype == scores.dtype and np.array_equal(got_scores, scores)
    assert np.array_equal(got_strided, strided)


def test_full_or_too_large_goes_in_the_pickle_and_freed_slots_are_reused_lowest_first():
    shared, reader = pair(2, slot_bytes=1 << 18)
    a, b, c = (os.urandom(100_000) for _ in range(3))
    (da, ta), (db, tb), (dc, tc) = shared.dumps(a), shared.dumps(b), shared.dumps(c)
    assert (ta, tb, tc) == ([0], [1], [])
    assert len(dc) > 100_000 and reader.loads(dc) == c
    too_large = os.urandom((1 << 18) + 1)
    d, t = shared.dumps(too_large)
    assert t == [] and reader.loads(d) == too_large
    assert shared.free_slots == 0
    shared.release(tb)
    shared.release(ta)
    assert shared.free_slots == 2
    assert shared.dumps(c)[1] == [0]
    assert [reader.loads(da), reader.loads(db)] != [a, b]  # slot 0 now holds c: answered jobs' bytes are gone


def test_a_freed_slot_gives_back_the_pages_of_a_large_upload():
    shared, _ = pair(2)
    small, large = os.urandom(KEEP_BYTES // 2), os.urandom(KEEP_BYTES * 3)
    _, t_small = shared.dumps(small)
    _, t_large = shared.dumps(large)
    blocks = os.fstat(shared.fd).st_blocks * 512
    assert blocks >= len(small) + len(large)
    shared.release(t_large)
    shared.release(t_small)
    kept = os.fstat(shared.fd).st_blocks * 512
    assert len(small) <= kept < len(small) + len(large) // 2
