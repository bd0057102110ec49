"""A function's large captured arrays, shipped once per pool, both sides.

Parent side (`CapturedStore`, one per pool, held as ``pool.arrays.captured``):
when a map pickles its function, every NumPy array of CAPTURE_MIN bytes or
more found in it (closure cells, globals of a function pickled by value,
default arguments, attributes of a callable object, a functools.partial's
arguments, arrays inside dicts or lists of those) is left out of the pickle
and replaced by a reference to a shared segment holding its bytes. Segments
are content-addressed (xxh3_128 of the bytes and their length): the same
bytes reach the same segment from any array object, of any dtype or shape,
and an array changed since the last map hashes to a new one. The pool lends
each segment to its workers once (lent.py's SegmentLent, as for any job
segment); a worker's array is a view of its mapping, not a copy, and is
read-only: a write raises ``ValueError: assignment destination is
read-only``, so no worker can change what the others see.

Every map checks its function's large arrays again: an array that is
writable here can change without notice. Where the kernel tracks writes
(written.py: Linux 6.7's userfaultfd WP_ASYNC and PAGEMAP_SCAN), an array
whose pages were not written since it was last hashed keeps its key with no
hash; else it is hashed again (a few GB/s, on threads: far less than
shipping it).

Lifetime: a segment is pinned by every map whose function refers to it
until that map ends. Unpinned, it stays while an array here last had its
bytes (the next map of the same closure finds it), within CACHE_BYTES of
unpinned segments, least recently used out first. It is freed (SegmentFreed
to every worker, which drops the cached functions that refer to it) when the
last such array is garbage collected, when that array's bytes changed (a
later map hashed it to another segment), or when the cache needs room or
the machine runs short of memory (CACHE_BYTES).

Worker side: `FunctionCache` keeps the functions a worker decoded, by their
bytes, and forgets those that view a captured segment when it is freed
(`segment_freed`), so that its mapping goes.
"""
import collections
import threading
import weakref

import numpy as np
import xxhash

from .. import _memguard, _serialize
from .copy import byte_tasks, run_tasks
from .lent import resolve
from .written import WATCH
from .._threads import run_pieces
from .._options import CORES

# Arrays of at least this many bytes go through a shared segment. Below it,
# pickling the bytes with the function costs less than hashing them, a
# segment of their own and its message to every worker.
CAPTURE_MIN = 1 << 20
# Unpinned segments kept for later maps, in bytes (all pinned ones are kept
# regardless). Past it the least recently used go first; they go too, as
# many as it takes, while the machine's available memory is under the memory
# guard's default floor (_memguard.default_floor(): 5% of the memory, at
# least 256 MiB), checked as each map starts and ends.
CACHE_BYTES = 1 << 30
# Hash pieces: a fixed size, so that a digest does not depend on the number of
# threads; large enough that a piece's digest costs nothing next to its bytes.
HASH_PIECE = 16 << 20


def _flat(a):
    """(a's bytes as a 1-D uint8 array, the strides of `a` over them)."""
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = np.ascontiguousarray(a)
    # ravel("K") of a C- or F-contiguous array is a view in memory order
    return a.ravel(order="K").view(np.uint8), a.strides


def digest(flat):
    """The content key of a 1-D uint8 array: xxh3_128 over fixed pieces,
    hashed on threads (xxhash releases the GIL) above one piece."""
    n = flat.nbytes
    if n <= HASH_PIECE:
        return xxhash.xxh3_128_digest(flat), n
    starts = range(0, n, HASH_PIECE)
    out = [None] * len(starts)

    def piece(i, a):
        out[i] = xxhash.xxh3_128_digest(flat[a: a + HASH_PIECE])

    run_pieces([lambda i=i, a=a: piece(i, a) for i, a in enumerate(starts)],
               min(CORES, len(out), 4))
    return xxhash.xxh3_128_digest(b"".join(out)), n


class _Entry:
    __slots__ = ("seg", "nbytes", "pins", "sources")

    def __init__(self, seg, nbytes):
        self.seg = seg
        self.nbytes = nbytes
        self.pins = 0           # live maps whose function refers to it
        self.sources = {}       # id(array) -> weakref: arrays here whose bytes it last held


