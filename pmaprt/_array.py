"""NumPy arrays through shared memory: shared arrays, out-of-band buffers, out=, chunks=.

Shared arrays
    ``empty/zeros/empty_like/zeros_like/asarray(..., shared=True)`` return a
    plain ``numpy.ndarray`` whose memory is an anonymous memfd mapped with
    ``_core.Mapping``. The mapping owns the memfd; both go when the last
    reference to the memory (the array, any view of it, a worker's view of
    it) goes: the kernel counts the mappings. A shared array, or any view of
    it, reaches workers by handle: a pool sends the memfd once over each
    worker's socket (SCM_RIGHTS) the first time a map uses it; workers keep
    their mapping (and its page tables) for later maps, until the array's
    last reference in the parent goes (a weakref on its mapping), when the
    pool tells them to drop it. Its memory is allocated when it is created
    (MADV_POPULATE_WRITE, or ``posix_fallocate``, after comparing the size
    with the memory available), so running short is a MemoryError then,
    never a SIGBUS later. Nothing is in /dev/shm.

Out-of-band buffers (pickle protocol 5)
    Items and results are pickled with a ``buffer_callback``. A buffer of
    OOB_MIN bytes or more (a large ndarray inside a tuple, a dict, ...) is
    left out of the pickle:

    - parent to workers: a buffer that lies inside a shared array is sent by
      reference (segment, offset); any other is read by the worker straight
      from the parent (see below), or, where that is not allowed, copied
      once into the job's segment, after the pickle, and the worker's array
      is a view of it;
    - workers to parent: a buffer inside a shared array the worker received
      is sent by reference; any other is copied once into a memfd the worker
      creates, whose descriptor goes to the parent over the worker's socket
      (SCM_RIGHTS) before the result's record; the parent maps it, and the
      result arrays are views of that mapping.

    Smaller buffers stay in the pickle. An encoded list with out-of-band
    buffers is a blob::

        HDR (tag, nbuf, body_off, body_len) | nbuf x ENTRY | body | buffers

    tag b"O": buffers are in the blob (kind 0), in a shared segment (kind 1),
    in the result mapping attached to the payload (kind 2) or in the parent's
    memory (kind 3). A result whose
    buffers went into a memfd reaches the parent's ring as b"R" + blob (or
    b"r" + where the blob lies in the memfd, when it is large), so that the
    ring record stays small and the parent knows to take the descriptor from
    the socket.

Plain arrays read by the workers (process_vm_readv)
    Where the pool's workers may read their parent's memory (asked once per
    pool by a one-item probe job; same user and no ptrace restriction such as
    Yama's ptrace_scope >= 1 or a seccomp rule; ``PMAPRT_PVM=0`` turns it
    off), a plain C-contiguous ndarray input, and a large plain buffer inside
    an item (kind 3: pid, address, length), are not copied by the parent at
    all: each worker copies the rows of its chunk straight out of the
    parent's memory into a buffer of its own (``_core.vm_read``, the GIL
    released), reused for the next chunk once fn has let go of it. The map
    keeps the arrays alive until the workers are done with them. Elsewhere
    they are copied once into the job's shared segment, by several threads.

out= and chunks=
    ``pmap(fn, arr, chunks=k)`` maps fn over contiguous blocks ``arr[lo:hi]``
    of k rows (or of the given row counts); ``out=`` makes workers write each
    result into a preallocated array: ``out[i]`` for item i, or
    ``out[lo:hi]`` for a block. See pmap's docstring for what the iterator
    yields then.
"""
import collections.abc
import functools
import os
import pickle
import struct
import sys
import threading
import weakref

from . import _shm

_core = _shm.core()
Mapping = _core.Mapping
memcpy = _core.memcpy
buffer_address = _core.buffer_address

# Buffers of at least this many bytes travel out of band (shared memory).
OOB_MIN = 64 * 1024
# Segment ids of shared arrays: SHARED_BASE + the mapping's key in the
# parent; below it are the pool's own job segments.
SHARED_BASE = 1 << 62
# Copies larger than this are split over threads (memcpy releases the GIL).
PARALLEL_COPY_MIN = 32 << 20
COPY_PIECE = 16 << 20
MAX_COPY_THREADS = 8
ALIGN = 64

TAG_OOB = b"O"
TAG_RESULT = b"R"        # b"R" + blob; the memfd went ahead of the record, on the socket
TAG_RESULT_FAR = b"r"    # b"r" + (offset, length) of the blob inside the memfd

