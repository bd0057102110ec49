"""Worker set-up: what the parent sends at spawn, what a worker does with it
before its loop. Both sides of the protocol are here.

Protocol, step by step:

1. Parent, once per pool (`Startup`): the user's `initializer` is encoded
   as functions are (by reference, else by value) and `initargs` with
   multiprocessing's own pickler while "spawning" (`_SpawnPickling`), so
   that what ProcessPoolExecutor accepts there (a spawn-context Queue, Lock,
   Event, a Manager proxy) is accepted here too; the file descriptors those
   objects carry are collected and ride on the worker's first message
   (SCM_RIGHTS). The pool keeps `initargs` alive, so the descriptors stay
   valid for replacement workers.
2. Parent, at each spawn (`Startup.child_env`, `Startup.message`): the
   child's environment is ``os.environ`` as it is *now* (variables the
   caller set after the pool started reach workers started later), plus a
   cap on native thread pools (`THREAD_VARS`): `threads_per_worker` if
   given, overriding the caller's variables; by default cores // workers
   (at least 1) for each variable the caller did not set. A fresh
   interpreter reads them as its BLAS/OpenMP libraries load. The message
   (`WorkerSetup`, inside `WorkerStart`) adds the parent's
   ``multiprocessing.current_process().authkey`` (Manager proxies
   authenticate with it) and the encoded initializer.
3. Worker (`prepare_worker`), before it maps the control segment: set the
   authkey, mark the process daemonic for multiprocessing (as loky's
   workers), record its rank (`worker_rank`), run ``initializer(*initargs)``.
   An initializer that raises is logged as ProcessPoolExecutor logs it
   (CRITICAL on the ``concurrent.futures`` logger, with the traceback) and
   the worker exits (SystemExit, so that logging queues flush) with
   `INIT_FAILED_EXIT` before it is ready.
4. Parent (processes.py): a worker that exits with `INIT_FAILED_EXIT`
   before it is ready breaks the pool at once (`initializer_error`), as
   ProcessPoolExecutor does: every waiting job fails with that
   BrokenProcessPool, and no replacement is started.

Per-worker state: `worker_state()` is a dict that lives as long as the
process (across items, maps and executors on that worker), for what is
costly to build (a model, a tokenizer, a connection); an initializer may
fill it. In the caller's process it is the caller's own dict.
"""
import logging
import os
import pickle
from typing import NamedTuple

import multiprocessing
import multiprocessing.context
import multiprocessing.reduction

from .. import _serialize
from .._errors import WorkerCrashedError
from .._options import CORES

# The variables native thread pools read at load: OpenMP, OpenBLAS, MKL,
# BLIS, Accelerate, numexpr, Numba (loky's list).
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")
# Exit code of a worker whose initializer raised (any code a Python process
# does not exit with on its own: 1 is an uncaught exception, 2 a usage error).
INIT_FAILED_EXIT = 87
# File descriptors one message carries (framing.recv_msg's limit).
MAX_FDS = 16

_state = {}
_rank = None


def worker_state():
    """A dict private to this process that persists across items and maps.

    In a worker: build a costly object once and reuse it for every item the
    worker runs (``st = pmaprt.worker_state(); st.setdefault(...)``), or fill
    it from an ``initializer``. In the caller's process (items run inline,
    or no pool): the caller's own dict. It is gone with the process (a
    replaced or recycled worker starts empty)."""
    return _state


def worker_rank():
    """This worker's index in its pool (0 .. workers - 1), or None outside a worker."""
    return _rank


