"""pmap and friends on a default pool, created on first use and reused."""
import itertools
import threading

from . import _array, _worker
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
         out=None, chunks=None):
    """map(fn, *iterables) on worker processes: lazy, in order, same results and exceptions.

    workers: how many of the default pool's workers take part (None: all, one per core).
    chunksize: items per chunk (None: adaptive). ordered=False yields results as they
    finish. progress=True shows a tqdm bar. Inside a worker, pmap runs serially.

    NumPy: an ndarray input is iterated over axis 0, as map does (fn gets rows);
    a shared array (pmaprt.empty/zeros/asarray) reaches the workers without a
    copy; the workers read any other ndarray's rows straight from this
    process's memory (process_vm_readv) where the system allows it, else it
    costs one copy into shared memory. Arrays inside items and results travel
    the same ways, not through pickle.
    chunks=k: fn gets contiguous blocks x[lo:hi] of k rows of each input
    (ndarray, list, tuple, range) instead of rows; chunks=[k0, k1, ...] gives
    each block's length. The map has one item per block.
    out=array: the workers write fn's result for item i into out[i] (for
    block i, into out[lo:hi]); out.shape[0] must be the input's length in
    rows. The iterator then yields None for each item, in order, once its
    result is in out: consume it (``for _ in pmap(...): pass``) and out is
    complete. A shared out is written in place, no gather copy; a plain
    ndarray out costs one more copy (workers write a shared twin, and each
    chunk is copied into out before its items are yielded). Shapes are
    checked before any work starts (out.shape[0] against the input), and
    each result against its row (shape, and a same_kind dtype cast) before
    it is written: a mismatch raises ValueError naming both.
    """
    if workers is not None:
        check_workers(workers)
    if _worker.IN_WORKER:
        if out is not None or chunks is not None:
            return _array.local_map(fn, iterables, False, out, chunks)
        return map(fn, *iterables)
    return default_pool(workers).map(fn, *iterables, chunksize=chunksize, ordered=ordered,
                                     workers=workers, progress=progress, out=out, chunks=chunks)


def imap_unordered(fn, *iterables, workers=None, chunksize=None, progress=False, out=None,
                   chunks=None):
    """pmap with results in the order they finish."""
    return pmap(fn, *iterables, workers=workers, chunksize=chunksize, ordered=False,
                progress=progress, out=out, chunks=chunks)


def starmap(fn, iterable, *, workers=None, chunksize=None, ordered=True, progress=False,
            out=None):
    """itertools.starmap(fn, iterable) on worker processes."""
    if workers is not None:
        check_workers(workers)
    if _worker.IN_WORKER:
        if out is not None:
            return _array.local_map(fn, (iterable,), True, out)
        return itertools.starmap(fn, iterable)
    return default_pool(workers).starmap(fn, iterable, chunksize=chunksize, ordered=ordered,
                                         workers=workers, progress=progress, out=out)
