"""The all-reduce over the collective segment: its two algorithms, which
dtypes and ops it takes, and fusion of small arrays into buckets.

    rank r, round m (a slot's worth of every rank's input):
      stage:   x_r[round] --copy--> r's stage slot      (or left where it is, below)
      direct:  res[round] = x_0 op x_1 op ... op x_{N-1}   read from every stage slot
      split:   r's red slot = slice r of that              read from every stage slot
               res[round] = every rank's red slot          (reduce-scatter, all-gather)

Both algorithms read every rank's buffer directly (one pass) rather than
passing pieces around a ring: the shared memory allows it, and a ring moves
each byte 2(N-1) times in as many synchronised steps. `direct` has one
synchronisation per round and each rank reads N stage slots; `split` has two,
each rank reads 2 rounds' worth, and a rank does not stage the slice it
reduces itself (it reads it from its own input). `direct` is used for small
calls (SMALL_BYTES, DIRECT_BYTES) and, with two ranks, for calls of more
than C_ROUNDS rounds; `split` for the rest. A call of one round (at most a
slot) runs as one C call (`_round`: one_round in csrc/collective.c), either
algorithm, and with two ranks so does each round of a call of up to C_ROUNDS;
bench/RESULTS.md has the measurements. Longer calls run one round deep: a rank stages round m + 1 before it reduces round m, and (split)
gathers round m - 1 after it has published its slice of round m, so that a
rank a little behind delays the others less.

Where the input is a shared array every rank maps (`pmaprt.empty` and
friends, lent to the pool's workers), the others read it in place: the stage
slot's head names its segment and offset, and nothing is copied in. Its rank
returns only after every rank has read it. In `split` it writes its result
only after every rank published its slice of that round (its RED), so
`out=x` (in place) is safe; in `direct` an `out` that overlaps the input is
staged as usual. (An `out` must not overlap another rank's input.)

Every element is reduced once, by one rank, in the fixed order
x_0 op x_1 op ... op x_{N-1} (pmaprt._core.reduce_into): every rank gets the
same bits, and every run with the same N does, whatever the algorithm or the
cut into rounds. float16 and bfloat16 accumulate in float32 and round once,
to nearest even (a mean divides the float32 sum by N first).

Each stage slot carries a stamp (call number and a hash of dtype, op and
length): a rank that calls with a different array than the others gets a
clear error instead of wrong numbers. The waits and rings are segment.py's.
"""
import zlib

import numpy as np

from .. import _arrays, _shm
from .._errors import CollectiveError
from .segment import (HALF, HD_SRC_OFF, HD_SRC_SEG, HD_STAMP, HEAD, L_FREE, L_PUB, L_RED,
                      MASK, RankEndpoint)

_core = _shm.core()
reduce_into = _core.reduce_into
memcpy = _core.memcpy
one_round = _core.one_round
ROUND_WAIT_FREE, ROUND_MISMATCH = _core.ROUND_WAIT_FREE, _core.ROUND_MISMATCH
ROUND_WAIT_PUB, ROUND_WAIT_RED = _core.ROUND_WAIT_PUB, _core.ROUND_WAIT_RED
ROUND_MAX_RANKS = _core.ROUND_MAX_RANKS

# Fusion: many small arrays of one dtype are packed into buffers of at most this
# many bytes, each reduced in one pass (Horovod's default threshold).
FUSION_BYTES = 64 * 1024 * 1024
# Calls of at most this many bytes per rank, times the ranks, use `direct`
# (one synchronisation per round) at any N; so do calls of more than one
# round with up to DIRECT_RANKS ranks (with two, each rank reads 2 rounds'
# worth in `direct` as in `split`, and the Python pipeline of `split` costs
# more than it saves) past C_ROUNDS rounds. A call of up to C_ROUNDS rounds
# takes `split` in C there, round after round: each rank copies in and reduces
# half as much (bench/RESULTS.md).
DIRECT_BYTES = 256 * 1024
DIRECT_RANKS = 2
C_ROUNDS = 4
# Calls of at most this many bytes per rank always take `direct`, staged, in
# one round (`_round`): below it, reading a shared input in place saves less
# than checking for one costs. At most the smallest slot. Larger calls that
# fit in one slot, staged and `direct`, take `_round` too.
SMALL_BYTES = 64 * 1024

# Stamp hashes remembered per (kind, op, divisor, length): calls of ever new
# lengths must not grow it without bound.
HASHES_KEPT = 1024