HDR = struct.Struct("<c3xIQQ")        # tag, nbuf, body_off, body_len
ENTRY = struct.Struct("<IIQQQ")       # kind, 0, segment id (kind 3: pid), offset (address), length
FAR = struct.Struct("<QQ")
KIND_BLOB, KIND_SEGMENT, KIND_MAPPING, KIND_PARENT = 0, 1, 2, 3
# A result stub bigger than this puts its blob into the memfd.
RESULT_STUB_MAX = 64 * 1024

try:
    _CORES = len(os.sched_getaffinity(0))
except AttributeError:
    _CORES = os.cpu_count() or 1


def _np():
    import numpy as np
    return np


def _align(n, a=ALIGN):
    return (n + a - 1) // a * a


# --------------------------------------------------------------------------
# shared arrays (user API)
# --------------------------------------------------------------------------


def new_mapping(nbytes, name="pmaprt-array"):
    """A memfd of nbytes (at least 1), mapped here, its pages allocated now
    (_shm.populate); the mapping owns the fd. Running out of memory is a
    MemoryError here, never a SIGBUS at a later write."""
    size = max(int(nbytes), 1)
    _shm.check_room(size)
    fd = _shm.new_memfd(size, name, reserve=False)
    try:
        m = Mapping(fd, size, own_fd=True)
    except BaseException:
        os.close(fd)
        raise
    _shm.populate(m, size, m.fd)
    return m


def empty(shape, dtype=float, order="C", *, shared=True):
    """numpy.empty; with shared=True (the default) the array lives in shared
    memory and reaches pmaprt's workers without a copy. Its memory is
    allocated now: a MemoryError here, never a SIGBUS later. (Fresh shared
    memory reads as zeros.)"""
    np = _np()
    if not shared:
        return np.empty(shape, dtype, order)
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError("pmaprt: a shared array cannot hold Python objects (dtype %s)" % dt)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    count = 1
    for s in shape:
        if s < 0:
            raise ValueError("pmaprt: negative dimensions are not allowed: %r" % (shape,))
        count *= s
    m = new_mapping(count * dt.itemsize)
    return np.ndarray(shape, dt, buffer=m, order=order)


def zeros(shape, dtype=float, order="C", *, shared=True):
    """numpy.zeros in shared memory (shared=True)."""
    if not shared:
        return _np().zeros(shape, dtype, order)
    return empty(shape, dtype, order)   # a new memfd is zero-filled


def empty_like(a, dtype=None, *, shared=True):
    np = _np()
    a = np.asarray(a)
    return empty(a.shape, a.dtype if dtype is None else dtype,
                 "F" if (a.flags.f_contiguous and not a.flags.c_contiguous) else "C", shared=shared)


def zeros_like(a, dtype=None, *, shared=True):
    return empty_like(a, dtype, shared=shared)


def asarray(a, dtype=None, *, shared=True):
    """numpy.asarray; with shared=True the result is a shared array: `a`
    itself when it already is one (and dtype matches), else one copy."""
    np = _np()
    if not shared:
        return np.asarray(a, dtype)
    if isinstance(a, np.ndarray) and is_shared(a) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    src = np.asarray(a, dtype)
    dst = empty_like(src)
    copy_array(dst, src)
    return dst


def is_shared(a):
    """True if `a` (an ndarray or a view of one) lives in a pmaprt shared array."""
    m = find_mapping(a)
    return m is not None and m.fd >= 0


def find_mapping(obj):
    """The _core.Mapping whose memory `obj` (an ndarray, memoryview, ...) views, or None."""
    np = _np()
    for _ in range(64):
        if isinstance(obj, Mapping):
            return obj
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, pickle.PickleBuffer):
            obj = memoryview(obj).obj
        else:
            return None
    return None


def _array_address(a):
    return a.__array_interface__["data"][0]


def shared_spec(a, seg_id, mapping):
    """What a worker needs to rebuild a view of `a` (inside `mapping`)."""
    off = _array_address(a) - mapping.address
    return ("sharr", seg_id, a.dtype, a.shape, a.strides, off)


def open_shared(spec, resolve):
    """The worker's ndarray for a shared_spec; resolve(seg_id) -> segment with .buf."""
    np = _np()
    _, seg_id, dtype, shape, strides, off = spec
    seg = resolve(seg_id)
    return np.ndarray(shape, dtype, buffer=seg.buf, offset=off, strides=strides)


# --------------------------------------------------------------------------
# copies (threads; the GIL is released)
# --------------------------------------------------------------------------


