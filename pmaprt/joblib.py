"""A joblib parallel backend on pmaprt: ``import pmaprt.joblib``, then

    with joblib.parallel_config(backend="pmaprt"):
        Parallel(n_jobs=4)(delayed(f)(x) for x in xs)

Code that uses joblib (scikit-learn's ``n_jobs`` among it) then runs its
batches on a pmaprt Executor. Built on joblib's public backend API only
(``ParallelBackendBase``, ``AutoBatchingMixin``, ``register_parallel_backend``).

- One Executor per worker count, created on first use and kept for later
  Parallel calls (as loky keeps its executor) while the worker set-up stays
  the same: ``initializer``/``initargs`` (``Parallel(initializer=...)`` or
  ``parallel_config(...)``) and ``inner_max_num_threads`` (each worker's
  BLAS/OpenMP threads; by default cores // n_jobs, as loky). Another set-up
  replaces it. ``shutdown()`` stops them; ``executors()`` lists them.
  ``parallel_config(backend="pmaprt", pool=p)`` runs on a given Pool
  instead (its own set-up applies; ``inner_max_num_threads`` is then set
  around each batch with threadpoolctl).
- Batching: joblib groups calls into batches (``BatchedCalls``) sized from
  their measured durations. pmaprt's per-task cost is a few microseconds
  rather than loky's hundreds, so the batch target here is ten times shorter
  than joblib's default (20-200 ms instead of 0.2-2 s): less idle time at the
  end of a heavy-tailed loop.
- Nesting: a Parallel call inside a task runs on threads (first level) or
  sequentially (deeper), by joblib's own rule (``get_nested_backend``). A
  Parallel call inside a pmaprt worker that names this backend runs
  sequentially: workers do not start pools of their own.
- Errors: the task's exception type reaches the caller (joblib re-raises
  it), with the standard library's ``_RemoteTraceback`` as its cause; a
  worker crash raises ``WorkerCrashedError`` (a BrokenProcessPool) and the
  executor for that worker count is replaced on the next call.
- Abort (an error in one task, or a ``return_as="generator"`` generator
  dropped early): the call's queued tasks are cancelled and the executor's
  workers are killed (as loky kills its workers); a new executor serves the
  next call, which so never waits behind abandoned work. Another call that was using that executor at that
  moment gets joblib's "The executor underlying Parallel has been shutdown"
  RuntimeError, as with loky.
- os.fork(): a child starts with no executor of its parent's (it makes its
  own on its first call) and never touches the parent's workers.
"""
import multiprocessing
import os
import pickle
import threading
import warnings

from joblib import register_parallel_backend
from joblib.parallel import (AutoBatchingMixin, FallbackToBackend, ParallelBackendBase,
                             SequentialBackend)

from . import _serialize
from ._runtime import worker as _worker
from ._options import default_workers
from ._pool import Pool
from .executor import Executor

__all__ = ["PmaprtBackend", "register", "shutdown", "executors"]

BACKEND_NAME = "pmaprt"

_executors = {}      # key -> (set-up, Executor)
_executors_lock = threading.Lock()
# What another call that was using an executor an abort killed gets (loky's words).
SHUTDOWN_MESSAGE = (
    "The executor underlying Parallel has been shutdown. This is likely due to the garbage "
    "collection of a previous generator from a call to Parallel with return_as='generator'. "
    "Make sure the generator is not garbage collected when submitting a new job or that it "
    "is first properly exhausted.")


def _same_setup(a, b):
    """(initializer, initargs, threads) equal: the same initializer object,
    equal initargs (a Manager proxy compares by identity)."""
    if a[0] is not b[0] or a[2] != b[2]:
        return False
    try:
        return bool(a[1] == b[1])
    except Exception:
        return a[1] is b[1]


def _executor_for(n_jobs, pool=None, setup=(None, (), None)):
    """The executor for this worker count and set-up, kept across calls."""
    key = ("pool", id(pool)) if pool is not None else n_jobs
    with _executors_lock:
        kept_setup, ex = _executors.get(key, (None, None))
        if ex is None or ex.shut_down or not _same_setup(kept_setup, setup):
            if ex is not None:
                ex.shutdown(wait=False)
            if pool is not None:
                ex = Executor(pool=pool)
            else:
                ex = Executor(max_workers=n_jobs, initializer=setup[0], initargs=setup[1],
                              threads_per_worker=setup[2])
            _executors[key] = (setup, ex)
        return ex


def _retire(ex):
    with _executors_lock:
        for key, (_, kept) in list(_executors.items()):
            if kept is ex:
                del _executors[key]


def executors():
    """The Executors the backend keeps for later calls (one per worker count)."""
    with _executors_lock:
        return [ex for _, ex in _executors.values()]


