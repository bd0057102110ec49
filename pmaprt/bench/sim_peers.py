"""The peers' scheduling policies in the simulator (``pmaprt.bench.sim``).

Each peer is modelled from its source, as of the versions the harness runs:

* ``mp_pool_map``: ``multiprocessing.Pool.map``, chunks of ceil(n / 4W)
  (``Pool._map_async``: divmod(n, 4W), plus one if a remainder), all put on
  one shared task queue at the start; a free worker takes the next.
* ``mp_pool_imap``: ``Pool.imap``, chunk 1, the same queue.
* ``mpire``: ``WorkerPool.map``, chunks of ceil(n / 64W) (``params.py``: 64
  splits per job), at most 2 chunks per worker in flight
  (``max_tasks_active`` = 2W chunks), handed round-robin at first, then each
  to the worker whose result came in (``comms._get_task_worker_id``).
* ``joblib``: ``Parallel(batch_size="auto")`` on loky: 2W batches of one item
  first (``pre_dispatch="2*n_jobs"``), then one batch per completed one, sized
  by ``AutoBatchingMixin.compute_batch_size`` (below, its arithmetic as in
  joblib 1.x) from the dispatch-to-completion time of batches of the current
  size (EWMA 0.8/0.2), and cut into W (near the end 10W) batches per slice
  of the input (``Parallel.dispatch_one_batch``).
* ``dask``: ``client.map``, one task per item, one at a time per one-thread
  worker (worker-saturation 1.1), each costing the central scheduler
  DASK_TASK_S of serial time before its worker gets it.
* ``greedy``: one item at a time from a shared queue, no overhead at all:
  the best that a scheduler that does not know the costs can do taking
  items in order. A reference, not a library.
"""
from __future__ import annotations

import math
from collections import deque
from typing import List, Optional, Tuple

from .sim_engine import FREE, Costs, Engine, Overheads, SimResult

#: the central scheduler's serial seconds per task (Dask's own figure: about 1 ms)
DASK_TASK_S = 1e-3
#: joblib's AutoBatchingMixin bounds on a batch's duration, seconds
JOBLIB_MIN_BATCH_S = 0.2
JOBLIB_MAX_BATCH_S = 2.0


def mp_pool_chunksize(n: int, workers: int) -> int:
    cs, extra = divmod(n, 4 * workers)
    return max(1, cs + (1 if extra else 0))


def mpire_chunksize(n: int, workers: int) -> int:
    return max(1, math.ceil(n / (64 * workers)))


def static_chunks(n: int, size: int) -> List[Tuple[int, int]]:
    return [(lo, min(size, n - lo)) for lo in range(0, n, size)]


class QueueSim:
    """Chunks handed out from a queue: shared (depth None: a free worker
    takes the next chunk) or per worker (depth k: at most k chunks held per
    worker, refilled by the parent as each result comes in, refill_s of its
    serial time per chunk)."""

    def __init__(self, engine: Engine, chunks, depth: Optional[int] = None,
                 refill_s: float = 0.0):
        self.e = engine
        self.pending = deque(chunks)
        self.depth = depth
        self.refill_s = refill_s
        self.shared: deque = deque()          # (lo, n, available_at)
        self.own = [deque() for _ in range(engine.workers)]
        self.idle = set(range(engine.workers))

    def start(self):
        e = self.e
        t = e.over.start_s
        if self.depth is None:
            for lo, n in self.pending:
                self.shared.append((lo, n, t))
            self.pending.clear()
            for w in range(e.workers):
                self.idle.discard(w)
                e.at(t, self._next, w)
            return
        # round-robin at first, depth chunks per worker
        for _ in range(self.depth):
            for w in range(e.workers):
                self._give(w, t)

    def _give(self, w, t):
        if not self.pending:
            return
        lo, n = self.pending.popleft()
        avail = self.e.parent(t, self.refill_s) if self.refill_s else t
        self.own[w].append((lo, n, avail))
        if w in self.idle:
            self.idle.discard(w)
            self.e.at(max(avail, self.e.now), self._next, w)

    def _next(self, w):
        q = self.shared if self.depth is None else self.own[w]
        if not q:
            self.idle.add(w)
            return
        self.idle.discard(w)
        lo, n, avail = q.popleft()
        e = self.e
        t0 = max(e.now, avail) + e.over.claim_s
        e.at(t0 + e.chunk_time(lo, n) + e.over.chunk_s, self._done, w, lo, n)

    def _done(self, w, lo, n):
        e = self.e
        got = e.record(e.now, n)
        self.completed(w, lo, n, got)
        e.at(e.now, self._next, w)

    def completed(self, w, lo, n, t_parent):
        """The parent has this result at t_parent: refill (per-worker queues)."""
        if self.depth is not None:
            self._give(w, t_parent)


