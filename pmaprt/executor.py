"""pmaprt.Executor: a concurrent.futures.Executor on a pmaprt Pool.

    submit(fn, *args) --> Future (PENDING) --> queue (deque, under one lock)
                                                 |
        runner threads (at most workers + 1), each:
          take everything queued (up to MAX_BATCH tasks), mark the futures
          RUNNING, run the batch as one unordered map of ``call`` over the
          tasks; ``call`` returns (task id, ok, pickled result or exception)
                                                 |
        as each result arrives: set the future's result or exception

- Tasks are batched: one map per batch, not one per task, so many small
  submits cost a few microseconds each in the parent and the pool's chunking
  and work stealing run them. A batch is taken as soon as a runner is free, so
  a lone submit starts at once (no waiting to fill a batch).
- Up to ``workers + 1`` batches are in flight, each on its own runner thread:
  single long tasks submitted one by one still occupy every worker. Long
  tasks are RUNNING at most ``workers + 1`` at a time (ProcessPoolExecutor's
  call queue), so shutdown(cancel_futures=True) cancels the rest.
- Workers start on demand: a submit reuses an idle worker or starts one
  more, up to max_workers (as ProcessPoolExecutor's do).
- Tasks are pickled one by one (arguments in the parent, results in the
  worker): what cannot be pickled fails its own future with PicklingError;
  a task or result that cannot be unpickled breaks the executor.
- Results are pickled by ``call`` itself, in the worker, so an unpicklable
  result fails that task's future only (as ProcessPoolExecutor does), never
  the other tasks of its batch.
- A worker crash (WorkerCrashedError from a batch) breaks the executor, as
  ProcessPoolExecutor does: every pending and running future fails with the
  crash error (a BrokenProcessPool), later submits raise it; the workers of a
  pool the executor owns are stopped.

Modules: a task on its way to a worker and back (``call``, ``deliver``) is
in ``pmaprt._executor_items``; the queue, runner threads and batching are in
``pmaprt._executor_state.ExecutorState``, which the runner threads hold. The
Executor object is a thin front, so an Executor dropped without shutdown() is
collected and its state shut down (pending work still completes).
"""
import concurrent.futures as _cf
import itertools
import multiprocessing
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

from ._executor_items import process_chunk
from ._executor_state import EXTRA_RUNNERS, ExecutorState, shutdown_all
from ._options import check_workers, default_workers
from ._pool import Pool

# Batches in flight on a pool the executor does not own: it shares the pool's
# job slots (32 by default) with the pool's other users.
SHARED_POOL_RUNNERS = 8


def _check_max_workers(max_workers):
    if max_workers is None:
        return default_workers()
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError("pmaprt.Executor: max_workers must be a positive int or None, got %r"
                        % (max_workers,))
    if max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    return check_workers(max_workers)   # the pool's bound, before any pool starts


def _check_max_tasks(n):
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("max_tasks_per_child must be an integer")
    if n <= 0:
        raise ValueError("max_tasks_per_child must be >= 1")
    return n


def _unpin_when_done(fs, store, pins):
    """Unpin a map's captured segments once its last future is done."""
    left = [len(fs)]
    lock = threading.Lock()

    def done(_):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            store.unpin(pins)

    if not fs:
        store.unpin(pins)
    for f in fs:
        f.add_done_callback(done)


