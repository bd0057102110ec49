"""The inline cost model, and where a map over a list, tuple or range starts.

"Inline": when the workers' measured costs show that dispatching cannot beat
map itself (the parent's own cost of decoding a result is about as large as
computing it), the parent claims the rest of the input and runs it as map
would. This module holds only the decision, as pure functions over plain
numbers (seconds per item, counts), and `MapCosts`, the numbers one map
measures for it. Taking a map over and handing it back is the collector's
(collect.py).

The start (see PROBE_PIECE_S): a map over a list, tuple or range with
inline="auto" runs its first item in the caller, then timed pieces while
items stay cheaper than `probe_item_s` (the model's break-even, with the
parallel path's costs assumed) and no item runs long past its piece's budget
(`probe_piece_s`, shorter as the workers the map could use are more); dear
items go to the workers from there.
Nothing is remembered from one map to the next: where an item runs, and so
what a crash in fn does, depends on this call alone, never on earlier maps
of the same function.
"""
import functools

from .. import _sched
from .._options import CORES

# Decide after this many chunks have been measured, only when the rest is
# worth at least INLINE_MIN_WORK_S of serial work, and only when the model
# predicts the parallel path slower than map by this margin or less.
INLINE_MIN_CHUNKS = 4
INLINE_MIN_WORK_S = 0.005
INLINE_MARGIN = 1.25
# The consumer's measured wait corrects the model only for items cheaper
# than this (where the model's error matters; see tiny_by_model).
INLINE_OBS_MAX_T = 2e-6
# The caller's cost of taking one item from a result list (C-level iteration).
CONSUME_ITEM_S = 1e-8
# Decoding a chunk's results has a fixed part besides its per-item cost. The
# model trusts the decode cost per item only once two chunks were decoded
# (see PerItem) and the largest is big enough for that part to be under a
# tenth of an item's cost even in one an eighth its size: from the first,
# small chunks (1, 4, 16 items), items of a few microseconds would look not
# worth the workers, and the model would run the rest of such a map here,
# serially.
DEC_FIXED_S = 4e-6
DEC_MAX_ERROR = 0.1
# A probed map runs in timed pieces: _core.Results stops a piece once it
# has run probe_piece_s(nwork) (it reads the clock after the first item, then as
# PROBE_DEAR_ITEM_S and PROBE_CLOCK_STRIDE say). PROBE_STRIKES pieces in a
# row that cost more than the break-even per item (plus PROBE_SLACK_S) hand
# the rest to the workers, from that index; one piece of a single item
# that ran past the whole budget does so at once. The first item runs alone
# (a piece of its own): if it is still running after PROBE_HANDOFF_S, a
# helper thread posts the job for the rest (handoff.py); so for every later
# piece still running PROBE_HANDOFF_S past its budget, if the item in fn then
# is still the same one HANDOFF_CONFIRM_S later: the helper cuts the piece
# after it (PieceBudget.cut) and posts the items after that one. So workers
# never wait long on an item running here, whichever it is; the consumer's
# time between items, and a pause of this process among cheap items, are
# judged by the piece's own timing. HANDOFF_CONFIRM_S is long enough that a
# pause inside a cheap item (a full garbage collection, the process
# descheduled) rarely passes for a dear item; it costs the caller a wait of up
# to HANDOFF_CONFIRM_S at the end of a piece that overran its deadline.
# A tiny map costs what map costs, plus a clock read per PROBE_CLOCK_STRIDE
# items and, per piece, a generator resume and an arm of the handoff (a few
# stores). The rest of a map that went inline midway runs in the same timed
# pieces.
PROBE_PIECE_S = 0.002
PROBE_HANDOFF_S = 0.002
HANDOFF_CONFIRM_S = 0.002
# The workers a map could use wait through its probe: nwork x its pieces.
# A piece lasts PROBE_PIECE_S x min(1, PROBE_IDLE_WORKERS / nwork), so that
# wait stays about PROBE_IDLE_WORKERS pieces of PROBE_PIECE_S of worker
# time, down to PROBE_MIN_PIECE_S. The price of smaller pieces: more
# generator resumes and handoff arms per item (a few microseconds a piece,
# some % of a tiny map at the floor), and a pause of the caller covers more
# of them, so that PROBE_STRIKES dear pieces in a row may be one pause (a
# tiny map posted to the workers on a busy machine). The floor keeps a piece
# well above its own fixed cost and PROBE_SLACK_S, else dear items would not
# look dear; pieces under PROBE_CLEAR_FACTOR x PROBE_SLACK_S are never
# clearly dear alone, so from there the post waits for PROBE_STRIKES pieces.
PROBE_IDLE_WORKERS = 4
PROBE_MIN_PIECE_S = 1.5e-4
# The inline rest of a map that went inline midway strikes against its own
# measured cost per item, times this (a cost shift, a slow consumer).
PROBE_FACTOR = 4
# Two dear pieces in a row: one can be a pause of this process (preempted for
# most of a piece on a busy machine), which must not post the job.
PROBE_STRIKES = 2
# One piece this many times dearer than the break-even hands over at once:
# a pause would have to last most of the piece many times over.
PROBE_CLEAR_FACTOR = 8
# The first item alone decides too: more than PROBE_CLEAR_FACTOR x the
# break-even, plus this allowance, hands the rest to the workers at once
# (else a short map of dear items would run here whole, in one piece). The
# allowance covers what the timing of one item also catches: the consumer's
# step, and the handoff thread waking for its first arm and taking the GIL
# (tens to hundreds of microseconds on a loaded machine). Cheaper items are
# judged by the pieces.
PROBE_FIRST_SLACK_S = 2e-4
PROBE_SLACK_S = 5e-5
# A timed piece reads the clock after every item while items cost more than
# PROBE_DEAR_ITEM_S, else after every PROBE_CLOCK_STRIDE-th: a longer stride
# spreads the cost of a read over more tiny items, but lets a piece whose
# items turn dear overrun its budget by up to a stride of them.
PROBE_DEAR_ITEM_S = 2e-6
PROBE_CLOCK_STRIDE = 16

