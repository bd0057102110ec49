"""Ring all-reduce over N ranks' buffers: reduce-scatter, then all-gather.

    step:      0        1      ...  N-2  |  0       ...  N-2
    phase:  reduce-scatter               |  all-gather
    rank r sends segment (r - s) % N     |  rank r sends segment (r + 1 - s) % N
    to rank r+1, which combines it into  |  to rank r+1, which overwrites its copy
    its own copy of that segment         |
    after it: rank r holds segment (r + 1) % N reduced over every rank

Each rank sends 2(N-1) segments of S/N: 2(N-1)/N of the buffer, whatever N
(the bound nccl-tests' busbw = algbw * 2(N-1)/N measures against).

The schedule is array-module agnostic: ``xp`` is numpy or cupy, and a
*links* object moves segments and runs the combine on the receiving rank.

- ``HostLinks`` (numpy): ranks are buffers in one process, a copy is a copy;
  everything is synchronous. It is the reference the tests check against
  numpy's reductions, and it counts the bytes each rank sends.
- ``CupyLinks`` (cupy): one stream per rank on the rank's device; a copy is
  ``cudaMemcpyPeerAsync`` enqueued on the receiver's stream (a device-to-device
  copy when both ranks share a device: the "N logical ranks on one GPU" test).
  Before its step, a receiver's stream waits on the events of its sender (the
  segment is final) and of the rank it sends to (that rank has finished
  reading this rank's memory in the previous step), so no host sync is needed
  between steps.

Which events an operation waits on is decided in one place, ``step_waits``
and ``scale_waits``, called by ``ring_allreduce`` for every links object:
the CuPy links and the tests' race checker and asynchronous stand-in see the
same waits.
"""
import numpy as np

OPS = ("sum", "mean", "min", "max")


def ring_schedule(n):
    """[(phase, step, [(src, dst, segment), ...])] for n ranks; 2(n-1) steps."""
    out = []
    for s in range(n - 1):
        out.append(("reduce", s, [(r, (r + 1) % n, (r - s) % n) for r in range(n)]))
    for s in range(n - 1):
        out.append(("gather", s, [(r, (r + 1) % n, (r + 1 - s) % n) for r in range(n)]))
    return out


