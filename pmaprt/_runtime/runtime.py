"""The runtime: the parent's side of every protocol, composed into one object.

A `Runtime` owns the control segment, the worker processes and the board,
and is what a job is given (the map layer posts into it, waits on it, lends
segments through it). Each protocol's parent side is a mixin from the module
that also holds its worker side; the hot paths (a task's round trip, the
drain) call each other through `self`, with no object in between.

What a job may use of it: `_lock` (an RLock held around every change to the
board and the rings), `_r` (the control Region), `_res` (`.ctl`, `.segs`),
`_layout`, `_post`, `_retire`, `share`, `unshare`, `wait`, `wake_workers`,
`workers`, `seed`, `max_items_per_worker`, `startup`, `_broken`, `_closed`,
`_check_open`, `terminate`, and for shared arrays `arrays`, `lend`, `apply`.
"""
import threading
import weakref

from .. import _arrays, _shm
from .._errors import PoolClosedError
from .._options import check_max_items, check_workers
from .._shm import H_MAGIC, MAGIC
from .board import BoardPoster
from .claims import Reconciler
from .lent import Lender
from .processes import Processes, _Resources, live_runtimes
from .ring import RingReader
from .startup import Startup
from .task import TaskCaller
from .wake import ParentWake

# Jobs (live map iterators, tasks in flight) one runtime can run at once.
# Each slot costs its inline descriptor area in the control segment.
DEFAULT_MAX_JOBS = 32


class Runtime(Processes, Lender, BoardPoster, RingReader, ParentWake, Reconciler, TaskCaller):
    """Worker processes that persist across jobs, and the shared memory they
    work in. `run_map` (how a map is built) belongs to the layer above."""

    def __init__(self, workers=None, *, max_jobs=DEFAULT_MAX_JOBS, seed=0,
                 max_items_per_worker=None, initializer=None, initargs=(),
                 threads_per_worker=None, start=None):
        n = check_workers(workers)
        # What each worker gets at spawn: initializer, authkey, thread caps (startup.py).
        self.startup = Startup(initializer, initargs, threads_per_worker, n)
        self.workers = n
        self.seed = seed
        self.max_items_per_worker = check_max_items(max_items_per_worker)
        self._layout = _shm.Layout(n, max_jobs)
        self._res = res = _Resources()
        res.ctl = _shm.Segment(self._layout.size)
        self._ctl = res.ctl
        self._r = res.ctl.region
        self._r.store64(H_MAGIC, MAGIC)
        self._lock = threading.RLock()
        self._broken = None
        self._closed = False
        self._init_processes(n)
        self._init_lent(n)
        self._init_board()
        self._init_rings(n)
        self.arrays = _arrays.PoolArrays(self)   # shared arrays lent to the workers, and pvm
        self.arrays.captured = _arrays.CapturedStore(self)   # functions' large arrays
        self._finalizer = weakref.finalize(self, res.terminate, False)
        # start: workers started now; the rest on demand (start_worker), as
        # the Executor starts them (None: all of them).
        self.started = n if start is None else min(n, max(0, start))
        try:
            for w in range(n):
                if w < self.started:
                    self._spawn(w)
                else:
                    self._clear_area(w)
        except BaseException:
            self.terminate()
            raise
        live_runtimes.add(self)

    def run_map(self, fn, iterables, star, opts):
        """A map on this runtime: the map layer above provides it (Pool)."""
        raise NotImplementedError

    def _check_open(self):
        if self._owner_pid is not None:
            raise PoolClosedError(
                "pmaprt: this pool belongs to process %d, of which this process is a fork "
                "(os.fork): its workers are not this process's; make a new Pool here (pmap "
                "starts a fresh default pool by itself)" % self._owner_pid)
        if self._closed:
            raise PoolClosedError("pmaprt: this pool is closed")
        if self._broken is not None:
            raise self._broken

    def close(self):
        """Stop the workers once they are idle; waits for them."""
        self._stop(graceful=True)

    def terminate(self):
        """Kill the workers now."""
        self._stop(graceful=False)

    def _stop(self, graceful):
        self._closed = True
        live_runtimes.discard(self)
        self._finalizer.detach()
        self._res.terminate(graceful=graceful)
        self._r = None

    @property
    def closed(self):
        return self._closed
