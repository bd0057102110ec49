"""The reduction over the collective segment: the ring all-reduce, fusion of
small arrays into buckets, and which dtypes and ops a reduction takes.

    rank r:   local x --> [reduce-scatter: N-1 steps][all-gather: N-1 steps] --> result
              writes into its own slots, reads its left neighbour's (r-1) slots

The data is cut into rounds of N blocks (a block is at most one slot); each
round is a classic ring all-reduce. A rank's messages form one stream over all
rounds and calls: message m goes to slot m % SLOTS of the rank's own area, so
a rank can run SLOTS messages ahead of its right neighbour, and reading,
reducing and writing of successive messages overlap across ranks (the
pipeline). The reduction of block b of a round runs in the fixed order
x[b] + x[b+1] + ... + x[b-1] (ranks mod N), once, on one rank; the all-gather
only copies, so every rank gets the same bits, and every run with the same N
gets the same bits. How a message is sent, received and waited for is the
protocol in segment.py.

Each message carries a stamp (call number and a hash of dtype, op and
length): a rank that calls with a different array than its neighbour gets a
clear error instead of wrong numbers.
"""
import zlib

import numpy as np

from .._errors import CollectiveError
from .segment import L_ACK, L_PUB, MASK, STAMP, RankEndpoint

# Fusion: many small arrays of one dtype are packed into buffers of at most this
# many bytes, each reduced in one pass (Horovod's default threshold).
FUSION_BYTES = 64 * 1024 * 1024

DTYPES = ("float32", "float64", "int32", "int64")
DTYPE_SET = frozenset(np.dtype(d) for d in DTYPES)
OPS = ("sum", "mean", "min", "max")
UFUNC = {"sum": np.add, "mean": np.add, "min": np.minimum, "max": np.maximum}


