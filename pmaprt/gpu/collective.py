"""The GPU all-reduce entry: one call, and the choice between NCCL and the ring.

- NumPy arrays: the ring of ``ring.py`` over host buffers.
- CuPy arrays, one rank per GPU, NCCL available (``cupy.cuda.nccl``) and a
  dtype NCCL has: NCCL's own all-reduce, one communicator per rank for the
  call (``NcclCommunicator.initAll``).
- Otherwise (several ranks sharing a GPU, no NCCL, or a dtype NCCL lacks such
  as int16, bool or complex): the ring over peer copies (``ring.CupyLinks``).
- A mean over a non-floating dtype returns new float64 arrays, reduced in
  float64 as on the host (in place it is refused).

Host and device arrays take the same steps (``reduce_ranks``); what differs
is a *ranks* object: where an array lives, how to copy it, and the links and
NCCL module to reduce with. CuPy is imported inside ``CupyRanks``.
"""
import numpy as np

from .forkguard import check_not_forked, mark_cuda_used
from .ring import CupyLinks, HostLinks, check_buffers, check_op, ring_allreduce

METHODS = ("auto", "ring", "nccl")
# numpy dtype -> the name of its cupy.cuda.nccl constant (NCCL has no int16,
# uint16, bool or complex types).
NCCL_TYPE_NAMES = (("float16", "NCCL_FLOAT16"), ("float32", "NCCL_FLOAT32"),
                   ("float64", "NCCL_FLOAT64"), ("int8", "NCCL_INT8"), ("uint8", "NCCL_UINT8"),
                   ("int32", "NCCL_INT32"), ("uint32", "NCCL_UINT32"), ("int64", "NCCL_INT64"),
                   ("uint64", "NCCL_UINT64"))


def allreduce(x, op="sum", inplace=False, method="auto"):
    """All-reduce over ranks: x is a sequence of arrays, one per rank (CuPy arrays on
    one or more GPUs; several ranks may share a GPU). Returns a list with every rank's
    result on that rank's device. op: "sum", "mean", "min" or "max".

    method "auto": NCCL (cupy.cuda.nccl) when each rank has its own GPU, NCCL
    is available and has the dtype, else the ring over peer copies ("ring").
    NumPy arrays run the same ring on the host.
    """
    check_op(op)
    bufs = list(x)
    check_buffers(bufs)
    if method not in METHODS:
        raise ValueError("pmaprt: method must be 'auto', 'ring' or 'nccl', not %r" % (method,))
    host = [isinstance(b, np.ndarray) for b in bufs]
    if any(host) and not all(host):
        raise TypeError("pmaprt: all-reduce ranks mix NumPy and device arrays (rank %d is %s)"
                        % (host.index(not host[0]), "a NumPy array" if host[0] else
                           type(bufs[host.index(not host[0])]).__name__))
    if host[0]:
        return reduce_ranks(bufs, op, inplace, method, HostRanks())
    check_not_forked()
    ranks = CupyRanks()
    mark_cuda_used()
    return reduce_ranks(bufs, op, inplace, method, ranks)


def reduce_ranks(bufs, op, inplace, method, ranks):
    """The all-reduce of allreduce() over a ranks object (HostRanks, CupyRanks, or a
    stand-in of the tests): copy or cast, choose NCCL or the ring, reduce."""
    devs = [ranks.device_of(b) for b in bufs]
    dtype = bufs[0].dtype
    if op == "mean" and dtype.kind not in "fc":
        if inplace:
            raise TypeError("pmaprt: an in-place mean needs a floating dtype, not %s" % dtype)
        # as on the host: sum in float64, never in the input dtype (int8 would wrap)
        bufs = [ranks.copy(b, np.float64, d) for b, d in zip(bufs, devs)]
    elif not inplace:
        bufs = [ranks.copy(b, dtype, d) for b, d in zip(bufs, devs)]
    else:
        for r, b in enumerate(bufs):
            if not b.flags.c_contiguous:
                raise ValueError("pmaprt: an in-place all-reduce needs C-contiguous arrays "
                                 "(rank %d is not)" % r)
    if choose_method(method, devs, bufs[0].dtype, ranks.nccl) == "nccl":
        nccl_allreduce(ranks, ranks.nccl, bufs, devs, op)
    else:
        ring_allreduce(bufs, op, xp=ranks.xp, links=ranks.links(devs))
    return bufs