class JoblibSim(QueueSim):
    """joblib's auto-batching (see the module docstring) on a shared queue."""

    def __init__(self, engine: Engine, pre_dispatch: Optional[int] = None):
        super().__init__(engine, [], depth=None)
        self.n = engine.costs.n
        self.pre_dispatch = pre_dispatch if pre_dispatch is not None else 2 * engine.workers
        self.next_item = 0
        self.ready: deque = deque()
        self.effective = 1
        self.smoothed = 0.0
        self.sent = {}           # (lo, n) -> dispatch time
        self.batch_sizes: List[int] = []

    # AutoBatchingMixin.compute_batch_size, its arithmetic
    def compute_batch_size(self) -> int:
        old, d = self.effective, self.smoothed
        if 0 < d < JOBLIB_MIN_BATCH_S:
            ideal = int(old * JOBLIB_MIN_BATCH_S / d) * 2
            bs = max(min(2 * old, ideal), 1)
            self.effective = bs
        elif d > JOBLIB_MAX_BATCH_S and old >= 2:
            bs = max(2 * int(old * JOBLIB_MIN_BATCH_S / d), 1)
            self.effective = bs
        else:
            bs = old
        if bs != old:
            self.smoothed = 0.0
        return bs

    def batch_completed(self, size, duration):
        if size == self.effective:
            self.smoothed = duration if self.smoothed == 0.0 else 0.8 * self.smoothed + 0.2 * duration

    def dispatch_one_batch(self, t, limit=None) -> bool:
        bs = self.compute_batch_size()
        if not self.ready:
            W = self.e.workers
            stop = self.n if limit is None else min(self.n, limit)
            take = min(bs * W, stop - self.next_item)
            if take <= 0:
                return False
            lo = self.next_item
            self.next_item += take
            original = limit is None
            final = max(1, take // (10 * W)) if original and take < bs * W else max(1, take // W)
            for a in range(lo, lo + take, final):
                self.ready.append((a, min(final, lo + take - a)))
        lo, n = self.ready.popleft()
        self.sent[(lo, n)] = t
        self.batch_sizes.append(n)
        self.shared.append((lo, n, t))
        if self.idle:
            w = min(self.idle)
            self.idle.discard(w)
            self.e.at(max(t, self.e.now), self._next, w)
        return True

    def start(self):
        t = self.e.over.start_s
        while self.dispatch_one_batch(t, limit=self.pre_dispatch):
            pass

    def completed(self, w, lo, n, t_parent):
        self.batch_completed(n, t_parent - self.sent.pop((lo, n)))
        self.e.at(t_parent, self.dispatch_one_batch, t_parent)


def _run(engine: Engine, sim, name: str) -> SimResult:
    sim.start()
    return engine.run(name)


def simulate_peer(policy: str, costs: Costs, workers: int, over: Overheads) -> SimResult:
    """One map under a peer's policy (names: PEERS)."""
    n = costs.n
    if policy == "mp_pool_map":
        e = Engine(workers, costs, over)
        return _run(e, QueueSim(e, static_chunks(n, mp_pool_chunksize(n, workers))), policy)
    if policy == "mp_pool_imap":
        e = Engine(workers, costs, over)
        return _run(e, QueueSim(e, static_chunks(n, 1)), policy)
    if policy == "mpire":
        e = Engine(workers, costs, over)
        return _run(e, QueueSim(e, static_chunks(n, mpire_chunksize(n, workers)), depth=2), policy)
    if policy == "joblib":
        e = Engine(workers, costs, over)
        return _run(e, JoblibSim(e), policy)
    if policy == "dask":
        e = Engine(workers, costs, over)
        return _run(e, QueueSim(e, static_chunks(n, 1), depth=1, refill_s=DASK_TASK_S), policy)
    if policy == "greedy":
        e = Engine(workers, costs, FREE)
        return _run(e, QueueSim(e, static_chunks(n, 1)), policy)
    raise ValueError("sim: unknown policy %r; choose from %s" % (policy, ", ".join(PEERS)))


PEERS = ("mp_pool_map", "mp_pool_imap", "joblib", "mpire", "dask", "greedy")
