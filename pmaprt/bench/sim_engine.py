"""The discrete-event core of the scheduler simulator (``pmaprt.bench.sim``).

W virtual workers and one parent share a virtual clock. A policy (pmaprt's in
``sim_pmaprt``, the peers' in ``sim_peers``) schedules events with ``at``;
a worker that finishes a chunk hands its record to the parent with
``record``. The parent is one serial server: it decodes records in the order
they arrive, and a map ends when the parent has decoded its last record, as
a real map ends when the caller holds every result.

Time of a chunk on a worker: the policy's per-chunk costs, plus
``Overheads.item_s`` per item, plus the items' own costs (``Costs``).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Sequence

import numpy as np


@dataclass(frozen=True)
class Overheads:
    """Seconds a runtime spends besides the items (measured: ``sim_measure``).

    start_s: from the call to the first claim of a worker (post and wake-up);
    claim_s: a worker's claim of one chunk; chunk_s: the rest of a chunk on
    the worker (reading its items, encoding and sending its results);
    item_s: per item on the worker beyond the call; parent_chunk_s and
    parent_item_s: the parent's serial work per record and per item of it
    (decoding, for the pipe-based peers also handing out the task)."""

    name: str
    start_s: float = 0.0
    claim_s: float = 0.0
    chunk_s: float = 0.0
    item_s: float = 0.0
    parent_chunk_s: float = 0.0
    parent_item_s: float = 0.0

    def as_dict(self):
        return asdict(self)


#: no overhead at all: what a policy's choices alone cost
FREE = Overheads("free")


class Costs:
    """Item costs in seconds, with O(1) sums over index ranges."""

    def __init__(self, seconds: Sequence[float]):
        a = np.asarray(seconds, dtype=np.float64)
        if a.ndim != 1 or len(a) == 0:
            raise ValueError("sim: item costs must be a non-empty 1-d sequence of seconds")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError("sim: item costs must be finite and >= 0 seconds")
        self.seconds = a
        self._prefix = [0.0] + np.cumsum(a).tolist()
        self.n = len(a)
        self.total = self._prefix[-1]
        self.longest = float(a.max())

    def work(self, lo: int, n: int) -> float:
        return self._prefix[lo + n] - self._prefix[lo]

    def ideal(self, workers: int) -> float:
        """A lower bound on any schedule: max(total / W, the dearest item)."""
        return max(self.total / workers, self.longest)


@dataclass
class SimResult:
    policy: str
    workers: int
    items: int
    makespan_s: float
    ideal_s: float
    total_s: float
    chunks: int
    chunk_sizes: List[int] = field(default_factory=list)
    steals: int = 0

    @property
    def over_ideal(self) -> float:
        """makespan / max(total / W, longest item) (the harness's /ideal)."""
        return self.makespan_s / self.ideal_s

    @property
    def over_even_share(self) -> float:
        """makespan / (total / W): ignores the dearest item's own bound."""
        return self.makespan_s / (self.total_s / self.workers)

    def as_dict(self):
        return {"policy": self.policy, "workers": self.workers, "items": self.items,
                "makespan_s": self.makespan_s, "ideal_s": self.ideal_s, "total_s": self.total_s,
                "over_ideal": self.over_ideal, "over_even_share": self.over_even_share,
                "chunks": self.chunks, "steals": self.steals,
                "chunk_median": _median(self.chunk_sizes)}


def _median(xs):
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2]


class Engine:
    """The virtual clock, the event queue and the parent's serial server."""

    def __init__(self, workers: int, costs: Costs, over: Overheads):
        if workers < 1:
            raise ValueError("sim: workers must be >= 1, got %r" % (workers,))
        self.workers = workers
        self.costs = costs
        self.over = over
        self.now = 0.0
        self._heap = []
        self._seq = 0
        self.parent_free = 0.0
        self.end = 0.0
        self.items_done = 0
        self.chunk_sizes: List[int] = []
        self.steals = 0

    def at(self, t: float, fn: Callable, *args) -> None:
        """Run fn(*args) at virtual time t (events at one time run in the
        order they were scheduled)."""
        if t < self.now or math.isnan(t):
            raise ValueError("sim: an event at %r is before now (%r)" % (t, self.now))
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def parent(self, t: float, seconds: float) -> float:
        """Serial work of the parent that can start at t; returns its end."""
        start = max(self.parent_free, t)
        self.parent_free = start + seconds
        return self.parent_free

    def chunk_time(self, lo: int, n: int) -> float:
        """The worker's seconds for the items of a chunk (no per-chunk part)."""
        return self.costs.work(lo, n) + n * self.over.item_s

    def record(self, t: float, n: int, stolen: bool = False) -> float:
        """A chunk of n items finished on a worker at t: the parent decodes
        its record. Returns when the parent is done with it."""
        o = self.over
        end = self.parent(t, o.parent_chunk_s + n * o.parent_item_s)
        self.items_done += n
        self.chunk_sizes.append(n)
        self.steals += bool(stolen)
        self.end = max(self.end, end)
        return end

    def local(self, t: float, n: int) -> None:
        """n items the caller ran itself, done at t (no record to decode)."""
        self.items_done += n
        self.end = max(self.end, t)

    def run(self, policy: str) -> SimResult:
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)
        if self.items_done != self.costs.n:
            raise RuntimeError("sim: policy %s ran %d of %d items" % (
                policy, self.items_done, self.costs.n))
        return SimResult(policy, self.workers, self.costs.n, self.end,
                         self.costs.ideal(self.workers), self.costs.total,
                         len(self.chunk_sizes), self.chunk_sizes, self.steals)
