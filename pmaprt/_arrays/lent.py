"""Shared arrays lent to a pool's workers, both sides.

Parent side: the first map that uses a shared array (or a view of it) lends
its memfd to every worker of the pool, once, over each worker's socket
(SCM_RIGHTS); `PoolArrays.share` does it and returns the array's segment id
(SHARED_BASE + the mapping's key). The pool keeps an `ArraySeg` (a dup of the
memfd, not the array) among its segments, so that workers keep their mapping,
page tables included, from one map to the next. When the array's last
reference in the parent goes (a weakref on its mapping), the pool tells its
workers to drop it: at once if the pool's lock is free, else at the start or
end of its next map.

Worker side: `MappedSegment` maps each segment it receives (a job's segment
or a shared array) and remembers which mapping is which shared array, so that
a result that views a shared array goes back by reference.

Each process resolves a segment id to its memory with `resolve`: the parent
looks the id up among the arrays it lent; a worker installs its own table
(`set_resolver`).

`PoolArrays` is also where a pool keeps its answer to "may the workers read
this process's memory" (pvm.py), asked once per pool.
"""
import os
import weakref

from .. import _shm
from . import pvm
from .shared import Mapping

buffer_address = _shm.core().buffer_address

# Segment ids of shared arrays: SHARED_BASE + the mapping's key in the
# parent; below it are the pool's own job segments.
SHARED_BASE = 1 << 62

# Parent side: segment id -> the shared array's mapping, while it lives.
_parent_maps = weakref.WeakValueDictionary()
# Worker side: mapping key -> segment id of the shared arrays this worker received.
_worker_seg_of_key = {}


class ArraySeg:
    """A shared array's memfd lent to one pool's workers. Looks like a
    _shm.Segment to the pool (id, fd, size, close). It holds a dup of the
    memfd, not the array; on_gone(ref) runs when the array's mapping goes."""

    __slots__ = ("id", "fd", "size", "watch", "__weakref__")

    def __init__(self, seg_id, mapping, on_gone):
        self.id = seg_id
        self.fd = os.dup(mapping.fd)
        self.size = mapping.size
        self.watch = weakref.ref(mapping, on_gone)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.watch = None


class PoolArrays:
    """One pool's array state, parent side: the shared arrays lent to its
    workers, those whose last reference went since, and whether its workers
    may read this process's memory. The pool creates one and holds it as
    `pool.arrays`; this object holds the pool weakly (no reference cycle)."""

    def __init__(self, pool):
        self._pool = weakref.ref(pool)
        self.gone = []      # segment ids of lent arrays whose last reference here went
        # Whether the workers may read this process's memory (pvm.py): None
        # until asked; set it to False to make the pool copy plain arrays.
        self.pvm = None
        # The pool's CapturedStore (captured.py, a module above this one), set by the pool.
        self.captured = None

    def share(self, mapping):
        """Lend a shared array's memfd to every worker of the pool (no copy),
        once: later maps find it there. Returns its segment id."""
        pool = self._pool()
        sid = SHARED_BASE + mapping.key
        with pool._lock:
            self._unshare_gone(pool)
            segs = pool._res.segs
            if sid not in segs:
                seg = ArraySeg(sid, mapping, lambda _ref: self._mapping_gone(sid))
                _parent_maps[sid] = mapping
                pool.lend(seg)
        return sid

    def release_gone(self):
        """Unshare the arrays that went (a map is over), taking the pool's lock."""
        pool = self._pool()
        if self.gone and pool is not None and pool._res.ctl is not None:
            with pool._lock:
                self._unshare_gone(pool)

    def _mapping_gone(self, sid):
        """A shared array's last reference here went: the pool's workers must
        let go of it too. Done now unless the pool is busy; then at its next map."""
        try:
            pool = self._pool()
            if pool is None or pool._res.ctl is None:
                return
            self.gone.append(sid)
            lock = pool._lock
            try:
                owned = lock._is_owned()
            except AttributeError:
                owned = True
            if not owned and lock.acquire(blocking=False):
                try:
                    self._unshare_gone(pool)
                finally:
                    lock.release()
        except Exception:  # interpreter shutdown, a pool being torn down: nothing to give back
            pass

    def _unshare_gone(self, pool):
        """Unshare the arrays that are gone. Pool lock held."""
        gone = self.gone
        if not gone or pool._res.ctl is None:
            return
        while gone:
            seg = pool._res.segs.get(gone.pop())
            if seg is not None:
                try:
                    pool.unshare(seg)
                except OSError:
                    pass

    def pvm_allowed(self):
        """Whether this pool's workers may read the parent's memory with
        process_vm_readv (same user and no ptrace restriction such as Yama's
        ptrace_scope >= 1, no seccomp rule against it). Asked once per pool, by
        one small job; PMAPRT_PVM=0 in the environment turns it off. Where it is
        not allowed, a plain array is copied once into shared memory instead."""
        if self.pvm is not None:
            return self.pvm
        if os.environ.get("PMAPRT_PVM", "1") == "0":
            self.pvm = False
            return False
        self.pvm = False            # the probe's own map must not probe
        canary = os.urandom(64)
        addr, n = buffer_address(canary)
        try:
            v = bool(self._pool().apply(pvm.probe, os.getpid(), addr, n, canary))
        except Exception:
            v = False
        self.pvm = v
        return v


class MappedSegment:
    """Worker side: a segment received from the parent. Its descriptor is
    closed at once; the mapping goes when close() has run and the last view
    of it (an item, a result, the user's reference) is gone."""

    __slots__ = ("id", "size", "mapping", "buf", "_region")

    @property
    def mm(self):
        """The mapping (buffer protocol), as Segment.mm."""
        return self.mapping

    @property
    def region(self):
        """Atomics and futex waits over the segment (collectives use them)."""
        if self._region is None:
            self._region = _shm.Region(self.buf)
        return self._region

    def __init__(self, fd, size, seg_id):
        self._region = None
        try:
            self.mapping = Mapping(fd, size)
        finally:
            os.close(fd)
        self.id = seg_id
        self.size = size
        self.buf = memoryview(self.mapping)
        if seg_id >= SHARED_BASE:
            _worker_seg_of_key[self.mapping.key] = seg_id

    def close(self):
        if self.mapping is None:
            return
        _worker_seg_of_key.pop(self.mapping.key, None)
        if self._region is not None:
            self._region.release()
            self._region = None
        self.buf = None
        self.mapping = None


def received_segment_id(mapping):
    """Worker side: the segment id of the shared array `mapping` maps, or None."""
    return _worker_seg_of_key.get(mapping.key)


class _View:
    __slots__ = ("buf",)

    def __init__(self, mapping):
        self.buf = memoryview(mapping)


def _resolve_lent(seg_id):
    """Parent side: a shared array this process lent, by segment id."""
    m = _parent_maps.get(seg_id)
    if m is None:
        raise RuntimeError("pmaprt: a result refers to shared array segment %d, which no "
                           "longer exists" % seg_id)
    return _View(m)


_resolver = _resolve_lent


def set_resolver(fn):
    """fn(seg_id) -> an object with .buf; workers install theirs."""
    global _resolver
    _resolver = fn


def resolve(seg_id):
    """The segment `seg_id` in this process (an object with .buf)."""
    return _resolver(seg_id)
