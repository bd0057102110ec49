"""What a pmapped function calls: allreduce, psum, pmean, pmax, pmin,
axis_index, axis_size; the axis context they read; and the parent's check of
an SPMD map's shards (`spmd_inputs`).

    pmap(step, shards, axis_name="batch")      (parent: one collective segment per map)
       rank i = shard i = worker i, all ranks at once; inside step:
       psum(g, "batch") / pmean / allreduce(x, op)

A worker runs shard i through `rank_fn`, which attaches rank i to the map's
segment for the duration of the step; the functions here find that rank in
the axis context and fail clearly outside an SPMD map.
"""
import numpy as np

from .._errors import CollectiveError
from .reduce import (OPS, ReduceRank, check_as_dtype, leaf_array, reduce_array, reduce_flat,
                     reduce_tree)
from .segment import AXIS_MAX

# The rank this worker runs now (set around the step function).
_CTX = None


def rank_fn(fn, seg, rank):
    """fn wrapped to run as rank `rank` of the SPMD map whose segment is seg."""
    def step(*args):
        global _CTX
        ctx = _CTX = ReduceRank(seg, rank)
        failed = True
        try:
            out = fn(*args)
            failed = False
            return out
        finally:
            _CTX = None
            ctx.leave(failed)
    return step


def _current(axis_name, who):
    ctx = _CTX
    if ctx is None:
        raise CollectiveError(
            "pmaprt.%s must be called inside the function of an SPMD map, "
            "pmap(step, shards, axis_name=...), in a worker" % who)
    if axis_name is not None and axis_name != ctx.axis:
        raise NameError("pmaprt.%s: unbound axis name %r (this SPMD map's axis is %r)"
                        % (who, axis_name, ctx.axis))
    return ctx


# --------------------------------------------------------------------------
# parent side: the shards


def check_axis_name(axis_name):
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError("pmaprt: axis_name must be a non-empty str, got %r" % (axis_name,))
    if len(axis_name.encode()) > AXIS_MAX:
        raise ValueError("pmaprt: axis_name is longer than %d bytes" % AXIS_MAX)


def spmd_inputs(iterables, axis_name, nwork):
    """Materialize the shards (one per rank) and check they fit the workers."""
    check_axis_name(axis_name)
    out = []
    for x in iterables:
        if not hasattr(x, "__len__") or not hasattr(x, "__getitem__"):
            x = list(x)
        out.append(x)
    n = min(len(x) for x in out)
    if n > nwork:
        raise ValueError(
            "pmaprt: an SPMD map (axis_name=%r) runs one shard per worker, all at once: "
            "%d shards but only %d workers can run this map; pass at most %d shards or use "
            "a pool with more workers" % (axis_name, n, nwork, nwork))
    return tuple(out), n


# --------------------------------------------------------------------------
# the public API


def allreduce(x, op="sum", *, out=None, as_dtype=None):
    """Reduce x over the ranks of the current SPMD map; every rank gets the result.

    x: an ndarray (float16, bfloat16, float32, float64, int32, int64), a scalar,
    or a list/tuple/dict tree of them; the result has the same structure,
    shapes and dtypes (op="mean" of integers gives float64). ops: sum, mean,
    min, max. Every rank gets the same bits: each element is reduced once, in
    rank order. float16 and bfloat16 (ml_dtypes) accumulate in float32 and
    round once to their type, to nearest even; a mean divides the float32 sum
    first. Integer sums wrap as NumPy's do. Every rank must make the same
    calls with the same shapes. Small arrays of one dtype are fused into
    buffers of up to FUSION_BYTES.
    out: for an ndarray x, a C-contiguous array of the result's shape and dtype to
    write into (it may be x itself: an in-place all-reduce); returned.
    as_dtype: "float16" or "bfloat16": uint16 leaves hold the bits of that
    type (gradients kept as raw 16-bit words); the result is uint16 words too.
    An x that lives in a shared array every worker maps (pmaprt.empty and
    friends, passed to the map) is read in place by the other ranks.
    """
    ctx = _CTX
    if ctx is not None and type(x) is np.ndarray:
        res = reduce_array(ctx, x, out, op, as_dtype)
        if res is not None:
            return res
    check_as_dtype(as_dtype)
    if out is not None:
        return _allreduce_out(x, op, out, as_dtype)
    return _allreduce(x, op, None, "allreduce", as_dtype)


def _allreduce_out(x, op, out, as_dtype):
    if op not in OPS:
        raise ValueError("pmaprt.allreduce: op must be one of %s, got %r" % (", ".join(OPS), op))
    ctx = _current(None, "allreduce")
    if not isinstance(x, np.ndarray) or not isinstance(out, np.ndarray):
        raise TypeError("pmaprt.allreduce: out= needs x and out to be ndarrays")
    a, kind = leaf_array(x, 0, op, as_dtype)
    if out.shape != a.shape or out.dtype != a.dtype or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError("pmaprt.allreduce: out must be a writeable C-contiguous %s array of "
                         "shape %s, got %s %s" % (a.dtype, a.shape, out.dtype, out.shape))
    # 1-D arrays as they are: a new view costs a buffer export of its own
    src = a if a.ndim == 1 and a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
    reduce_flat(ctx, src, out if out.ndim == 1 else out.reshape(-1), kind, op)
    return out


def _allreduce(x, op, axis_name, who, as_dtype=None):
    ctx = _CTX
    if ctx is not None and type(x) is np.ndarray and axis_name == ctx.axis:
        res = reduce_array(ctx, x, None, op, as_dtype)
        if res is not None:
            return res
    check_as_dtype(as_dtype)
    if op not in OPS:
        raise ValueError("pmaprt.%s: op must be one of %s, got %r" % (who, ", ".join(OPS), op))
    ctx = _current(axis_name, who)
    if type(x) is np.ndarray:
        # One array (the common case): what reduce_tree does for a single
        # leaf, without building a tree.
        a, kind = leaf_array(x, 0, op, as_dtype)
        if a.ndim == 1 and a.flags.c_contiguous:
            res = np.empty_like(a)
            reduce_flat(ctx, a, res, kind, op)
            return res
        src = np.ascontiguousarray(a).reshape(-1)
        res = np.empty(src.size, a.dtype)
        reduce_flat(ctx, src, res, kind, op)
        return res.reshape(a.shape)
    return reduce_tree(ctx, x, op, as_dtype)


def psum(x, axis_name, *, as_dtype=None):
    """The sum of x over the ranks of the SPMD map with this axis name."""
    return _allreduce(x, "sum", axis_name, "psum", as_dtype)


def pmean(x, axis_name, *, as_dtype=None):
    """The mean of x over the ranks of the SPMD map with this axis name."""
    return _allreduce(x, "mean", axis_name, "pmean", as_dtype)


def pmax(x, axis_name, *, as_dtype=None):
    return _allreduce(x, "max", axis_name, "pmax", as_dtype)


def pmin(x, axis_name, *, as_dtype=None):
    return _allreduce(x, "min", axis_name, "pmin", as_dtype)


def axis_index(axis_name):
    """This rank's index along the SPMD map's axis (the shard's position)."""
    return _current(axis_name, "axis_index").rank


def axis_size(axis_name):
    """The number of ranks of the SPMD map with this axis name."""
    return _current(axis_name, "axis_size").world
