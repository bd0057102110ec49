"""Claims: how a worker takes items, and how the parent finds items a dead
worker took without recording them.

Every item index a worker takes is, at every instant, in exactly one place:
a range word of its job's slot (one per worker, plus RETRY_RANGES that no
worker owns), the slot's shared counter S_NEXT (items not yet assigned), a
worker's current-chunk words (W_CUR_LO, W_CUR_N), or a record in a result
ring. The C calls move items and record where they went in one step
(`range_take`, `range_steal`, `claim_span`, `range_untake`, `cas64_mark`),
so when a worker dies the parent knows exactly which items it lost.

One window is left: between a call's compare-and-swap and the store that
records the items, they are nowhere. The claim bracket marks it:

1. Before a move, the worker adds 1 to its W_CLAIM (now odd): `begin_move`.
2. It moves items (the C call: a compare-and-swap, then the recording store).
3. It adds 1 again (now even): `end_move`. Every move is so bracketed: an
   index claim (own range, a span of S_NEXT, a retry word, a steal), a feed
   chunk's claim, a task's claim (task.py), and an untake that gives a cut
   chunk's unstarted items back (chunk.py).

The parent, finding a dead worker's W_CLAIM odd, marks its job suspect
(processes.py) and reconciles it (`_reconcile`, at each check, lock held):

4. Read every live worker's W_CLAIM; if any is odd, try again later.
5. Read where the job's items are, in an order that sees each item that moves
   while it reads: current-chunk words, then range words and S_NEXT, then
   the result rings (items move from a current chunk to a word or a ring
   only by a store to those first).
6. Read every W_CLAIM again: unchanged (no claim started or ended meanwhile)
   means the view is consistent. The job then runs again what is nowhere
   (`job.reconcile`); a task nobody holds is posted again (S_NEXT = 0).
   Changed: try again at the next check.

Memory ordering: every shared word is read and written with sequentially
consistent atomics (the C Region's load, store, add and compare-and-swap), so
all processes see all word updates in one order, and steps 4-6 rely on
exactly that. Bytes that are not words (a record's payload, a descriptor, a
task's result in its slot) are written before the word that publishes them
(W_TAIL, S_STATE, S_TASK_DONE) is stored, and read after that word is
loaded: the seq_cst store and load order them as a release and an acquire.
"""
from .. import _sched
from .._shm import (
    MODE_INDEX, RANGE_N_MAX, RETRY_RANGES, S_CANCEL, S_GEN, S_LIMIT, S_MODE, S_N, S_NEXT,
    S_NWORK, S_RANGES,
    W_CLAIM, W_CUR_GEN, W_CUR_K, W_CUR_LO, W_CUR_N,
)


def slot_has_work(r, off, retry_off):
    """Whether the job in the slot at `off` has items a worker could still
    claim: unassigned ones below the limit, or (index mode) items in a
    range word (a worker's, which a thief may take, or a retry word)."""
    if r.load32(off + S_CANCEL):
        return False
    if r.load64(off + S_NEXT) < r.load64(off + S_LIMIT):
        return True
    if r.load32(off + S_MODE) != MODE_INDEX:
        return False
    for w in range(r.load32(off + S_NWORK)):
        if r.range_get(off + S_RANGES + 8 * w)[1]:
            return True
    for j in range(RETRY_RANGES):
        if r.range_get(retry_off + 8 * j)[1]:
            return True
    return False


def begin_move(wk):
    """Step 1: W_CLAIM odd; worker `wk` is about to move items."""
    wk.claim_seq += 1
    wk.r.store64(wk.area + W_CLAIM, wk.claim_seq)


def end_move(wk):
    """Step 3: W_CLAIM even; the items moved are recorded where they went."""
    wk.claim_seq += 1
    wk.r.store64(wk.area + W_CLAIM, wk.claim_seq)


