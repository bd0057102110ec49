"""Options of a map, validated once at the API into one frozen object.

`MapOptions.make(...)` checks every option and returns a `MapOptions` that is
passed down whole (pmap -> Pool -> the map's job); nothing below re-checks or
re-declares them. `default_workers()` is the one place the core count is read.
"""
import os
from dataclasses import dataclass
from typing import Any, Optional

from . import _memguard


def default_workers():
    """The cores this process may run on (its affinity mask), one worker each."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


CORES = default_workers()

# Workers a pool may have. Each is an interpreter (tens of MiB) plus its
# result ring in the control segment (4 MiB): more than a few per core buys
# nothing for CPU work and can exhaust the machine. PMAPRT_MAX_WORKERS raises
# (or lowers) the bound for callers who mean it (I/O-bound work), up to
# HARD_MAX_WORKERS, what the control segment is built for.
MAX_WORKERS_PER_CORE = 8
MIN_MAX_WORKERS = 64
HARD_MAX_WORKERS = 4096


def max_workers():
    """The largest worker count a pool accepts (see MAX_WORKERS_PER_CORE)."""
    env = os.environ.get("PMAPRT_MAX_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError("pmaprt: PMAPRT_MAX_WORKERS must be an int, got %r" % env) from None
        return max(1, min(n, HARD_MAX_WORKERS))
    return max(MIN_MAX_WORKERS, MAX_WORKERS_PER_CORE * CORES)


def _positive_int(name, value, none_means):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("pmaprt: %s must be a positive int or None, got %r" % (name, value))
    if value < 1:
        raise ValueError("pmaprt: %s must be >= 1 (or None %s), got %d" % (name, none_means, value))
    return value


def check_workers(workers):
    """The worker count asked for: None means one per core."""
    if workers is None:
        return default_workers()
    n = _positive_int("workers", workers, "for one per core")
    most = max_workers()
    if n > most:
        raise ValueError("pmaprt: workers=%d is more than the maximum of %d (%d per core, at least "
                         "%d; set PMAPRT_MAX_WORKERS to allow up to %d)"
                         % (n, most, MAX_WORKERS_PER_CORE, MIN_MAX_WORKERS, HARD_MAX_WORKERS))
    return n


def check_max_items(n):
    """max_items_per_worker as the control segment stores it (0: never recycle)."""
    if n is None:
        return 0
    return _positive_int("max_items_per_worker", n, "for never")


def check_chunksize(chunksize, most):
    """A fixed chunk size capped at `most` (what a range word holds); 0: adaptive."""
    if chunksize is None:
        return 0
    return min(_positive_int("chunksize", chunksize, "for adaptive"), most)


def check_call(fn, iterables):
    """The TypeErrors map itself raises for what it is given (also on Dask)."""
    if not callable(fn):
        raise TypeError("pmaprt: %r is not callable" % (fn,))
    if not iterables:
        raise TypeError("pmap() must have at least two arguments.")
    for i, x in enumerate(iterables):
        try:
            iter(x)
        except TypeError:
            raise TypeError("pmaprt: argument %d of the map (%s) is not iterable"
                            % (i + 2, type(x).__name__)) from None


def _check_retries(retries):
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError("pmaprt: retries must be an int >= 0, got %r" % (retries,))
    if retries < 0:
        raise ValueError("pmaprt: retries must be >= 0, got %d" % retries)
    return retries


def _check_timeout(timeout):
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("pmaprt: timeout must be a number of seconds or None, got %r" % (timeout,))
    if not timeout > 0:
        raise ValueError("pmaprt: timeout must be > 0 seconds, got %r" % (timeout,))
    return float(timeout)


@dataclass(frozen=True)
class MapOptions:
    """One map's options, checked. `chunksize` None is adaptive; `workers`
    None is every worker of the pool; `memory_floor` is in bytes (0: no guard);
    `return_errors` is on_error="return"."""
    chunksize: Optional[int] = None
    ordered: bool = True
    workers: Optional[int] = None
    progress: bool = False
    inline: Any = "auto"
    retries: int = 0
    timeout: Optional[float] = None
    return_errors: bool = False
    max_items_per_worker: int = 0
    memory_floor: int = 0
    axis_name: Any = None
    out: Any = None
    chunks: Any = None

    @classmethod
    def make(cls, chunksize=None, ordered=True, workers=None, progress=False, inline="auto",
             retries=0, timeout=None, on_error="raise", max_items_per_worker=None,
             memory_floor=None, axis_name=None, out=None, chunks=None):
        if chunksize is not None:
            _positive_int("chunksize", chunksize, "for adaptive")
        if workers is not None:
            check_workers(workers)
        if inline not in ("auto", False, True):
            raise ValueError("pmaprt: inline must be 'auto' or False, got %r" % (inline,))
        if on_error not in ("raise", "return"):
            raise ValueError('pmaprt: on_error must be "raise" or "return", got %r' % (on_error,))
        return cls(chunksize=chunksize, ordered=bool(ordered), workers=workers,
                   progress=bool(progress), inline=inline, retries=_check_retries(retries),
                   timeout=_check_timeout(timeout), return_errors=on_error == "return",
                   max_items_per_worker=check_max_items(max_items_per_worker),
                   memory_floor=_memguard.check_floor(memory_floor), axis_name=axis_name,
                   out=out, chunks=chunks)

    @property
    def tracked(self):
        """Workers publish per-item progress, so the parent can name the item a
        crash or timeout hit (retries, timeouts, returned errors need it)."""
        return bool(self.retries or self.timeout is not None or self.return_errors)
