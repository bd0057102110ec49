"""pmaprt.tune: measure a function's best chunk size (and worker count).

``tune(fn, sample)`` maps ``fn`` over ``sample`` on real pmaprt pools with a
geometric set of fixed chunk sizes (and, optionally, several worker counts),
within a total time budget, and recommends the fastest point.  With
``cache=True`` the recommendation is remembered under the function's module and
qualified name in ``pmaprt._tuned``, where ``cached_chunksize`` finds it later
(``pmap`` asks it when called with ``chunksize=None``).

Pick a sample that takes a small fraction of ``time_budget`` to map once: every
measured point costs one full map over the sample.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ._options import default_workers
from ._pool import Pool
from ._tuned import CurvePoint, TuneResult, remember

__all__ = ["TuneResult", "tune", "default_chunksizes"]

#: a timer: (fn, sample, chunksize, workers) -> seconds for one full map
Timer = Callable[[Callable, List[Any], int, int], float]


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
    """Time ``fn`` over ``sample`` at several chunk sizes and recommend one.

    chunksizes: the sizes to try (default 1, 2, 4, ... ceil(len(sample)/W)).
    workers: None (the default pool's size: one per core), an int, or several
        ints to try each.
    time_budget: seconds for the whole call, pool start-up included.  A point
        is started only while the time spent plus its predicted cost fits the
        budget, so the budget can be overrun by at most one mispredicted map
        (and the first point is always measured).  Leftover budget re-measures
        the points (best of the repeats is kept) to damp noise.
    cache: remember the result for :func:`cached_chunksize`.
    _timer: for tests, ``(fn, sample, chunksize, workers) -> seconds``
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
    # large chunks first: they cost least to measure (per-chunk overhead is
    # what grows as the chunk size shrinks)
    points = [(c, w) for w in ws for c in sorted(css[w], reverse=True)]

    own_timer = _timer is None
    timer = _PoolTimer() if own_timer else _timer
    best: Dict[Tuple[int, int], float] = {}
    reported = 0.0
    t0 = time.perf_counter()

    def spent() -> float:
        return max(time.perf_counter() - t0, reported)

    try:
        for rnd in range(3):
            prev: Dict[int, List[float]] = {}
            stopped = False
            for (c, w) in points:
                hist = prev.get(w, [])
                if rnd > 0:
                    predict = best.get((c, w), 0.0)
                elif hist:
                    # extrapolate the growth seen so far (smaller chunks cost more)
                    growth = hist[-1] / hist[-2] if len(hist) > 1 and hist[-2] > 0 else 1.0
                    predict = hist[-1] * min(max(growth, 1.0), 8.0)
                else:
                    predict = max(best.values()) if best else 0.0
                if best and spent() + predict > time_budget:
                    stopped = True
                    if rnd > 0:
                        break
                    continue  # a cheaper point (another worker count) may still fit
                if own_timer:
                    timer.prepare(w)  # pool start-up counts against the budget
                    if best and spent() + predict > time_budget:
                        stopped = True
                        continue
                s = float(timer(fn, sample, c, w))
                reported += s
                prev.setdefault(w, []).append(s)
                if (c, w) not in best or s < best[(c, w)]:
                    best[(c, w)] = s
            if stopped or spent() >= time_budget:
                break
    finally:
        if own_timer:
            timer.close()

    elapsed = spent()
    curve: List[CurvePoint] = []
    for (c, w) in sorted(best, key=lambda p: (p[1], p[0])):
        s = best[(c, w)]
        curve.append((c, w, s, n / s if s > 0 else float("inf")))
    # fastest; ties go to the larger chunk size (less scheduling traffic)
    c_best, w_best, _, _ = min(curve, key=lambda p: (p[2], -p[0], p[1]))
    result = TuneResult(chunksize=c_best, workers=w_best, curve=curve, items=n,
                        elapsed_s=elapsed,
                        skipped=[p for p in points if p not in best])
    if cache:
        remember(fn, result)
    return result
