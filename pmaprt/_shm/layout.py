"""The control segment's layout: every shared word's offset, and `Layout`.

One control segment per pool, an anonymous memfd mapped by the parent and
inherited by every worker::

    [header][job slot 0]...[job slot S-1][worker area 0]...[worker area W-1]

The header fills the first page (slots start at 4096); each slot and each
worker area is rounded up to whole pages. Offsets below are in bytes from the
start of their part; `tests/test_shm_layout.py` checks this text against the
constants.

Header (offset from the segment's start)::

    offset  size  name               what
    0       8     H_MAGIC            MAGIC, written by the parent at creation
    16      4     H_BOARD_SEQ        bumped by every post; idle workers sleep on it
    20      4     H_BOARD_SLEEPERS   workers asleep in the kernel on H_BOARD_SEQ
    24      4     H_RESULTS_SEQ      bumped by every record; the parent sleeps on it
    28      4     H_PARENT_SLEEPING  parent threads asleep in the kernel on it
    32      4     H_SHUTDOWN         1: workers leave
    40      8     H_ACTIVE_MASK      bit s set while slot s holds an active job
    48      8     H_HOT_SPINNER      rank + 1 of the hot spinner (| HOT_CLAIMED)
    56      8     H_PARENT_WANT      the one record a sleeping parent waits for
    64      4     H_DEATHS           bumped by the zygote as it reaps a worker

Job slot (offset from the slot's start, `Layout.slot(s)`)::

    offset  size  name               what
    0       4     S_STATE            SLOT_FREE, SLOT_ACTIVE or SLOT_CLOSED
    4       4     S_REFS             workers inside the job
    8       8     S_GEN              the job's id (increases per post)
    16      4     S_MODE             MODE_INDEX, MODE_FEED or MODE_TASK
    20      4     S_FLAGS            FLAG_* bits
    24      8     S_N                items (-1 while unknown, feed mode)
    32      8     S_LIMIT            index: items below it may be claimed; feed: chunks published
    40      8     S_NEXT             index: next unassigned item; feed: next chunk; task: 1 once taken
    48      4     S_CANCEL           1: workers stop claiming
    52      4     S_CHUNK            fixed chunk size (0: adaptive)
    56      4     S_DESC_LEN         the descriptor's length
    60      4     S_NWORK            ranks that take part (rank < nwork)
    64      8     S_DESC_SEG         the descriptor's segment id (0: inline, at desc_off)
    72      8     S_DESC_OFF         the descriptor's offset in that segment
    80      8     S_MAX_ITEMS        recycle a worker after this many items (0: never)
    88      4     S_TASK_DONE        task: 1 result in the slot, 2 record in the ring
    96      8     S_TASK_LEN         task: the length of the result in the slot
    120     8     S_SPMD_SEG         SPMD map: its collective segment's id
    128     8     S_RANGES           one packed range word per worker (8 * nworkers)

then, from `Layout.retry_off` (S_RANGES + 8 * nworkers), RETRY_RANGES range
words that no worker owns (the parent puts a lost chunk's items there), and
from `Layout.desc_off` (64-byte aligned) INLINE_DESC bytes of inline
descriptor, which a task's result overwrites.

Worker area (offset from the area's start, `Layout.worker(w)`)::

    offset  size  name               what
    0       4     W_PID              the worker's pid
    4       4     W_STATE            WSTATE_STARTING, WSTATE_READY, WSTATE_RECYCLED
    8       8     W_CUR_GEN          the current chunk's job
    16      8     W_CUR_LO           the current chunk's first item
    24      8     W_CUR_N            its item count (0: none; -1: loading the job)
    32      8     W_HEAD             ring: bytes consumed (parent)
    40      8     W_TAIL             ring: bytes written (worker)
    48      4     W_SPACE_SEQ        bumped by the parent as it frees ring space
    52      4     W_SPACE_WAIT       1 while the worker waits for ring space
    56      8     W_CUR_DONE         items of the current chunk finished (progress)
    64      8     W_CUR_K            feed: the chunk claimed, until its items are read (-1)
    72      8     W_CLAIM            odd while the worker moves items between words
    80      4     W_SLOT             slot + 1 whose S_REFS this worker holds (0: none)
    128     -     W_RING             the result ring, RING_SIZE bytes

Result record (in a worker's ring, 8-byte aligned; `REC`)::

    total_len u32, kind u32, gen u64, start i64, count u32, payload_len u32,
    t0 f64, t1 f64 (wall clock), cpu f64 (the items' calls), enc f64 (the
    chunk's own overhead), then the payload.
"""
import struct

from .loader import core

_core = core()
# The C range words' limits: a packed word holds (lo, n) in 64 bits.
RANGE_N_MAX = _core.RANGE_N_MAX
RANGE_LO_MAX = _core.RANGE_LO_MAX

MAGIC = 0x706D61707274_0001

# --- header
H_MAGIC = 0
H_BOARD_SEQ = 16
H_BOARD_SLEEPERS = 20
H_RESULTS_SEQ = 24
H_PARENT_SLEEPING = 28
H_SHUTDOWN = 32
H_ACTIVE_MASK = 40
# rank + 1 of the one worker spinning for the next job after finishing work
# (0: none). A task posted while it spins needs no wake call.
H_HOT_SPINNER = 48
# Set in H_HOT_SPINNER by the one post that skipped its wake call because of
# it: each hold covers one task, later posts wake a sleeper as usual.
HOT_CLAIMED = 1 << 32
# What a parent asleep for results waits for: (slot + 1) << WANT_SHIFT |
# position, for an ordered map; 0: anything. A worker skips the wake call for
# a plain result record that does not hold that position.
H_PARENT_WANT = 56
WANT_SHIFT = 48
WANT_POS_MASK = (1 << WANT_SHIFT) - 1
# Bumped (then H_RESULTS_SEQ, with a wake) by the zygote each time it reaps a
# worker it forked: a waiting parent checks its workers at once rather than
# at its next POLL_S look (_runtime/zygote.py).
H_DEATHS = 64
HEADER_SIZE = 72