class RingRank(RankEndpoint):
    """A rank that runs the ring all-reduce over its endpoint's slots."""

    __slots__ = ("views", "hashes")

    def __init__(self, seg, rank):
        super().__init__(seg, rank)
        self.views = {}
        self.hashes = {}

    def leave(self, failed):
        RankEndpoint.leave(self, failed)
        self.views.clear()

    def _slot_views(self, dtype):
        v = self.views.get(dtype)
        if v is None:
            cap = self.slot_bytes // dtype.itemsize
            stride = STAMP + self.slot_bytes
            own = [np.frombuffer(self.mm, dtype, cap, self.own_off + k * stride + STAMP)
                   for k in range(self.slots)]
            left = [np.frombuffer(self.mm, dtype, cap, self.left_off + k * stride + STAMP)
                    for k in range(self.slots)]
            v = self.views[dtype] = (own, left, cap)
        return v

    def reduce(self, src, res, op):
        """res = the reduction of every rank's src (1-D, contiguous, same dtype)."""
        if self.broken is not None:
            raise CollectiveError("pmaprt: an earlier collective failed on this rank (%s); "
                                  "no further collective can run in this map" % self.broken)
        self.calls += 1
        key = (src.dtype.str, op, src.size)
        h = self.hashes.get(key)
        if h is None:
            h = self.hashes[key] = zlib.crc32(("%s|%s|%d" % key).encode()) & MASK
        stamp = ((self.calls & MASK) << 32) | h
        N = self.world
        if N == 1:
            np.copyto(res, src)
            return
        ufunc = UFUNC[op]
        r = self.r
        own, left, cap = self._slot_views(src.dtype)
        K = self.slots
        stride = STAMP + self.slot_bytes
        rank = self.rank
        P = 2 * (N - 1)
        L = src.size
        ack_right = self.rline + L_ACK
        my_pub = self.line + L_PUB
        my_ack = self.line + L_ACK
        if N == 2 and L <= cap:
            # Two ranks, one slot's worth: each publishes its whole array and
            # reduces the other's with its own, rank 0's first. One message per
            # rank instead of the ring's two (latency is Python per message).
            # Every rank computes rank 0's (op) rank 1's, so every rank, and
            # every run with two ranks, gets the same bits.
            m = self.sent
            self._wait(ack_right, m - K + 1, self.rline, "take its part")
            ko = m % K
            np.copyto(own[ko][:L], src)
            r.store64(self.own_off + ko * stride, stamp)
            self.sent = m + 1
            r.store32(my_pub, self.sent & MASK)
            self._ring(self.rline)
            inp = self._recv_view(left, L, stamp, src, op)
            if rank == 0:
                ufunc(src, inp, out=res)
            else:
                ufunc(inp, src, out=res)
            self.recv += 1
            r.store32(my_ack, self.recv & MASK)
            self._ring(self.lline)
            return
        per_round = N * cap
        g0 = 0
        while g0 < L or (g0 == 0 and L == 0):
            Lg = min(per_round, L - g0)
            bounds = [g0 + (k * Lg) // N for k in range(N + 1)]
            for t in range(P + 1):
                b = (rank - t) % N
                lo, hi = bounds[b], bounds[b + 1]
                n = hi - lo
                if t:
                    inp = self._recv_view(left, n, stamp, src, op)
                if t < P:
                    m = self.sent
                    self._wait(ack_right, m - K + 1, self.rline, "take its part")
                    ko = m % K
                    o = own[ko][:n]
                if t == 0:
                    np.copyto(o, src[lo:hi])
                elif t < N - 1:
                    ufunc(inp, src[lo:hi], out=o)
                elif t == N - 1:
                    ufunc(inp, src[lo:hi], out=o)
                    np.copyto(res[lo:hi], o)
                else:
                    np.copyto(res[lo:hi], inp)
                    if t < P:
                        np.copyto(o, inp)
                if t < P:
                    r.store64(self.own_off + ko * stride, stamp)
                    self.sent = m + 1
                    r.store32(my_pub, self.sent & MASK)
                if t:
                    self.recv += 1
                    r.store32(my_ack, self.recv & MASK)
                    if N > 2 or t == P:
                        self._ring(self.lline)
                if t < P:
                    self._ring(self.rline)
            g0 += per_round
            if L == 0:
                break

    def _recv_view(self, left, n, stamp, src, op):
        """Wait for the left neighbour's next message; a view of its n elements."""
        j = self.recv
        self._wait(self.lline + L_PUB, j + 1, self.lline, "publish its part")
        k = j % self.slots
        got = self.r.load64(self.left_off + k * (STAMP + self.slot_bytes))
        if got != stamp:
            raise self._fail(self._mismatch(got, stamp, src, op))
        return left[k][:n]

    def _mismatch(self, got, want, src, op):
        if (got >> 32) != (want >> 32):
            return CollectiveError(
                "pmaprt: rank %d made collective call %d while its left neighbour (rank %d) "
                "was at call %d: every rank must make the same collective calls"
                % (self.rank, want >> 32, (self.rank - 1) % self.world, got >> 32))
        return CollectiveError(
            "pmaprt: collective call %d differs across ranks: rank %d reduces %d elements of "
            "%s with op %r and rank %d does not (dtype, size or op differ)"
            % (want >> 32, self.rank, src.size, src.dtype, op, (self.rank - 1) % self.world))


# --------------------------------------------------------------------------
# trees and fusion


def _flatten(x, leaves):
    """A rebuild function for a list/tuple/dict tree; leaves appended in order
    (dict keys sorted when they can be, so every rank packs them alike)."""
    if isinstance(x, (list, tuple)):
        parts = [_flatten(v, leaves) for v in x]
        kind = type(x)
        if kind is list or kind is tuple:
            return lambda it: kind(p(it) for p in parts)
        return lambda it: kind(*[p(it) for p in parts])  # a namedtuple
    if isinstance(x, dict):
        keys = list(x)
        try:
            order = sorted(keys)
        except TypeError:
            order = keys
        parts = [(k, _flatten(x[k], leaves)) for k in order]

        def rebuild(it):
            vals = {k: p(it) for k, p in parts}
            return {k: vals[k] for k in keys}
        return rebuild
    leaves.append(x)
    return next


def leaf_array(x, i, op):
    """Leaf i of a call as an ndarray of a supported dtype (mean of ints: float64)."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype not in DTYPE_SET:
        raise TypeError("pmaprt.allreduce: leaf %d has dtype %s; supported: %s"
                        % (i, a.dtype, ", ".join(DTYPES)))
    if op == "mean" and a.dtype.kind == "i":
        a = a.astype(np.float64)
    return a


def finish(res, a, op, world):
    """The reduced flat `res` in the shape of leaf `a` (divided for a mean)."""
    if op == "mean":
        np.divide(res, world, out=res)
    return res.reshape(a.shape)


def reduce_tree(ctx, x, op):
    """Reduce a list/tuple/dict tree of arrays and scalars on rank ctx: leaves
    of one dtype fused, in order, into buckets of up to FUSION_BYTES."""
    leaves = []
    rebuild = _flatten(x, leaves)
    arrs = [leaf_array(v, i, op) for i, v in enumerate(leaves)]
    outs = [None] * len(arrs)
    buckets = {}
    order = []
    for i, a in enumerate(arrs):
        if a.nbytes >= FUSION_BYTES or len(arrs) == 1:
            order.append([i])
            continue
        cur = buckets.get(a.dtype)
        if cur is None or cur[1] + a.nbytes > FUSION_BYTES:
            cur = buckets[a.dtype] = [[], 0]
            order.append(cur[0])
        cur[0].append(i)
        cur[1] += a.nbytes
    for idx in order:
        if len(idx) == 1:
            a = arrs[idx[0]]
            src = np.ascontiguousarray(a).reshape(-1)
            res = np.empty(src.size, a.dtype)
            ctx.reduce(src, res, op)
            outs[idx[0]] = finish(res, a, op, ctx.world)
        else:
            src = np.concatenate([arrs[i].reshape(-1) for i in idx])
            res = np.empty_like(src)
            ctx.reduce(src, res, op)
            pos = 0
            for i in idx:
                a = arrs[i]
                outs[i] = finish(res[pos: pos + a.size], a, op, ctx.world)
                pos += a.size
    results = []
    for v, o in zip(leaves, outs):
        results.append(o if isinstance(v, np.ndarray) else o[()])
    return rebuild(iter(results))
