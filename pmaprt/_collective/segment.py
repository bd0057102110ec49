"""The collective segment of one SPMD map: its layout, its words, both sides.

The parent makes one segment per SPMD map (`SpmdParent`); each rank (the worker
running shard r) attaches to it as a `RankEndpoint`, which owns the waiting,
ringing and aborting below. The all-reduce that runs over these words is in
`reduce.py`.

Layout::

    [header 512 B][rank lines: 64 B each][pad to 4096]
    [rank 0: SLOTS stage slots x (64 B head + slot bytes)][SLOTS x red bytes] ...
    [rank N-1: ...]

    header:     MAGIC, WORLD, ABORT, SLOTS, BELL, SLEEPERS, SLOT_BYTES, RED_BYTES,
                AXIS_LEN, AXIS (name, utf-8)
    rank line:  PUB  rounds whose input this rank published  (written by the rank)
                RED  rounds whose slice this rank reduced     (written by the rank)
                FREE rounds this rank no longer reads         (written by the rank)
                DONE 1 once the rank's step has returned      (written by the rank)
    slot head:  STAMP (call number << 32) | crc32(dtype, op, length);
                SRC_SEG, SRC_OFF: where the round's input is, when it is not
                in the slot (a shared array every rank maps; SRC_SEG 0: in the slot)

A rank's calls are cut into rounds (at most a slot each), numbered by one
counter over all its calls: round m uses stage slot and red slot m % SLOTS.
A rank writes only into its own slots and lines; it reads every rank's.
Counters are 32-bit and compared modulo 2**32. All atomics are sequentially
consistent.

The protocol
------------

Set-up (parent):
 1. The parent shares a zeroed segment and writes WORLD, SLOTS, the slot sizes
    and the axis name, then MAGIC last.
 2. Each worker that runs shard r attaches as rank r; it refuses a segment
    without MAGIC.

A round m (reduce.py says what is read and written in each step):
 1. Stage: wait until every rank's FREE >= m - SLOTS + 1 (no rank still reads
    slot m % SLOTS), write the input into the stage slot (split: all but the
    slice this rank reduces itself; or its place into the head), then the
    stamp, then PUB = m + 1; ring.
 2. Wait until every rank's PUB >= m + 1; compare every rank's stamp with
    this rank's: a difference aborts (below) with a message that names it.
 3. Reduce from every rank's stage slot (or input); then either the result is
    this rank's (direct: FREE = m + 1, ring), or its slice goes into its red
    slot, RED = m + 1, ring; wait until every rank's RED >= m + 1, copy every
    red slot's slice, FREE = m + 1, ring.

Waiting for counters (any step):
 1. If every counter waited for has reached its target, return.
 2. Read BELL into b.
 3. If every counter has reached its target now, return.
 4. If ABORT is set, raise CollectiveAbortedError.
 5. If a rank waited for has set DONE (it returned from its step), check its
    counter once more, else fail: the ranks made different calls.
 6. Wait on BELL while it equals b: spin (the first time round, and only when
    every rank can have a core of its own; how long adapts to the waits that
    slept, SPIN_NS at most), then sleep (at most WAIT_SLICE_S), counted in
    SLEEPERS while in the kernel; go to 2.

Ringing: add 1 to BELL; issue FUTEX_WAKE (every waiter) only if SLEEPERS is
non-zero. No wake-up is lost: a waiter reads BELL (2) before it checks (3) and
sleeps only while BELL still equals b, and it raises SLEEPERS before the
kernel compares BELL, so a ringer that reads SLEEPERS = 0 bumped BELL first
and the futex returns at once.

Leaving (a rank's step returns, or raises):
 1. If it raised and ABORT is 0, store ABORT = rank + 1.
 2. Store DONE = 1 and ring: a rank waiting on one that has left wakes and
    fails at its step 5 instead of hanging.

Aborting (nothing hangs):
 - A rank that fails inside a collective (a stamp mismatch, a rank gone)
   stores ABORT = rank + 1 if ABORT is 0, and rings.
 - The parent stores ABORT = culprit + 1 when a rank's worker dies or raises,
   or WORLD + 1 when the map fails or is dropped before every rank delivered,
   and rings.
 - Every waiting rank wakes, sees ABORT at its step 4, and raises; a sleeping
   rank also looks at ABORT every WAIT_SLICE_S.
"""
import time

