"""Shared memory: segments, the control block's layout, result rings, fd passing.

Every segment is an anonymous ``memfd``: it has no name in /dev/shm, so
nothing can be left there, even when every process is killed with SIGKILL.
The control segment is inherited by workers at start; later segments (job
data, large chunks) reach them as file descriptors over their control
socket (SCM_RIGHTS).

Control segment::

    [header 64 B][job slot 0]...[job slot S-1][worker area 0]...[worker area W-1]

header: board_seq (workers sleep on it), board_sleepers, results_seq (the
parent sleeps on it), parent_sleeping, shutdown, active_mask.

job slot: state, refs (workers inside), gen (job id), mode, flags, n (items,
-1 while unknown), limit (index mode: items below it may be claimed; feed
mode: chunks published), next (index mode: next unassigned index; feed mode:
next chunk to claim), cancel, chunk (fixed chunk size or 0), the descriptor's
length and segment, nwork (ranks that take part), then one packed range word
per worker, then the inline descriptor.

worker area: pid, state, the chunk it is running (gen, lo, n: a crash names
it), the result ring's head (parent) and tail (worker), a futex word for
ring space, then the ring.
"""
import array
import mmap
import os
import pickle
import socket
import struct

from . import _core_loader

_core = _core_loader.core()
Region = _core.Region
RANGE_N_MAX = _core.RANGE_N_MAX
RANGE_LO_MAX = _core.RANGE_LO_MAX

MAGIC = 0x706D61707274_0001

# header
H_MAGIC = 0
H_BOARD_SEQ = 16
H_BOARD_SLEEPERS = 20
H_RESULTS_SEQ = 24
H_PARENT_SLEEPING = 28
H_SHUTDOWN = 32
H_ACTIVE_MASK = 40  # 64-bit: bit s set while slot s holds an active job
# 64-bit: rank + 1 of the one worker spinning for the next job after finishing
# work (0: none). A task (one call) posted while it spins needs no wake call.
H_HOT_SPINNER = 48
# Set in H_HOT_SPINNER by the one post that skipped its wake call because of
# it: each hold covers one task, later posts wake a sleeper as usual.
HOT_CLAIMED = 1 << 32
# 64-bit: what a parent asleep for results waits for: (slot + 1) << WANT_SHIFT
# | position, for an ordered map; 0: anything. A worker skips the wake call
# for a plain result record that does not hold that position.
H_PARENT_WANT = 56
WANT_SHIFT = 48
WANT_POS_MASK = (1 << WANT_SHIFT) - 1
HEADER_SIZE = 64

# job slot
S_STATE = 0
S_REFS = 4
S_GEN = 8
S_MODE = 16
S_FLAGS = 20
S_N = 24
S_LIMIT = 32
S_NEXT = 40
S_CANCEL = 48
S_CHUNK = 52
S_DESC_LEN = 56
S_NWORK = 60
S_DESC_SEG = 64
S_DESC_OFF = 72
S_MAX_ITEMS = 80   # recycle a worker after this many items (0: never)
# A task's result (Pool.apply, see _task.py), when it fits the slot's inline
# area: the worker writes it over the descriptor, stores its length, then
# S_TASK_DONE = 1. Larger results and errors go through the result ring, and
# then S_TASK_DONE = 2 (the caller spins on this word first).
S_TASK_DONE = 88
S_TASK_LEN = 96
S_SPMD_SEG = 120   # SPMD maps: the collective segment (FLAG_SPMD set)
S_RANGES = 128
# After the workers' range words: RETRY_RANGES words that no worker owns. The
# parent puts the items of a lost chunk there; workers steal from them first.
RETRY_RANGES = 8

SLOT_FREE, SLOT_ACTIVE, SLOT_CLOSED = 0, 1, 2
MODE_INDEX, MODE_FEED = 1, 2
# One call (Pool.apply): the descriptor is (function bytes, args, kwargs); see _task.py.
MODE_TASK = 3
FLAG_FEED_DONE = 1
FLAG_ON_ERROR_RETURN = 2  # an exception takes its item's place in the results
FLAG_PROGRESS = 4         # workers publish items done per chunk (retries, timeouts)
# SPMD map: shard i is claimed by worker i only (no spans, no stealing).
FLAG_SPMD = 8

# Descriptors up to this size travel inside the slot: a one-item job then
# needs no segment and no socket message at all (the round-trip path).
INLINE_DESC = 32 * 1024

