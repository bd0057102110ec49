"""Collectives: a ring all-reduce over shared memory, for SPMD maps.

    pmap(step, shards, axis_name="batch")      (parent: one collective segment per map)
       rank i = shard i = worker i, all ranks at once; inside step:
       psum(g, "batch") / pmean / allreduce(x, op)

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
gets the same bits.

Synchronization (no barriers): each rank has `pub` (messages it published),
`ack` (messages of its left neighbour it consumed) and a doorbell word `bell`
with a sleeper flag. A rank that publishes rings its right neighbour's bell; a
rank that consumes rings its left neighbour's. A waiter reads its bell, checks
its condition, spins briefly (wait32 with a zero timeout), then sets its
sleeper flag and sleeps on the bell (futex); a ringer issues FUTEX_WAKE only
when that flag is set. All atomics are sequentially consistent.

Failure: an `abort` word in the segment header. A rank whose step raises sets
it and rings every bell; the parent sets it when a rank's worker dies or the
map fails or is dropped. Every wait checks it, and also whether the neighbour
it waits on has already returned from its step (a mismatched number of
collective calls), so nothing hangs. Each message carries a stamp (call number
and a hash of dtype, op and length): a rank that calls with a different array
than its neighbour gets a clear error instead of wrong numbers.

Segment layout::

    [header 512 B][rank lines: 64 B each][pad to 4096]
    [rank 0: SLOTS x (64 B stamp + SLOT_BYTES)] ... [rank N-1: ...]
"""
import os
import zlib

import numpy as np

# Bytes per message slot. A block of a round is at most one slot: smaller slots
# pipeline more finely but cost more messages (about 10 us of Python each).
SLOT_BYTES = 256 * 1024
# Slots per rank: how far a rank may run ahead of its right neighbour (>= 2).
SLOTS = 4
# Fusion: many small arrays of one dtype are packed into buffers of at most this
# many bytes, each reduced in one pass (Horovod's default threshold).
FUSION_BYTES = 64 * 1024 * 1024
# Spin before a futex sleep, only when every rank can have a core of its own:
# a neighbour that answers within this costs no system call.
try:
    _CORES = len(os.sched_getaffinity(0))
except AttributeError:
    _CORES = os.cpu_count() or 1
SPIN_NS = 100_000
# A sleeping rank wakes this often to look at its parent (the rest wakes it).
WAIT_SLICE_S = 1.0

MAGIC = 0x706D61707274_C011
H_MAGIC = 0
H_WORLD = 8
H_ABORT = 12       # 0, or the failing rank + 1 (the parent uses world + 1 for "map over")
H_SLOTS = 16
H_SLOT_BYTES = 24
H_AXIS_LEN = 32
H_AXIS = 64        # axis name, utf-8, up to 256 bytes
AXIS_MAX = 256
LINES = 512
LINE = 64
L_PUB, L_ACK, L_BELL, L_SLEEP, L_DONE = 0, 4, 8, 12, 16
STAMP = 64

_MASK = 0xFFFFFFFF
_HALF = 0x80000000

DTYPES = ("float32", "float64", "int32", "int64")
_DTYPE_SET = frozenset(np.dtype(d) for d in DTYPES)
OPS = ("sum", "mean", "min", "max")
_UFUNC = {"sum": np.add, "mean": np.add, "min": np.minimum, "max": np.maximum}


class CollectiveError(RuntimeError):
    """A collective call failed: mismatched calls across ranks, a call outside an
    SPMD map, or a rank that left early."""


class CollectiveAbortedError(CollectiveError):
    """Another rank of the SPMD map failed (raised, died) while this rank waited."""


def segment_size(world):
    return _data_off(world) + world * SLOTS * (STAMP + SLOT_BYTES)


def _data_off(world):
    return (LINES + world * LINE + 4095) // 4096 * 4096


# --------------------------------------------------------------------------
# parent side


class SpmdParent:
    """The parent's handle on one SPMD map's collective segment."""

    def __init__(self, pool, world, axis_name):
        self.world = world
        self.axis_name = axis_name
        self.seg = pool.share(segment_size(world), reserve=False)
        r = self.seg.region
        r.store32(H_WORLD, world)
        r.store32(H_SLOTS, SLOTS)
        r.store64(H_SLOT_BYTES, SLOT_BYTES)
        name = axis_name.encode()
        r.store32(H_AXIS_LEN, len(name))
        self.seg.buf[H_AXIS: H_AXIS + len(name)] = name
        r.store64(H_MAGIC, MAGIC)
        self.delivered = set()
        self.root = None            # the first failure: what the map raises
        self.secondary = []         # ranks that failed only because another did

    def abort(self, culprit):
        """Make every rank's waits fail now. culprit: a rank, or None."""
        if self.seg.mm is None:
            return
        r = self.seg.region
        if not r.load32(H_ABORT):
            r.store32(H_ABORT, (culprit + 1) if culprit is not None else self.world + 1)
        ring_all(r, self.world)

    def complete(self):
        return len(self.delivered) >= self.world


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


