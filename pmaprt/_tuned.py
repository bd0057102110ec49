"""The tuned chunk-size cache: what ``tune(fn, ..., cache=True)`` recommended.

A ground-floor module: the map's job reads a recommendation from here
(``cached_chunksize``) when called with ``chunksize=None``, and the tuner
(``pmaprt._tune``, which builds pools) writes one with ``remember``. Keeping
the cache apart from the tuner lets the map read it without importing the
layer that builds pools.

Recommendations are keyed by the function's module and qualified name, so a
function redefined with the same name (a re-run notebook cell) keeps its
recommendation, and a callable without a stable name (``functools.partial``)
is never cached.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["TuneResult", "CurvePoint", "cached", "cached_chunksize", "clear_cache", "remember"]

#: (chunksize, workers, seconds (median), items_per_s)
CurvePoint = Tuple[int, int, float, float]


@dataclass(repr=False)
class TuneResult:
    """What :func:`pmaprt.tune` measured and recommends.

    ``chunksize`` and ``workers``: the recommendation; ``chunksize`` is None
    (adaptive chunks, what ``pmap`` does by default) when nothing beat the
    default, and ``gain`` is then None. ``gain``: the recommendation's speed
    over the default (adaptive chunks on ``reference_workers`` workers), the
    median of ``confirm_ratios``, fresh pairs measured after the choice
    (``gain_lo``-``gain_hi`` their spread); ``gain_vs_adaptive``: over
    adaptive chunks on the recommended worker count; ``candidate``,
    ``candidate_ratios``: the best point and its confirmation pairs, even
    when it was not recommended. ``curve`` has one point per measured fixed
    (chunksize, workers) pair, sorted by workers then chunksize; ``seconds``
    is the median of that point's runs and ``items_per_s`` is
    ``len(sample) / seconds``; ``ratios`` holds every point's screening pairs
    (the default's time / the point's, > 1: faster).
    """

    chunksize: Optional[int]
    workers: int
    curve: List[CurvePoint] = field(default_factory=list)
    items: int = 0
    elapsed_s: float = 0.0
    skipped: List[Tuple[Optional[int], int]] = field(default_factory=list)  # over budget
    gain: Optional[float] = None
    gain_lo: Optional[float] = None
    gain_hi: Optional[float] = None
    gain_vs_adaptive: Optional[float] = None
    reference_workers: int = 1
    confirm_ratios: List[float] = field(default_factory=list)
    candidate: Optional[Tuple[Optional[int], int]] = None
    candidate_ratios: List[float] = field(default_factory=list)
    ratios: Dict[Tuple[Optional[int], int], List[float]] = field(default_factory=dict)
    reason: str = ""

    @property
    def no_gain(self) -> bool:
        """True when the default (adaptive chunks, every core) is the advice."""
        return self.gain is None

    @property
    def items_per_s(self) -> float:
        for cs, w, _, ips in self.curve:
            if cs == self.chunksize and w == self.workers:
                return ips
        return 0.0

    def _confidence(self, ratios: List[float]) -> str:
        if not ratios:
            return "not confirmed"
        faster = sum(r > 1.0 for r in ratios)
        return (f"{min(ratios):.2f}-{max(ratios):.2f}x, {faster} of {len(ratios)} fresh "
                f"pairs faster")

    def __repr__(self) -> str:
        default = f"the default (adaptive chunks, {self.reference_workers} workers)"
        tail = f"{len(self.curve)} points in {self.elapsed_s:.1f} s"
        if self.gain is None:
            cand = ""
            if self.candidate is not None:
                c, w = self.candidate
                rs, where = self.candidate_ratios, "fresh"
                if not rs:
                    rs, where = self.ratios.get(self.candidate) or [], "screening"
                cand = f"; best candidate chunksize={c} workers={w}"
                if rs:
                    med = sorted(rs)[len(rs) // 2]
                    faster = sum(r > 1.0 for r in rs)
                    cand += (f" read {med:.2f}x ({min(rs):.2f}-{max(rs):.2f}x, {faster} of "
                             f"{len(rs)} {where} pairs faster)")
            return (f"TuneResult(no gain: keep {default}{cand}; "
                    f"{self.reason + '; ' if self.reason else ''}{tail})")
        vs = f"{self.gain:.2f}x the speed of {default} ({self._confidence(self.confirm_ratios)})"
        if self.workers != self.reference_workers and self.gain_vs_adaptive is not None:
            vs += f", {self.gain_vs_adaptive:.2f}x adaptive chunks on {self.workers} workers"
        return f"TuneResult(chunksize={self.chunksize}, workers={self.workers}: {vs}; {tail})"


_CACHE: Dict[str, TuneResult] = {}
_LOCK = threading.Lock()


def _key(fn: Callable) -> Optional[str]:
    fn = getattr(fn, "__func__", fn)  # bound methods: the function
    mod = getattr(fn, "__module__", None)
    qn = getattr(fn, "__qualname__", None)
    if not mod or not qn:
        return None  # e.g. functools.partial: no stable identity
    return f"{mod}:{qn}"


def remember(fn: Callable, result: TuneResult) -> None:
    """Cache ``result`` as the recommendation for ``fn`` (no-op without a key)."""
    k = _key(fn)
    if k is not None:
        with _LOCK:
            _CACHE[k] = result


def cached(fn: Callable) -> Optional[TuneResult]:
    """The last cached :class:`TuneResult` for ``fn`` (by module + qualname)."""
    k = _key(fn)
    if k is None:
        return None
    with _LOCK:
        return _CACHE.get(k)


def cached_chunksize(fn: Callable) -> Optional[int]:
    """The chunk size ``tune(fn, ..., cache=True)`` recommended, or None
    (adaptive: nothing cached, or no gain found)."""
    r = cached(fn)
    return None if r is None or r.chunksize is None else int(r.chunksize)


def clear_cache(fn: Optional[Callable] = None) -> None:
    """Forget the recommendation for ``fn``, or every one if fn is None."""
    with _LOCK:
        if fn is None:
            _CACHE.clear()
        else:
            k = _key(fn)
            if k is not None:
                _CACHE.pop(k, None)
