"""pmaprt: a parallel-map runtime.

``from pmaprt import pmap`` replaces ``map``: lazy, ordered, the same results and
the same exceptions, on worker processes that exchange work through shared memory.
"""
from ._api import default_pool, imap_unordered, pmap, shutdown, starmap
from ._collective import allreduce, axis_index, axis_size, pmax, pmean, pmin, psum
from ._arrays import asarray, empty, empty_like, is_shared, zeros, zeros_like
from ._errors import (
    CollectiveAbortedError, CollectiveError, PoolClosedError, RemoteTraceback, WorkerCrashedError,
)
from ._pool import Pool
from ._stats import MapStats, WorkerStats
from ._tune import TuneResult, tune
from .gpu.discovery import devices
from .executor import Executor

__version__ = "0.1.0"

__all__ = [
    "pmap",
    "imap_unordered",
    "starmap",
    "Pool",
    "default_pool",
    "shutdown",
    "MapStats",
    "WorkerStats",
    "WorkerCrashedError",
    "RemoteTraceback",
    "PoolClosedError",
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
