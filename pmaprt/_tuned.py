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

#: (chunksize, workers, seconds, items_per_s)
CurvePoint = Tuple[int, int, float, float]


@dataclass
class TuneResult:
    """What :func:`pmaprt.tune` measured and recommends.

    ``curve`` has one point per measured (chunksize, workers) pair, sorted by
    workers then chunksize; ``seconds`` is the best of that point's
    measurements and ``items_per_s`` is ``len(sample) / seconds``.
    """

    chunksize: int
    workers: int
    curve: List[CurvePoint] = field(default_factory=list)
    items: int = 0
    elapsed_s: float = 0.0
    skipped: List[Tuple[int, int]] = field(default_factory=list)  # not measured: over budget

    @property
    def items_per_s(self) -> float:
        for cs, w, _, ips in self.curve:
            if cs == self.chunksize and w == self.workers:
                return ips
        return 0.0


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
    """The chunk size ``tune(fn, ..., cache=True)`` recommended, or None."""
    r = cached(fn)
    return None if r is None else int(r.chunksize)


def clear_cache(fn: Optional[Callable] = None) -> None:
    """Forget the recommendation for ``fn``, or every one if fn is None."""
    with _LOCK:
        if fn is None:
            _CACHE.clear()
        else:
            k = _key(fn)
            if k is not None:
                _CACHE.pop(k, None)
