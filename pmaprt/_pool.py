"""Pool: the public face of a runtime, the methods that start maps.

Everything about workers, shared memory and tasks is the runtime's
(`_runtime/`); a Pool adds the map API on top and is the runtime its maps
are given.
"""
import dataclasses

from ._map import MapJob
from ._options import MapOptions
from ._runtime import Runtime


class Pool(Runtime):
    """Worker processes that persist across maps.

    ``with Pool(workers=4) as pool: list(pool.map(f, xs))``. The pool can run
    several maps at once (several live iterators, or several threads), and
    single calls (`apply`) beside them. Its constructor is the runtime's:
    ``Pool(workers=None, *, max_jobs=32, seed=0, max_items_per_worker=None,
    initializer=None, initargs=(), threads_per_worker=None, start=None)``
    (``start=k``: k workers start now, the others on ``start_worker()``).

    Worker set-up: each worker runs ``initializer(*initargs)`` once, before
    its first item (a worker whose initializer raises breaks the pool, as
    ProcessPoolExecutor does; a pool with an initializer never runs items
    inline, in the caller). ``threads_per_worker`` caps the native thread
    pools (BLAS, OpenMP) of each worker; by default cores // workers, for
    every thread variable the caller did not set (see
    pmaprt/_runtime/startup.py).
    """

    def map(self, fn, *iterables, chunksize=None, ordered=True, workers=None, progress=False,
            inline="auto", retries=0, timeout=None, on_error="raise", max_items_per_worker=None,
            memory_floor=None, axis_name=None, out=None,
            chunks=None):
        """Lazy map(fn, *iterables) on this pool's workers.

        inline="auto": items may run here, in the calling process, as map
        would run them: a map over a list, tuple or range runs its first
        item here, then goes on here while items stay cheaper than what
        shipping them costs, and hands the rest to the workers once they
        prove dear; any map whose measured cost per item shows that workers
        cannot beat map runs its rest here. inline=False keeps every item on
        the workers (True is "auto").

        Crashes: where an item runs depends on this call alone (its input
        and its items' measured costs), never on earlier maps. A crash of fn
        (a segfault, os._exit) on an item run here ends the calling process,
        as under map: under "auto" that is always so for the first item of
        a list, tuple or range. With inline=False, retries, timeout or
        on_error="return", every item runs on a worker and a crash is a
        WorkerCrashedError at its position.

        Reliability (each turns inline off: items then always run on workers):

        - retries=N: the items of a worker that dies are run again on other
          workers; the item it was running when it died counts one attempt,
          and fails with WorkerCrashedError once N retries are spent.
        - timeout=seconds: a worker that spends longer than this on one item
          is killed and replaced; the item fails with TimeoutError (or is
          retried, if retries allow).
        - on_error="return": an exception raised by fn on an item (and a
          crash or timeout past its retries) takes that item's place in the
          results, and the map goes on.
        - max_items_per_worker=N: a worker that has run N items is replaced by
          a fresh one (for functions that leak memory).
        - memory_floor=bytes: while the machine's available memory is below
          it, no more work is put in flight beyond one chunk (default: the
          larger of 256 MiB and 5 % of RAM; 0 turns the guard off).

        axis_name: an SPMD map: shard i runs on worker i, all at once, and fn may
        call pmaprt.psum/pmean/allreduce over that axis (see pmaprt/_collective/).
        SPMD maps take none of the reliability options.

        chunks=k (ndarray, list, tuple or range inputs): fn gets blocks of k rows,
        x[lo:hi], instead of rows; chunks=[k0, k1, ...] gives the block lengths.
        out=array: workers write fn's result for item i into out[i] (for block
        i, into out[lo:hi]) and the iterator yields None per item once its
        result is in out. See pmaprt.pmap.
        """
        return self.run_map(fn, iterables, False, MapOptions.make(
            chunksize=chunksize, ordered=ordered, workers=workers, progress=progress,
            inline=inline, retries=retries, timeout=timeout, on_error=on_error,
            max_items_per_worker=max_items_per_worker, memory_floor=memory_floor,
            axis_name=axis_name, out=out, chunks=chunks))

    def imap_unordered(self, fn, *iterables, **options):
        """Like map, results in the order they finish (same options as map)."""
        options["ordered"] = False
        return self.map(fn, *iterables, **options)

    def starmap(self, fn, iterable, *, chunksize=None, ordered=True, workers=None, progress=False,
                inline="auto", retries=0, timeout=None, on_error="raise", max_items_per_worker=None,
                memory_floor=None, axis_name=None, out=None):
        """itertools.starmap(fn, iterable), in parallel (same options as map)."""
        return self.run_map(fn, (iterable,), True, MapOptions.make(
            chunksize=chunksize, ordered=ordered, workers=workers, progress=progress,
            inline=inline, retries=retries, timeout=timeout, on_error=on_error,
            max_items_per_worker=max_items_per_worker, memory_floor=memory_floor,
            axis_name=axis_name, out=out))

    def run_map(self, fn, iterables, star, opts):
        """A map with options already checked (MapOptions): the one entry
        that pmap and the methods above share."""
        if self.startup.initializer is not None and opts.inline:
            # Items run where the initializer ran: never in the caller.
            opts = dataclasses.replace(opts, inline=False)
        return MapJob(self, fn, iterables, star, opts)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.terminate()

    def __repr__(self):
        state = "closed" if self._closed else "broken" if self._broken else "running"
        return "<pmaprt.Pool workers=%d %s>" % (self.workers, state)