# Inputs whose rest _core.Results runs itself (fn(seq[i]), timed or not).
TAIL_TYPES = (list, tuple, range)


def probe_piece_s(nwork):
    """The budget of one timed piece of a probed map that could use `nwork`
    workers (see PROBE_IDLE_WORKERS)."""
    return max(PROBE_MIN_PIECE_S, PROBE_PIECE_S * min(1.0, PROBE_IDLE_WORKERS / max(1, nwork)))


class InlineTail(tuple):
    """(fn, seq, start, end[, budget]): a piece of a map's results that
    _core.Results computes itself, fn(seq[i]) for i in start..end-1 (seq a
    list, tuple or range); with a _core.PieceBudget, a timed piece that
    stops once it has run the budget (see PROBE_PIECE_S)."""
    __slots__ = ()


class PerItem:
    """A cost per item from the largest chunks seen: a chunk's fixed cost,
    charged to the items of the first, small chunks, would inflate it. The
    least among them: one slow chunk (a pause, one result slow to load) must
    not make the parallel path look dear; one too cheap errs toward the
    workers, never toward running dear items serially here. `samples`: the
    chunks it rests on (of at least 1/SPAN of the largest count)."""
    SPAN = 8
    __slots__ = ("est", "largest", "samples")

    def __init__(self):
        self.est, self.largest, self.samples = None, 0, 0

    def add(self, seconds, count):
        d = seconds / count
        if self.est is None or count > self.SPAN * self.largest:
            self.est, self.samples = d, 1
        elif self.SPAN * count >= self.largest:
            self.est = min(self.est, d)
            self.samples += 1
        self.largest = max(self.largest, count)


# --- the model, over plain numbers: t is the workers' CPU seconds per item
# (map's own cost), dec the parent's decode seconds per item, wenc the
# workers' seconds per item reading items and encoding results, enc the
# parent's lazy encode seconds per item.

def decode_known(t, samples, largest, span=PerItem.SPAN):
    """Whether the decode cost per item rests on chunks large enough to trust."""
    return t is not None and samples >= 2 and largest / span * t * DEC_MAX_ERROR >= DEC_FIXED_S


def parallel_item_s(t, dec, wenc, enc, nwork, cores=CORES):
    """Seconds per item of the parallel path, steady state: bounded by the
    parent's decode and taking, by all the CPU shared over the cores, and by
    the workers (the call, then encoding its result)."""
    p = dec + CONSUME_ITEM_S + enc
    w = t + wenc
    return max(p, (w + p) / cores, w / nwork)


def overhead_item_s(dec, wenc, enc):
    """CPU seconds per item of the parallel path beyond the call itself: the
    workers' reading of items and encoding of results, the caller's encoding,
    decoding and taking."""
    return wenc + dec + enc + CONSUME_ITEM_S


def tiny_by_model(t, dec, wenc, enc, nwork, wall=None, waited=None, cores=CORES):
    """Whether map itself is about as fast as the parallel path for items of
    t seconds. wall: the wall seconds per item of a chunk (None: unknown);
    waited: (items consumed, seconds the consumer waited for them, records)
    since chunks ran their full target, or None."""
    if parallel_item_s(t, dec, wenc, enc, nwork, cores) * INLINE_MARGIN >= t:
        return True
    # The model assumes the cores are shared perfectly; what the consumer
    # actually waited per item, once chunks are mature, corrects it where
    # they are not (a loaded or small machine). Only for tiny items (where
    # the model's error matters): with dearer or skewed items, what the
    # consumer waits in order says little (it waited for one long item, not
    # for the pool's overhead). And only for items that compute: an item
    # that blocks (I/O, a lock) has a wall time far above its CPU time, and
    # would run serially inline.
    if t < INLINE_OBS_MAX_T and waited is not None and computing(t, wall):
        items, wait_s, records = waited
        if records >= INLINE_MIN_CHUNKS and items > 0 \
                and (wait_s / items + dec + (CONSUME_ITEM_S + enc)) * INLINE_MARGIN >= t:
            return True
    return False