class CapturedStore:
    """One pool's captured segments (parent side). Holds the pool weakly.

    Counters for tests and benchmarks: `made` (segments created), `copied`
    (bytes copied into them), `freed` (segments freed), `hashed` (arrays
    hashed), `reused` (arrays found unwritten, their hash kept), `yielded`
    (segments freed because memory ran short)."""

    def __init__(self, pool):
        self._pool = weakref.ref(pool)
        self._lock = threading.RLock()
        self._entries = collections.OrderedDict()   # key -> _Entry, least recently used first
        self._key_of = {}       # id(array) -> (key, weakref, write generation): its last hash
        self._gone = []         # (id, weakref) of arrays collected since, handled at the next turn
        self.made = self.copied = self.freed = 0
        self.hashed = self.reused = self.yielded = 0

    # --- a map's side

    def dumps_fn(self, fn, pins, by_value=False):
        """fn pickled for the workers, its large arrays by reference. The keys
        of the segments it refers to are added to the set `pins` (pinned
        until `unpin(pins)`, when the map ends)."""
        self.collect()
        return _serialize.dumps_fn(fn, capture=lambda obj: self._capture(obj, pins),
                                   by_value=by_value)

    def unpin(self, pins):
        """A map is over: its segments may go (now, if nothing keeps them)."""
        with self._lock:
            for key in pins:
                e = self._entries.get(key)
                if e is not None:
                    e.pins -= 1
                    if not e.pins and not e.sources:
                        self._free(key)
            pins.clear()
            self._trim()
        self.collect()

    def _capture(self, obj, pins):
        if type(obj) is not np.ndarray or obj.nbytes < CAPTURE_MIN or obj.dtype.hasobject:
            return None
        # before the hash: a write racing with it is seen at the next map
        gen = WATCH.generation(obj)
        flat, strides = _flat(obj)
        key = self._unchanged(obj, gen)
        if key is None:
            key = digest(flat)
            self.hashed += 1
        else:
            self.reused += 1
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                e = self._make(key, flat)
            else:
                self._entries.move_to_end(key)
            if key not in pins:
                pins.add(key)
                e.pins += 1
            self._watch(obj, key, e, gen)
            seg_id = e.seg.id
        return _open_captured, (seg_id, obj.dtype, obj.shape, strides)

    def _unchanged(self, obj, gen):
        """obj's key when its memory was not written since it was hashed to
        it and its segment is still here, else None."""
        if gen is None:
            return None
        with self._lock:
            seen = self._key_of.get(id(obj))
            if seen is not None and seen[1]() is obj and seen[2] == gen \
                    and seen[0] in self._entries:
                return seen[0]
        return None

    def _make(self, key, flat):
        pool = self._pool()
        n = flat.nbytes
        self._trim(room=n)
        with pool._lock:
            pool._check_open()
            seg = pool.share(n)
        tasks = []
        run_tasks(tasks, byte_tasks(seg.buf, 0, flat, tasks))
        e = self._entries[key] = _Entry(seg, n)
        self.made += 1
        self.copied += n
        return e

    def _watch(self, obj, key, e, gen):
        """Remember that obj's bytes are e's (as of its write generation gen);
        obj's earlier segment loses it."""
        oid = id(obj)
        seen = self._key_of.get(oid)
        if seen is not None and seen[1]() is obj:
            if seen[0] == key:
                self._key_of[oid] = (key, seen[1], gen)
                return
            old = self._entries.get(seen[0])
            if old is not None:
                old.sources.pop(oid, None)
                if not old.pins and not old.sources:
                    self._free(seen[0])
        ref = weakref.ref(obj, lambda r, oid=oid: self._source_gone(oid, r))
        self._key_of[oid] = (key, ref, gen)
        e.sources[oid] = ref

    # --- freeing

    def _source_gone(self, oid, ref):
        """An array whose bytes a segment holds was garbage collected (any
        thread, any moment): handled now if both locks are free, else at the
        next map's start or end."""
        self._gone.append((oid, ref))
        try:
            pool = self._pool()
            if pool is None or pool._res.ctl is None:
                return
            lock = pool._lock
            if lock._is_owned() or not self._lock.acquire(blocking=False):
                return
            try:
                if lock.acquire(blocking=False):
                    lock.release()
                    self.collect()
            finally:
                self._lock.release()
        except Exception:   # interpreter shutdown, a pool being torn down
            pass

    def collect(self):
        """Free the segments whose last array went."""
        if not self._gone:
            return
        with self._lock:
            while self._gone:
                oid, ref = self._gone.pop()
                seen = self._key_of.get(oid)
                if seen is None or seen[1] is not ref:
                    continue
                del self._key_of[oid]
                e = self._entries.get(seen[0])
                if e is not None:
                    e.sources.pop(oid, None)
                    if not e.pins and not e.sources:
                        self._free(seen[0])

    def _trim(self, room=0):
        """Free unpinned segments, least recently used first, until they and
        `room` more bytes fit in CACHE_BYTES, and while the machine's
        available memory is under the memory guard's floor."""
        self._yield_memory()
        idle = sum(e.nbytes for e in self._entries.values() if not e.pins)
        for key in [k for k, e in self._entries.items() if not e.pins]:
            if idle + room <= CACHE_BYTES:
                return
            idle -= self._entries[key].nbytes
            self._free(key)

    def _yield_memory(self):
        idle = [k for k, e in self._entries.items() if not e.pins]
        if not idle:
            return
        # one reading: a freed segment's memory goes when the workers unmap it,
        # later than a second reading would see
        need = _memguard.default_floor() - _memguard.available_bytes()
        for key in idle:
            if need <= 0:
                return
            need -= self._entries[key].nbytes
            self._free(key)
            self.yielded += 1

    def _free(self, key):
        e = self._entries.pop(key)
        for oid in e.sources:
            self._key_of.pop(oid, None)
        e.sources.clear()
        self.freed += 1
        pool = self._pool()
        if pool is not None and pool._res.ctl is not None:
            with pool._lock:
                pool.unshare(e.seg)
                pool.wake_workers()     # idle workers drop their mapping now

    @property
    def nbytes(self):
        """Bytes held in captured segments now."""
        return sum(e.nbytes for e in self._entries.values())

    def segment_ids(self):
        return [e.seg.id for e in self._entries.values()]