def thread_cap(threads_per_worker, workers):
    """The native threads each worker may run: explicit, or cores // workers."""
    if threads_per_worker is not None:
        return threads_per_worker
    return max(1, CORES // max(1, workers))


def check_threads(n):
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("pmaprt: threads_per_worker must be a positive int or None "
                         "(cores // workers), got %r" % (n,))
    return n


class WorkerSetup(NamedTuple):
    """The set-up a worker receives in its WorkerStart message."""
    authkey: bytes
    initializer: bytes     # encoded function, or b"" for none
    initargs: bytes        # ForkingPickler bytes of the tuple (or cloudpickle's, tag first)
    nfds: int              # descriptors initargs refer to, riding on the message


class _ReceivedFd:
    """Stands for a descriptor of the parent inside pickled initargs; in the
    worker, the descriptor received with the message (multiprocessing's
    connections call ``detach()`` to take it)."""

    def __init__(self, index):
        self.index = index

    def detach(self):
        return _received[self.index]


_received = []


class _SpawnPickling:
    """The "spawning popen" multiprocessing asks for while pickling objects
    that may only travel to a starting process (Queue, Lock, Event): records
    each descriptor they hand over."""

    def __init__(self):
        self.fds = []

    def duplicate_for_child(self, fd):
        self.fds.append(fd)
        return len(self.fds) - 1

    def DupFd(self, index):   # noqa: N802 (multiprocessing's name)
        return _ReceivedFd(index)


def _encode_initargs(initargs):
    """(bytes, fds): multiprocessing's pickler while spawning; objects of
    __main__ and lambdas by value (cloudpickle; no descriptors then)."""
    popen = _SpawnPickling()
    multiprocessing.context.set_spawning_popen(popen)
    try:
        data = bytes(multiprocessing.reduction.ForkingPickler.dumps(initargs, _serialize.PROTOCOL))
    except Exception as first:
        popen.fds = []
        try:
            data = _serialize.cloudpickle().dumps(initargs, _serialize.PROTOCOL)
        except Exception:
            raise TypeError("pmaprt: initargs cannot be pickled for the workers: %s: %s (a "
                            "multiprocessing Queue, Lock or Event must come from "
                            "multiprocessing.get_context('spawn'), or use a Manager)"
                            % (type(first).__name__, first)) from first
    finally:
        multiprocessing.context.set_spawning_popen(None)
    if _serialize.names_main(data) and not popen.fds:
        data = _serialize.cloudpickle().dumps(initargs, _serialize.PROTOCOL)
    if len(popen.fds) > MAX_FDS:
        raise ValueError("pmaprt: initargs carry %d file descriptors; at most %d"
                         % (len(popen.fds), MAX_FDS))
    return data, popen.fds


class Startup:
    """The parent's side: a pool's worker set-up, encoded once."""

    def __init__(self, initializer=None, initargs=(), threads_per_worker=None, workers=1):
        if initializer is not None and not callable(initializer):
            raise TypeError("pmaprt: initializer must be callable, got %r" % (initializer,))
        if not isinstance(initargs, tuple):
            initargs = tuple(initargs)
        self.initializer = initializer
        self.initargs = initargs          # kept: the descriptors it holds stay open
        self.explicit_threads = check_threads(threads_per_worker)
        self.threads = thread_cap(self.explicit_threads, workers)
        if initializer is None:
            self._fn, self._args, self._fds = b"", b"", []
        else:
            self._fn = _serialize.dumps_fn(initializer)
            self._args, self._fds = _encode_initargs(initargs)

    def same(self, initializer, initargs, threads_per_worker):
        """Whether this set-up serves what is asked for (the default pool
        keeps its workers then): nothing in particular, or the same
        initializer object with equal initargs and the same thread cap."""
        if initializer is None and threads_per_worker is None:
            return True
        if initializer is not self.initializer or threads_per_worker != self.explicit_threads:
            return False
        try:
            return bool(tuple(initargs) == self.initargs)
        except Exception:
            return tuple(initargs) is self.initargs

    def child_env(self):
        """Step 2: the environment of a worker started now."""
        env = dict(os.environ)
        cap = str(self.threads)
        for var in THREAD_VARS:
            if self.explicit_threads is not None or var not in env:
                env[var] = cap
        return env

    def message(self):
        """Step 2: (WorkerSetup, fds) for a worker started now."""
        key = bytes(multiprocessing.current_process().authkey)
        return WorkerSetup(key, self._fn, self._args, len(self._fds)), list(self._fds)


def prepare_worker(setup, fds, rank):
    """Step 3, in the worker. Returns normally, or exits the process with
    INIT_FAILED_EXIT when the initializer raises."""
    global _rank
    _rank = rank
    me = multiprocessing.current_process()
    me.authkey = setup.authkey
    # A worker dies with its parent, as a daemonic process does; libraries
    # that check (joblib's multiprocessing and loky backends) then run nested
    # loops sequentially instead of starting processes of their own.
    me.daemon = True
    _received[:] = fds[:setup.nfds]
    if not setup.initializer:
        return
    try:
        fn = _serialize.loads_fn(setup.initializer)
        args = pickle.loads(setup.initargs)
        fn(*args)
    except BaseException:
        logging.getLogger("concurrent.futures").critical("Exception in initializer:",
                                                         exc_info=True)
        # A normal exit (not os._exit): the handlers' queues (a QueueHandler
        # on a multiprocessing Queue) flush at exit, as they do for
        # ProcessPoolExecutor's workers.
        raise SystemExit(INIT_FAILED_EXIT)


def initializer_error(what, pid, rc):
    """Step 4: the error a pool breaks with."""
    return WorkerCrashedError(
        "pmaprt: the initializer raised in a worker (%s); the pool is not usable (the "
        "traceback was logged on the worker's stderr after 'Exception in initializer:')"
        % what, pid, rc)