# worker area
W_PID = 0
W_STATE = 4
W_CUR_GEN = 8
W_CUR_LO = 16
W_CUR_N = 24
W_HEAD = 32
W_TAIL = 40
W_SPACE_SEQ = 48
W_SPACE_WAIT = 52
W_CUR_DONE = 56  # items of the current chunk finished (when the job asks for progress)
W_CUR_K = 64     # feed mode: the chunk number claimed, until its items are read (-1: none)
# Odd while the worker moves items between shared words (a claim, a steal, an
# untake): a worker that dies with it odd may have taken items it had not yet
# recorded anywhere, and the parent reconciles its job (see _map/recovery.py).
W_CLAIM = 72
# The job slot (+1) whose S_REFS this worker holds (0: none): a worker killed
# inside a job cannot drop its reference; the parent drops it for it, or the
# slot could never be reused.
W_SLOT = 80
W_RING = 128
WSTATE_STARTING, WSTATE_READY, WSTATE_RECYCLED = 0, 1, 2

# Result ring per worker. Pages are touched only as records are written, so a
# large ring costs nothing until it is used. A record bigger than half the ring
# goes over the worker's socket instead.
RING_SIZE = 4 * 1024 * 1024

# record: total_len, kind, gen, start, count, payload_len, t0, t1 (wall), cpu
# seconds of the items, seconds encoding the results
REC = struct.Struct("<IIQqIIdddd")
REC_RESULT, REC_ERROR, REC_WRAP, REC_BIG = 1, 2, 3, 4
REC_KIND_MASK = 0xFF
REC_STOLEN = 0x100      # the chunk came from a steal
REC_BIG_ERROR = 0x200   # a BIG record whose payload is an error
REC_HAS_ERRORS = 0x400  # on_error="return": some results are returned exceptions
REC_LOCAL = 5           # parent-made: the payload is already a list of results

MAX_SLOTS = 64


def align(n, a=64):
    return (n + a - 1) // a * a


class Layout:
    """Offsets inside the control segment for a pool of `nworkers` and `nslots`."""

    def __init__(self, nworkers, nslots):
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError("nslots must be in 1..%d" % MAX_SLOTS)
        self.nworkers = nworkers
        self.nslots = nslots
        self.retry_off = S_RANGES + 8 * nworkers
        self.desc_off = align(self.retry_off + 8 * RETRY_RANGES)
        self.slot_size = align(self.desc_off + INLINE_DESC, 4096)
        self.slots_off = 4096
        self.workers_off = self.slots_off + nslots * self.slot_size
        self.worker_size = align(W_RING + RING_SIZE, 4096)
        self.size = self.workers_off + nworkers * self.worker_size

    def slot(self, s):
        return self.slots_off + s * self.slot_size

    def worker(self, w):
        return self.workers_off + w * self.worker_size


class Segment:
    """A shared mapping of an anonymous memfd."""

    __slots__ = ("fd", "size", "mm", "region", "buf", "id")

    def __init__(self, size, fd=None, seg_id=0, reserve=False):
        size = max(int(size), 8)
        if fd is None:
            if reserve:
                check_room(size)
            fd = new_memfd(size, "pmaprt", reserve=False)
        self.fd = fd
        self.size = size
        self.id = seg_id
        self.mm = mmap.mmap(fd, size)
        if reserve:
            # the pages are allocated and mapped now: a MemoryError, never a SIGBUS
            try:
                populate(self.mm, size, fd)
            except BaseException:
                self.mm.close()
                os.close(fd)
                raise
        self.region = Region(self.mm)
        self.buf = memoryview(self.mm)

    def close(self):
        if self.mm is None:
            return
        self.region.release()
        self.buf.release()
        try:
            self.mm.close()
        except BufferError:
            # A view of it is still alive somewhere (an array handed to the
            # user); the mapping goes when that view does.
            pass
        os.close(self.fd)
        self.mm = None


# --- memfds: never in /dev/shm, reserved up front

# Below this size a reservation does not first compare itself with the memory
# available (reading /proc costs more than the reservation).
CHECK_ROOM_BYTES = 1 << 20
MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 1)


def _read_int(path):
    try:
        with open(path) as f:
            v = f.read().strip()
    except OSError:
        return None
    if v == "max":
        return None
    try:
        return int(v)
    except ValueError:
        return None


def _memstat(path, keys):
    out = 0
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k in keys:
                    out += int(v)
    except (OSError, ValueError):
        return 0
    return out


def available_memory():
    """(bytes, where): the memory a new reservation can still get, the
    tighter of the machine's MemAvailable and this process's cgroup limit
    (v2 memory.max, v1 memory.limit_in_bytes) less what the cgroup uses
    beyond reclaimable page cache. (None, None) when nothing is known."""
    best, where = None, None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    best, where = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, lim_f, use_f, stat_f = "/sys/fs/cgroup", "memory.max", "memory.current", "memory.stat"
            cache = ("active_file", "inactive_file")
        elif "memory" in parts[1].split(","):
            base, lim_f, use_f, stat_f = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                          "memory.usage_in_bytes", "memory.stat")
            cache = ("total_active_file", "total_inactive_file")
        else:
            continue
        path = parts[2]
        while True:
            d = base + path.rstrip("/")
            limit = _read_int(d + "/" + lim_f)
            if limit is not None and limit < (1 << 60):
                used = _read_int(d + "/" + use_f) or 0
                room = max(0, limit - used) + _memstat(d + "/" + stat_f, cache)
                if best is None or room < best:
                    best, where = room, "the cgroup memory limit (%s/%s = %d bytes)" % (d, lim_f, limit)
            if path in ("", "/"):
                break
            path = path.rsplit("/", 1)[0] or "/"
    return best, where


