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
S_SPMD_SEG = 120   # SPMD maps: the collective segment (FLAG_SPMD set)
S_RANGES = 128
# After the workers' range words: RETRY_RANGES words that no worker owns. The
# parent puts the items of a lost chunk there; workers steal from them first.
RETRY_RANGES = 8

SLOT_FREE, SLOT_ACTIVE, SLOT_CLOSED = 0, 1, 2
MODE_INDEX, MODE_FEED = 1, 2
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
W_RING = 128
WSTATE_STARTING, WSTATE_READY, WSTATE_RECYCLED = 0, 1, 2

# Result ring per worker. Pages are touched only as records are written, so a
# large ring costs nothing until it is used. A record bigger than half the ring
# goes over the worker's socket instead.
RING_SIZE = 4 * 1024 * 1024

# record: total_len, kind, gen, start, count, payload_len, t0, t1 (wall), cpu seconds
REC = struct.Struct("<IIQqIIddd")
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
            fd = os.memfd_create("pmaprt", getattr(os, "MFD_CLOEXEC", 1))
            try:
                os.ftruncate(fd, size)
                if reserve:
                    # Fail now with ENOSPC rather than with SIGBUS on a later write.
                    os.posix_fallocate(fd, 0, size)
            except OSError as e:
                os.close(fd)
                raise MemoryError(
                    "pmaprt: could not reserve %d bytes of shared memory: %s" % (size, e)) from e
        self.fd = fd
        self.size = size
        self.id = seg_id
        self.mm = mmap.mmap(fd, size)
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