def _run_tasks(tasks, total):
    """Run copy callables; in threads when there are many bytes."""
    nthreads = min(MAX_COPY_THREADS, _CORES, len(tasks), max(1, total // COPY_PIECE))
    if total < PARALLEL_COPY_MIN or nthreads <= 1:
        for t in tasks:
            t()
        return
    lock = threading.Lock()
    it = iter(tasks)
    errors = []

    def run():
        while True:
            with lock:
                t = next(it, None)
            if t is None:
                return
            try:
                t()
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)
                return

    threads = [threading.Thread(target=run, daemon=True) for _ in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def _byte_tasks(dst, off, src, tasks):
    """Tasks that copy the contiguous buffer src into dst at off, in pieces."""
    mv = memoryview(src).cast("B") if not isinstance(src, (bytes, bytearray)) else memoryview(src)
    n = mv.nbytes
    for a in range(0, n, COPY_PIECE):
        piece = mv[a: a + COPY_PIECE]
        tasks.append(lambda piece=piece, o=off + a: memcpy(dst, o, piece))
    return n


def _array_tasks(dst, src, tasks):
    """Tasks that copy ndarray src into ndarray dst (same shape), by row blocks."""
    np = _np()
    if src.ndim == 0 or src.shape[0] <= 1 or src.nbytes <= COPY_PIECE:
        tasks.append(lambda: np.copyto(dst, src, casting="unsafe"))
        return src.nbytes
    rows = max(1, COPY_PIECE // max(1, src.nbytes // src.shape[0]))
    for a in range(0, src.shape[0], rows):
        tasks.append(lambda a=a: np.copyto(dst[a: a + rows], src[a: a + rows], casting="unsafe"))
    return src.nbytes


def copy_array(dst, src):
    """np.copyto(dst, src), in threads for large arrays."""
    tasks = []
    total = _array_tasks(dst, src, tasks)
    _run_tasks(tasks, total)


def write_blobs(buf, blobs):
    """Write each (offset, blob) into the writable buffer `buf`: bytes-like,
    an Encoded, or an ndarray (copied element-wise into place). Large totals
    are copied by several threads."""
    np = _np()
    tasks = []
    total = 0
    for off, blob in blobs:
        if isinstance(blob, Encoded):
            total += blob.tasks(buf, off, tasks)
        elif isinstance(blob, np.ndarray):
            dst = np.frombuffer(buf, dtype=blob.dtype, count=blob.size, offset=off).reshape(blob.shape)
            total += _array_tasks(dst, blob, tasks)
        else:
            total += _byte_tasks(buf, off, blob, tasks)
    _run_tasks(tasks, total)


# --------------------------------------------------------------------------
# out-of-band encoding
# --------------------------------------------------------------------------


class Encoded:
    """A list encoded with its large buffers out of band, not yet written:
    len() is its size; write_blobs() writes it (the one copy of each buffer)."""

    __slots__ = ("head", "inline", "nbytes")

    def __init__(self, head, inline, nbytes):
        self.head = head        # header + entries + body (bytes)
        self.inline = inline    # [(offset in the blob, PickleBuffer)]
        self.nbytes = nbytes

    def __len__(self):
        return self.nbytes

    def tasks(self, buf, off, tasks):
        tasks.append(lambda: memcpy(buf, off, self.head))
        n = len(self.head)
        for boff, pb in self.inline:
            n += _byte_tasks(buf, off + boff, pb.raw(), tasks)
        return n


def has_inline_buffers(data):
    """True for an Encoded that carries buffers to be copied with it."""
    return isinstance(data, Encoded) and bool(data.inline)


def _pickle_oob(items):
    """(tag, body, [PickleBuffer]) with buffers >= OOB_MIN left out of band."""
    bufs = []

    def cb(pb):
        try:
            raw = pb.raw()
        except BufferError:   # not contiguous: in band
            return True
        if raw.nbytes < OOB_MIN:
            return True
        bufs.append(pb)
        return False

    try:
        return b"P", pickle.dumps(items, 5, buffer_callback=cb), bufs
    except Exception as first:
        del bufs[:]
        try:
            from . import _serialize
            return b"C", _serialize._cloudpickle().dumps(items, 5, buffer_callback=cb), bufs
        except Exception:
            raise first


def _blob(entries, body):
    """header + entries + body; the body starts right after the entries."""
    body_off = HDR.size + ENTRY.size * len(entries)
    parts = [HDR.pack(TAG_OOB, len(entries), body_off, len(body))]
    parts += [ENTRY.pack(k, 0, seg, off, n) for k, seg, off, n in entries]
    parts.append(body)
    return b"".join(parts)


class ItemEncoder:
    """Parent side: items with large buffers. jobarrays.share(mapping) ->
    segment id lends a shared array's memfd to the workers; jobarrays.keep(obj)
    keeps a buffer the workers read from this process (use_pvm()) alive."""

    def __init__(self, jobarrays):
        self.share = jobarrays.share
        self.keep = jobarrays.keep
        self.use_pvm = jobarrays.use_pvm
        self.ref_bytes = 0     # bytes the last dumps() referred to outside its blob

    def dumps(self, items):
        self.ref_bytes = 0
        tag, body, bufs = _pickle_oob(items)
        if not bufs:
            return tag + body
        entries, inline = [], []
        pos = HDR.size + ENTRY.size * len(bufs) + len(body)
        for pb in bufs:
            raw = pb.raw()
            n = raw.nbytes
            m = find_mapping(pb)
            if m is not None and m.fd >= 0:
                off = buffer_address(raw)[0] - m.address
                if 0 <= off and off + n <= m.size:
                    entries.append((KIND_SEGMENT, self.share(m), off, n))
                    self.ref_bytes += n
                    continue
            if self.use_pvm():
                # the worker copies it straight from this process's memory
                self.keep(pb)
                entries.append((KIND_PARENT, os.getpid(), buffer_address(raw)[0], n))
                self.ref_bytes += n
                continue
            pos = _align(pos)
            entries.append((KIND_BLOB, 0, pos, n))
            inline.append((pos, pb))
            pos += n
        head = _blob(entries, body)
        if not inline:
            return head          # only references to shared arrays: plain bytes
        return Encoded(head, inline, pos)


# Worker side: mapping key -> segment id of the shared arrays this worker received.
_worker_seg_of_key = {}


class ResultEncoder:
    """Worker side: results with large buffers. A buffer inside a shared
    array goes by reference; the others are copied into one memfd per
    chunk, sent to the parent before the chunk's record."""

    def __init__(self, sock):
        self.sock = sock
        self.moved = 0      # bytes the last chunk's results took (pickle, copied buffers)

    def dumps(self, items):
        tag, body, bufs = _pickle_oob(items)
        self.moved = len(body)  # + the buffers copied below (not those of shared arrays)
        if not bufs:
            return tag + body
        entries, copies = [], []
        size = 0
        for pb in bufs:
            raw = pb.raw()
            n = raw.nbytes
            m = find_mapping(pb)
            sid = _worker_seg_of_key.get(m.key) if m is not None else None
            if sid is not None:
                off = buffer_address(raw)[0] - m.address
                if 0 <= off and off + n <= m.size:
                    entries.append((KIND_SEGMENT, sid, off, n))
                    continue
            entries.append((KIND_MAPPING, 0, size, n))
            copies.append((size, raw))
            self.moved += n
            size = _align(size + n)
        blob = _blob(entries, body)
        if not copies:
            return blob
        far = len(blob) > RESULT_STUB_MAX
        blob_off = size
        if far:
            size = blob_off + len(blob)
        try:
            m = new_mapping(size, "pmaprt-result")
        except MemoryError:
            return _plain_dumps(items)
        try:
            for off, raw in copies:
                memcpy(m, off, raw)
            if far:
                memcpy(m, blob_off, blob)
            _shm.send_msg(self.sock, ("res", size), fds=[m.fd])
        finally:
            del m  # unmapped and closed here; the parent holds its own mapping
        if far:
            return TAG_RESULT_FAR + FAR.pack(blob_off, len(blob))
        return TAG_RESULT + blob


def _plain_dumps(items):
    from . import _serialize
    return _serialize.dumps_list(items)


class ResultPayload:
    """A result payload whose buffers lie in a mapping the worker sent."""

    __slots__ = ("blob", "mapping")

    def __init__(self, blob, mapping):
        self.blob = blob
        self.mapping = mapping


def is_result_stub(payload):
    t = payload[:1]
    return t == TAG_RESULT or t == TAG_RESULT_FAR


def attach_result(payload, sock):
    """Parent, draining a worker's ring: take the memfd that came before this
    record from the worker's socket and map it."""
    msg, fds = _shm.recv_msg(sock)
    if not fds or msg[0] != "res":
        for fd in fds:
            os.close(fd)
        raise RuntimeError("pmaprt: expected a result buffer from the worker, got %r" % (msg,))
    try:
        m = Mapping(fds[0], msg[1], populate=True)  # its pages exist: map them all at once
    finally:
        for fd in fds:
            os.close(fd)
    if payload[:1] == TAG_RESULT_FAR:
        off, n = FAR.unpack_from(payload, 1)
        return ResultPayload(memoryview(m)[off: off + n], m)
    return ResultPayload(memoryview(payload)[1:], m)


# Parent side: segment id -> the shared array's mapping, while it lives.
_parent_maps = weakref.WeakValueDictionary()


def _resolve_parent(seg_id):
    m = _parent_maps.get(seg_id)
    if m is None:
        raise RuntimeError("pmaprt: a result refers to shared array segment %d, which no "
                           "longer exists" % seg_id)
    return _View(m)


class _View:
    __slots__ = ("buf",)

    def __init__(self, mapping):
        self.buf = memoryview(mapping)


_resolver = _resolve_parent


def set_resolver(fn):
    """fn(seg_id) -> an object with .buf; workers install theirs."""
    global _resolver
    _resolver = fn


def load_oob(blob, mapping=None):
    """Decode a b"O" blob (bytes or memoryview); kind-2 buffers lie in `mapping`."""
    mv = memoryview(blob)
    tag, nbuf, body_off, body_len = HDR.unpack_from(mv, 0)
    buffers = []
    mm = None
    for i in range(nbuf):
        kind, _, seg, off, n = ENTRY.unpack_from(mv, HDR.size + i * ENTRY.size)
        if kind == KIND_BLOB:
            buffers.append(mv[off: off + n])
        elif kind == KIND_SEGMENT:
            buffers.append(_resolver(seg).buf[off: off + n])
        elif kind == KIND_PARENT:
            buffers.append(read_parent(seg, off, n))
        else:
            if mm is None:
                mm = memoryview(mapping)
            buffers.append(mm[off: off + n])
    return pickle.loads(mv[body_off: body_off + body_len], buffers=buffers)


# --------------------------------------------------------------------------
# plain arrays read by the workers straight from the parent (process_vm_readv)
# --------------------------------------------------------------------------

# Below this a plain array or buffer is copied into the job's segment instead.
PVM_MIN = OOB_MIN


class _Spares:
    """Worker side: buffers that rows read from the parent went into, reused
    once nothing refers to them any more (fn let go of its items), so that a
    stream of chunks does not fault in fresh pages for every chunk. At most
    SPARES buffers of at most SPARE_MAX bytes each are kept."""

    SPARES = 2
    SPARE_MAX = 16 << 20

    def __init__(self):
        self.bufs = []

    def take(self, nbytes):
        np = _np()
        bufs = self.bufs
        for i in range(len(bufs)):
            b = bufs[i]
            # referenced by the list, `b` and the argument only: free
            if b.nbytes >= nbytes and sys.getrefcount(b) <= 3:
                return b[:nbytes]
        b = np.empty(nbytes, np.uint8)
        if nbytes <= self.SPARE_MAX:
            if len(bufs) >= self.SPARES:
                for i in range(len(bufs)):
                    if sys.getrefcount(bufs[i]) <= 2:
                        del bufs[i]
                        break
            if len(bufs) < self.SPARES:
                bufs.append(b)
        return b[:nbytes] if b.nbytes != nbytes else b


_spares = _Spares()


def read_parent(pid, address, nbytes):
    """Worker side: nbytes at `address` in process `pid`, into a buffer of its own."""
    buf = _spares.take(nbytes)
    if nbytes:
        _core.vm_read(pid, address, buf, 0, nbytes)
    return memoryview(buf)


def _pvm_probe(pid, address, nbytes, expected):
    """Run in a worker: can it read its parent's memory?"""
    try:
        return bytes(read_parent(pid, address, nbytes)) == expected
    except OSError:
        return False


def pvm_allowed(pool):
    """Whether this pool's workers may read the parent's memory with
    process_vm_readv (same user and no ptrace restriction such as Yama's
    ptrace_scope >= 1, no seccomp rule against it). Asked once per pool, by
    one small job; PMAPRT_PVM=0 in the environment turns it off. Where it is
    not allowed, a plain array is copied once into shared memory instead."""
    v = pool.__dict__.get("_pvm")
    if v is not None:
        return v
    if os.environ.get("PMAPRT_PVM", "1") == "0":
        pool.__dict__["_pvm"] = False
        return False
    pool.__dict__["_pvm"] = False            # the probe's own map must not probe
    canary = os.urandom(64)
    addr, n = buffer_address(canary)
    try:
        v = bool(pool.apply(_pvm_probe, os.getpid(), addr, n, canary))
    except Exception:
        v = False
    pool.__dict__["_pvm"] = v
    return v


def pvm_spec(a):
    """What a worker needs to read rows of the C-contiguous array `a` from here."""
    return ("pvm", os.getpid(), _array_address(a), a.dtype, a.shape)


def open_pvm(spec):
    """Worker side: get(lo, hi) -> a new array holding rows lo..hi, read from the parent."""
    np = _np()
    _, pid, address, dtype, shape = spec
    row = np.dtype(dtype).itemsize
    for s in shape[1:]:
        row *= s

    def get(lo, hi):
        n = max(0, hi - lo)
        buf = _spares.take(n * row)
        if n * row:
            _core.vm_read(pid, address + lo * row, buf, 0, n * row)
        return buf.view(dtype).reshape((n,) + tuple(shape[1:]))
    return get


# --------------------------------------------------------------------------
# segments: parent side (a shared array lent to a pool) and worker side
# --------------------------------------------------------------------------


class ArraySeg:
    """A shared array's memfd lent to one pool's workers. Looks like a
    _shm.Segment to the pool (id, fd, size, close). It holds a dup of the
    memfd, not the array: the pool lends it from the first map that uses the
    array until the array's last reference in this process goes (a weakref
    callback on its mapping), so workers keep their mapping, page tables
    included, from one map to the next."""

    __slots__ = ("id", "fd", "size", "watch", "__weakref__")

    def __init__(self, seg_id, mapping, pool):
        self.id = seg_id
        self.fd = os.dup(mapping.fd)
        self.size = mapping.size
        self.watch = weakref.ref(mapping, functools.partial(_mapping_gone, weakref.ref(pool), seg_id))

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.watch = None


def share(pool, mapping):
    """Lend a shared array's memfd to every worker of `pool` (no copy), once:
    later maps find it there. Returns its segment id."""
    sid = SHARED_BASE + mapping.key
    with pool._lock:
        _release_pending(pool)
        segs = pool._res.segs
        if sid not in segs:
            seg = ArraySeg(sid, mapping, pool)
            _parent_maps[sid] = mapping
            pool.lend(seg)
    return sid


def _mapping_gone(poolref, sid, _ref):
    """A shared array's last reference here went: the pool's workers must
    let go of it too. Done now unless the pool is busy; then at its next map."""
    try:
        pool = poolref()
        if pool is None or pool._res.ctl is None:
            return
        pool.__dict__.setdefault("_arrays_gone", []).append(sid)
        lock = pool._lock
        try:
            owned = lock._is_owned()
        except AttributeError:
            owned = True
        if not owned and lock.acquire(blocking=False):
            try:
                _release_pending(pool)
            finally:
                lock.release()
    except Exception:  # interpreter shutdown, a pool being torn down: nothing to give back
        pass


def _release_pending(pool):
    """Unshare the arrays that are gone. Pool lock held."""
    gone = pool.__dict__.get("_arrays_gone")
    if not gone or pool._res.ctl is None:
        return
    while gone:
        seg = pool._res.segs.get(gone.pop())
        if seg is not None:
            try:
                pool.unshare(seg)
            except OSError:
                pass


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
            from ._shm import Region
            self._region = Region(self.buf)
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


# --------------------------------------------------------------------------
# chunks=: blocks of rows
# --------------------------------------------------------------------------


def _block_bounds(n, chunks):
    """The rule for blocks over n rows: ("every", k, n) or ("bounds", (0, b1, ..., n))."""
    np = _np()
    if isinstance(chunks, (bool, str, bytes)):
        raise TypeError("pmaprt: chunks must be a positive int (rows per block) or a sequence "
                        "of block lengths, got %r" % (chunks,))
    if isinstance(chunks, (int, np.integer)):
        k = int(chunks)
        if k < 1:
            raise ValueError("pmaprt: chunks must be >= 1 rows per block, got %d" % k)
        return ("every", k, n)
    try:
        sizes = [int(c) for c in chunks]
    except (TypeError, ValueError):
        raise TypeError("pmaprt: chunks must be a positive int (rows per block) or a sequence "
                        "of block lengths, got %r" % (chunks,)) from None
    if any(c < 0 for c in sizes) or sum(sizes) != n:
        raise ValueError("pmaprt: the block lengths in chunks= must be >= 0 and add up to the "
                         "input's %d rows (they add up to %d)" % (n, sum(sizes)))
    bounds = [0]
    for c in sizes:
        bounds.append(bounds[-1] + c)
    return ("bounds", tuple(bounds))


def rule_len(rule):
    if rule[0] == "every":
        _, k, n = rule
        return (n + k - 1) // k
    return len(rule[1]) - 1


def rule_rows(rule, i):
    """Rows [lo, hi) of block i."""
    if rule[0] == "every":
        _, k, n = rule
        lo = i * k
        return lo, min(lo + k, n)
    b = rule[1]
    return b[i], b[i + 1]


class BlockView(collections.abc.Sequence):
    """The blocks of a sliceable input: item i is base[lo_i:hi_i]."""

    def __init__(self, base, rule):
        self.base = base
        self.rule = rule
        self.n = rule_len(rule)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError("block index out of range")
        lo, hi = rule_rows(self.rule, i)
        return self.base[lo:hi]


_SLICEABLE = (list, tuple, range, str, bytes)


def wrap_chunks(iterables, chunks):
    """The iterables as BlockViews (chunks given) or as they are."""
    if chunks is None:
        return iterables, None
    np = _np()
    n = None
    for i, x in enumerate(iterables):
        if not (isinstance(x, _SLICEABLE) or (isinstance(x, np.ndarray) and x.ndim >= 1)):
            raise TypeError("pmaprt: chunks= needs inputs that can be sliced into blocks "
                            "(ndarray, list, tuple, range); argument %d is a %s"
                            % (i + 2, type(x).__name__))
        if n is None:
            n = len(x)
        elif len(x) != n:
            raise ValueError("pmaprt: with chunks= every input must have the same length "
                             "(%d and %d)" % (n, len(x)))
    rule = _block_bounds(n, chunks)
    return tuple(BlockView(x, rule) for x in iterables), rule


# --------------------------------------------------------------------------
# out=: the parent's checks and the worker's writer
# --------------------------------------------------------------------------


def _describe(a):
    return "shape %s, dtype %s" % (tuple(a.shape), a.dtype)


def check_out(out, n_items, rule):
    """TypeError/ValueError before any work starts when out cannot take the results."""
    np = _np()
    if not isinstance(out, np.ndarray):
        raise TypeError("pmaprt: out= must be a numpy.ndarray (pmaprt.empty(..) makes a shared "
                        "one), got %s" % type(out).__name__)
    if out.ndim < 1:
        raise ValueError("pmaprt: out= must have at least one dimension (one row per item), "
                         "got a 0-d array")
    if out.dtype.hasobject:
        raise TypeError("pmaprt: out= cannot hold Python objects (dtype %s)" % out.dtype)
    if not out.flags.writeable:
        raise ValueError("pmaprt: out= is read-only")
    if n_items is None:
        return
    rows = rule[2] if rule is not None and rule[0] == "every" else \
        (rule[1][-1] if rule is not None else n_items)
    if out.shape[0] != rows:
        what = ("the input has %d rows (in %d blocks)" % (rows, n_items)) if rule is not None \
            else ("the input has %d items" % rows)
        raise ValueError("pmaprt: out= has %d rows (%s) but %s: out.shape[0] must be %d"
                         % (out.shape[0], _describe(out), what, rows))


class OutSink:
    """Worker side: wraps fn; writes fn's result for item `pos` into out and
    returns None. pos is set to the chunk's first index before each chunk."""

    __slots__ = ("fn", "out", "rule", "pos", "row_shape", "ok_dtypes")

    def __init__(self, fn, out, rule):
        self.fn = fn
        self.out = out
        self.rule = rule
        self.pos = 0
        self.row_shape = out.shape[1:]
        self.ok_dtypes = set()

    def __call__(self, *args):
        r = self.fn(*args)
        i = self.pos
        self.pos = i + 1
        self.put(i, r)

    def put(self, i, r):
        np = _np()
        out = self.out
        a = r if isinstance(r, np.ndarray) else np.asarray(r)
        if self.rule is None:
            if i >= out.shape[0]:
                raise IndexError("pmaprt: out= has %d rows (%s) but the input has more items "
                                 "(item %d)" % (out.shape[0], _describe(out), i))
            want = self.row_shape
            lo, hi = i, i + 1
        else:
            lo, hi = rule_rows(self.rule, i)
            want = (hi - lo,) + self.row_shape
        if a.shape != want or (a.dtype not in self.ok_dtypes and not self._castable(a.dtype)):
            where = ("out[%d]" % i) if self.rule is None else ("out[%d:%d]" % (lo, hi))
            raise ValueError(
                "pmaprt: out= cannot take the result of item %d: the function returned %s; "
                "%s needs shape %s and a dtype that casts to %s (same_kind); out has %s"
                % (i, ("an array of " + _describe(a)) if isinstance(r, np.ndarray)
                   else "%s (%s)" % (type(r).__name__, _describe(a)),
                   where, tuple(want), out.dtype, _describe(out)))
        if self.rule is None:
            out[i] = a
        else:
            out[lo:hi] = a

    def _castable(self, dt):
        np = _np()
        if np.can_cast(dt, self.out.dtype, "same_kind"):
            self.ok_dtypes.add(dt)
            return True
        return False


class JobArrays:
    """The array side of one map, parent side: chunks=, out= and the item
    encoder. `segs` is the job's list of segments (unshared when it ends).

    A shared array that items refer to must outlive the items here until a
    worker has taken them (else the pool would tell the workers to drop it
    first): the mappings an encoding referred to are held, for a fed chunk
    until its record arrives (hold/done), otherwise until the map ends
    (release)."""

    def __init__(self, pool, segs, iterables, out, chunks, star):
        self.pool = pool
        self.segs = segs
        self.started = False     # set once the job is posted; its _finish then unshares
        self._fresh = []         # mappings referred to since the last hold()
        self._chunks = {}        # fed chunk's first item -> the mappings it refers to
        self.iterables, self.rule = wrap_chunks(iterables, chunks)
        self.out = None
        self.target = None       # a plain out=: copied back as results are taken
        self.on_take = None
        self._pvm = None
        self.encoder = ItemEncoder(self)
        if out is None:
            return
        n = None
        if all(hasattr(x, "__len__") for x in self.iterables):
            try:
                n = min(len(x) for x in self.iterables)
            except TypeError:
                n = None
        check_out(out, n, self.rule)
        if is_shared(out):
            self.out = out
        else:
            # One extra copy: workers write into a shared twin, the parent
            # copies each chunk into the caller's array as it is taken.
            self.out = empty_like(out)
            self.target = out
            self.on_take = self._copy_back

    def __del__(self):
        # The map's constructor raised after segments were shared: give them back.
        if not self.started and self.segs:
            segs, self.segs[:] = list(self.segs), []
            pool = self.pool
            try:
                if pool._res.ctl is not None:
                    with pool._lock:
                        for seg in segs:
                            pool.unshare(seg)
            except Exception:
                pass

    def share(self, mapping):
        if not self._fresh or self._fresh[-1] is not mapping:
            self._fresh.append(mapping)
        return share(self.pool, mapping)

    def keep(self, obj):
        """Keep obj (a buffer the workers read from this process) as long as a shared array would be."""
        self._fresh.append(obj)

    def use_pvm(self):
        """Whether workers read plain arrays from this process. While the map is
        being planned (before it is posted, outside the pool's lock) the pool
        may be asked; later (a fed chunk, under the lock) only a known answer counts."""
        if self._pvm is None:
            known = self.pool.__dict__.get("_pvm")
            if known is None and self.started:
                return False
            self._pvm = known if known is not None else pvm_allowed(self.pool)
        return self._pvm

    def hold(self, start):
        """The arrays encoded since the last call belong to the fed chunk at `start`."""
        if self._fresh:
            self._chunks.setdefault(start, []).extend(self._fresh)
            self._fresh = []

    def done(self, start):
        """The chunk at `start` came back: its workers have mapped what it refers to."""
        if self._chunks:
            self._chunks.pop(start, None)

    def release(self):
        """The map is over: let go of its shared arrays (an array nobody else
        holds is then unshared and freed)."""
        self._fresh = []
        self._chunks.clear()
        self.out = self.target = None
        pool = self.pool
        if pool.__dict__.get("_arrays_gone") and pool._res.ctl is not None:
            with pool._lock:
                _release_pending(pool)

    def desc_extra(self):
        """What the job's descriptor carries for the workers (a tuple to append)."""
        if self.out is None:
            return ()
        m = find_mapping(self.out)
        sid = self.share(m)
        return ({"out": shared_spec(self.out, sid, m), "rule": self.rule},)

    def _copy_back(self, start, count):
        if count <= 0:
            return
        if self.rule is None:
            lo, hi = start, start + count
        else:
            lo, hi = rule_rows(self.rule, start)[0], rule_rows(self.rule, start + count - 1)[1]
        copy_array(self.target[lo:hi], self.out[lo:hi])


def open_sink(extra, fn, resolve):
    """Worker side: fn, or an OutSink around it when the job has out=."""
    if not extra or extra.get("out") is None:
        return None
    return OutSink(fn, open_shared(extra["out"], resolve), extra.get("rule"))


def local_map(fn, iterables, star, out=None, chunks=None):
    """What pmap does, in this process (a pmap inside a worker)."""
    import itertools
    its, rule = wrap_chunks(iterables, chunks)
    if out is not None:
        n = min(len(x) for x in its) if all(hasattr(x, "__len__") for x in its) else None
        check_out(out, n, rule)
        sink = OutSink(fn, out, rule)
        fn = sink
    if star and len(its) == 1:
        return itertools.starmap(fn, its[0])
    return map(fn, *its)