def segment_bounds(size, n):
    """n contiguous [lo, hi) spans covering range(size), sizes differing by at most 1
    (empty spans when size < n)."""
    q, rem = divmod(size, n)
    out, lo = [], 0
    for i in range(n):
        hi = lo + q + (1 if i < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


def check_op(op):
    if op not in OPS:
        raise ValueError("pmaprt: all-reduce op must be one of %s, not %r" % (", ".join(OPS), op))


def check_buffers(bufs):
    if len(bufs) == 0:
        raise ValueError("pmaprt: all-reduce needs at least one rank's array")
    b0 = bufs[0]
    for i, b in enumerate(bufs):
        if b.shape != b0.shape or b.dtype != b0.dtype:
            raise ValueError("pmaprt: all-reduce ranks must agree on shape and dtype: rank 0 has "
                             "%s %s, rank %d has %s %s" % (b0.shape, b0.dtype, i, b.shape, b.dtype))


def step_waits(src, dst, n):
    """Ranks whose last recorded event rank dst waits on before its move of a step.

    The sender src: the segment dst reads from it is final (src combined or
    received it in an earlier step). dst's successor: it has finished reading
    dst's own buffer, which this step may overwrite (a write after a read).
    Every stream runs in order and events are recorded after every step, so
    waiting on the latest event covers all earlier steps of that rank.
    """
    return (src, (dst + 1) % n)


def scale_waits(rank, n):
    """Ranks rank waits on before it divides its own buffer (op "mean"): its
    successor, whose last all-gather copy reads this rank's buffer."""
    return ((rank + 1) % n,)


class HostLinks:
    """N ranks as arrays of one array module, copies standing in for peer links."""

    def __init__(self, xp=np):
        self.xp = xp
        self.sent = None          # bytes sent per rank, for the 2(N-1)/N check
        self.copies = 0

    def setup(self, n):
        self.sent = [0] * n

    def empty(self, rank, size, dtype):
        return self.xp.empty(size, dtype)

    def wait(self, rank, on):
        pass

    def copy(self, dst_rank, dst, src_rank, src):
        dst[...] = src
        self.sent[src_rank] += src.nbytes
        self.copies += 1

    def combine(self, rank, ufunc, d, t):
        ufunc(d, t, out=d)

    def scale(self, rank, f, n):
        self.xp.divide(f, n, out=f)

    def step_done(self):
        pass

    def finish(self):
        pass


_COMBINE = {"sum": "add", "mean": "add", "min": "minimum", "max": "maximum"}


def ring_allreduce(bufs, op="sum", xp=np, links=None):
    """Reduce bufs (one C-contiguous array per rank) in place; every rank ends with
    the reduction of all. op "mean" divides the sum by N (floating dtypes only:
    the buffers are reduced in place).

    The links object runs each operation on the stream of the rank named
    first; ``links.wait(rank, ranks)`` orders it after the events the ranks
    recorded at the last ``step_done`` (``step_waits``, ``scale_waits``).
    """
    check_op(op)
    check_buffers(bufs)
    n = len(bufs)
    dtype = bufs[0].dtype
    if op == "mean" and dtype.kind not in "fc":
        raise TypeError("pmaprt: an in-place mean needs a floating dtype, not %s" % (dtype,))
    for r, b in enumerate(bufs):
        if not b.flags.c_contiguous:
            raise ValueError("pmaprt: all-reduce buffers must be C-contiguous (rank %d is not)" % r)
    links = links if links is not None else HostLinks(xp)
    links.setup(n)
    flat = [b.reshape(-1) for b in bufs]
    bounds = segment_bounds(flat[0].size, n)
    maxseg = max(hi - lo for lo, hi in bounds) if n else 0
    combine = getattr(xp, _COMBINE[op])
    tmp = [links.empty(r, maxseg, dtype) for r in range(n)] if n > 1 else []
    for phase, _step, moves in ring_schedule(n):
        for src, dst, seg in moves:
            lo, hi = bounds[seg]
            if hi == lo:
                continue
            links.wait(dst, step_waits(src, dst, n))
            if phase == "reduce":
                t = tmp[dst][:hi - lo]
                links.copy(dst, t, src, flat[src][lo:hi])
                links.combine(dst, combine, flat[dst][lo:hi], t)
            else:
                links.copy(dst, flat[dst][lo:hi], src, flat[src][lo:hi])
        links.step_done()
    if op == "mean" and n > 1:
        for r in range(n):
            links.wait(r, scale_waits(r, n))
            links.scale(r, flat[r], n)
    links.finish()
    return bufs


class CupyLinks:
    """Ranks on CUDA devices (several may share one), one stream and event per rank."""

    def __init__(self, devices):
        import cupy

        self.cp = cupy
        self.devices = list(devices)
        self.streams = []
        for d in self.devices:
            with cupy.cuda.Device(d):
                self.streams.append(cupy.cuda.Stream(non_blocking=True))
        self.events = [None] * len(self.devices)
        self.sent = None

    def setup(self, n):
        self.sent = [0] * n
        self.events = [None] * n
        # The buffers were written on the callers' streams: start after them.
        for r, d in enumerate(self.devices):
            with self.cp.cuda.Device(d):
                self.cp.cuda.Device(d).synchronize()

    def empty(self, rank, size, dtype):
        with self.cp.cuda.Device(self.devices[rank]):
            return self.cp.empty(size, dtype)

    def wait(self, rank, on):
        s = self.streams[rank]
        for r in on:
            ev = self.events[r]
            if ev is not None and r != rank:
                with self.cp.cuda.Device(self.devices[rank]):
                    s.wait_event(ev)

    def copy(self, dst_rank, dst, src_rank, src):
        rt = self.cp.cuda.runtime
        with self.cp.cuda.Device(self.devices[dst_rank]):
            rt.memcpyPeerAsync(dst.data.ptr, self.devices[dst_rank], src.data.ptr,
                               self.devices[src_rank], src.nbytes, self.streams[dst_rank].ptr)
        self.sent[src_rank] += src.nbytes

    def combine(self, rank, ufunc, d, t):
        with self.cp.cuda.Device(self.devices[rank]), self.streams[rank]:
            ufunc(d, t, out=d)

    def scale(self, rank, f, n):
        with self.cp.cuda.Device(self.devices[rank]), self.streams[rank]:
            self.cp.divide(f, n, out=f)

    def step_done(self):
        for r, d in enumerate(self.devices):
            with self.cp.cuda.Device(d):
                self.events[r] = self.streams[r].record()

    def finish(self):
        for r, d in enumerate(self.devices):
            with self.cp.cuda.Device(d):
                self.streams[r].synchronize()