def _run_batch(data, threads=None):
    """In a worker: run one joblib batch (a BatchedCalls), pickled by
    cloudpickle; threads: inner_max_num_threads on a given pool."""
    batch = pickle.loads(data)
    if threads is None:
        return batch()
    from threadpoolctl import threadpool_limits
    with threadpool_limits(threads):
        return batch()


def _forget_in_child():
    """os.fork(): the parent's executors are not the child's (see the docstring)."""
    global _executors_lock
    _executors.clear()
    _executors_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def shutdown():
    """Stop the executors the backend started (a later Parallel call starts new ones)."""
    with _executors_lock:
        exs = [ex for _, ex in _executors.values()]
        _executors.clear()
    for ex in exs:
        ex.shutdown(wait=True)


class PmaprtBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend whose batches run on a pmaprt Executor."""

    supports_retrieve_callback = True
    supports_timeout = True
    supports_inner_max_num_threads = True
    # Batches of about MIN..MAX seconds (joblib's defaults: 0.2 and 2).
    MIN_IDEAL_BATCH_DURATION = 0.02
    MAX_IDEAL_BATCH_DURATION = 0.2

    def __init__(self, nesting_level=None, inner_max_num_threads=None, pool=None,
                 **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        if pool is not None and not isinstance(pool, Pool):
            raise TypeError("pmaprt joblib backend: pool must be a pmaprt.Pool, got %r" % (pool,))
        self._given_pool = pool
        self._workers = None    # the Executor of this call (loky's name, which joblib reads)
        self._futures = set()   # submitted by this backend and not done yet

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = 1
        if _worker.IN_WORKER:
            return 1
        if n_jobs != 1 and self._given_pool is None:
            # loky's rules, with its warnings: no processes of our own inside
            # a daemonic process, nor below threads.
            if multiprocessing.current_process().daemon:
                warnings.warn("Pmaprt-backed parallel loops cannot be called in a "
                              "multiprocessing, setting n_jobs=1", stacklevel=3)
                return 1
            if not (self.in_main_thread() or self.nesting_level == 0):
                warnings.warn("Pmaprt-backed parallel loops cannot be nested below threads, "
                              "setting n_jobs=1", stacklevel=3)
                return 1
        if self._given_pool is not None:
            return self._given_pool.workers if n_jobs < 0 else min(n_jobs, self._given_pool.workers)
        if n_jobs < 0:
            n_jobs = max(default_workers() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **kwargs):
        n = self.effective_n_jobs(n_jobs)
        if n == 1 and self._given_pool is None:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        opts = {**self.backend_kwargs, **kwargs}
        initializer, initargs = opts.get("initializer"), tuple(opts.get("initargs") or ())
        if self._given_pool is not None and initializer is not None:
            raise ValueError("pmaprt joblib backend: with pool=, the pool's own initializer "
                             "applies (pass initializer= to the Pool)")
        self.parallel = parallel
        threads = None if self._given_pool is not None else self.inner_max_num_threads
        self._workers = _executor_for(n, self._given_pool, (initializer, initargs, threads))
        return n

    def submit(self, func, callback=None):
        # As loky: the batch is pickled with cloudpickle, so that functions
        # defined in __main__ or interactively reach the workers by value;
        # its large captured arrays go once per pool, pinned until it is done.
        store, pins = self._workers._ensure_pool().pool.arrays.captured, set()
        try:
            args = (store.dumps_fn(func, pins, by_value=True),)
        except _serialize.PICKLE_ERRORS as e:
            store.unpin(pins)
            raise pickle.PicklingError("Could not pickle the task to send it to the workers.") \
                from e
        if self._given_pool is not None and self.inner_max_num_threads is not None:
            args += (self.inner_max_num_threads,)
        try:
            future = self._workers.submit(_run_batch, *args)
        except BaseException:
            store.unpin(pins)
            raise
        if pins:
            future.add_done_callback(lambda _: store.unpin(pins))
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future):
        return future.result()

    def terminate(self):
        # The executor is kept for later Parallel calls (as loky's is).
        self._workers = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready=True):
        """An error in one task, or a dropped generator: cancel this call's
        queued tasks and, as loky does, kill the executor's workers, so that
        the next call does not wait behind tasks nobody wants; it gets a new
        executor. On a given pool (pool=), only the queued tasks are cancelled."""
        for f in list(self._futures):
            f.cancel()
        ex = self._workers
        if ex is not None and self._given_pool is None:
            _retire(ex)
            # Another call still using this executor gets joblib's error.
            ex._terminate(RuntimeError(SHUTDOWN_MESSAGE), False)
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel,
                           **getattr(self.parallel, "_backend_kwargs", {}))


def register():
    """Register the backend under the name "pmaprt" (done on import)."""
    register_parallel_backend(BACKEND_NAME, PmaprtBackend)


register()