class Executor(_cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on pmaprt worker processes.

    ``Executor(max_workers=None, mp_context=None, initializer=None,
    initargs=(), *, max_tasks_per_child=None, threads_per_worker=None)``
    takes ProcessPoolExecutor's arguments: it starts its own Pool of
    ``max_workers`` processes (one per core by default) on the first submit
    and stops it on shutdown. Each worker runs ``initializer(*initargs)``
    first (one that raises breaks the executor); a worker that has run
    ``max_tasks_per_child`` tasks is replaced; ``mp_context`` is accepted and
    ignored (workers are always fresh interpreters, as with "spawn");
    ``threads_per_worker`` caps the workers' BLAS/OpenMP threads (default
    cores // workers). ``Executor(pool=p)`` runs on an existing Pool, whose
    own set-up applies, and leaves it running. Futures are
    ``concurrent.futures.Future``: ``wait`` and ``as_completed`` accept them.
    See docs/ARCHITECTURE.md for how it differs from ProcessPoolExecutor.
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, threads_per_worker=None, pool=None):
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        max_tasks = _check_max_tasks(max_tasks_per_child)
        # Informative only: the start method closest to a fresh interpreter.
        self.mp_context = mp_context if mp_context is not None else \
            multiprocessing.get_context("spawn")
        if pool is not None:
            if not isinstance(pool, Pool):
                raise TypeError("pmaprt.Executor: pool must be a pmaprt.Pool, got %r" % (pool,))
            if max_workers is not None:
                raise ValueError("pmaprt.Executor: pass max_workers or pool, not both")
            if initializer is not None or max_tasks is not None or threads_per_worker is not None:
                raise ValueError("pmaprt.Executor: with pool=, the pool's own worker set-up "
                                 "applies (initializer, max_items_per_worker, "
                                 "threads_per_worker are the Pool's arguments)")
            pool._check_open()
            self._max_workers = pool.workers
            self._state = ExecutorState(pool, False, min(pool.workers + EXTRA_RUNNERS, SHARED_POOL_RUNNERS))
        else:
            n = _check_max_workers(max_workers)
            self._max_workers = n
            runners = min(n + EXTRA_RUNNERS, 63)
            self._state = ExecutorState(None, True, runners)
            self._max_jobs = max(32, runners + 1)
            self._pool_args = dict(max_items_per_worker=max_tasks, initializer=initializer,
                                   initargs=initargs, threads_per_worker=threads_per_worker)
        self._pool_lock = threading.Lock()
        weakref.finalize(self, self._state.do_shutdown, False, False)

    def _ensure_pool(self):
        st = self._state
        if st.pool is None:
            with self._pool_lock:
                if st.pool is None:
                    st.check_open()
                    st.pool = Pool(self._max_workers, max_jobs=self._max_jobs, start=0,
                                   **self._pool_args)
                    st.start_watch()
        return st

    @property
    def broken(self):
        """None, or the BrokenProcessPool this executor broke with (a worker
        died, an initializer raised, a task or result could not be unpickled)."""
        st = self._state
        return st.broken_error() if st.broken is not None else None

    def pids(self):
        """The process ids of the workers now running (none before the first submit)."""
        pool = self._state.pool
        return [] if pool is None or pool.closed else pool.pids()

    @property
    def pool(self):
        """The pmaprt Pool the tasks run on (started on first use)."""
        return self._ensure_pool().pool

    def submit(self, fn, /, *args, **kwargs):
        """Schedules fn(*args, **kwargs); returns a Future."""
        if not callable(fn):
            raise TypeError("pmaprt.Executor.submit: %r is not callable" % (fn,))
        self._state.check_open()
        return self._ensure_pool().add(((fn, args, kwargs),))[0]

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like map(fn, *iterables), with the calls run on the workers.

        As the standard library's Executor.map: the iterables are collected
        at once, every call is submitted before the first result is asked
        for, results come in order, the timeout counts from this call (a
        result not ready by then raises TimeoutError), and an exception is
        raised when its result is reached. chunksize > 1 sends that many
        calls as one task (as ProcessPoolExecutor does).
        """
        if not callable(fn):
            raise TypeError("pmaprt.Executor.map: %r is not callable" % (fn,))
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError("chunksize must be an int, got %r" % (chunksize,))
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if timeout is not None:
            end_time = timeout + time.monotonic()
        self._state.check_open()
        st = self._ensure_pool()
        if chunksize == 1:
            entries = [(fn, args, {}) for args in zip(*iterables)]
        else:
            calls = zip(*iterables)
            # large captured arrays go once, pinned until every chunk is done
            store, pins = st.pool.arrays.captured, set()
            fn_bytes = store.dumps_fn(fn, pins)
            entries = []
            while True:
                chunk = tuple(itertools.islice(calls, chunksize))
                if not chunk:
                    break
                entries.append((process_chunk, (fn_bytes, chunk), {}))
        fs = st.add(entries) if entries else []
        if chunksize > 1 and pins:
            _unpin_when_done(fs, store, pins)

        def result_iterator():
            try:
                fs.reverse()
                # As the standard library: no reference to a popped future or
                # to a result is kept while suspended.
                while fs:
                    if chunksize == 1:
                        if timeout is None:
                            yield _result_or_cancel(fs.pop())
                        else:
                            yield _result_or_cancel(fs.pop(), end_time - time.monotonic())
                    elif timeout is None:
                        yield from _result_or_cancel(fs.pop())
                    else:
                        yield from _result_or_cancel(fs.pop(), end_time - time.monotonic())
            finally:
                for f in fs:
                    f.cancel()

        return result_iterator()

    def shutdown(self, wait=True, *, cancel_futures=False):
        """As Executor.shutdown: no new tasks; with wait, returns once every
        pending task is done and the workers are stopped; cancel_futures
        cancels the queued tasks, except those about to run (a worker's worth
        and one more, as ProcessPoolExecutor's call queue holds)."""
        self._state.do_shutdown(wait, cancel_futures)

    def kill_workers(self):
        """Stop at once (as Python 3.14's ProcessPoolExecutor.kill_workers):
        queued tasks are cancelled, running ones fail with BrokenProcessPool,
        the workers of the executor's own pool are killed (SIGKILL), and the
        executor is shut down. On a given pool (pool=) the workers are left
        alone and the running tasks finish on them."""
        self._terminate(BrokenProcessPool(
            "pmaprt.Executor: the task's worker was killed by kill_workers()"), True)

    def _terminate(self, exc, cancel_queued):
        """kill_workers(), with the error running tasks (and, unless
        cancel_queued, queued ones) fail with (the joblib backend's abort)."""
        self._state.terminate(exc, cancel_queued)

    @property
    def shut_down(self):
        """True once shutdown() or kill_workers() was called, or the executor broke."""
        st = self._state
        return st.shutdown or st.broken is not None or st.forked

    def __repr__(self):
        st = self._state
        state = ("broken" if st.broken is not None else "shut down" if st.shutdown else "running")
        return "<pmaprt.Executor max_workers=%d %s>" % (self._max_workers, state)


def _result_or_cancel(fut, timeout=None):
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut


# As concurrent.futures: pending work completes before the interpreter exits
# (before atexit handlers, among them the pools' own).
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(shutdown_all)
else:  # pragma: no cover
    import atexit
    atexit.register(shutdown_all)