def ring_all(r, world):
    base = LINES
    for q in range(world):
        off = base + q * LINE
        r.add32(off + L_BELL, 1)
        r.wake32(off + L_BELL, 1)


# --------------------------------------------------------------------------
# rank side (in a worker)

# The rank this worker runs now (set around the step function).
_CTX = None


class _Rank:
    __slots__ = ("seg", "r", "mm", "rank", "world", "axis", "slots", "slot_bytes", "sent",
                 "recv", "calls", "views", "own_off", "left_off", "line", "lline", "rline",
                 "spin", "broken", "hashes")

    def __init__(self, seg, rank):
        r = seg.region
        if r.load64(H_MAGIC) != MAGIC:
            raise CollectiveError(
                "pmaprt: the collective segment of this SPMD map is not initialized")
        self.seg, self.r, self.mm = seg, r, seg.mm
        self.rank = rank
        self.world = w = r.load32(H_WORLD)
        n = r.load32(H_AXIS_LEN)
        self.axis = bytes(seg.buf[H_AXIS: H_AXIS + n]).decode()
        self.slots = r.load32(H_SLOTS)
        self.slot_bytes = r.load64(H_SLOT_BYTES)
        self.sent = self.recv = self.calls = 0
        self.views = {}
        self.hashes = {}
        stride = self.slots * (STAMP + self.slot_bytes)
        self.own_off = _data_off(w) + rank * stride
        self.left_off = _data_off(w) + ((rank - 1) % w) * stride
        self.line = LINES + rank * LINE
        self.lline = LINES + ((rank - 1) % w) * LINE
        self.rline = LINES + ((rank + 1) % w) * LINE
        self.spin = SPIN_NS if w <= _CORES else 0
        self.broken = None

    # --- sync

    def _ring(self, line):
        r = self.r
        r.add32(line + L_BELL, 1)
        if r.load32(line + L_SLEEP):
            r.wake32(line + L_BELL, 1)

    def _wait(self, off, target, peer_line, what):
        """Wait until the counter at `off` reaches `target` (mod 2**32)."""
        r = self.r
        if ((r.load32(off) - target) & _MASK) < _HALF:
            return
        bell = self.line + L_BELL
        sleep = self.line + L_SLEEP
        spun = False
        while True:
            b = r.load32(bell)
            if ((r.load32(off) - target) & _MASK) < _HALF:
                return
            a = r.load32(H_ABORT)
            if a:
                raise self._aborted(a)
            if r.load32(peer_line + L_DONE):
                if ((r.load32(off) - target) & _MASK) < _HALF:
                    return
                peer = (peer_line - LINES) // LINE
                raise self._fail(CollectiveError(
                    "pmaprt: rank %d of axis %r returned from its step while rank %d waited for "
                    "it to %s (collective call %d of this rank): every rank must make the same "
                    "collective calls, in the same order, with arrays of the same size"
                    % (peer, self.axis, self.rank, what, self.calls)))
            if not spun and self.spin:
                spun = True
                r.wait32(bell, b, 0.0, self.spin)
                continue
            r.store32(sleep, 1)
            r.wait32(bell, b, WAIT_SLICE_S, 0)
            r.store32(sleep, 0)

    def _aborted(self, a):
        if a == self.world + 1:
            msg = "pmaprt: the SPMD map (axis %r) was stopped while rank %d was in a collective" \
                  % (self.axis, self.rank)
        else:
            msg = "pmaprt: rank %d of axis %r failed, so the collective on rank %d was aborted" \
                  % (a - 1, self.axis, self.rank)
        err = CollectiveAbortedError(msg)
        self.broken = err
        return err

    def _fail(self, err):
        """This rank cannot go on: stop every rank now."""
        self.broken = err
        r = self.r
        if not r.load32(H_ABORT):
            r.store32(H_ABORT, self.rank + 1)
        ring_all(r, self.world)
        return err

    def leave(self, failed):
        r = self.r
        if failed and not r.load32(H_ABORT):
            r.store32(H_ABORT, self.rank + 1)
            ring_all(r, self.world)
        r.store32(self.line + L_DONE, 1)
        self._ring(self.lline)
        self._ring(self.rline)
        self.views.clear()

    # --- the ring

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
            h = self.hashes[key] = zlib.crc32(("%s|%s|%d" % key).encode()) & _MASK
        stamp = ((self.calls & _MASK) << 32) | h
        N = self.world
        if N == 1:
            np.copyto(res, src)
            return
        ufunc = _UFUNC[op]
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
            r.store32(my_pub, self.sent & _MASK)
            self._ring(self.rline)
            inp = self._recv_view(left, L, stamp, src, op)
            if rank == 0:
                ufunc(src, inp, out=res)
            else:
                ufunc(inp, src, out=res)
            self.recv += 1
            r.store32(my_ack, self.recv & _MASK)
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
                    r.store32(my_pub, self.sent & _MASK)
                if t:
                    self.recv += 1
                    r.store32(my_ack, self.recv & _MASK)
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


