"""Segments lent to workers: memfds that reach every worker over its socket.

A job's data (a descriptor too large for its slot, a map's input, a feed's
chunks, an SPMD map's collective area) and every shared array live in
segments of their own. The parent lends each to every worker, once.

Protocol, step by step:

1. Parent, lock held: `share` makes a segment (or `lend` takes one that
   exists, such as a shared array's memfd), keeps it in `_res.segs` under its
   id, and queues a `SegmentLent` message with a dup of its fd for every
   worker. A worker started later gets every lent segment after its start
   message (processes.py).
2. The parent never blocks on a worker's socket: a worker deep in a long
   item does not read it, and a blocked parent would stop crash and timeout
   handling for every job. It sends what the socket takes now
   (MSG_DONTWAIT); the rest stays in that worker's outbox, flushed at every
   check and by a background thread while anything is left.
3. Worker: reads its socket between turns at the board (every SOCKET_POLL_S
   while busy, and always before it sleeps) and maps each segment as its message comes,
   closing the fd at once. When a job names a segment it has not seen yet,
   `segment()` waits on the socket for it.
4. Parent: `unshare` drops the segment, queues `SegmentFreed` for every
   worker, and closes its own mapping; for a shared array it then wakes the
   workers, so that idle ones let go of its memory now. A worker unmaps the
   segment when its last view goes, and forgets job contexts that are over
   (they hold views of their segments).
"""
import collections
import os
import select
import threading
import time
import weakref
from typing import NamedTuple

from .. import _arrays, _shm
from .._shm import H_SHUTDOWN, S_CANCEL, S_GEN
from .wake import IDLE_TIMEOUT_S


class SegmentLent(NamedTuple):
    """parent -> worker: map segment `seg_id` of `size` bytes (its fd rides along)."""
    seg_id: int
    size: int


class SegmentFreed(NamedTuple):
    """parent -> worker: drop segment `seg_id` (once its last view goes)."""
    seg_id: int


class Lender:
    """The parent's side (a runtime mixin). State: self._res.segs (id ->
    segment), _seg_id, _outbox (per worker: [bytes, fds] not yet sent),
    _flusher."""

    def _init_lent(self, n):
        self._seg_id = 0
        self._outbox = self._res.outbox = [collections.deque() for _ in range(n)]
        self._flusher = None

    def share(self, size, reserve=True):
        """A new segment, mapped here and lent to every worker. Lock held."""
        self._seg_id += 1
        seg = _shm.Segment(size, seg_id=self._seg_id, reserve=reserve)
        self.lend(seg)
        return seg

    def lend(self, seg):
        """Lend an existing segment (id, fd, size, close) to every worker. Lock held."""
        self._res.segs[seg.id] = seg
        for w in range(self.workers):
            self._send(w, SegmentLent(seg.id, seg.size), seg.fd)

    def _lend_all(self, w):
        """Every lent segment, to a worker just started (through its outbox: a
        worker that dies as it starts must not fail the caller's send)."""
        for seg in self._res.segs.values():
            self._send(w, SegmentLent(seg.id, seg.size), seg.fd)

    def unshare(self, seg):
        if self._res.segs.pop(seg.id, None) is None:
            return
        for w in range(self.workers):
            self._send(w, SegmentFreed(seg.id))
        seg.close()
        if isinstance(seg, _arrays.ArraySeg):
            self.wake_workers()  # the array was freed: idle workers drop their mapping now

    def _send(self, w, msg, fd=None):
        """Queue a message for worker w and send what its socket takes now.
        A worker not started yet gets every lent segment when it starts."""
        if self._res.socks[w] is None:
            return
        box = self._outbox[w]
        # A queued fd must outlive the segment's own (closed by unshare): dup it.
        box.append([_shm.frame(msg), [os.dup(fd)] if fd is not None else []])
        self._flush(w)

    def _flush(self, w):
        self._flush_once(w)
        if self._outbox[w]:
            self._flush_later()

    def _flush_all(self):
        for w, box in enumerate(self._outbox):
            if box:
                self._flush(w)

    def _flush_later(self):
        """A worker's socket is full: keep sending in the background until the
        outbox is empty, so messages (a released array, say) reach idle workers
        even when no map is waiting on the pool."""
        t = self._flusher
        if t is not None and t.is_alive():
            return
        ref = weakref.ref(self)

        def run():
            while True:
                time.sleep(0.05)
                pool = ref()
                if pool is None or pool._res.ctl is None:
                    return
                with pool._lock:
                    if pool._res.ctl is None:
                        return
                    for w, box in enumerate(pool._outbox):
                        if box:
                            pool._flush_once(w)
                    if not any(pool._outbox):
                        pool._flusher = None
                        return
                del pool

        self._flusher = threading.Thread(target=run, name="pmaprt-outbox", daemon=True)
        self._flusher.start()

    def _flush_once(self, w):
        box = self._outbox[w]
        sock = self._res.socks[w]
        while box:
            data, fds = box[0]
            try:
                n = _shm.send_nowait(sock, data, fds)
            except BlockingIOError:
                return
            except OSError:
                self._drop_outbox(w)
                return
            for fd in fds:
                os.close(fd)
            if n < len(data):
                box[0] = [data[n:], []]
            else:
                box.popleft()

    def _drop_outbox(self, w):
        box = self._outbox[w]
        while box:
            for fd in box.popleft()[1]:
                os.close(fd)


class SegmentCache:
    """The worker's side (a worker mixin): the segments it has mapped.
    State: self.segs (id -> MappedSegment)."""

    def _init_segments(self):
        self.segs = {}

    def _handle_msg(self, msg, fds):
        if type(msg) is SegmentLent:
            # mapped, its descriptor closed at once; unmapped with its last view
            self.segs[msg.seg_id] = _arrays.MappedSegment(fds[0], msg.size, msg.seg_id)
        elif type(msg) is SegmentFreed:
            seg = self.segs.pop(msg.seg_id, None)
            if seg is not None:
                seg.close()
                _arrays.segment_freed(msg.seg_id)     # workers' function caches
                self._forget_finished_jobs()

    def _forget_finished_jobs(self):
        """Drop cached contexts of jobs that are over: they hold views of
        segments (a shared array's memory must go with its last user)."""
        r = self.r
        for k, c in list(self.jobs.items()):
            if r.load64(c.off + S_GEN) != c.gen or r.load32(c.off + S_CANCEL):
                del self.jobs[k]

    def poll_socket(self):
        while select.select([self.sock], [], [], 0)[0]:
            msg, fds = _shm.recv_msg(self.sock)
            self._handle_msg(msg, fds)

    def segment(self, seg_id):
        # The parent sends segments as its workers' sockets take them (it never
        # blocks on a busy worker), so this may wait for the parent's next turn.
        while seg_id not in self.segs:
            if not select.select([self.sock], [], [], IDLE_TIMEOUT_S)[0]:
                if os.getppid() != self.parent_pid or self.r.load32(H_SHUTDOWN):
                    raise SystemExit(0)
                continue
            msg, fds = _shm.recv_msg(self.sock)
            self._handle_msg(msg, fds)
        return self.segs[seg_id]
