"""Whether a captured array is provably unchanged since it was last hashed.

The kernel keeps the record (``_core.WriteTracker``: a userfaultfd in
asynchronous write-protect mode and PAGEMAP_SCAN, Linux 6.7): the pages of a
tracked array are armed, the first write to each takes one minor fault that
marks it written, and a scan reports the written ones and arms them again.
`generation(a)` is a number that changes whenever a's memory may have been
written; a consumer that hashed a at generation g may reuse that hash while
generation(a) is still g.

Rules that keep it sound:
- Only a C- or F-contiguous array lying wholly in private anonymous memory
  is tracked (a shared or file mapping can change through another process).
- Arm, then hash: `generation` is called before the hash, so a write racing
  with the hash is seen by the next call.
- One scan consumes the record of every array over those pages: a scan that
  finds writes moves on the generation of every tracked array whose pages
  overlap (views of one buffer, arrays sharing a boundary page).
- A page that another array or object shares with the array counts when
  written: a spurious rehash, never a missed change.
- A forked child inherits no registration: it starts with none, and the
  extension refuses (answers "written") the parent's descriptors.
- An array found written at STRIKES checks in a row stops being tracked (it
  is rewritten between maps: every map hashes it anyway, and its writer would
  only pay the faults), and is not tracked again while it lives.

Not seen: device writes into pages pinned before they were armed (RDMA,
io_uring fixed buffers). Where the kernel lacks the features, or a seccomp
filter refuses userfaultfd, nothing is tracked and every map hashes;
`status()` says why (and a debug log line, once).
"""
import itertools
import logging
import mmap
import os
import threading
import weakref

import numpy as np

from .. import _shm

_core = _shm.core()
_log = logging.getLogger("pmaprt")

# Checks in a row that found an array written before it stops being tracked.
STRIKES = 2

# Generations are drawn from one counter: a number is never handed out twice,
# so an array tracked again (resized, or under a reused id) never matches a
# generation recorded before.
_generations = itertools.count(1)


class _Tracked:
    __slots__ = ("ref", "lo", "hi", "addr", "nbytes", "gen", "strikes", "live")

    def __init__(self, ref, addr, nbytes, live):
        self.ref = ref
        self.addr = addr
        self.nbytes = nbytes
        self.lo = addr & ~(mmap.PAGESIZE - 1)
        self.hi = addr + nbytes
        self.gen = next(_generations)
        self.strikes = 0
        self.live = live        # registered with the kernel now


def _span(a):
    """(address, nbytes) of a contiguous array's memory, or None."""
    if not (a.flags.c_contiguous or a.flags.f_contiguous) or a.nbytes == 0:
        return None
    return a.__array_interface__["data"][0], a.nbytes


def _self_test(tracker):
    """Whether a write to a scratch page is reported once, and a page left
    alone is not: the features can be compiled out, or half there."""
    m = mmap.mmap(-1, 2 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        a = np.frombuffer(m, np.uint8)
        addr = a.__array_interface__["data"][0]
        if not tracker.track(addr, a.nbytes):
            return False
        clean = not tracker.written(addr, a.nbytes)
        a[mmap.PAGESIZE + 1] = 1
        seen = tracker.written(addr, a.nbytes)
        rearmed = not tracker.written(addr, a.nbytes)
        tracker.untrack(addr, a.nbytes)
        del a
        return clean and seen and rearmed
    finally:
        try:
            m.close()
        except BufferError:
            pass


class WrittenPages:
    """The process's tracked arrays (one userfaultfd per process: the kernel
    lets one descriptor register a page, not two)."""

    def __init__(self):
        self._reset()

    def _reset(self):
        # made again in a forked child: another thread may have held it
        self._lock = threading.Lock()
        self._pending = []          # (id, weakref) of arrays freed, dropped at the next call
        self._tracker = None
        self._why = None            # why nothing is tracked, once known
        self._entries = {}          # id(array) -> _Tracked
        self.scans = 0              # checks of tracked arrays
        self.found_written = 0      # of which found the array written

    def _get_tracker(self):
        if self._tracker is None and self._why is None:
            try:
                tracker = _core.WriteTracker()
                ok = _self_test(tracker)
            except OSError as e:
                tracker, ok = None, False
                self._why = "userfaultfd with WP_ASYNC unavailable (%s)" % e
            else:
                if not ok:
                    self._why = "the kernel's write tracking failed its self-test"
            if ok:
                self._tracker = tracker
            else:
                _log.debug("pmaprt: captured arrays are hashed at every map: %s", self._why)
        return self._tracker

    def status(self):
        """None while writes can be tracked, else why not."""
        with self._lock:
            self._get_tracker()
            return self._why

    def generation(self, a):
        """A number that changes whenever a's memory may have been written
        since the last call (arming its pages again), or None when a is not
        tracked. Call it before hashing a."""
        span = _span(a)
        if span is None:
            return None
        with self._lock:
            tracker = self._get_tracker()
            if tracker is None:
                return None
            self._drop_pending()
            oid = id(a)
            t = self._entries.get(oid)
            if t is not None and (t.ref() is not a or (t.addr, t.nbytes) != span):
                self._drop(oid)     # another array under a reused id, or a resized one
                t = None
            if t is None:
                live = tracker.track(*span)
                ref = weakref.ref(a, lambda r, oid=oid: self._gone(oid, r))
                t = self._entries[oid] = _Tracked(ref, span[0], span[1], live)
                return t.gen if live else None
            if not t.live:
                return None
            self.scans += 1
            if tracker.written(t.addr, t.nbytes):
                self.found_written += 1
                t.strikes += 1
                for other in self._entries.values():
                    if other.lo < t.hi and t.lo < other.hi:
                        other.gen = next(_generations)
                if t.strikes >= STRIKES:
                    self._untrack(t)
                    return None
            else:
                t.strikes = 0
            return t.gen

    def tracked(self, a):
        """Whether a's writes are tracked now."""
        with self._lock:
            t = self._entries.get(id(a))
            return t is not None and t.live and t.ref() is a

    def _untrack(self, t):
        """Unregister t's pages unless another tracked array shares them."""
        t.live = False
        t.gen = next(_generations)
        if any(o.live and o.lo < t.hi and t.lo < o.hi for o in self._entries.values()):
            return
        self._tracker.untrack(t.addr, t.nbytes)

    def _drop(self, oid):
        t = self._entries.pop(oid)
        if t.live:
            self._untrack(t)

    def _gone(self, oid, ref):
        """An array was freed (any thread, any moment, a garbage collection
        inside generation() among them): dropped now if the lock is free,
        else at the next call. Its memory is still mapped now (weak
        references are cleared first); later, unregistering it is harmless."""
        self._pending.append((oid, ref))
        if self._lock.acquire(blocking=False):
            try:
                self._drop_pending()
            finally:
                self._lock.release()

    def _drop_pending(self):
        while self._pending:
            oid, ref = self._pending.pop()
            t = self._entries.get(oid)
            if t is not None and t.ref is ref:
                self._drop(oid)


WATCH = WrittenPages()

if hasattr(os, "register_at_fork"):
    # the child's memory has no registration; its tracker opens its own
    os.register_at_fork(after_in_child=lambda: WATCH._reset())
