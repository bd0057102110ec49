"""The GPU all-reduce entry: one call, and the choice between NCCL and the ring.

- NumPy arrays: the ring of ``ring.py`` over host buffers.
- CuPy arrays, one rank per GPU and NCCL available (``cupy.cuda.nccl``):
  NCCL's own all-reduce, one communicator for the call.
- Otherwise (several ranks sharing a GPU, or no NCCL): the ring over peer
  copies (``ring.CupyLinks``).
- A mean over an integer dtype returns new floating arrays (in place it is
  refused).

CuPy is imported inside the functions that take CuPy arrays.
"""
import numpy as np

from .forkguard import check_not_forked, mark_cuda_used
from .ring import CupyLinks, check_buffers, check_op, ring_allreduce


def allreduce(x, op="sum", inplace=False, method="auto"):
    """All-reduce over ranks: x is a sequence of arrays, one per rank (CuPy arrays on
    one or more GPUs; several ranks may share a GPU). Returns a list with every rank's
    result on that rank's device. op: "sum", "mean", "min" or "max".

    method "auto": NCCL (cupy.cuda.nccl) when each rank has its own GPU and NCCL
    is available, else the ring over peer copies ("ring"). NumPy arrays run the
    same ring on the host.
    """
    check_op(op)
    bufs = list(x)
    check_buffers(bufs)
    if method not in ("auto", "ring", "nccl"):
        raise ValueError("pmaprt: method must be 'auto', 'ring' or 'nccl', not %r" % (method,))
    if isinstance(bufs[0], np.ndarray):
        return _host_allreduce(bufs, op, inplace)
    check_not_forked()
    import cupy as cp

    mark_cuda_used()
    devs = [b.device.id for b in bufs]
    if op == "mean" and bufs[0].dtype.kind not in "fc":
        if inplace:
            raise TypeError("pmaprt: an in-place mean needs a floating dtype, not %s" % bufs[0].dtype)
        out = allreduce(bufs, "sum", False, method)
        res = []
        for o in out:
            with cp.cuda.Device(o.device.id):
                res.append(o / len(bufs))
        return res
    if not inplace:
        copies = []
        for b, d in zip(bufs, devs):
            with cp.cuda.Device(d):
                copies.append(cp.ascontiguousarray(b).copy())
        bufs = copies
    use_nccl = method == "nccl" or (method == "auto" and len(set(devs)) == len(devs) > 1
                                    and nccl_module() is not None)
    if use_nccl:
        _nccl_allreduce(bufs, devs, op)
    else:
        ring_allreduce(bufs, op, xp=cp, links=CupyLinks(devs))
    return bufs


def _host_allreduce(bufs, op, inplace):
    if not inplace:
        if op == "mean" and bufs[0].dtype.kind not in "fc":
            bufs = [b.astype(np.float64) for b in bufs]
        else:
            bufs = [np.array(b, order="C") for b in bufs]
    return ring_allreduce(bufs, op, xp=np)


def nccl_module():
    """cupy.cuda.nccl when it imports and is available, else None."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


def _nccl_allreduce(bufs, devs, op):
    import cupy as cp

    nccl = nccl_module()
    if nccl is None:
        raise RuntimeError("pmaprt: method='nccl' but cupy.cuda.nccl is not available")
    if len(set(devs)) != len(devs):
        raise ValueError("pmaprt: NCCL needs one rank per GPU; ranks share GPUs %s (use method='ring')"
                         % devs)
    types = {np.dtype(k): getattr(nccl, v) for k, v in (
        ("float16", "NCCL_FLOAT16"), ("float32", "NCCL_FLOAT32"), ("float64", "NCCL_FLOAT64"),
        ("int32", "NCCL_INT32"), ("int64", "NCCL_INT64"), ("uint8", "NCCL_UINT8"),
        ("int8", "NCCL_INT8"), ("uint32", "NCCL_UINT32"), ("uint64", "NCCL_UINT64"))
        if hasattr(nccl, v)}
    dt = bufs[0].dtype
    if dt not in types:
        raise TypeError("pmaprt: NCCL has no type for %s" % dt)
    red = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "min": nccl.NCCL_MIN,
           "max": nccl.NCCL_MAX}[op]
    comm = nccl.NcclCommunicator.initAll(len(devs), devs)
    try:
        streams = []
        for d in devs:
            with cp.cuda.Device(d):
                cp.cuda.Device(d).synchronize()
                streams.append(cp.cuda.Stream(non_blocking=True))
        comm.groupStart()
        for r, (b, d) in enumerate(zip(bufs, devs)):
            comm.setCurrentComm(r)
            with cp.cuda.Device(d):
                comm.allReduce(b.data.ptr, b.data.ptr, b.size, types[dt], red, streams[r].ptr)
        comm.groupEnd()
        for b, d, s in zip(bufs, devs, streams):
            with cp.cuda.Device(d):
                s.synchronize()
                if op == "mean":
                    b /= len(bufs)
    finally:
        comm.destroy()
