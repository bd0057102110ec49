"""A joblib parallel backend on pmaprt: ``import pmaprt.joblib``, then

    with joblib.parallel_config(backend="pmaprt"):
        Parallel(n_jobs=4)(delayed(f)(x) for x in xs)

Code that uses joblib (scikit-learn's ``n_jobs`` among it) then runs its
batches on a pmaprt Executor. Built on joblib's public backend API only
(``ParallelBackendBase``, ``AutoBatchingMixin``, ``register_parallel_backend``).

- One Executor per worker count, created on first use and kept for later
  Parallel calls (as loky keeps its executor); ``shutdown()`` stops them.
  ``parallel_config(backend="pmaprt", pool=p)`` runs on a given Pool instead.
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
  it); a worker crash raises ``WorkerCrashedError`` (a BrokenProcessPool) and
  the executor for that worker count is replaced on the next call.
"""
import pickle
import threading

import cloudpickle
from joblib import register_parallel_backend
from joblib.parallel import (AutoBatchingMixin, FallbackToBackend, ParallelBackendBase,
                             SequentialBackend)

from . import _serialize
from ._runtime import worker as _worker
from ._options import default_workers
from ._pool import Pool
from .executor import Executor

__all__ = ["PmaprtBackend", "register", "shutdown"]

BACKEND_NAME = "pmaprt"

_executors = {}
_executors_lock = threading.Lock()


def _executor_for(n_jobs, pool=None):
    if pool is not None:
        key = ("pool", id(pool))
    else:
        key = n_jobs
    with _executors_lock:
        ex = _executors.get(key)
        st = ex._state if ex is not None else None
        if ex is None or st.shutdown or st.broken is not None:
            if ex is not None:
                ex.shutdown(wait=False)
            ex = Executor(pool=pool) if pool is not None else Executor(max_workers=n_jobs)
            _executors[key] = ex
        return ex


def _run_batch(data):
    """In a worker: run one joblib batch (a BatchedCalls), pickled by cloudpickle."""
    return pickle.loads(data)()


def shutdown():
    """Stop the executors the backend started (a later Parallel call starts new ones)."""
    with _executors_lock:
        exs = list(_executors.values())
        _executors.clear()
    for ex in exs:
        ex.shutdown(wait=True)


class PmaprtBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend whose batches run on a pmaprt Executor."""

    supports_retrieve_callback = True
    supports_timeout = True
    # Batches of about MIN..MAX seconds (joblib's defaults: 0.2 and 2).
    MIN_IDEAL_BATCH_DURATION = 0.02
    MAX_IDEAL_BATCH_DURATION = 0.2

    def __init__(self, nesting_level=None, inner_max_num_threads=None, pool=None,
                 **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        if pool is not None and not isinstance(pool, Pool):
            raise TypeError("pmaprt joblib backend: pool must be a pmaprt.Pool, got %r" % (pool,))
        self._pool = pool
        self._executor = None
        self._futures = set()   # submitted by this backend and not done yet

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = 1
        if _worker.IN_WORKER:
            return 1
        if self._pool is not None:
            return self._pool.workers if n_jobs < 0 else min(n_jobs, self._pool.workers)
        if n_jobs < 0:
            n_jobs = max(default_workers() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **kwargs):
        n = self.effective_n_jobs(n_jobs)
        if n == 1 and self._pool is None:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._executor = _executor_for(n, self._pool)
        return n

    def submit(self, func, callback=None):
        # As loky: the batch is pickled with cloudpickle, so that functions
        # defined in __main__ or interactively reach the workers by value.
        future = self._executor.submit(_run_batch, cloudpickle.dumps(func, _serialize.PROTOCOL))
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future):
        return future.result()

    def terminate(self):
        # The executor is kept for later Parallel calls (as loky's is).
        self._executor = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready=True):
        """An error in one task: cancel this call's tasks that have not
        started. Running ones finish on their own (the workers are kept for
        later calls)."""
        for f in list(self._futures):
            f.cancel()
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)


def register():
    """Register the backend under the name "pmaprt" (done on import)."""
    register_parallel_backend(BACKEND_NAME, PmaprtBackend)


register()