OPS = ("sum", "mean", "min", "max")
OP_CODE = {"sum": _core.REDUCE_SUM, "mean": _core.REDUCE_SUM, "min": _core.REDUCE_MIN,
           "max": _core.REDUCE_MAX}
# dtype -> the kernel's element kind. float16 and bfloat16 travel as uint16.
KIND = {np.dtype(np.float32): _core.REDUCE_F32, np.dtype(np.float64): _core.REDUCE_F64,
        np.dtype(np.int32): _core.REDUCE_I32, np.dtype(np.int64): _core.REDUCE_I64,
        np.dtype(np.float16): _core.REDUCE_F16}
HALF_KIND = {"float16": _core.REDUCE_F16, "bfloat16": _core.REDUCE_BF16}
FLOAT_KINDS = frozenset((_core.REDUCE_F32, _core.REDUCE_F64, _core.REDUCE_F16,
                         _core.REDUCE_BF16))
DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")
U16 = np.dtype(np.uint16)


class ReduceRank(RankEndpoint):
    """A rank that runs the all-reduce over its endpoint's slots."""

    __slots__ = ("hashes", "mms", "stage_data", "others", "peer_bufs")

    def __init__(self, seg, rank):
        super().__init__(seg, rank)
        self.hashes = {}
        self.mms = (self.mm,) * self.world
        self.stage_data = [tuple(o + HEAD for o in offs) for offs in self.stage]
        self.others = tuple(q for q in range(self.world) if q != rank)
        self.peer_bufs = {}

    def leave(self, failed):
        RankEndpoint.leave(self, failed)
        self.peer_bufs.clear()

    def reduce(self, src, res, kind, op, divisor=1.0):
        """res = the reduction of every rank's src, divided by `divisor`
        (C-contiguous, the same dtype and size; res may be src). kind, op: the kernel's
        codes (KIND, OP_CODE)."""
        if self.broken is not None:
            raise CollectiveError("pmaprt: an earlier collective failed on this rank (%s); "
                                  "no further collective can run in this map" % self.broken)
        self.calls += 1
        n = src.size
        key = (kind, op, divisor, n)
        h = self.hashes.get(key)
        if h is None:
            if len(self.hashes) >= HASHES_KEPT:
                self.hashes.clear()
            h = self.hashes[key] = zlib.crc32(("%d|%d|%r|%d" % key).encode()) & MASK
        stamp = ((self.calls & MASK) << 32) | h
        if self.world == 1:
            reduce_into(res, 0, (src,), (0,), n, kind, op, divisor)
            return
        isz = src.itemsize
        nbytes = n * isz
        w = self.world
        slot = self.slot_bytes
        # with up to DIRECT_RANKS ranks, calls of up to C_ROUNDS rounds run
        # split, round after round in C; longer ones direct's Python pipeline
        few = nbytes <= slot or (w <= DIRECT_RANKS and nbytes <= C_ROUNDS * slot)
        direct = nbytes <= SMALL_BYTES or nbytes * w <= DIRECT_BYTES \
            or (w <= DIRECT_RANKS and not few)
        # in place only where this rank's result does not overwrite its input
        # while others may read it (direct writes a round as soon as it is reduced)
        place = None
        if nbytes > SMALL_BYTES and not (direct and np.may_share_memory(src, res)):
            place = self._shared_place(src)
        if few and w <= ROUND_MAX_RANKS and (place is None or not direct):
            if nbytes <= slot:
                self._round(src, res, stamp, kind, op, divisor, direct, place)
                return
            if src.ndim != 1:
                src, res = src.reshape(-1), res.reshape(-1)
            per = slot // isz
            for lo in range(0, n, per):
                at = None if place is None else (place[0], place[1] + lo * isz)
                self._round(src[lo:lo + per], res[lo:lo + per], stamp, kind, op, divisor,
                            direct, at)
            return
        if src.ndim != 1:
            src, res = src.reshape(-1), res.reshape(-1)
        per = self.slot_bytes // isz
        bounds = [(lo, min(n, lo + per)) for lo in range(0, n, per)] or [(0, 0)]
        # A pipeline one round deep: round i + 1 is staged before round i is
        # reduced, and (split) round i - 1 gathered after round i's slice is
        # published, so a rank a little behind the others holds nobody up.
        rounds = [self._put(src, *bounds[0], isz, stamp, place, direct)]
        for i, (lo, hi) in enumerate(bounds):
            if i + 1 < len(bounds):
                rounds.append(self._put(src, *bounds[i + 1], isz, stamp, place, direct))
            m, j = rounds[i]
            self._take(m, j, stamp)
            if direct:
                srcs, offs = self._sources(j, 0)
                reduce_into(res, lo * isz, srcs, offs, hi - lo, kind, op, divisor)
                self.publish(L_FREE, m + 1)
                continue
            self._reduce_slice(src, place, j, lo, hi, isz, kind, op, divisor)
            self.publish(L_RED, m + 1)
            if i:
                self._gather(res, isz, *rounds[i - 1], *bounds[i - 1])
        if not direct:
            self._gather(res, isz, *rounds[-1], *bounds[-1])
        elif place is not None:   # the caller may change src once this returns
            self.wait_all(L_FREE, self.sent, "finish reading this rank's input")

    def _round(self, src, res, stamp, kind, op, divisor, direct, place):
        """A call of one round (at most a slot) in one C call (one_round): its
        steps cost about 1 us there, 5-20 us as Python calls. A wait longer
        than the spin comes back here to sleep on the bell (and to see
        aborts); a round where another rank lent its input in place comes
        back for that input's buffer. place (split only): this rank's input
        is named in place, not copied; the call returns after every rank's
        RED, so every rank has read it."""
        m = (self.sent + 1) & MASK
        j = self.sent % self.slots
        heads = self.stage[j]
        reds = None if direct else self.red[j]
        phase = 0
        inputs = None
        while True:
            st = one_round(self.mm, src, res, heads, reds, self.lines, self.rank, m, self.slots,
                           stamp, kind, op, divisor, self.spin, phase, place, inputs)
            if not st:
                self.sent += phase == 0
                return
            code, q = st & 0xFF, st >> 8
            if code == ROUND_WAIT_FREE:
                self._wait(self.lines[q], L_FREE, (m - self.slots) & MASK,
                           "finish an earlier collective round", True)
                continue
            if phase == 0:
                self.sent += 1   # published
            if code == ROUND_WAIT_PUB:
                phase = 1
                self._wait(self.lines[q], L_PUB, m, "publish its part", True)
            elif code == ROUND_WAIT_RED:
                phase = 2
                self._wait(self.lines[q], L_RED, m, "reduce its slice", True)
            elif code == ROUND_MISMATCH:
                raise self._fail(self._mismatch(self.r.load64(heads[q] + HD_STAMP), stamp, q))
            else:   # ROUND_IN_PLACE: another rank's input is read where it is
                phase = 1
                inputs = self._sources(j, 0)

    # -- the steps of a round

    def _put(self, src, lo, hi, isz, stamp, place, direct):
        """This rank's part of its next round goes into its stage slot (or its
        place in a shared array into the head); publish. -> (round, slot).
        In `split` the slice this rank reduces itself is not staged: it is
        read from src (the copy in shrinks by 1/N)."""
        m = self.sent
        k = self.slots
        j = m % k
        self.wait_all(L_FREE, m + 1 - k, "finish an earlier collective round")
        head = self.stage[j][self.rank]
        r = self.r
        if place is None:
            if direct:
                if hi > lo:
                    memcpy(self.mm, head + HEAD, src[lo:hi])
            else:
                w, rank = self.world, self.rank
                a = lo + ((hi - lo) * rank) // w
                b = lo + ((hi - lo) * (rank + 1)) // w
                if a > lo:
                    memcpy(self.mm, head + HEAD, src[lo:a])
                if hi > b:
                    memcpy(self.mm, head + HEAD + (b - lo) * isz, src[b:hi])
            r.store64(head + HD_SRC_SEG, 0)
        else:
            r.store64(head + HD_SRC_SEG, place[0])
            r.store64(head + HD_SRC_OFF, place[1] + lo * isz)
        r.store64(head + HD_STAMP, stamp)
        self.sent = m + 1
        self.publish(L_PUB, m + 1)
        return m, j

    def _reduce_slice(self, src, place, j, lo, hi, isz, kind, op, divisor):
        """split: this rank's slice of the round in slot j (elements lo..hi of
        the call) into its red slot; its own part read from src unless it
        was lent in place."""
        w, rank = self.world, self.rank
        a = lo + ((hi - lo) * rank) // w
        b = lo + ((hi - lo) * (rank + 1)) // w
        srcs, offs = self._sources(j, (a - lo) * isz)
        if place is None:   # this rank's own slice was not staged
            srcs = srcs[:rank] + (src,) + srcs[rank + 1:]
            offs = offs[:rank] + (a * isz,) + offs[rank + 1:]
        reduce_into(self.mm, self.red[j][rank], srcs, offs, b - a, kind, op, divisor)

    def _take(self, m, j, stamp):
        """Wait until every rank has published round m; compare the stamps."""
        self.wait_all(L_PUB, m + 1, "publish its part")
        r = self.r
        heads = self.stage[j]
        for q in self.others:
            got = r.load64(heads[q] + HD_STAMP)
            if got != stamp:
                raise self._fail(self._mismatch(got, stamp, q))

    def _gather(self, res, isz, m, j, lo, hi):
        """Copy every rank's reduced slice of round m into res; publish FREE."""
        self.wait_all(L_RED, m + 1, "reduce its slice")
        w = self.world
        buf = self.seg.buf
        reds = self.red[j]
        n = hi - lo
        a = lo
        for q in range(w):
            b = lo + (n * (q + 1)) // w
            if b > a:
                memcpy(res, a * isz, buf[reds[q]: reds[q] + (b - a) * isz])
            a = b
        self.publish(L_FREE, m + 1)

    def _sources(self, j, skip):
        """(buffers, byte offsets) of every rank's input of the round in stage
        slot j, `skip` bytes in: the slots, or shared arrays read in place."""
        offs = self.stage_data[j]
        r = self.r
        heads = self.stage[j]
        if not any(r.load64(h + HD_SRC_SEG) for h in heads):
            return self.mms, (tuple(o + skip for o in offs) if skip else offs)
        srcs, offs = list(self.mms), [o + skip for o in offs]
        for q, h in enumerate(heads):
            seg = r.load64(h + HD_SRC_SEG)
            if seg:
                srcs[q] = self._peer_buf(seg)
                offs[q] = r.load64(h + HD_SRC_OFF) + skip
        return tuple(srcs), tuple(offs)

    def _shared_place(self, src):
        """(segment id, byte offset) of src inside a shared array lent to
        every worker, or None (src is copied into the stage slots)."""
        mapping = _arrays.find_mapping(src)
        if mapping is None:
            return None
        seg = _arrays.received_segment_id(mapping)
        if seg is None:
            return None
        return seg, _arrays.array_address(src) - mapping.address

    def _peer_buf(self, seg):
        b = self.peer_bufs.get(seg)
        if b is None:
            b = self.peer_bufs[seg] = _arrays.resolve(seg).buf
        return b

    def _mismatch(self, got, want, q):
        if (got >> 32) != (want >> 32):
            return CollectiveError(
                "pmaprt: rank %d made collective call %d while rank %d was at call %d: every "
                "rank must make the same collective calls" % (self.rank, want >> 32, q, got >> 32))
        return CollectiveError(
            "pmaprt: collective call %d differs across ranks: rank %d and rank %d reduce "
            "different arrays (dtype, size or op differ)" % (want >> 32, self.rank, q))