from .._errors import CollectiveAbortedError, CollectiveError
from .._options import CORES

# Bytes of a stage slot: the most of one rank's input a round carries. A round
# costs a few Python calls per rank (about 10-20 us), so slots must be large
# enough to hide that; with every rank's SLOTS slots they should also stay in
# the cache between the write and the reads. Past 16 ranks the slot shrinks
# so that a rank's area stays near STAGE_BUDGET.
MAX_SLOT_BYTES = 1 << 20
MIN_SLOT_BYTES = 64 << 10
STAGE_BUDGET = 16 << 20
# Rounds a rank may run ahead of the slowest rank (>= 2): each is a stage slot
# and a red slot of every rank.
SLOTS = 4
# Spin before a futex sleep, only when every rank can have a core of its own:
# a rank that answers within this costs no system call. The spin adapts: a
# wait that ended in a sleep longer than SPIN_NS halves it (the other ranks
# are off their cores, so spinning takes a core they need); one shorter sets
# it to twice that wait.
SPIN_NS = 100_000
# A sleeping rank wakes this often to look at its parent (the rest wakes it).
WAIT_SLICE_S = 1.0

MAGIC = 0x706D61707274_C012
H_MAGIC = 0
H_WORLD = 8
H_ABORT = 12       # 0, or the failing rank + 1 (the parent uses world + 1 for "map over")
H_SLOTS = 16
H_BELL = 20
H_SLOT_BYTES = 24
H_RED_BYTES = 32
H_SLEEPERS = 40
H_AXIS_LEN = 44
H_AXIS = 64        # axis name, utf-8, up to 256 bytes
AXIS_MAX = 256
LINES = 512
LINE = 64
L_PUB, L_RED, L_FREE, L_DONE = 0, 4, 8, 12
HEAD = 64          # a stage slot's head: stamp, then where its input is
HD_STAMP, HD_SRC_SEG, HD_SRC_OFF = 0, 8, 16

MASK = 0xFFFFFFFF
HALF = 0x80000000
WAKE_ALL = 0x7FFFFFFF