# --- job slot
S_STATE = 0
S_REFS = 4
S_GEN = 8
S_MODE = 16
S_FLAGS = 20
S_N = 24
S_LIMIT = 32
S_NEXT = 40
S_CANCEL = 48
S_CHUNK = 52
S_DESC_LEN = 56
S_NWORK = 60
S_DESC_SEG = 64
S_DESC_OFF = 72
S_MAX_ITEMS = 80
# A task's result (see _runtime/task.py), when it fits the slot's inline
# area: the worker writes it over the descriptor, stores its length, then
# S_TASK_DONE = 1. Larger results and errors go through the result ring, and
# then S_TASK_DONE = 2 (the caller spins on this word first).
S_TASK_DONE = 88
S_TASK_LEN = 96
S_SPMD_SEG = 120
S_RANGES = 128
# Range words after the workers' own that no worker owns: the parent puts the
# items of a lost chunk there; workers steal from them first. More words let
# more lost chunks wait at once; each costs 8 bytes per slot.
RETRY_RANGES = 8

SLOT_FREE, SLOT_ACTIVE, SLOT_CLOSED = 0, 1, 2
MODE_INDEX, MODE_FEED = 1, 2
# One call (Pool.apply): the descriptor is (function bytes, args, kwargs).
MODE_TASK = 3
FLAG_FEED_DONE = 1
FLAG_ON_ERROR_RETURN = 2  # an exception takes its item's place in the results
FLAG_PROGRESS = 4         # workers publish items done per chunk (retries, timeouts)
# SPMD map: shard i is claimed by worker i only (no spans, no stealing).
FLAG_SPMD = 8

# Descriptors up to this size travel inside the slot: a one-item job then
# needs no segment and no socket message at all (the round-trip path). Each
# slot carries this much memory, so it bounds what max_jobs costs.
INLINE_DESC = 32 * 1024

# --- worker area
W_PID = 0
W_STATE = 4
W_CUR_GEN = 8
W_CUR_LO = 16
W_CUR_N = 24
W_HEAD = 32
W_TAIL = 40
W_SPACE_SEQ = 48
W_SPACE_WAIT = 52
W_CUR_DONE = 56
W_CUR_K = 64
# Odd while the worker moves items between shared words (a claim, a steal, an
# untake): a worker that dies with it odd may have taken items it had not yet
# recorded anywhere, and the parent reconciles its job (_runtime/claims.py).
W_CLAIM = 72
# The job slot (+1) whose S_REFS this worker holds (0: none): a worker killed
# inside a job cannot drop its reference; the parent drops it for it, or the
# slot could never be reused.
W_SLOT = 80
W_RING = 128
WSTATE_STARTING, WSTATE_READY, WSTATE_RECYCLED = 0, 1, 2

# Result ring per worker. Pages are touched only as records are written, so a
# large ring costs nothing until it is used; a small one makes a worker wait
# for a slow consumer sooner. A record bigger than half the ring goes over the
# worker's socket instead.
RING_SIZE = 4 * 1024 * 1024

# The record header: total_len, kind, gen, start, count, payload_len, t0, t1,
# cpu, enc (see the module docstring).
REC = struct.Struct("<IIQqIIdddd")
REC_RESULT, REC_ERROR, REC_WRAP, REC_BIG = 1, 2, 3, 4
REC_KIND_MASK = 0xFF
REC_STOLEN = 0x100      # the chunk came from a steal
REC_BIG_ERROR = 0x200   # a BIG record whose payload is an error
REC_HAS_ERRORS = 0x400  # on_error="return": some results are returned exceptions
# Kinds the parent makes, never in a ring: results computed in the parent (the
# payload is already a list), and a result chunk holding returned exceptions.
REC_LOCAL = 5
REC_RESULT_ERRORS = 6

# H_ACTIVE_MASK has one bit per slot.
MAX_SLOTS = 64
SLOTS_OFF = 4096


def align(n, a=64):
    return (n + a - 1) // a * a


class Layout:
    """Offsets inside the control segment for a pool of `nworkers` and `nslots`."""

    def __init__(self, nworkers, nslots):
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError("nslots must be in 1..%d" % MAX_SLOTS)
        self.nworkers = nworkers
        self.nslots = nslots
        self.retry_off = S_RANGES + 8 * nworkers
        self.desc_off = align(self.retry_off + 8 * RETRY_RANGES)
        self.slot_size = align(self.desc_off + INLINE_DESC, 4096)
        self.slots_off = SLOTS_OFF
        self.workers_off = self.slots_off + nslots * self.slot_size
        self.worker_size = align(W_RING + RING_SIZE, 4096)
        self.size = self.workers_off + nworkers * self.worker_size

    def slot(self, s):
        return self.slots_off + s * self.slot_size

    def worker(self, w):
        return self.workers_off + w * self.worker_size


__all__ = [n for n in dir() if n.isupper() and not n.startswith("_")] + ["Layout", "align"]
