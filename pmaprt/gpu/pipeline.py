"""The host pipeline: host arrays through pinned staging buffers, double-buffered.

    host ndarray --> chunks of rows, claimed by one thread per GPU worker
      per worker: S streams (default 2), each with a pinned input and output
      staging buffer and a device input and output buffer of one chunk:
        slot k: [host -> pinned_in] -> H2D async -> kernel -> D2H async -> event
        next slot: wait for its previous event, [pinned_out -> result rows], reuse
      so chunk i+1's copy in, chunk i's kernel and chunk i-1's copy out run at once

- ``HostMap`` is one host-input map's shared state (the next chunk to claim,
  the result, the first error); ``HostMap.worker(dev)`` is the body of one
  GPU worker thread, which owns its slots (a ``Slot`` per stream).
- ``direct=True`` (the caller's arrays are page-locked, ``register=True``):
  the copies DMA from and to the caller's rows, and the staging copies are
  skipped.
- ``host_copy``: the pageable <-> pinned copies, split over threads when large.
- ``HostMap.cancel``: the caller was interrupted; workers claim nothing more,
  wait for what they have in flight, and end (the dispatch waits for them
  before it unregisters memory or returns).
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._options import CORES

# One thread copies pageable memory several times slower than a pinned
# host-device copy moves it: copies larger than COPY_SPLIT_BYTES are split over
# COPY_THREADS threads (numpy releases the GIL while it copies); below it the
# hand-off to threads costs more than it saves. COPY_THREADS takes at most half
# the cores (and at most 8), leaving the rest to the caller's other work.
COPY_SPLIT_BYTES = 8 << 20
COPY_THREADS = max(1, min(8, CORES // 2))
_copy_pool = None
_copy_pool_lock = threading.Lock()


def host_copy(dst, src):
    """np.copyto(dst, src) for C-contiguous arrays, in parallel when large."""
    global _copy_pool
    n = len(src)
    if src.nbytes < COPY_SPLIT_BYTES or COPY_THREADS < 2 or n < 2:
        np.copyto(dst, src)
        return
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="pmaprt-copy")
    step = -(-n // COPY_THREADS)
    futs = [_copy_pool.submit(np.copyto, dst[lo:lo + step], src[lo:lo + step])
            for lo in range(step, n, step)]
    np.copyto(dst[:step], src[:step])
    for f in futs:
        f.result()


class Slot:
    """One stream of a GPU worker with its buffers, and the chunk it has in flight."""
    __slots__ = ("stream", "pin_in", "pin_out", "d_in", "d_out", "pending")


class HostMap:
    """Shared state of a host-input map: the next chunk to claim, the result."""

    def __init__(self, eng, kind, fn, arr, out, chunk, launch, odt, streams, direct=False):
        self.eng, self.kind, self.fn, self.arr, self.out = eng, kind, fn, arr, out
        self.direct = direct
        self.chunk, self.launch, self.odt, self.nstreams = chunk, launch, odt, streams
        self.next = 0
        self.lock = threading.Lock()
        self.error = None
        self.chunks_by_device = {}

    def cancel(self, exc):
        """Stop the map with exc (the caller was interrupted): no more chunks are
        claimed; each worker waits for its chunks in flight and ends."""
        with self.lock:
            if self.error is None:
                self.error = exc

    def claim(self):
        with self.lock:
            if self.error is not None or self.next >= len(self.arr):
                return None
            lo = self.next
            self.next = hi = min(lo + self.chunk, len(self.arr))
            return lo, hi

    def _result_for(self, r, m):
        """out, created from the first function result (shape and dtype per row)."""
        with self.lock:
            if self.out is None:
                if r.shape[:1] != (m,):
                    raise ValueError("pmaprt: fn must return one row per input row: got shape %s "
                                     "for %d rows" % (tuple(r.shape), m))
                self.out = np.empty((len(self.arr),) + tuple(r.shape[1:]), r.dtype)
            return self.out

    def worker(self, dev):
        eng = self.eng
        slots = []
        try:
            with eng.device(dev):
                for _ in range(self.nstreams):
                    s = Slot()
                    s.stream = eng.stream()
                    rest = self.arr.shape[1:]
                    s.pin_in = None if self.direct else eng.pinned((self.chunk,) + rest,
                                                                   self.arr.dtype)
                    s.d_in = eng.empty((self.chunk,) + rest, self.arr.dtype, s.stream)
                    if self.kind != "function":
                        oshape = (self.chunk,) + self.out.shape[1:]
                        s.pin_out = None if self.direct else eng.pinned(oshape, self.odt)
                        s.d_out = eng.empty(oshape, self.odt, s.stream)
                    else:
                        s.pin_out = s.d_out = None
                    s.pending = None
                    slots.append(s)
                k = 0
                while True:
                    s = slots[k % self.nstreams]
                    k += 1
                    self._finish(s)
                    span = self.claim()
                    if span is None:
                        break
                    self._start(s, dev, *span)
                for j in range(self.nstreams):
                    self._finish(slots[(k + j) % self.nstreams])
        except BaseException as e:  # noqa: B902 - handed to the caller's thread
            with self.lock:
                if self.error is None:
                    self.error = e
            # copies may still be in flight into buffers about to be released
            for s in slots:
                try:
                    with eng.device(dev):
                        s.stream.synchronize()
                except Exception:
                    pass

    def _start(self, s, dev, lo, hi):
        eng, m = self.eng, hi - lo
        if self.direct:                               # registered: DMA from the caller's rows
            src = self.arr[lo:hi]
        else:
            src = s.pin_in[:m]
            host_copy(src, self.arr[lo:hi])           # pageable -> pinned (host memcpy)
        dst = self.out[lo:hi] if self.direct else None
        d_in = s.d_in[:m]
        eng.h2d(d_in, src, s.stream)
        if self.kind == "function":
            r = eng.launch(self.kind, self.fn, d_in, None, s.stream, self.launch)
            out = self._result_for(r, m)
            if r.shape != (m,) + out.shape[1:]:
                raise ValueError("pmaprt: fn returned shape %s for %d rows; earlier chunks gave "
                                 "rows of shape %s" % (tuple(r.shape), m, out.shape[1:]))
            if not self.direct and (s.pin_out is None or s.pin_out.shape[0] < self.chunk):
                s.pin_out = eng.pinned((self.chunk,) + out.shape[1:], out.dtype)
            r = eng.astype(r, out.dtype, stream=s.stream)
            s.d_out = r
            eng.d2h(dst if self.direct else s.pin_out[:m], r, s.stream)
        else:
            d_out = s.d_out[:m]
            eng.launch(self.kind, self.fn, d_in, d_out, s.stream, self.launch)
            eng.d2h(dst if self.direct else s.pin_out[:m], d_out, s.stream)
        s.pending = (lo, hi, eng.record(s.stream))
        with self.lock:
            self.chunks_by_device[dev] = self.chunks_by_device.get(dev, 0) + 1

    def _finish(self, s):
        if s.pending is None:
            return
        lo, hi, ev = s.pending
        s.pending = None
        self.eng.synchronize(ev)
        if not self.direct and self.error is None:      # a failed map's rows are not wanted
            host_copy(self.out[lo:hi], s.pin_out[:hi - lo])

