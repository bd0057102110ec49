"""pmaprt's own policy in the simulator, driven through its real code.

Nothing of the policy is copied here. Each virtual worker is a
``_runtime.claims.ClaimTaker`` (the worker's claim code) over a ``_core.Region``
on a local buffer laid out as one job slot (``_shm`` offsets) and W worker
areas, so every claim runs the real C range words (``range_take``,
``claim_span``, ``range_steal``) and the real order of own range, span of
the shared counter, retry words and victims (``_sched.victims``). Chunks are
sized by ``_sched.ChunkSizer``, which observes each chunk's virtual seconds as
a worker observes its measured ones; a chunk past ``_sched.preempt_deadline_s``
gives its unstarted items back with the real ``range_untake`` at the virtual
time of the stride that ends past the deadline. Claims happen at event
times, one at a time: two claims never race (see ``sim``'s limits).

The caller's probe (``_map/inline``, ``_map/collect``): a map over a list
starts in the caller, item 0 alone, then timed pieces of ``probe_piece_s(W)``
while items stay under the break-even (``probe_item_s``); the job for the rest
is posted at the first item's handoff (PROBE_HANDOFF_S), at a piece's handoff
(an item still running PROBE_HANDOFF_S past the piece's budget and
HANDOFF_CONFIRM_S after that: the workers take the items after it, the
caller finishes it), after one clearly dear
piece, or after PROBE_STRIKES dear pieces in a row. That sequence is modelled
here from those constants and functions: its pieces are the items' costs
alone, without the consumer's step, the clock reads or the post's own time.
"""
from __future__ import annotations

from typing import List, Optional

from .. import _sched
from .._core import Region
from .._map.inline import (HANDOFF_CONFIRM_S, PROBE_CLEAR_FACTOR, PROBE_FIRST_SLACK_S,
                           PROBE_HANDOFF_S, PROBE_MARGIN, PROBE_SLACK_S, PROBE_STRIKES,
                           probe_item_s, probe_piece_s)
from .._runtime.claims import ClaimTaker, begin_move, end_move
from .._shm import RETRY_RANGES, S_LIMIT, S_N, S_NEXT, S_RANGES, W_CUR_N
from .sim_engine import Costs, Engine, Overheads, SimResult

#: bytes of one virtual worker's area (every W_* word lies below it)
AREA = 128


class _Ctx:
    """The fields of a worker's job context (`_runtime.chunk._JobCtx`) that
    the claim code reads."""
    __slots__ = ("gen", "off", "spmd", "sizer", "nwork", "max_items", "retry_base", "rng",
                 "stolen")


class SimWorker(ClaimTaker):
    """A virtual worker: the real claim code over the local region."""

    def __init__(self, r, area, rank):
        self.r, self.area, self.rank = r, area, rank
        self.claim_seq = 0
        self.items_done = 0
        self.prog = [0]


