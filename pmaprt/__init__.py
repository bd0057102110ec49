"""pmaprt: a parallel-map runtime.

``from pmaprt import pmap`` replaces ``map``: lazy, ordered, the same results and
the same exceptions, on worker processes that exchange work through shared memory.

The layering rule: a module imports only modules of its own layer or below,
never above, and never from inside a function (optional third-party
libraries excepted); tests/test_layout.py checks it. Read from the bottom up:

    ground floor  _options, _errors, _sched, _stats, _serialize, _memguard, _tuned,
                  _threads
    _shm/         the control segment's layout, memfd segments, socket framing,
                  the C extension's loader (csrc/ builds pmaprt._core)
    _arrays/      shared arrays, how one buffer travels, chunks= blocks, out=
    _access       how a map's input reaches the workers (both sides)
    _collective/  the shared-memory all-reduce inside SPMD maps
    _runtime/     one module per protocol, both its sides: board, ranges and
                  claims, result ring, sleep/wake, lent segments, processes,
                  the task path, running a chunk, the worker loop; the Job protocol
    _map/         one map: job, feed, window, recovery, inline cost model, SPMD
    _pool, _api   the public face: Pool, pmap and friends
    above         executor, joblib, dask, _tune, gpu/, bench/

docs/ARCHITECTURE.md describes each layer and protocol.
"""
from ._api import default_pool, imap_unordered, pmap, shutdown, starmap
from ._collective import allreduce, axis_index, axis_size, pmax, pmean, pmin, psum
from ._arrays import asarray, empty, empty_like, is_shared, zeros, zeros_like
from ._errors import (
    CollectiveAbortedError, CollectiveError, PoolClosedError, RemoteTraceback, TooManyMapsError,
    WorkerCrashedError,
)
from ._pool import Pool
from ._runtime import worker_rank, worker_state
from ._stats import MapStats, WorkerStats
from ._tune import TuneResult, tune
from .gpu.discovery import devices
from .executor import Executor
from . import dask as _dask  # registers backend="dask" (distributed is imported on use)

__version__ = "0.1.0"

__all__ = [
    "pmap",
    "imap_unordered",
    "starmap",
    "Pool",
    "worker_state",
    "worker_rank",
    "default_pool",
    "shutdown",
    "MapStats",
    "WorkerStats",
    "WorkerCrashedError",
    "RemoteTraceback",
    "PoolClosedError",
    "TooManyMapsError",
    "tune",
    "TuneResult",
    "Executor",
    "devices",
    "allreduce",
    "psum",
    "pmean",
    "pmax",
    "pmin",
    "axis_index",
    "axis_size",
    "CollectiveError",
    "CollectiveAbortedError",
    "empty",
    "zeros",
    "empty_like",
    "zeros_like",
    "asarray",
    "is_shared",
]
