"""Chunk sizing: the constants of the scheduler and their trade-offs.

A chunk is sized from the measured seconds per item toward TARGET_CHUNK_S.
Each chunk costs about 10-20 us of dispatch (a compare-and-swap, a slice,
encoding the results, a ring record, the parent's decode), so 2 ms keeps that
near 1 %. Longer chunks would cut the overhead further but leave a longer tail
at the end of the map and make ordered results arrive in bigger lumps.
"""
import math
import random

# Seconds of work one chunk aims at, at first.
TARGET_CHUNK_S = 0.002
# While the cost per item holds steady (each chunk within STEADY x the
# estimate), a worker doubles its target per chunk up to MAX_TARGET_S; any
# other chunk sets it back to TARGET_CHUNK_S. Each chunk costs more than its
# dispatch: the caller wakes, decodes and yields it, and on a machine with no
# spare core that wake takes a worker's core, so longer chunks pay where the
# cost per item is steady. Near the end
# a chunk is held to TAIL_SHARE of an even share of what is left unclaimed
# (remaining / workers), never below TARGET_CHUNK_S: the last chunks stay short.
MAX_TARGET_S = 0.016
STEADY = 1.5
TAIL_SHARE = 0.5
# A chunk whose results take more than this many bytes does not grow the
# target: moving them costs far more than the chunk's dispatch, and a worker
# holds a chunk's results twice while it sends them (built, then copied into
# shared memory), so larger chunks of large results would raise peak memory.
GROW_MAX_BYTES = 1 << 20
# The first chunk of a function never seen before is one item: it measures.
# Each later chunk may grow at most this factor over the last, so a wrong
# first measurement (a cold cache, a lazy import) costs at most a few chunks.
GROWTH = 4
# Upper bound on items per chunk: bounds the results buffered per chunk and
# the latency of the first ordered results for very cheap items.
MAX_CHUNK = 65536
# Weight of the newest chunk in the moving estimate of seconds per item. 0.5
# follows a change of item cost within two or three chunks.
EWMA_ALPHA = 0.5
# Preemption: a chunk sized from the measured cost per item may meet items
# that cost far more (a cost shift mid-stream); without a check, one such
# chunk would run 100x its target while other workers idle.
# A chunk of more than one item (adaptive sizes only; chunksize=N is left as
# given) runs in PREEMPT_STRIDES strides; once it has run PREEMPT_FACTOR x
# its expected time (and at least PREEMPT_MIN_S), the items it has not
# started go back to the front of the worker's range, where the next chunk,
# sized from the new cost, or a thief takes them. A check costs one clock read
# per stride (1/32 of a chunk: well under 1 % of it).
PREEMPT_FACTOR = 4
PREEMPT_MIN_S = 4 * TARGET_CHUNK_S
PREEMPT_STRIDES = 32
# Work that one worker is expected to end within this many seconds is left
# to it: the first chunk sized from a carried cost takes it whole (no even
# share), and a worker that took such a chunk wakes no other until it has
# run this long in the map (_runtime/wake.py, steps 5 and 9). A 10-item map
# of cheap items then costs one claim, one record and no wake call; a
# second worker woken for it would cost more (a wake call of 50-250 us on a
# small VM) than it could save. A map that runs longer loses at most this
# long of its other workers.
SHORT_WORK_S = 100e-6
# Guided self-scheduling: a worker claims 1/(SPAN_FACTOR * workers) of what is
# left from the shared counter at once (at least one chunk). Spans shrink
# toward the end; stealing evens out what is left.
SPAN_FACTOR = 2


class ChunkSizer:
    __slots__ = ("fixed", "t_item", "last", "grown", "grow", "carried")

    def __init__(self, fixed=0, t_item=None, grow=True):
        self.fixed = fixed
        self.t_item = t_item
        self.last = 1 if t_item is None else MAX_CHUNK
        self.carried = t_item is not None     # not measured in this map yet
        self.grown = TARGET_CHUNK_S     # this worker's target now (see MAX_TARGET_S)
        # False: the target stays TARGET_CHUNK_S (chunks the caller feeds
        # from an iterator: what is in flight is held in memory).
        self.grow = grow

    def size(self, remaining=None, workers=1):
        """Items for the next chunk; `remaining`: items not yet claimed by
        any worker (None: unknown), which bounds it near the end."""
        if self.fixed:
            return self.fixed
        if self.t_item is None:
            return 1
        t = max(self.t_item, 1e-9)
        target = self.grown
        if remaining is not None and target > TARGET_CHUNK_S:
            target = max(TARGET_CHUNK_S, min(target, TAIL_SHARE * remaining * t / workers))
        c = int(target / t)
        if self.carried and remaining is not None and min(c, remaining) * t >= SHORT_WORK_S:
            # The first chunk sized from a cost per item carried from an
            # earlier map takes at most an even share of what is unclaimed
            # (unless all of it is short work, SHORT_WORK_S):
            # a chunk cannot be stolen, and if the items now cost far more,
            # one chunk of many would leave the other workers nothing to
            # take while it runs (their leaving is final for this map: a
            # preempted chunk's items go back to its owner alone). An even
            # share on every chunk would cost W x the records at the end.
            c = min(c, -(-remaining // workers))
        return max(1, min(c, self.last * GROWTH, MAX_CHUNK))

    def hold(self):
        """No growth after this chunk (see GROW_MAX_BYTES)."""
        self.grown = TARGET_CHUNK_S

    def observe(self, count, seconds):
        if count <= 0:
            return
        t = seconds / count
        self.last = count
        self.carried = False
        if self.t_item is None:
            self.t_item = t
        else:
            est = self.t_item
            if self.grow and est / STEADY <= t <= est * STEADY:
                self.grown = min(2 * self.grown, MAX_TARGET_S)
            else:
                self.grown = TARGET_CHUNK_S
            self.t_item = EWMA_ALPHA * t + (1 - EWMA_ALPHA) * est


def preempt_deadline_s(count, t_item):
    """Seconds a preemptible chunk of `count` items, each expected to take
    `t_item`, may run before its unstarted items go back (PREEMPT_FACTOR)."""
    return max(PREEMPT_MIN_S, PREEMPT_FACTOR * count * t_item)


def preempt_stride(count):
    """Items run between two clock reads of a preemptible chunk."""
    return max(1, count // PREEMPT_STRIDES)


def span_size(chunk, remaining, workers):
    """Items to claim from the shared counter at once (guided self-scheduling)."""
    span = max(chunk, math.ceil(remaining / (SPAN_FACTOR * workers)))
    return min(span, remaining)


def victim_rng(seed, rank):
    """The RNG a worker draws its steal victims from in a job: seeded by the
    pool's seed and the worker's rank, so a schedule can be reproduced."""
    return random.Random(seed * 1_000_003 + rank)


def victims(rng, rank, workers):
    """The order in which a worker of this rank tries the others' ranges."""
    out = [w for w in range(workers) if w != rank]
    rng.shuffle(out)
    return out