class PmaprtSim:
    """One map of n items on W virtual workers, as pmaprt runs it.

    t_item: each worker's seconds per item carried from an earlier map of
    the same function (a warm pool), or None (a function never seen: the
    first chunk is one item). probe: start in the caller, as a map over a
    list with inline="auto" does. chunksize: a fixed size (chunksize=N)."""

    def __init__(self, engine: Engine, *, seed: int = 0, t_item=None, probe: bool = True,
                 chunksize: int = 0):
        self.e = engine
        W, n = engine.workers, engine.costs.n
        self.W, self.n = W, n
        self.retry_off = S_RANGES + 8 * W
        self.areas_off = (self.retry_off + 8 * RETRY_RANGES + AREA - 1) // AREA * AREA
        self.buf = bytearray(self.areas_off + AREA * W)
        self.r = Region(self.buf)
        self.probe = probe
        self.workers: List[SimWorker] = []
        self.ctxs: List[_Ctx] = []
        for w in range(W):
            wk = SimWorker(self.r, self.areas_off + AREA * w, w)
            ctx = _Ctx()
            ctx.gen, ctx.off, ctx.spmd, ctx.nwork, ctx.max_items = 1, 0, 0, W, 0
            ctx.retry_base = self.retry_off
            ctx.rng = _sched.victim_rng(seed, w)
            ctx.stolen = False
            tw = t_item[w] if isinstance(t_item, (list, tuple)) else t_item
            ctx.sizer = _sched.ChunkSizer(chunksize, tw)
            self.workers.append(wk)
            self.ctxs.append(ctx)

    # --- the caller's probe -------------------------------------------------

    def _probe(self) -> tuple:
        """(time the job is posted, first index the workers take, time the
        caller's items end); index n: no job."""
        c = self.e.costs
        per_item = PROBE_MARGIN * probe_item_s(self.W, cores=self.W)
        piece_s = probe_piece_s(self.W)
        cut_s = piece_s + PROBE_HANDOFF_S   # a piece's handoff, from its start
        first = c.work(0, 1)
        if first > PROBE_HANDOFF_S:
            return PROBE_HANDOFF_S, 1, first
        t = first
        if first > PROBE_CLEAR_FACTOR * per_item + PROBE_FIRST_SLACK_S:
            return t, 1, t
        done, strikes = 1, 0
        while done < self.n:
            k, dt = 0, 0.0
            while done + k < self.n and dt < piece_s:
                w = c.work(done + k, 1)
                if dt + w > cut_s + HANDOFF_CONFIRM_S and done + k + 1 < self.n:
                    # the helper finds this item running at the deadline and
                    # still HANDOFF_CONFIRM_S later: it cuts the piece after it
                    # and posts the rest
                    return t + cut_s + HANDOFF_CONFIRM_S, done + k + 1, t + dt + w
                dt += w
                k += 1
            cost = k * per_item + PROBE_SLACK_S
            dear = dt > cost
            strikes = strikes + 1 if dear else 0
            clear = dt > PROBE_CLEAR_FACTOR * cost or (k == 1 and dt > piece_s)
            done += k
            t += dt
            if done < self.n and (strikes >= PROBE_STRIKES or (dear and clear)):
                return t, done, t
        return t, self.n, t

    # --- the run --------------------------------------------------------------

    def start(self):
        e, r = self.e, self.r
        post, start, caller_end = self._probe() if self.probe else (0.0, 0, 0.0)
        if start:
            e.local(caller_end, start)
        if start >= self.n:
            return
        r.store64(S_N, self.n)
        r.store64(S_LIMIT, self.n)
        r.store64(S_NEXT, start)
        t0 = post + e.over.start_s
        for w in range(self.W):
            e.at(t0, self._claim, w)

    def _claim(self, w):
        e, o = self.e, self.e.over
        wk, ctx = self.workers[w], self.ctxs[w]
        got = wk.claim_index(ctx)
        if got is None:
            return      # this worker leaves the job (it would look at the board again)
        lo, n, stolen = got
        t0 = e.now + o.claim_s
        full = e.chunk_time(lo, n)
        sz = ctx.sizer
        if n > 1 and not sz.fixed and sz.t_item is not None:
            cut = self._cut_time(lo, n, t0, _sched.preempt_deadline_s(n, sz.t_item))
            if cut is not None:
                i, t_cut = cut
                e.at(t_cut, self._preempt, w, lo, n, i, t0, stolen)
                return
        e.at(t0 + full, self._done, w, n, t0, stolen)

    def _cut_time(self, lo, n, t0, budget) -> Optional[tuple]:
        """(items run, time) at the first stride boundary past the deadline
        before the chunk's end, as the worker's clock read finds it; None if
        the chunk ends first."""
        e = self.e
        stride = _sched.preempt_stride(n)
        i = 0
        while True:
            j = min(n, i + stride)
            if j >= n:
                return None
            if e.chunk_time(lo, j) > budget:
                return j, t0 + e.chunk_time(lo, j)
            i = j

    def _preempt(self, w, lo, n, i, t0, stolen):
        wk = self.workers[w]
        begin_move(wk)
        given = self.r.range_untake(self.range_word(w), lo + i, n - i, wk.area + W_CUR_N, i)
        end_move(wk)
        if given:
            self._done(w, i, t0, stolen)
        else:
            self.e.at(t0 + self.e.chunk_time(lo, n), self._done, w, n, t0, stolen)

    def range_word(self, w):
        """Worker w's range word in the slot."""
        return S_RANGES + 8 * w

    def _done(self, w, n, t0, stolen):
        e = self.e
        ctx = self.ctxs[w]
        ctx.sizer.observe(n, e.now - t0)
        self.workers[w].items_done += n
        e.record(e.now + e.over.chunk_s, n, stolen)
        e.at(e.now + e.over.chunk_s, self._claim, w)

    def t_items(self):
        return [c.sizer.t_item for c in self.ctxs]


def simulate_pmaprt(costs: Costs, workers: int, over: Overheads, *, seed: int = 0,
                    warm: bool = True, probe: bool = True, chunksize: int = 0) -> SimResult:
    """pmaprt's makespan for one map. warm: the result of a second map of the
    same items, its workers holding the cost per item the first one left
    (as in a benchmark's repeated runs); else a first map ever."""
    t_item = None
    if warm:
        first = PmaprtSim(Engine(workers, costs, over), seed=seed, probe=probe,
                          chunksize=chunksize)
        first.start()
        first.e.run("pmaprt")
        t_item = first.t_items()
    sim = PmaprtSim(Engine(workers, costs, over), seed=seed,
                    t_item=t_item, probe=probe, chunksize=chunksize)
    sim.start()
    return sim.e.run("pmaprt")
