"""Reading the parent's memory from a worker (process_vm_readv).

Where a pool's workers may read their parent's memory (same user and no ptrace
restriction such as Yama's ptrace_scope >= 1 or a seccomp rule; asked once per
pool by `probe`, see lent.PoolArrays.pvm_allowed; ``PMAPRT_PVM=0`` turns it
off), a plain C-contiguous ndarray input and a large plain buffer inside an
item are not copied by the parent at all: each worker copies the rows of its
chunk straight out of the parent's memory into a buffer of its own
(``_core.vm_read``, the GIL released), reused for the next chunk once fn has
let go of it. The map keeps those arrays alive until the workers are done
with them (jobarrays.JobArrays.keep).
"""
import os
import sys

import numpy as np

from .. import _shm
from .shared import array_address

_core = _shm.core()

class Spares:
    """Worker side: buffers that rows read from the parent went into, reused
    once nothing refers to them any more (fn let go of its items), so that a
    stream of chunks does not fault in fresh pages for every chunk. At most
    SPARES buffers of at most SPARE_MAX bytes each are kept."""

    SPARES = 2
    SPARE_MAX = 16 << 20

    def __init__(self):
        self.bufs = []

    def take(self, nbytes):
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


_spares = Spares()


def read_parent(pid, address, nbytes):
    """Worker side: nbytes at `address` in process `pid`, into a buffer of its own."""
    buf = _spares.take(nbytes)
    if nbytes:
        _core.vm_read(pid, address, buf, 0, nbytes)
    return memoryview(buf)


def probe(pid, address, nbytes, expected):
    """Run in a worker: can it read its parent's memory?"""
    try:
        return bytes(read_parent(pid, address, nbytes)) == expected
    except OSError:
        return False


def pvm_spec(a):
    """What a worker needs to read rows of the C-contiguous array `a` from here."""
    return ("pvm", os.getpid(), array_address(a), a.dtype, a.shape)


def open_pvm(spec):
    """Worker side: get(lo, hi) -> a new array holding rows lo..hi, read from the parent."""
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