def _fmt_bytes(n):
    for div, suf in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return "%.1f %s" % (n / div, suf)
    return "%d B" % n


NOT_DEV_SHM = ("pmaprt's shared memory is anonymous memfd memory, not /dev/shm, so the size of "
               "/dev/shm (64 MB in Docker) does not limit it; RAM and the cgroup memory limit do")


def check_room(size):
    """MemoryError now if `size` bytes clearly cannot be had."""
    if size < CHECK_ROOM_BYTES:
        return
    room, where = available_memory()
    if room is not None and size > room:
        raise MemoryError("pmaprt: cannot reserve %s of shared memory: only %s is available (%s). %s."
                          % (_fmt_bytes(size), _fmt_bytes(room), where, NOT_DEV_SHM))


# populate() splits sizes above this over threads (the kernel zeroes pages in each).
POPULATE_PARALLEL = 64 << 20
POPULATE_PIECE = 64 << 20


def populate(buf, size, fd=None):
    """Allocate and map every page of a shared mapping now
    (MADV_POPULATE_WRITE, one pass, several threads for large sizes), so
    that running out of memory is a MemoryError here and never a SIGBUS at a
    later write. Kernels before 5.14 lack it: posix_fallocate on `fd` (or
    on nothing, when no fd is given) instead."""
    import errno
    import threading

    def one(a, n):
        _core.populate(buf, a, n)

    try:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        nth = min(8, cores, size // POPULATE_PIECE) if size >= POPULATE_PARALLEL else 1
        if nth <= 1:
            one(0, size)
        else:
            pieces = [(a, min(POPULATE_PIECE, size - a)) for a in range(0, size, POPULATE_PIECE)]
            errs = []
            lock = threading.Lock()

            def run():
                while True:
                    with lock:
                        if not pieces:
                            return
                        a, n = pieces.pop()
                    try:
                        one(a, n)
                    except OSError as e:
                        errs.append(e)
                        return
            ths = [threading.Thread(target=run, daemon=True) for _ in range(nth)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            if errs:
                raise errs[0]
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS) and fd is not None:
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except OSError as e2:
                e = e2
        elif e.errno in (errno.EINVAL, errno.ENOSYS):
            return
        raise MemoryError("pmaprt: could not allocate %s of shared memory (memfd): %s. %s."
                          % (_fmt_bytes(size), e, NOT_DEV_SHM)) from e


def new_memfd(size, name="pmaprt", reserve=True):
    """An anonymous memfd of `size` bytes. reserve: its pages are allocated
    now (posix_fallocate), so running out of memory is this MemoryError and
    never a SIGBUS at a later write."""
    if reserve:
        check_room(size)
    fd = os.memfd_create(name, MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        if reserve:
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        raise MemoryError("pmaprt: could not reserve %s of shared memory (memfd): %s. %s."
                          % (_fmt_bytes(size), e, NOT_DEV_SHM)) from e
    return fd


# --- socket messages: an 8-byte length, then a pickle; fds ride on the first byte

_LEN = struct.Struct("<Q")


def frame(obj):
    body = pickle.dumps(obj, 5)
    return _LEN.pack(len(body)) + body


def send_nowait(sock, data, fds=()):
    """Send what the socket takes now, without blocking; returns bytes sent
    (the fds go with the first byte). Raises BlockingIOError if nothing fits."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    return sock.sendmsg([data], anc, socket.MSG_DONTWAIT)


def send_msg(sock, obj, fds=()):
    body = pickle.dumps(obj, 5)
    data = _LEN.pack(len(body)) + body
    if fds:
        n = socket.send_fds(sock, [data], list(fds))
        if n < len(data):
            sock.sendall(data[n:])
    else:
        sock.sendall(data)


def recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("pmaprt: control socket closed")
        got += k
    return buf


def recv_msg(sock):
    """(obj, fds) from a peer's send_msg."""
    data, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, 16)
    if not data:
        raise EOFError("pmaprt: control socket closed")
    if len(data) < _LEN.size:
        data = bytes(data) + bytes(recv_exact(sock, _LEN.size - len(data)))
    (n,) = _LEN.unpack(data)
    return pickle.loads(recv_exact(sock, n)), fds


def send_blob(sock, data):
    sock.sendall(_LEN.pack(len(data)))
    sock.sendall(data)


def recv_blob(sock):
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    return recv_exact(sock, n)