def nccl_types(nccl):
    """{numpy dtype: NCCL type code} for the types this NCCL module has."""
    return {np.dtype(k): getattr(nccl, v) for k, v in NCCL_TYPE_NAMES if hasattr(nccl, v)}


def choose_method(method, devs, dtype, nccl):
    """'nccl' or 'ring' for ranks on devs (None: host memory) of one dtype.
    nccl: the NCCL module, or None where there is none."""
    if method == "ring":
        return "ring"
    one_per_gpu = None not in devs and len(set(devs)) == len(devs)
    types = nccl_types(nccl) if nccl is not None else {}
    if method == "nccl":
        if None in devs:
            raise ValueError("pmaprt: method='nccl' reduces CuPy arrays on GPUs; these ranks are "
                             "NumPy arrays (use method='ring' or 'auto')")
        if nccl is None:
            raise RuntimeError("pmaprt: method='nccl' but cupy.cuda.nccl is not available "
                               "(pip install nvidia-nccl-cu12)")
        if not one_per_gpu:
            raise ValueError("pmaprt: NCCL needs one rank per GPU; ranks share GPUs %s (use "
                             "method='ring')" % (devs,))
        if dtype not in types:
            raise TypeError("pmaprt: NCCL has no type for %s (use method='ring')" % (dtype,))
        return "nccl"
    return "nccl" if one_per_gpu and len(devs) > 1 and dtype in types else "ring"


def nccl_communicators(nccl, devs):
    """One NCCL communicator per rank, rank i on CUDA device devs[i]: CuPy's
    initAll takes the device list and returns the communicators in its order."""
    return nccl.NcclCommunicator.initAll(list(devs))


def nccl_allreduce(ranks, nccl, bufs, devs, op):
    """In place, one all-reduce per rank in one NCCL group (a single thread drives
    every device: the group makes NCCL launch them together instead of blocking
    on the first). A mean divides on each rank's stream after its all-reduce."""
    code = nccl_types(nccl)[bufs[0].dtype]
    red = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "min": nccl.NCCL_MIN,
           "max": nccl.NCCL_MAX}[op]
    streams = []
    for d in devs:
        with ranks.device(d):
            ranks.synchronize_device(d)         # the buffers were written on the callers' streams
            streams.append(ranks.stream())
    comms = nccl_communicators(nccl, devs)
    done = False
    try:
        nccl.groupStart()
        try:
            for comm, b, d, s in zip(comms, bufs, devs, streams):
                with ranks.device(d):
                    comm.allReduce(ranks.ptr(b), ranks.ptr(b), b.size, code, red, s.ptr)
        finally:
            nccl.groupEnd()
        for b, d, s in zip(bufs, devs, streams):
            with ranks.device(d):
                if op == "mean":
                    ranks.scale(b, len(bufs), s)
                s.synchronize()
        done = True
    finally:
        for c in comms:
            if done:
                c.destroy()
            else:           # a failed group may have left work queued that would never end
                c.abort()


class HostRanks:
    """Ranks as NumPy arrays of this process."""
    xp = np
    nccl = None

    def device_of(self, b):
        return None

    def copy(self, b, dtype, dev):
        return np.array(b, dtype=dtype, order="C")

    def links(self, devs):
        return HostLinks(np)


class CupyRanks:
    """Ranks as CuPy arrays on their devices; NCCL where cupy.cuda.nccl loads."""

    def __init__(self):
        import cupy

        self.cp = self.xp = cupy
        self.nccl = nccl_module()

    def device_of(self, b):
        if not isinstance(b, self.cp.ndarray):
            raise TypeError("pmaprt: GPU all-reduce ranks must be CuPy arrays, not %s"
                            % type(b).__name__)
        return b.device.id

    def copy(self, b, dtype, dev):
        with self.cp.cuda.Device(dev):
            return self.cp.array(b, dtype=dtype, order="C")

    def links(self, devs):
        return CupyLinks(devs)

    def device(self, d):
        return self.cp.cuda.Device(d)

    def synchronize_device(self, d):
        self.cp.cuda.Device(d).synchronize()

    def stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def ptr(self, b):
        return b.data.ptr

    def scale(self, b, n, stream):
        with stream:
            self.cp.divide(b, n, out=b)


def nccl_module():
    """cupy.cuda.nccl when it imports and is available, else None."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None
