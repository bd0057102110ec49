"""pmap and friends on a default pool, created on first use and reused."""
import itertools
import os
import threading

from . import _arrays
from ._runtime import worker as _worker
from ._options import MapOptions, default_workers
from ._pool import Pool

_default = None
_default_lock = threading.Lock()

# Maps that run elsewhere than this machine's CPU pool (device="gpu" or
# "auto": pmaprt.gpu; backend="dask": pmaprt.dask) live in layers above this
# one and call pmap themselves. They register here as they are imported
# (pmaprt's __init__ imports both; neither imports its optional libraries
# until a call needs them), so this module never imports a layer above it.
_device_maps = []           # at most one: the GPU layer's device_map
_backends = {}              # name -> map function


def register_device_map(fn):
    """Called by the GPU layer: fn(fn, iterables, device=, ...) runs device maps."""
    _device_maps[:] = [fn]


def register_backend(name, fn):
    """Called by a cluster layer: fn(fn, *iterables, chunksize=, ordered=, ...)."""
    _backends[name] = fn


def default_pool(workers=None, initializer=None, initargs=(), threads_per_worker=None):
    """The shared pool, created on first use; grown if more workers are asked
    for; replaced if it was closed or terminated (a map interrupted by Ctrl-C
    terminates its pool) or is broken, or if another worker set-up
    (initializer, initargs, threads_per_worker) is asked for."""
    global _default
    with _default_lock:
        p = _default
        if p is None or p.closed or p._broken is not None or (workers or 0) > p.workers \
                or not p.startup.same(initializer, initargs, threads_per_worker):
            if p is not None and not p.closed:
                p.terminate()
            _default = p = Pool(max(workers or 0, default_workers()), initializer=initializer,
                                initargs=initargs, threads_per_worker=threads_per_worker)
        return p


def _forget_default_in_child():
    """os.fork(): the default pool is the parent's (processes.py lets go of
    it); the child's first pmap starts its own. The lock may have been held
    by a thread of the parent that does not exist here."""
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_default_in_child)


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
         backend=None, device=None, out=None, chunks=None, initializer=None, initargs=(),
         threads_per_worker=None, **options):
    """map(fn, *iterables) on worker processes: lazy, in order, same results and exceptions.

    workers: how many of the default pool's workers take part (None: all, one per core).
    chunksize: items per chunk (None: adaptive). ordered=False yields results as they
    finish. progress=True shows a tqdm bar. Inside a worker, pmap runs serially.
    Reliability options (retries=, timeout=, on_error=, max_items_per_worker=,
    memory_floor=) and inline= are those of Pool.map.
    Crashes: with inline="auto" (the default) a map over a list, tuple or
    range runs its first item in the calling process (and more while items
    stay cheap), as map would: a crash of fn there (a segfault, os._exit)
    ends the caller, the same for the same call whatever ran before it
    (nothing is remembered from earlier maps). inline=False, retries=,
    timeout= or on_error="return" run every item on a worker: a crash is
    then a WorkerCrashedError at its position.
    backend="dask" runs the map on a dask.distributed cluster (options: address=,
    client=, n_workers=; see pmaprt.dask).
    device="gpu" runs a GPU kernel (numba.cuda, CuPy) or a function over CuPy
    arrays on chunks of one array across the GPUs and returns an array;
    device="auto" does so where a GPU and a GPU kernel are present, else runs
    on the CPU pool and warns once (options: out=, devices=, launch=, streams=,
    dtype=; see pmaprt.gpu).
    axis_name: an SPMD map, one shard per worker, all running at once; fn may call
    pmaprt.psum(x, axis_name), pmean, allreduce (at most as many shards as workers).
    initializer, initargs, threads_per_worker: the default pool's worker set-up
    (see Pool); asking for another set-up replaces the default pool. Inside a
    worker (a nested pmap, run serially) the initializer runs first, here.

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
    if device not in (None, "cpu"):
        if backend not in (None, "local") or ordered is not True or progress:
            raise ValueError("pmaprt: device=%r maps one array on GPUs; backend=, ordered= and "
                             "progress= do not apply" % (device,))
        if chunks is not None:
            raise ValueError("pmaprt: chunks= does not apply to a device map (device=%r); "
                             "chunksize= sets its rows per chunk" % (device,))
        return _device_maps[0](fn, iterables, device=device, chunksize=chunksize, workers=workers,
                          out=out, **options)
    if backend not in (None, "local"):
        if out is not None or chunks is not None:
            raise ValueError("pmaprt: out= and chunks= apply to the local pool, not to "
                             "backend=%r" % (backend,))
        return _other_backend(fn, iterables, backend, options, chunksize, ordered,
                              workers, progress)
    opts = MapOptions.make(chunksize=chunksize, ordered=ordered, workers=workers,
                           progress=progress, out=out, chunks=chunks, **options)
    if _worker.IN_WORKER:
        if initializer is not None:
            initializer(*initargs)
        if out is not None or chunks is not None:
            return _arrays.local_map(fn, iterables, False, out, chunks)
        if opts.axis_name is not None:
            raise RuntimeError("pmaprt: an SPMD map (axis_name=%r) cannot run inside a worker"
                               % (opts.axis_name,))
        return map(fn, *iterables)
    return default_pool(workers, initializer, initargs, threads_per_worker).run_map(
        fn, iterables, False, opts)


def imap_unordered(fn, *iterables, workers=None, chunksize=None, progress=False, out=None,
                   chunks=None, **options):
    """pmap with results in the order they finish."""
    return pmap(fn, *iterables, workers=workers, chunksize=chunksize, ordered=False,
                progress=progress, out=out, chunks=chunks, **options)


def starmap(fn, iterable, *, workers=None, chunksize=None, ordered=True, progress=False,
            out=None, initializer=None, initargs=(), threads_per_worker=None, **options):
    """itertools.starmap(fn, iterable) on worker processes (options as pmap)."""
    opts = MapOptions.make(chunksize=chunksize, ordered=ordered, workers=workers,
                           progress=progress, out=out, **options)
    if _worker.IN_WORKER:
        if initializer is not None:
            initializer(*initargs)
        if out is not None:
            return _arrays.local_map(fn, (iterable,), True, out)
        if opts.axis_name is not None:
            raise RuntimeError("pmaprt: an SPMD map (axis_name=%r) cannot run inside a worker"
                               % (opts.axis_name,))
        return itertools.starmap(fn, iterable)
    return default_pool(workers, initializer, initargs, threads_per_worker).run_map(
        fn, (iterable,), True, opts)


def _other_backend(fn, iterables, backend, options, chunksize, ordered, workers, progress):
    if backend == "dask" and (workers is not None or progress):
        raise ValueError("pmaprt: workers= and progress= apply to the local pool; on Dask "
                         "the cluster sets the workers (n_workers= for a LocalCluster)")
    if backend not in _backends:
        raise ValueError("pmaprt: unknown backend %r; choose None (the local pool) or one of %s"
                         % (backend, ", ".join(repr(b) for b in sorted(_backends))))
    return _backends[backend](fn, *iterables, chunksize=chunksize, ordered=ordered, **options)
