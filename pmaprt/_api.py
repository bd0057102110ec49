"""pmap and friends on a default pool, created on first use and reused."""
import itertools
import threading

from . import _worker
from ._pool import Pool, check_workers, default_workers

_default = None
_default_lock = threading.Lock()


def default_pool(workers=None):
    """The shared pool, created on first use; grown if more workers are asked for."""
    global _default
    with _default_lock:
        p = _default
        if p is None or p.closed or p._broken is not None or (workers or 0) > p.workers:
            if p is not None and not p.closed:
                p.terminate()
            _default = p = Pool(max(workers or 0, default_workers()))
        return p


def _forget_default(pool):
    global _default
    with _default_lock:
        if _default is pool:
            _default = None


def shutdown():
    """Stop the default pool's workers (a later pmap starts a new pool)."""
    global _default
    with _default_lock:
        p, _default = _default, None
    if p is not None:
        p.close()


def pmap(fn, *iterables, workers=None, chunksize=None, ordered=True, progress=False,
         axis_name=None):
    """map(fn, *iterables) on worker processes: lazy, in order, same results and exceptions.

    workers: how many of the default pool's workers take part (None: all, one per core).
    chunksize: items per chunk (None: adaptive). ordered=False yields results as they
    finish. progress=True shows a tqdm bar. Inside a worker, pmap runs serially.
    axis_name: an SPMD map, one shard per worker, all running at once; fn may call
    pmaprt.psum(x, axis_name), pmean, allreduce (at most as many shards as workers).
    """
    if workers is not None:
        check_workers(workers)
    if _worker.IN_WORKER:
        if axis_name is not None:
            raise RuntimeError("pmaprt: an SPMD map (axis_name=%r) cannot run inside a worker"
                               % (axis_name,))
        return map(fn, *iterables)
    return default_pool(workers).map(fn, *iterables, chunksize=chunksize, ordered=ordered,
                                     workers=workers, progress=progress, axis_name=axis_name)


def imap_unordered(fn, *iterables, workers=None, chunksize=None, progress=False):
    """pmap with results in the order they finish."""
    return pmap(fn, *iterables, workers=workers, chunksize=chunksize, ordered=False,
                progress=progress)


def starmap(fn, iterable, *, workers=None, chunksize=None, ordered=True, progress=False,
            axis_name=None):
    """itertools.starmap(fn, iterable) on worker processes (axis_name: as in pmap)."""
    if workers is not None:
        check_workers(workers)
    if _worker.IN_WORKER:
        if axis_name is not None:
            raise RuntimeError("pmaprt: an SPMD map (axis_name=%r) cannot run inside a worker"
                               % (axis_name,))
        return itertools.starmap(fn, iterable)
    return default_pool(workers).starmap(fn, iterable, chunksize=chunksize, ordered=ordered,
                                         workers=workers, progress=progress, axis_name=axis_name)