# --- the worker's side

_loading = None     # while loads_fn runs: the segment ids its function refers to


def _open_captured(seg_id, dtype, shape, strides):
    """A worker's read-only view of a captured array (called by unpickling)."""
    if _loading is not None:
        _loading.append(seg_id)
    buf = resolve(seg_id).buf.toreadonly()
    return np.ndarray(shape, dtype, buffer=buf, strides=strides)


# Callbacks told of a captured segment freed in this worker (caches of
# functions kept above this layer: the executor's tasks).
_freed_hooks = []


def on_segment_freed(hook):
    """Call hook(seg_id) whenever this worker is told a segment was freed."""
    _freed_hooks.append(hook)


def segment_freed(seg_id):
    for hook in _freed_hooks:
        hook(seg_id)


def loads_fn(data):
    """(the function, the captured segment ids it refers to)."""
    global _loading
    outer, _loading = _loading, []
    try:
        fn = _serialize.loads_fn(data)
        return fn, _loading
    finally:
        _loading = outer


class FunctionCache:
    """A worker's functions decoded so far, by their pickled bytes (decoded
    once), with the captured segments each one views; a function is dropped
    when one of them is freed. Starts again past `most` functions (a
    long-lived worker may see many lambdas)."""

    def __init__(self, most):
        self.most = most
        self._fns = {}
        self._segs = {}         # fn bytes -> the captured segment ids it views
        on_segment_freed(self.forget)

    def load(self, fn_bytes):
        fn = self._fns.get(fn_bytes)
        if fn is None:
            fn, segs = loads_fn(fn_bytes)
            if len(self._fns) >= self.most:
                self._fns.clear()
                self._segs.clear()
            self._fns[fn_bytes] = fn
            if segs:
                self._segs[fn_bytes] = segs
        return fn

    def forget(self, seg_id):
        """Segment seg_id was freed: drop the functions that view it."""
        for k in [k for k, segs in self._segs.items() if seg_id in segs]:
            del self._segs[k]
            self._fns.pop(k, None)