class ClaimTaker:
    """The worker's side (a worker mixin). State: claim_seq (its W_CLAIM)."""

    def claim_index(self, ctx):
        """The next chunk of an index-mode job, as (lo, n, stolen), or None."""
        r, a = self.r, self.area
        r.store64(a + W_CUR_N, 0)
        r.store64(a + W_CUR_GEN, ctx.gen)
        self.prog[0] = 0
        begin_move(self)
        try:
            return self._claim_index(ctx)
        finally:
            end_move(self)

    def _claim_index(self, ctx):
        # Own range first, then a span of the shared counter (guided
        # self-scheduling), then retry words, then the back half of a victim's
        # range, victims in an order drawn from RNG seeded by (seed, rank).
        r, off, a = self.r, ctx.off, self.area
        mine = off + S_RANGES + 8 * self.rank
        if ctx.spmd:
            # One shard per rank: this worker's own, never a span or a steal.
            lo, n = r.range_take(mine, 1, a + W_CUR_LO)
            return (lo, n, False) if n else None
        n_all = r.load64(off + S_N)
        while True:
            c = ctx.sizer.size(max(0, n_all - r.load64(off + S_NEXT)), ctx.nwork)
            if ctx.max_items:
                c = max(1, min(c, ctx.max_items - self.items_done))
            # The parent may lower the limit under items already in range
            # words (results large, memory short: _map/window.py): none at
            # or past it is started until it rises again.
            lim = r.load64(off + S_LIMIT)
            olo, on = r.range_get(mine)
            if on and olo >= lim:
                return None
            lo, n = r.range_take(mine, c, a + W_CUR_LO)
            if n:
                return lo, n, ctx.stolen
            ctx.stolen = False
            nxt = r.load64(off + S_NEXT)
            if nxt < lim:
                span = min(_sched.span_size(c, lim - nxt, ctx.nwork), RANGE_N_MAX)
                r.claim_span(off + S_NEXT, nxt, span, mine)
                continue
            # Items handed back by the parent (a dead worker's chunk) come first.
            base = ctx.retry_base
            for j in range(RETRY_RANGES):
                if r.range_steal(base + 8 * j, mine)[1]:
                    ctx.stolen = True
                    break
            else:
                for v in _sched.victims(ctx.rng, self.rank, ctx.nwork):
                    if r.range_steal(off + S_RANGES + 8 * v, mine)[1]:
                        ctx.stolen = True
                        break
                else:
                    return None

    def claim_feed(self, ctx):
        """The next published chunk of a feed-mode job, as (k, -1, False), or None."""
        r, off, a = self.r, ctx.off, self.area
        r.store64(a + W_CUR_N, 0)
        r.store64(a + W_CUR_K, -1)
        r.store64(a + W_CUR_GEN, ctx.gen)
        self.prog[0] = 0
        begin_move(self)
        try:
            while True:
                k = r.load64(off + S_NEXT)
                if k >= r.load64(off + S_LIMIT):
                    return None
                if r.cas64_mark(off + S_NEXT, k, k + 1, a + W_CUR_K, k):
                    return k, -1, False
        finally:
            end_move(self)


class Reconciler:
    """The parent's side (a runtime mixin): steps 4-6."""

    def _reconcile(self, job):
        """A worker died inside a claim: read a consistent view of where the
        job's items are and let the job run again what is nowhere; without a
        consistent view, try again at the next check. Lock held."""
        r, lay = self._r, self._layout
        areas = [lay.worker(w) for w in range(self.workers)]
        seq = [r.load64(a + W_CLAIM) for a in areas]
        if any(c & 1 for c in seq):
            return
        off = job.off
        if off is None:
            job.suspect = False
            return
        curs = []
        for a in areas:
            # The claimed feed chunk first: a worker stores its items' range
            # in W_CUR_LO/N before it clears W_CUR_K.
            k = r.load64(a + W_CUR_K)
            curs.append((r.load64(a + W_CUR_GEN), r.load64(a + W_CUR_LO), r.load64(a + W_CUR_N), k))
        words = []
        if r.load32(off + S_MODE) == MODE_INDEX:
            for w in range(self.workers):
                words.append(r.range_get(off + S_RANGES + 8 * w))
            for j in range(RETRY_RANGES):
                words.append(r.range_get(off + lay.retry_off + 8 * j))
        nxt = r.load64(off + S_NEXT)
        self._drain()
        if [r.load64(a + W_CLAIM) for a in areas] != seq:
            return
        if r.load64(off + S_GEN) != job.gen:
            job.suspect = False
            return
        job.suspect = False
        if job.reconcile(curs, [x for x in words if x[1]], nxt):
            r.store64(off + S_NEXT, 0)     # a task nobody holds: post it again
            self.wake_workers()
