"""The collective segment of one SPMD map: its layout, its words, both sides.

The parent makes one segment per SPMD map (`SpmdParent`); each rank (the worker
running shard r) attaches to it as a `RankEndpoint`, which owns the waiting,
ringing and aborting below. The reduction that runs over these words is in
`reduce.py`.

Layout::

    [header 512 B][rank lines: 64 B each][pad to 4096]
    [rank 0: SLOTS x (64 B stamp + SLOT_BYTES)] ... [rank N-1: ...]

    header:     MAGIC, WORLD, ABORT, SLOTS, SLOT_BYTES, AXIS_LEN, AXIS (name, utf-8)
    rank line:  PUB  messages this rank published           (written by the rank)
                ACK  messages of its left neighbour it took  (written by the rank)
                BELL doorbell: bumped to wake the rank       (written by anyone)
                SLEEP 1 while the rank sleeps on BELL        (written by the rank)
                DONE 1 once the rank's step has returned     (written by the rank)

A rank writes only into its own slots and reads only its left neighbour's
(rank r-1 mod N). Message m of a rank goes to slot m % SLOTS of its own area;
its first 8 bytes are a stamp, (call number << 32) | crc32(dtype, op, length).
Counters are 32-bit and compared modulo 2**32. All atomics are sequentially
consistent.

The protocol
------------

Set-up (parent):
 1. The parent shares a zeroed segment and writes WORLD, SLOTS, SLOT_BYTES
    and the axis name, then MAGIC last.
 2. Each worker that runs shard r attaches as rank r; it refuses a segment
    without MAGIC.

Sending message m (rank r, to its right neighbour r+1):
 1. Wait until the right neighbour's ACK >= m - SLOTS + 1: slot m % SLOTS no
    longer holds a message it has yet to read.
 2. Write the payload into the slot, then the slot's stamp.
 3. Store PUB = m + 1.
 4. Ring the right neighbour's BELL.

Receiving message j (rank r, from its left neighbour r-1):
 1. Wait until the left neighbour's PUB >= j + 1.
 2. Read the stamp of its slot j % SLOTS; if it is not the stamp this rank
    expects, the ranks disagree: abort (below) with a message that names the
    difference.
 3. Read (reduce or copy) the payload.
 4. Store ACK = j + 1 and ring the left neighbour's BELL, so that it may
    reuse the slot. (With two ranks the left neighbour is the right one too,
    and the send that follows a receive rings it anyway: only a receive with
    no send after it, the last of a round, rings.)

Waiting for a counter (the wait of either step 1):
 1. If the counter has reached its target, return.
 2. Read the own BELL into b.
 3. If the counter has reached its target now, return.
 4. If ABORT is set, raise CollectiveAbortedError.
 5. If the peer waited on has set DONE (it returned from its step), check the
    counter once more, else fail: the ranks made different calls.
 6. The first time round, and only when every rank can have a core of its
    own, spin on BELL for SPIN_NS; go to 2.
 7. Store SLEEP = 1, sleep on BELL while it equals b (at most WAIT_SLICE_S),
    store SLEEP = 0; go to 2.

Ringing a rank: add 1 to its BELL; issue FUTEX_WAKE only if its SLEEP is 1.
No wake-up is lost: the waiter reads BELL (2) before it checks (3) and sleeps
only while BELL still equals b, and a ringer that reads SLEEP = 0 bumped BELL
before the waiter stored SLEEP = 1, so the futex sees the new BELL and returns
at once.

Leaving (a rank's step returns, or raises):
 1. If it raised and ABORT is 0, store ABORT = rank + 1 and ring every BELL.
 2. Store DONE = 1 and ring both neighbours' BELLs: a neighbour waiting on a
    rank that has left wakes and fails at its step 5 instead of hanging.

Aborting (nothing hangs):
 - A rank that fails inside a collective (a stamp mismatch, a neighbour gone)
   stores ABORT = rank + 1 if ABORT is 0, and rings every BELL.
 - The parent stores ABORT = culprit + 1 when a rank's worker dies or raises,
   or WORLD + 1 when the map fails or is dropped before every rank delivered,
   and rings every BELL.
 - Every waiting rank wakes, sees ABORT at its step 4, and raises; a sleeping
   rank also looks at ABORT every WAIT_SLICE_S.
"""
from .._errors import CollectiveAbortedError, CollectiveError
from .._options import CORES

# Bytes per message slot. A block of a round is at most one slot: smaller slots
# pipeline more finely but cost more messages (about 10 us of Python each).
SLOT_BYTES = 256 * 1024
# Slots per rank: how far a rank may run ahead of its right neighbour (>= 2).
SLOTS = 4
# Spin before a futex sleep, only when every rank can have a core of its own:
# a neighbour that answers within this costs no system call.
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

MASK = 0xFFFFFFFF
HALF = 0x80000000


def segment_size(world):
    return data_off(world) + world * SLOTS * (STAMP + SLOT_BYTES)


def data_off(world):
    """Where the ranks' slot areas begin: after the header and rank lines."""
    return (LINES + world * LINE + 4095) // 4096 * 4096


def ring_all(r, world):
    """Ring every rank's BELL, sleeping or not (an abort)."""
    base = LINES
    for q in range(world):
        off = base + q * LINE
        r.add32(off + L_BELL, 1)
        r.wake32(off + L_BELL, 1)


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


# --------------------------------------------------------------------------
# rank side (in a worker)


class RankEndpoint:
    """One rank's end of the segment: its attach, its counters and the waits,
    rings and aborts of the protocol above."""

    __slots__ = ("seg", "r", "mm", "rank", "world", "axis", "slots", "slot_bytes", "sent",
                 "recv", "calls", "own_off", "left_off", "line", "lline", "rline",
                 "spin", "broken")

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
        stride = self.slots * (STAMP + self.slot_bytes)
        self.own_off = data_off(w) + rank * stride
        self.left_off = data_off(w) + ((rank - 1) % w) * stride
        self.line = LINES + rank * LINE
        self.lline = LINES + ((rank - 1) % w) * LINE
        self.rline = LINES + ((rank + 1) % w) * LINE
        self.spin = SPIN_NS if w <= CORES else 0
        self.broken = None

    def _ring(self, line):
        r = self.r
        r.add32(line + L_BELL, 1)
        if r.load32(line + L_SLEEP):
            r.wake32(line + L_BELL, 1)

    def _wait(self, off, target, peer_line, what):
        """Wait until the counter at `off` reaches `target` (mod 2**32)."""
        r = self.r
        if ((r.load32(off) - target) & MASK) < HALF:
            return
        bell = self.line + L_BELL
        sleep = self.line + L_SLEEP
        spun = False
        while True:
            b = r.load32(bell)
            if ((r.load32(off) - target) & MASK) < HALF:
                return
            a = r.load32(H_ABORT)
            if a:
                raise self._aborted(a)
            if r.load32(peer_line + L_DONE):
                if ((r.load32(off) - target) & MASK) < HALF:
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
