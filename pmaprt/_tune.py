"""pmaprt.tune: measure whether a fixed chunk size (or worker count) beats the default.

``tune(fn, sample)`` maps ``fn`` over ``sample`` on real pmaprt pools with a
geometric set of fixed chunk sizes (and, optionally, several worker counts),
each run right after a run of the default (adaptive chunks on every core):
a pair, whose ratio a drifting machine disturbs far less than separate
medians. Screening rounds give every point its pairs; the best point then
gets ``CONFIRM_PAIRS`` fresh pairs (its screening pairs are biased upward by
the choice itself), and it is recommended only if every fresh pair shows it
faster. Otherwise the result says "no gain" and recommends the default.
With ``cache=True`` a recommendation is remembered under the function's
module and qualified name in ``pmaprt._tuned``, where ``cached_chunksize``
finds it later (``pmap`` asks it when called with ``chunksize=None``).

Pick a sample that takes a small fraction of ``time_budget`` to map once: every
pair costs two full maps over the sample.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ._options import default_workers
from ._pool import Pool
from ._tuned import CurvePoint, TuneResult, cached, clear_cache, remember

__all__ = ["TuneResult", "tune", "default_chunksizes"]

#: a timer: (fn, sample, chunksize or None for adaptive, workers) -> seconds for one full map
Timer = Callable[[Callable, List[Any], Optional[int], int], float]

# Screening rounds: each gives every point one more pair while the budget
# lasts. Fresh pairs for the chosen point: with 5, a point no faster than the
# default passes (every pair faster) by chance 1 time in 32; the screening's
# 20-30 points would find such a fluke often, so they never decide alone.
SCREEN_ROUNDS = 3
CONFIRM_PAIRS = 5
MIN_CONFIRM = 3


def default_chunksizes(n: int, workers: int) -> List[int]:
    """1, 2, 4, ... up to ceil(n / workers) (always included)."""
    hi = max(1, math.ceil(n / max(1, workers)))
    out, v = [], 1
    while v < hi:
        out.append(v)
        v *= 2
    out.append(hi)
    return sorted(set(out))


class _PoolTimer:
    """The real timer: one warm ``pmaprt.Pool`` per worker count."""

    def __init__(self):
        self.pools: Dict[int, Pool] = {}

    def _pool(self, workers: int) -> Pool:
        p = self.pools.get(workers)
        if p is None:
            p = Pool(workers=workers)
            for _ in p.map(abs, range(4 * workers), chunksize=1):  # start every worker
                pass
            self.pools[workers] = p
        return p

    def prepare(self, workers: int) -> None:
        self._pool(workers)

    def __call__(self, fn, sample, chunksize, workers) -> float:
        p = self._pool(workers)
        t0 = time.perf_counter()
        for _ in p.map(fn, sample, chunksize=chunksize):
            pass
        return time.perf_counter() - t0

    def close(self):
        for p in self.pools.values():
            try:
                p.close()
            except Exception:
                pass
        self.pools.clear()


def _as_workers(workers: Union[None, int, Iterable[int]]) -> List[int]:
    if workers is None:
        return [default_workers()]  # the default pool's size
    if isinstance(workers, int):
        ws = [workers]
    else:
        ws = [int(w) for w in workers]
    if not ws or any(w < 1 for w in ws):
        raise ValueError("workers must be positive")
    return sorted(set(ws))


Point = Tuple[Optional[int], int]


def tune(
    fn: Callable,
    sample: Sequence[Any],
    *,
    chunksizes: Optional[Iterable[int]] = None,
    workers: Union[None, int, Iterable[int]] = None,
    time_budget: float = 5.0,
    cache: bool = True,
    _timer: Optional[Timer] = None,
) -> TuneResult:
    """Time ``fn`` over ``sample`` at several chunk sizes, each paired with the
    default, and recommend one only if fresh pairs confirm it is faster.

    chunksizes: the sizes to try (default 1, 2, 4, ... ceil(len(sample)/W)).
    workers: None (the default pool's size: one per core), an int, or several
        ints to try each. A count other than the default's is recommended
        only when its own fresh pairs show it faster than the default.
    time_budget: seconds for the whole call, pool start-up included. A pair
        is started only while the time spent, its predicted cost and the
        confirmation's reserve fit (the first pair is always measured); a
        confirmation with fewer than MIN_CONFIRM pairs recommends nothing.
    cache: remember a recommendation for :func:`cached_chunksize` (and
        forget an older one when there is no gain).
    _timer: for tests, ``(fn, sample, chunksize or None, workers) -> seconds``
        instead of real maps (budget then counts the seconds it reports).
    """
    sample = list(sample)
    n = len(sample)
    if n == 0:
        raise ValueError("tune() needs a non-empty sample")
    if not (time_budget > 0):
        raise ValueError("time_budget must be > 0")
    ws = _as_workers(workers)
    if chunksizes is None:
        css = {w: default_chunksizes(n, w) for w in ws}
    else:
        cs = sorted({int(c) for c in chunksizes})
        if not cs or cs[0] < 1:
            raise ValueError("chunksizes must be positive")
        css = {w: cs for w in ws}
    ref: Point = (None, default_workers())
    # large chunks first: they cost least to measure (per-chunk overhead is
    # what grows as the chunk size shrinks); adaptive at another worker count
    # is a candidate too
    points: List[Point] = [(c, w) for w in ws for c in sorted(css[w], reverse=True)]
    points += [(None, w) for w in ws if w != ref[1]]

    own_timer = _timer is None
    timer = _PoolTimer() if own_timer else _timer
    previous = cached(fn)
    clear_cache(fn)   # the default's runs must be adaptive, not an older recommendation
    times: Dict[Point, List[float]] = {}
    ratios: Dict[Point, List[float]] = {}
    reported = [0.0]
    t0 = time.perf_counter()

    def spent() -> float:
        return max(time.perf_counter() - t0, reported[0])

    def run(p: Point) -> float:
        if own_timer:
            timer.prepare(p[1])
        s = float(timer(fn, sample, p[0], p[1]))
        reported[0] += s
        times.setdefault(p, []).append(s)
        return s

    def pair(p: Point) -> float:
        r = run(ref)
        return r / max(run(p), 1e-12)

    def cost(p: Point) -> float:
        ts = times.get(p)
        own = statistics.median(ts) if ts else _guess(times, p, ref)
        return statistics.median(times[ref]) + own if times.get(ref) else 0.0

    try:
        stopped = False
        for rnd in range(SCREEN_ROUNDS):
            for p in points:
                reserve = MIN_CONFIRM * cost(p)
                if times and spent() + cost(p) + reserve > time_budget:
                    stopped = True
                    continue  # a cheaper point (larger chunks, fewer workers) may still fit
                ratios.setdefault(p, []).append(pair(p))
            if stopped:
                break
        measured = [p for p in points if ratios.get(p)]
        best = max(measured, key=lambda p: (statistics.median(ratios[p]), p[0] or 0, p[1]))
        confirm: List[float] = []
        if statistics.median(ratios[best]) > 1.0:
            while len(confirm) < CONFIRM_PAIRS and (
                    spent() + cost(best) <= time_budget or len(confirm) < MIN_CONFIRM):
                if len(confirm) == 0 and spent() + MIN_CONFIRM * cost(best) > 2 * time_budget:
                    break  # far past the budget: say so rather than run on
                confirm.append(pair(best))
    finally:
        if own_timer:
            timer.close()

    curve: List[CurvePoint] = []
    for (c, w) in sorted((p for p in times if p[0] is not None), key=lambda p: (p[1], p[0])):
        s = statistics.median(times[(c, w)])
        curve.append((c, w, s, n / s if s > 0 else float("inf")))
    result = TuneResult(chunksize=None, workers=ref[1], curve=curve, items=n,
                        elapsed_s=spent(), skipped=[p for p in points if not ratios.get(p)],
                        reference_workers=ref[1], candidate=best,
                        candidate_ratios=confirm, ratios=ratios)
    if len(confirm) >= MIN_CONFIRM and min(confirm) > 1.0:
        gain = statistics.median(confirm)
        result.chunksize, result.workers = best
        result.gain, result.gain_lo, result.gain_hi = gain, min(confirm), max(confirm)
        result.confirm_ratios = confirm
        adaptive_w = ratios.get((None, best[1]))
        result.gain_vs_adaptive = (gain / statistics.median(adaptive_w) if adaptive_w
                                   else gain)
    elif not confirm:
        result.reason = ("no point was faster than the default in its screening pairs"
                         if statistics.median(ratios[best]) <= 1.0 else
                         "no time left to confirm the best point: raise time_budget")
    elif len(confirm) < MIN_CONFIRM:
        result.reason = "too few confirmation pairs in the budget: raise time_budget"
    else:
        result.reason = "its fresh pairs did not all show it faster"
    if cache and result.gain is not None:
        remember(fn, result)
    elif not cache and previous is not None:
        remember(fn, previous)
    return result


def _guess(times: Dict[Point, List[float]], p: Point, ref: Point) -> float:
    """A point not yet run: the last measured point with its worker count
    (smaller chunks cost more: that one's time, doubled), else the default's."""
    same = [statistics.median(ts) for q, ts in times.items() if q[1] == p[1] and q != ref]
    if same:
        return 2.0 * same[-1]
    return statistics.median(times[ref]) if times.get(ref) else 0.0