def slot_bytes(world):
    b = max(MIN_SLOT_BYTES, min(MAX_SLOT_BYTES, STAGE_BUDGET // max(1, world)))
    return b // 64 * 64


def red_bytes(world, slot):
    """A red slot holds one rank's slice of a round: ceil(slot / world) and
    one element more, 64-byte aligned."""
    return (slot // world + 64 + 63) // 64 * 64


def data_off(world):
    """Where the ranks' slot areas begin: after the header and rank lines."""
    return (LINES + world * LINE + 4095) // 4096 * 4096


def rank_stride(slots, slot, red):
    return slots * (HEAD + slot + red)


def segment_size(world):
    slot = slot_bytes(world)
    return data_off(world) + world * rank_stride(SLOTS, slot, red_bytes(world, slot))


def ring(r):
    """Ring the segment's bell: wake every sleeping rank, if any sleeps."""
    r.add32(H_BELL, 1)
    if r.load32(H_SLEEPERS):
        r.wake32(H_BELL, WAKE_ALL)


# --------------------------------------------------------------------------
# parent side


class SpmdParent:
    """The parent's handle on one SPMD map's collective segment."""

    def __init__(self, pool, world, axis_name):
        self.world = world
        self.axis_name = axis_name
        self.seg = pool.share(segment_size(world), reserve=False)
        r = self.seg.region
        slot = slot_bytes(world)
        r.store32(H_WORLD, world)
        r.store32(H_SLOTS, SLOTS)
        r.store64(H_SLOT_BYTES, slot)
        r.store64(H_RED_BYTES, red_bytes(world, slot))
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
        r.add32(H_BELL, 1)
        r.wake32(H_BELL, WAKE_ALL)

    def complete(self):
        return len(self.delivered) >= self.world


# --------------------------------------------------------------------------
# rank side (in a worker)


class RankEndpoint:
    """One rank's end of the segment: its attach, the places of every rank's
    lines and slots, and the waits, rings and aborts of the protocol above."""

    __slots__ = ("seg", "r", "mm", "rank", "world", "axis", "slots", "slot_bytes",
                 "red_bytes", "sent", "calls", "line", "lines", "other_lines", "stage", "red",
                 "spin", "max_spin", "broken")

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
        self.slots = k = r.load32(H_SLOTS)
        self.slot_bytes = slot = r.load64(H_SLOT_BYTES)
        self.red_bytes = red = r.load64(H_RED_BYTES)
        self.sent = self.calls = 0
        stride = rank_stride(k, slot, red)
        base = data_off(w)
        # stage[j][q]: offset of the head of rank q's stage slot j (its data
        # follows the head); red[j][q]: offset of rank q's red slot j.
        self.stage = [tuple(base + q * stride + j * (HEAD + slot) for q in range(w))
                      for j in range(k)]
        self.red = [tuple(base + q * stride + k * (HEAD + slot) + j * red for q in range(w))
                    for j in range(k)]
        self.lines = tuple(LINES + q * LINE for q in range(w))
        self.line = self.lines[rank]
        self.other_lines = self.lines[:rank] + self.lines[rank + 1:]
        self.spin = self.max_spin = SPIN_NS if w <= CORES else 0
        self.broken = None

    def publish(self, field, value):
        """Store this rank's counter `field` = value and ring."""
        r = self.r
        r.store32(self.line + field, value & MASK)
        r.add32(H_BELL, 1)
        if r.load32(H_SLEEPERS):
            r.wake32(H_BELL, WAKE_ALL)

    def wait_all(self, field, target, what):
        """Wait until every other rank's counter `field` reaches `target`
        (mod 2**32)."""
        r = self.r
        target &= MASK
        for line in self.other_lines:
            if ((r.load32(line + field) - target) & MASK) >= HALF:
                self._wait(line, field, target, what)

    def _wait(self, line, field, target, what, spun=False):
        """Wait for one rank's counter (steps 1-6 above); spun: the caller
        has already spun for self.spin (straight to sleep)."""
        r = self.r
        off = line + field
        slept = 0
        while True:
            b = r.load32(H_BELL)
            if ((r.load32(off) - target) & MASK) < HALF:
                if slept:
                    self._adapt_spin(time.perf_counter_ns() - slept)
                return
            a = r.load32(H_ABORT)
            if a:
                raise self._aborted(a)
            if r.load32(line + L_DONE):
                if ((r.load32(off) - target) & MASK) < HALF:
                    return
                peer = (line - LINES) // LINE
                raise self._fail(CollectiveError(
                    "pmaprt: rank %d of axis %r returned from its step while rank %d waited for "
                    "it to %s (collective call %d of this rank): every rank must make the same "
                    "collective calls, in the same order, with arrays of the same size"
                    % (peer, self.axis, self.rank, what, self.calls)))
            if not spun and self.spin:
                spun = True
                r.wait32(H_BELL, b, 0.0, self.spin)
                continue
            if not slept:
                slept = time.perf_counter_ns()
            r.wait32(H_BELL, b, WAIT_SLICE_S, 0, H_SLEEPERS)

    def _adapt_spin(self, waited_ns):
        """A wait went to sleep and took waited_ns: spin about that long next
        time if it was short, else half as long as now."""
        if waited_ns < self.max_spin:
            self.spin = min(self.max_spin, 2 * waited_ns)
        else:
            self.spin //= 2

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
        ring(r)
        return err

    def leave(self, failed):
        r = self.r
        if failed and not r.load32(H_ABORT):
            r.store32(H_ABORT, self.rank + 1)
        self.publish(L_DONE, 1)