def rank_fn(fn, seg, rank):
    """fn wrapped to run as rank `rank` of the SPMD map whose segment is seg."""
    def step(*args):
        global _CTX
        ctx = _CTX = _Rank(seg, rank)
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
# the public API


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


def _leaf(x, i, op):
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype not in _DTYPE_SET:
        raise TypeError("pmaprt.allreduce: leaf %d has dtype %s; supported: %s"
                        % (i, a.dtype, ", ".join(DTYPES)))
    if op == "mean" and a.dtype.kind == "i":
        a = a.astype(np.float64)
    return a


def allreduce(x, op="sum", *, out=None):
    """Reduce x over the ranks of the current SPMD map; every rank gets the result.

    x: an ndarray (float32, float64, int32, int64), a scalar, or a list/tuple/dict
    tree of them; the result has the same structure, shapes and dtypes (op="mean"
    of integers gives float64). ops: sum, mean, min, max. Integer sums wrap as
    NumPy's do. Every rank must make the same calls with the same shapes.
    Small arrays of one dtype are fused into buffers of up to FUSION_BYTES.
    out: for an ndarray x, a C-contiguous array of the result's shape and dtype to
    write into (it may be x itself: an in-place all-reduce); returned.
    """
    if out is not None:
        return _allreduce_out(x, op, out)
    return _allreduce(x, op, None, "allreduce")


def _allreduce_out(x, op, out):
    if op not in OPS:
        raise ValueError("pmaprt.allreduce: op must be one of %s, got %r" % (", ".join(OPS), op))
    ctx = _current(None, "allreduce")
    if not isinstance(x, np.ndarray) or not isinstance(out, np.ndarray):
        raise TypeError("pmaprt.allreduce: out= needs x and out to be ndarrays")
    a = _leaf(x, 0, op)
    if out.shape != a.shape or out.dtype != a.dtype or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError("pmaprt.allreduce: out must be a writeable C-contiguous %s array of "
                         "shape %s, got %s %s" % (a.dtype, a.shape, out.dtype, out.shape))
    res = out.reshape(-1)
    ctx.reduce(np.ascontiguousarray(a).reshape(-1), res, op)
    _finish(res, a, op, ctx.world)
    return out


def _allreduce(x, op, axis_name, who):
    if op not in OPS:
        raise ValueError("pmaprt.%s: op must be one of %s, got %r" % (who, ", ".join(OPS), op))
    ctx = _current(axis_name, who)
    if type(x) is np.ndarray:
        # One array (the common case): what the general path below does for a
        # single leaf, without building a tree (a tenth of a 4 KB call).
        a = _leaf(x, 0, op)
        src = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
        res = np.empty(src.size, a.dtype)
        ctx.reduce(src, res, op)
        return _finish(res, a, op, ctx.world)
    leaves = []
    rebuild = _flatten(x, leaves)
    arrs = [_leaf(v, i, op) for i, v in enumerate(leaves)]
    outs = [None] * len(arrs)
    # Fusion buckets: leaves of one dtype, in order, up to FUSION_BYTES per bucket.
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
            outs[idx[0]] = _finish(res, a, op, ctx.world)
        else:
            src = np.concatenate([arrs[i].reshape(-1) for i in idx])
            res = np.empty_like(src)
            ctx.reduce(src, res, op)
            pos = 0
            for i in idx:
                a = arrs[i]
                outs[i] = _finish(res[pos: pos + a.size], a, op, ctx.world)
                pos += a.size
    results = []
    for v, o in zip(leaves, outs):
        results.append(o if isinstance(v, np.ndarray) else o[()])
    return rebuild(iter(results))


def _finish(res, a, op, world):
    if op == "mean":
        np.divide(res, world, out=res)
    return res.reshape(a.shape)


def psum(x, axis_name):
    """The sum of x over the ranks of the SPMD map with this axis name."""
    return _allreduce(x, "sum", axis_name, "psum")


def pmean(x, axis_name):
    """The mean of x over the ranks of the SPMD map with this axis name."""
    return _allreduce(x, "mean", axis_name, "pmean")


def pmax(x, axis_name):
    return _allreduce(x, "max", axis_name, "pmax")


def pmin(x, axis_name):
    return _allreduce(x, "min", axis_name, "pmin")


def axis_index(axis_name):
    """This rank's index along the SPMD map's axis (the shard's position)."""
    return _current(axis_name, "axis_index").rank


def axis_size(axis_name):
    """The number of ranks of the SPMD map with this axis name."""
    return _current(axis_name, "axis_size").world