# --------------------------------------------------------------------------
# dtypes and ops


def dtype_kind(dt, as_dtype):
    """The C reduction's kind of a dtype (uint16 words as `as_dtype`), or None."""
    kind = KIND.get(dt)
    if kind is None:
        if dt.name == "bfloat16" and dt.itemsize == 2:
            return _core.REDUCE_BF16
        if dt == U16 and as_dtype is not None:
            return HALF_KIND[as_dtype]
    return kind


def leaf_array(x, i, op, as_dtype=None):
    """Leaf i of a call as (an ndarray of a supported dtype, its kind): a mean
    of integers is a float64 mean; float16/bfloat16, and uint16 words read as
    `as_dtype`, reduce as half kinds."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    dt = a.dtype
    kind = dtype_kind(dt, as_dtype)
    if kind is None:
        raise TypeError("pmaprt.allreduce: leaf %d has dtype %s; supported: %s (and uint16 "
                        "words with as_dtype='float16' or 'bfloat16')"
                        % (i, dt, ", ".join(DTYPES)))
    if op == "mean" and kind not in FLOAT_KINDS:
        a = a.astype(np.float64)
        kind = _core.REDUCE_F64
    return a, kind


# (dtype, op, as_dtype) -> (kind, op code, mean, as uint16) for one array
# that `reduce_array` takes as it is; False where the general path must
# convert or raise. Kept small: dtypes, ops and as_dtype values are few.
PLANS = {}
PLANS_KEPT = 256


def array_plan(dtype, op, as_dtype):
    """The plan of a (dtype, op, as_dtype): see PLANS; cached."""
    key = (dtype, op, as_dtype)
    plan = PLANS.get(key)
    if plan is None:
        plan = False
        if op in OPS and (as_dtype is None or as_dtype in HALF_KIND):
            kind = dtype_kind(dtype, as_dtype)
            if kind is not None and (op != "mean" or kind in FLOAT_KINDS):
                plan = (kind, OP_CODE[op], op == "mean", dtype.itemsize == 2 and dtype != U16)
        if len(PLANS) >= PLANS_KEPT:
            PLANS.clear()
        PLANS[key] = plan
    return plan


def reduce_array(ctx, x, out, op, as_dtype):
    """The all-reduce of one C-contiguous ndarray x by the shortest path (a
    training step's common call), into out (or a new array): the result, or
    None where x or out need the general path (a conversion, or an error to
    raise)."""
    if type(op) is not str or not (as_dtype is None or type(as_dtype) is str):
        return None   # the general path says what is wrong with them
    plan = PLANS.get((x.dtype, op, as_dtype))
    if plan is None:
        plan = array_plan(x.dtype, op, as_dtype)
    if not plan or not x.flags.c_contiguous:
        return None
    if out is None:
        out = np.empty_like(x)
    elif type(out) is not np.ndarray or out.dtype != x.dtype or out.shape != x.shape \
            or not out.flags.carray:
        return None
    kind, code, mean, half = plan
    if half:   # bfloat16 may lack a buffer format
        ctx.reduce(x.view(U16), out.view(U16), kind, code, float(ctx.world) if mean else 1.0)
    else:
        ctx.reduce(x, out, kind, code, float(ctx.world) if mean else 1.0)
    return out


def check_as_dtype(as_dtype):
    if as_dtype is not None and (not isinstance(as_dtype, str) or as_dtype not in HALF_KIND):
        raise ValueError("pmaprt.allreduce: as_dtype must be None, 'float16' or 'bfloat16', "
                         "got %r" % (as_dtype,))


def reduce_flat(ctx, src, res, kind, op):
    """res = the reduction of every rank's flat contiguous src (a mean divided)."""
    if src.dtype.itemsize == 2 and src.dtype != U16:
        src, res = src.view(U16), res.view(U16)   # bfloat16 may lack a buffer format
    ctx.reduce(src, res, kind, OP_CODE[op], float(ctx.world) if op == "mean" else 1.0)


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


def reduce_tree(ctx, x, op, as_dtype=None):
    """Reduce a list/tuple/dict tree of arrays and scalars on rank ctx: leaves
    of one dtype fused, in order, into buckets of up to FUSION_BYTES."""
    leaves = []
    rebuild = _flatten(x, leaves)
    arrs = [leaf_array(v, i, op, as_dtype) for i, v in enumerate(leaves)]
    outs = [None] * len(arrs)
    buckets = {}
    order = []
    for i, (a, kind) in enumerate(arrs):
        if a.nbytes >= FUSION_BYTES or len(arrs) == 1:
            order.append([i])
            continue
        cur = buckets.get((a.dtype, kind))
        if cur is None or cur[1] + a.nbytes > FUSION_BYTES:
            cur = buckets[(a.dtype, kind)] = [[], 0]
            order.append(cur[0])
        cur[0].append(i)
        cur[1] += a.nbytes
    for idx in order:
        if len(idx) == 1:
            a, kind = arrs[idx[0]]
            src = np.ascontiguousarray(a).reshape(-1)
            res = np.empty(src.size, a.dtype)
            reduce_flat(ctx, src, res, kind, op)
            outs[idx[0]] = res.reshape(a.shape)
        else:
            kind = arrs[idx[0]][1]
            src = np.concatenate([arrs[i][0].reshape(-1) for i in idx])
            res = np.empty_like(src)
            reduce_flat(ctx, src, res, kind, op)
            pos = 0
            for i in idx:
                a = arrs[i][0]
                outs[i] = res[pos: pos + a.size].reshape(a.shape)
                pos += a.size
    results = []
    for v, o in zip(leaves, outs):
        results.append(o if isinstance(v, np.ndarray) else o[()])
    return rebuild(iter(results))
