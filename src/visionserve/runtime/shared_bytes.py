"""Uploads handed to the inference process through shared memory instead of its job pipe.

Pickled into the pipe, a 164 kB upload is copied four times on its way (pickling, the pipe's
two kernel copies, unpickling): about 120 us of the HTTP process's CPU per job and 80 us of
the inference process's. Instead, the HTTP process copies each large byte string (an
encoded upload) or array (a V2 tensor's pixels) once into a slot of a memfd both processes
map, and the pickle carries only where it is; unpickling in the inference process copies it
out of the slot. A slot is taken again only after the
worker has answered the job that used it, which is after it unpickled the job. When every
slot is taken, or the bytes do not fit one, they travel in the pipe as before.

Slots are handed out lowest first so that a few stay in use, and the pages of bytes over
``KEEP_BYTES`` are given back when their slot is freed: the memfd's touched pages count in
both processes' resident memory.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import threading
from typing import Any

import numpy as np

SLOT_BYTES = 4 << 20  # larger uploads take the pipe (a slot's pages are used only as needed)
MIN_BYTES = 16 << 10  # below this the pipe costs about as much as the slot's bookkeeping
KEEP_BYTES = 256 << 10  # pages of a freed slot kept resident, at most


class SharedBytes:
    """The HTTP process's side: a memfd of ``slots`` slots, and pickling that puts large
    byte strings into them."""

    def __init__(self, slots: int, slot_bytes: int = SLOT_BYTES) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.fd = os.memfd_create("visionserve-uploads")
        os.ftruncate(self.fd, slots * slot_bytes)
        self._map = mmap.mmap(self.fd, slots * slot_bytes)
        self._free = list(range(slots - 1, -1, -1))  # a stack: pop() gives the lowest
        self._used = [0] * slots  # bytes written to each slot
        self._lock = threading.Lock()  # jobs are pickled on the event loop, loads on other threads
        self.placed = 0  # byte strings that went through a slot (for tests and metrics)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def close_fd(self) -> None:
        """Closes the descriptor once the inference processes have their own (the map stays)."""
        os.close(self.fd)

    def dumps(self, message: Any) -> tuple[bytes, list[int]]:
        """``message`` pickled, with its large byte strings in slots; returns the pickle and
        the slots it holds, to pass to ``release`` once the message is answered."""
        taken: list[int] = []
        buf = io.BytesIO()
        _SlotPickler(buf, self, taken).dump(message)
        return buf.getvalue(), taken

    def release(self, taken: list[int]) -> None:
        with self._lock:
            for slot in taken:
                if self._used[slot] > KEEP_BYTES:
                    start = slot * self.slot_bytes
                    self._map.madvise(mmap.MADV_REMOVE, start, self.slot_bytes)
                self._used[slot] = 0
                self._free.append(slot)
            self._free.sort(reverse=True)

    def _place(self, data: bytes | np.ndarray) -> int | None:
        """The slot now holding ``data`` (bytes, or a C-contiguous array), or None."""
        size = data.nbytes if isinstance(data, np.ndarray) else len(data)
        if size > self.slot_bytes:
            return None
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
            self._used[slot] = size
        start = slot * self.slot_bytes
        if isinstance(data, np.ndarray):
            np.frombuffer(self._map, np.uint8, size, start)[:] = data.reshape(-1).view(np.uint8)
        else:
            self._map[start : start + size] = data
        self.placed += 1
        return slot


class _SlotPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, shared: SharedBytes, taken: list[int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.shared = shared
        self.taken = taken

    def persistent_id(self, obj: Any) -> tuple | None:
        kind = type(obj)
        if kind is bytes and len(obj) >= MIN_BYTES:
            layout: tuple = (len(obj),)
        elif kind is np.ndarray and obj.nbytes >= MIN_BYTES and obj.flags.c_contiguous and not obj.dtype.hasobject:
            layout = (obj.nbytes, obj.dtype.str, obj.shape)
        else:
            return None
        slot = self.shared._place(obj)
        if slot is None:
            return None  # every slot taken, or too large: pickled into the pipe
        self.taken.append(slot)
        return (slot, *layout)


class SharedBytesReader:
    """The inference process's side: unpickles jobs, taking their byte strings out of the slots."""

    def __init__(self, fd: int, slots: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self._map = mmap.mmap(fd, slots * slot_bytes)

    def loads(self, data: bytes) -> Any:
        return _SlotUnpickler(io.BytesIO(data), self).load()

    def read(self, slot: int, length: int) -> bytes:
        start = slot * self.slot_bytes
        return self._map[start : start + length]  # a copy: the slot is reused after the reply

    def read_array(self, slot: int, length: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        array = np.empty(shape, dtype)  # a writable copy, like an unpickled array
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(self._map, np.uint8, length, slot * self.slot_bytes)
        return array


class _SlotUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, reader: SharedBytesReader) -> None:
        super().__init__(file)
        self.reader = reader

    def persistent_load(self, pid: Any) -> bytes | np.ndarray:
        if len(pid) == 2:
            return self.reader.read(*pid)
        return self.reader.read_array(*pid)