def computing(t, wall):
    """Items that compute: one whose wall time is far above its CPU time
    blocks (I/O, sleep), and would run serially in the caller."""
    return wall is not None and wall <= 2 * t


def rest_worth_inline(items_left, t):
    """Whether the unclaimed rest is worth the switch to inline."""
    return items_left * t >= INLINE_MIN_WORK_S


# What the probe assumes of the parallel path before it measured any of
# it: the parent's decode, and the workers' reading and encoding, per item
# of a small result (the measured model takes over once a job runs).
PROBE_DEC_S = 1e-7
PROBE_WENC_S = 1e-7
# Items dearer than this leave the caller even where the model finds no
# gain in the workers (one worker): their overheads are small beside them,
# and workers keep the caller free and a crash away from it.
PROBE_MAX_ITEM_S = 1e-4
# A piece's time includes the consumer's own step per item (its loop), and a
# loaded machine's pauses: items count as dear past this many times the
# break-even. Near the break-even either path costs about the same.
PROBE_MARGIN = 2


@functools.lru_cache(maxsize=None)
def probe_item_s(nwork, cores=CORES):
    """The cost per item under which the probe keeps a map in the caller:
    the largest t that tiny_by_model finds tiny with the assumed costs, at
    most PROBE_MAX_ITEM_S (parallel_item_s is piecewise linear in t: bisect)."""
    lo, hi = 0.0, PROBE_MAX_ITEM_S
    for _ in range(40):
        mid = (lo + hi) / 2
        if tiny_by_model(mid, PROBE_DEC_S, PROBE_WENC_S, 0.0, nwork, cores=cores):
            lo = mid
        else:
            hi = mid
    return lo


class MapCosts:
    """What one map measures of its costs: the model's inputs, the window's
    average chunk, and the feed's chunk sizer (`sizer`, whose `t_item` is the
    workers' wall seconds per item)."""

    __slots__ = ("sizer", "cpu_item", "dec", "wenc", "enc_item", "avg_chunk",
                 "obs_consumed", "obs_records", "wait_s", "nwork", "item_bytes")

    def __init__(self, fixed, nwork):
        self.sizer = _sched.ChunkSizer(fixed, grow=False)
        self.cpu_item = None       # workers' CPU seconds per item (EWMA)
        self.dec = PerItem()       # the parent's decode seconds per item
        self.wenc = PerItem()      # the workers' seconds per item reading items, encoding results
        self.enc_item = 0.0        # the parent's lazy encode seconds per item (list inputs)
        self.avg_chunk = 1.0
        # Observed throughput, from the first chunk that ran its full target
        # (a mature chunk): the consumer's seconds waiting for results then.
        self.obs_consumed = None
        self.obs_records = 0
        self.wait_s = 0.0
        self.nwork = nwork
        self.item_bytes = 0.0      # bytes per result the parent holds until taken (largest-leaning)

    def on_bytes(self, count, nbytes):
        """A record of `count` results holds `nbytes`: a moving average that
        rises at once (memory is bounded by the large ones) and falls slowly."""
        if count:
            b = nbytes / count
            self.item_bytes = b if b > self.item_bytes else 0.9 * self.item_bytes + 0.1 * b

    def on_chunk(self, count, t0, t1, cpu, enc, consumed):
        """A chunk of `count` items ran in t1 - t0 seconds (cpu of them on the
        CPU; enc reading items and encoding results)."""
        self.avg_chunk = 0.8 * self.avg_chunk + 0.2 * count
        if not count:
            return
        self.sizer.observe(count, t1 - t0)
        c = cpu / count
        self.cpu_item = c if self.cpu_item is None else 0.5 * c + 0.5 * self.cpu_item
        self.wenc.add(enc, count)
        if self.obs_consumed is not None:
            self.obs_records += 1
        elif t1 - t0 >= _sched.TARGET_CHUNK_S / 2:
            self.obs_consumed = consumed
            self.wait_s = 0.0

    def on_encoded(self, seconds, items):
        """The parent encoded `items` list items lazily in `seconds`."""
        e = seconds / items
        self.enc_item = e if not self.enc_item else 0.5 * e + 0.5 * self.enc_item

    def decode_known(self):
        return decode_known(self.cpu_item, self.dec.samples, self.dec.largest)

    def _waited(self, consumed):
        if self.obs_consumed is None:
            return None
        return consumed - self.obs_consumed, self.wait_s, self.obs_records

    def tiny(self, consumed):
        """The model's verdict now (decode_known() must hold)."""
        return tiny_by_model(self.cpu_item, self.dec.est, self.wenc.est or 0.0, self.enc_item,
                             self.nwork, self.sizer.t_item, self._waited(consumed))

    def computing(self):
        return computing(self.cpu_item, self.sizer.t_item)
