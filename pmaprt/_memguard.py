"""The memory guard: no more work in flight while the machine runs short.

A feeder that keeps filling shared memory, or workers that run ahead of a
slow consumer, can take a machine's last free memory (each result waits in
the parent until it is consumed). While available memory (psutil) is under
the floor, a map keeps at most one chunk in flight, so it still makes
progress and never deadlocks, and adds more again once memory comes back.
"""
import time

import psutil

# psutil.virtual_memory() costs some tens of microseconds: ask at most this often.
CHECK_EVERY_S = 0.05
DEFAULT_MIN_BYTES = 256 << 20
DEFAULT_FRACTION = 0.05


_default_floor = None


def default_floor():
    # Total memory does not change: read it once (psutil costs ~100 us a call).
    global _default_floor
    if _default_floor is None:
        _default_floor = max(DEFAULT_MIN_BYTES, int(psutil.virtual_memory().total * DEFAULT_FRACTION))
    return _default_floor


def available_bytes():
    return psutil.virtual_memory().available


# The latest reading, shared by every guard of this process: a short map
# builds a guard of its own and would otherwise pay a reading each time. A
# reading belongs to the reader that made it: a replaced `available_bytes`
# reads afresh.
_reading = [-CHECK_EVERY_S, 0, None]     # [monotonic time, available bytes, reader]


def recent_available(now):
    """Available bytes, read at most every CHECK_EVERY_S by this process."""
    t, avail, reader = _reading
    if now - t >= CHECK_EVERY_S or reader is not available_bytes:
        avail = available_bytes()
        _reading[:] = [now, avail, available_bytes]
    return avail


def check_floor(floor):
    if floor is None:
        return default_floor()
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError("pmaprt: memory_floor must be a number of bytes >= 0 (0: no guard) or "
                         "None, got %r" % (floor,))
    return floor


class MemoryGuard:
    __slots__ = ("floor", "_t", "_low", "trips")

    def __init__(self, floor):
        self.floor = floor
        self._t = 0.0
        self._low = False
        self.trips = 0  # times the guard held work back

    def low(self):
        if not self.floor:
            return False
        now = time.monotonic()
        if now - self._t >= CHECK_EVERY_S:
            self._t = now
            self._low = recent_available(now) < self.floor
        if self._low:
            self.trips += 1
        return self._low
