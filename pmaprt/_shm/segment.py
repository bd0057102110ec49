"""Shared memory segments: anonymous memfds, reserved up front.

Every segment is an anonymous ``memfd``: it has no name in /dev/shm, so
nothing can be left there, even when every process is killed with SIGKILL.
The control segment is inherited by workers at start; later segments (job
data, large chunks) reach them as file descriptors over their control
socket (see _runtime/lent.py). A reservation's pages are allocated when it
is made, so running out of memory is a MemoryError there, never a SIGBUS
at a later write.
"""
import errno
import mmap
import os
import functools

from .._options import default_workers
from .._threads import run_pieces
from .loader import core

_core = core()
Region = _core.Region


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
    def one(a, n):
        _core.populate(buf, a, n)

    try:
        nth = min(8, default_workers(), size // POPULATE_PIECE) if size >= POPULATE_PARALLEL else 1
        pieces = [(a, min(POPULATE_PIECE, size - a)) for a in range(0, size, POPULATE_PIECE)] \
            if nth > 1 else [(0, size)]
        run_pieces([functools.partial(one, a, n) for a, n in pieces], nth)
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
