"""pmaprt.Executor: a concurrent.futures.Executor on a pmaprt Pool.

    submit(fn, *args) --> Future (PENDING) --> queue (deque, under one lock)
                                                 |
        runner threads (at most workers + 1), each:
          take everything queued (up to MAX_BATCH tasks), mark the futures
          RUNNING, run the batch as one unordered map of _call over the
          tasks; _call returns (task id, ok, pickled result or exception)
                                                 |
        as each result arrives: set the future's result or exception

- Tasks are batched: one map per batch, not one per task, so many small
  submits cost a few microseconds each in the parent and the pool's chunking
  and work stealing run them. A batch is taken as soon as a runner is free, so
  a lone submit starts at once (no waiting to fill a batch).
- Up to ``workers + 1`` batches are in flight, each on its own runner thread:
  single long tasks submitted one by one still occupy every worker.
- Results are pickled by ``_call`` itself, in the worker, so an unpicklable
  result fails that task's future only (as ProcessPoolExecutor does), never
  the other tasks of its batch.
- A worker crash (WorkerCrashedError from a batch) breaks the executor, as
  ProcessPoolExecutor does: every pending and running future fails with the
  crash error (a BrokenProcessPool), later submits raise it; the workers of a
  pool the executor owns are stopped.

The machinery lives in ``_State``, which the runner threads hold; the
Executor object is a thin front, so an Executor dropped without shutdown() is
collected and its state shut down (pending work still completes).
"""
import collections
import concurrent.futures as _cf
import itertools
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from concurrent.futures.process import BrokenProcessPool

from . import _serialize
from ._errors import PoolClosedError, RemoteTraceback, WorkerCrashedError
from ._options import default_workers
from ._pool import Pool

# Tasks one batch may hold. A runner takes everything queued up to this many:
# larger batches amortize the map's start (posting the job, encoding the
# tasks) over more tasks; smaller ones let the next runner start sooner and
# bound the encoding done before the first task of a batch runs.
MAX_BATCH = 2048
# Batches are sized from the measured seconds per task toward this much work
# per worker, starting at one task per worker and growing at most GROWTH times
# per batch. A future is RUNNING from the moment its batch is formed, so this
# bounds how far ahead of the workers futures stop being cancellable (long
# tasks: about one per worker and batch, as ProcessPoolExecutor's call queue),
# while tiny tasks still travel in batches of MAX_BATCH.
BATCH_TARGET_S = 0.05
GROWTH = 4
# Tasks measured shorter than this (seconds, on average) may share a chunk
# (the pool's adaptive chunking); longer ones are claimed one at a time.
TINY_TASK_S = 0.0005
# Extra runner threads (batches in flight) beyond one per worker: while one
# batch is being collected, the next is already being formed and posted.
EXTRA_RUNNERS = 1
# How often the executor looks for a replaced worker of its own pool. A batch
# learns of a crash only once its other tasks are done (the error has a
# position in the batch); this look breaks the executor within WATCH_S.
WATCH_S = 0.05
# Batches in flight on a pool the executor does not own: it shares the pool's
# job slots (32 by default) with the pool's other users.
SHARED_POOL_RUNNERS = 8

_live_states = weakref.WeakSet()
_global_shutdown = False


# --- worker side


def _dump_exc(exc):
    """Pickled (exception, formatted traceback); a RuntimeError naming it when
    the exception itself cannot be pickled."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return _serialize.dumps_obj((exc, tb))
    except BaseException as pe:
        sub = RuntimeError("%s: %s (the exception could not be pickled: %s)"
                           % (type(exc).__name__, exc, pe))
        return pickle.dumps((sub, tb), _serialize.PROTOCOL)


# Worker side: functions decoded so far, by their bytes (a batch of tasks of
# one function carries its bytes once per task; decoding is done once).
_FN_CACHE = {}
_FN_CACHE_MAX = 256


def _load_fn(fn_bytes):
    fn = _FN_CACHE.get(fn_bytes)
    if fn is None:
        fn = _serialize.loads_fn(fn_bytes)
        if len(_FN_CACHE) >= _FN_CACHE_MAX:
            _FN_CACHE.clear()
        _FN_CACHE[fn_bytes] = fn
    return fn


def _call(task):
    """Runs in a worker: one submitted task. Never raises."""
    tid, fn_bytes, args, kwargs = task
    fn = None
    try:
        fn = _load_fn(fn_bytes)
        result = fn(*args, **kwargs)
    except BaseException as e:
        return tid, False, _dump_exc(e)
    try:
        return tid, True, _serialize.dumps_obj(result)
    except BaseException as e:
        err = TypeError("pmaprt.Executor: the result of %r cannot be pickled: %s: %s"
                        % (getattr(fn, "__qualname__", fn), type(e).__name__, e))
        err.__cause__ = e
        return tid, False, _dump_exc(err)


def _process_chunk(fn_bytes, chunk):
    """Executor.map with chunksize > 1: one task runs a chunk of argument tuples."""
    fn = _load_fn(fn_bytes)
    return [fn(*args) for args in chunk]


# --- parent side


class _State:
    def __init__(self, pool, owns_pool, runners):
        self.pool = pool
        self.owns_pool = owns_pool
        self.max_runners = runners
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.queue = collections.deque()      # (tid, future, fn, args, kwargs)
        self.batches = {}                     # id -> {tid: future} of each batch in flight
        self.tids = itertools.count()
        self.threads = []
        self.alive = 0
        self.idle = 0
        self.shutdown = False
        self.broken = None
        self.pool_closed = False
        self.task_s = None      # EWMA of seconds per task (wall x busy workers / tasks)
        self.batch_cap = None   # set on the first batch: one task per worker
        self.stop_watch = threading.Event()
        _live_states.add(self)

    def start_watch(self):
        """Owned pool: a replaced worker means one of our tasks killed it."""
        threading.Thread(target=self._watch, args=(self.pool,), name="pmaprt-executor-watch",
                         daemon=True).start()

    def _watch(self, pool):
        pids = pool.pids()
        while not self.stop_watch.wait(WATCH_S):
            if self.broken is not None or pool.closed:
                return
            now = pool.pids()
            if now != pids:
                gone = sorted(set(pids) - set(now))
                self._break(WorkerCrashedError(
                    "worker process %s terminated abruptly (killed by a signal or exited) while "
                    "the executor ran its tasks" % ", ".join("pid %d" % p for p in gone)))
                return

    # --- submitting (caller's thread)

    def check_open(self):
        if self.broken is not None:
            raise self.broken_error()
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def broken_error(self):
        b = self.broken
        err = BrokenProcessPool(
            "pmaprt.Executor is broken: a worker process terminated abruptly (%s); "
            "create a new Executor" % b)
        err.__cause__ = b
        return err

    def add(self, entries):
        """Queue (fn, args, kwargs) triples; returns their futures. Lock taken here."""
        futs = []
        with self.lock:
            self.check_open()
            q = self.queue
            for fn, args, kwargs in entries:
                f = _cf.Future()
                q.append((next(self.tids), f, fn, args, kwargs))
                futs.append(f)
            if self.idle:
                self.cond.notify()
            elif self.alive < self.max_runners:
                self._start_runner()
        return futs

    def _start_runner(self):
        t = threading.Thread(target=self._runner, name="pmaprt-executor-%d" % len(self.threads),
                             daemon=True)
        self.alive += 1
        self.threads.append(t)
        t.start()

    # --- runner threads

    def _take(self):
        """The next batch, or None when the runner should exit. Lock held."""
        while True:
            if self.broken is not None:
                return None
            if self.queue:
                break
            if self.shutdown:
                return None
            self.idle += 1
            try:
                self.cond.wait()
            finally:
                self.idle -= 1
        batch = []
        q = self.queue
        cap = self._batch_limit()
        while q and len(batch) < cap:
            tid, f, fn, args, kwargs = q.popleft()
            if f.set_running_or_notify_cancel():
                batch.append((tid, f, fn, args, kwargs))
        if q:
            # More than one batch's worth is queued: hand it to another runner.
            if self.idle:
                self.cond.notify()
            elif self.alive < self.max_runners:
                self._start_runner()
        return batch

    def _batch_limit(self):
        w = self.pool.workers
        if self.task_s is None:
            return w if self.batch_cap is None else self.batch_cap
        want = int(BATCH_TARGET_S * w / max(self.task_s, 1e-7)) + 1
        return max(1, min(want, MAX_BATCH, (self.batch_cap or w) * GROWTH))

    def _chunksize(self, n):
        """1 (each task claimed alone) unless the tasks are known to be tiny and
        many: a chunk runs its tasks one after another, so a long task would
        hold up the others of its chunk while a worker idles."""
        tiny = self.task_s is not None and self.task_s < TINY_TASK_S
        return None if tiny and n > 4 * self.pool.workers else 1

    def _observe(self, n, seconds):
        """A batch of n tasks took `seconds` of wall time."""
        if n <= 0:
            return
        t = seconds * min(n, self.pool.workers) / n
        self.task_s = t if self.task_s is None else 0.5 * t + 0.5 * self.task_s
        self.batch_cap = max(n, self.batch_cap or 1)

    def _runner(self):
        try:
            while True:
                with self.lock:
                    batch = self._take()
                if batch is None:
                    break
                if batch:
                    self._run_batch(batch)
        finally:
            with self.lock:
                self.alive -= 1
                last = self.alive == 0 and (self.shutdown or self.broken is not None)
                if not last:
                    self.cond.notify()
            if last:
                self._close_pool()

    def _run_batch(self, batch):
        futs = {tid: f for tid, f, _, _, _ in batch}
        with self.lock:
            if self.broken is not None:
                err = self.broken_error()
                for f in futs.values():
                    _set(f, exc=err)
                return
            self.batches[id(futs)] = futs
        try:
            self._run_tasks(batch, futs)
        finally:
            with self.lock:
                self.batches.pop(id(futs), None)

    def _run_tasks(self, batch, futs):
        it = None
        try:
            t0 = time.perf_counter()
            tasks = _encode_tasks(batch)
            if len(tasks) == 1:
                # One task: the pool's single-call path (no map to set up).
                it = iter((self.pool.apply(_call, tasks[0]),))
            else:
                it = self.pool.map(_call, tasks, ordered=False, inline=False,
                                   chunksize=self._chunksize(len(tasks)))
            for tid, ok, payload in it:
                _deliver(futs.pop(tid), ok, payload)
                if self.broken is not None:
                    break
            else:
                self._observe(len(tasks), time.perf_counter() - t0)
        except (BrokenProcessPool, PoolClosedError) as e:
            self._break(e)
        except BaseException as e:
            # An item the pool could not encode (an unpicklable argument or
            # function): the map stopped there. Fail the tasks that cannot be
            # pickled, run the others again (none of them ran).
            left = [t for t in batch if t[0] in futs]
            again = []
            for t in left:
                bad = _find_unpicklable(t)
                if bad is not None:
                    err = TypeError("pmaprt.Executor: the task (%r) cannot be pickled for the "
                                    "workers: %s: %s" % (t[2], type(bad[1]).__name__, bad[1]))
                    err.__cause__ = bad[1]
                    _set(t[1], exc=err)
                    futs.pop(t[0], None)
                else:
                    again.append(t)
            if len(again) == len(left):
                # Nothing to blame on pickling: fail them with the error itself.
                for t in again:
                    _set(t[1], exc=e)
                    futs.pop(t[0], None)
            elif again:
                self._run_tasks(again, futs)
            return
        finally:
            if it is not None and hasattr(it, "close"):
                it.close()
        if futs and self.broken is not None:
            # Left over only when the executor broke while this batch ran.
            err = self.broken_error()
            for f in futs.values():
                _set(f, exc=err)

    def _break(self, exc):
        with self.lock:
            if self.broken is not None:
                return
            if not isinstance(exc, BrokenProcessPool):
                exc = WorkerCrashedError(str(exc))
            self.broken = exc
            doomed = [e[1] for e in self.queue]
            for futs in self.batches.values():
                doomed.extend(list(futs.values()))  # C-level copy: atomic under the GIL
            self.queue.clear()
            self.cond.notify_all()
        err = self.broken_error()
        for f in doomed:
            _set(f, exc=err)
        if self.owns_pool:
            # As ProcessPoolExecutor: the other workers are stopped too, so the
            # batches still in flight end now (their runners see the crash).
            pool = self.pool
            try:
                pids = pool.pids()
            except Exception:
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    # --- shutting down

    def do_shutdown(self, wait, cancel_futures):
        with self.lock:
            self.shutdown = True
            cancelled = []
            if cancel_futures:
                cancelled = [e[1] for e in self.queue]
                self.queue.clear()
            self.cond.notify_all()
            threads = list(self.threads)
            none_alive = self.alive == 0
        for f in cancelled:
            f.cancel()
        if none_alive:
            self._close_pool()
        if wait:
            # A runner may start another runner after the snapshot above (it
            # hands on what it could not take): join until none is left.
            me = threading.current_thread()
            while threads:
                for t in threads:
                    if t is not me:
                        t.join()
                with self.lock:
                    threads = [t for t in self.threads if t is not me and t.is_alive()]
            self._close_pool()

    def _close_pool(self):
        with self.lock:
            if self.pool_closed or self.alive:
                return
            self.pool_closed = True
        self.stop_watch.set()
        _live_states.discard(self)
        if self.owns_pool and self.pool is not None and not self.pool.closed:
            if self.broken is not None:
                self.pool.terminate()
            else:
                self.pool.close()


def _encode_tasks(batch):
    """(tid, function bytes, args, kwargs) for each task; each distinct
    function is encoded once (by reference, or by value when it must be)."""
    codes = {}
    tasks = []
    for tid, _, fn, args, kwargs in batch:
        key = id(fn)
        b = codes.get(key)
        if b is None:
            b = codes[key] = _serialize.dumps_fn(fn)
        tasks.append((tid, b, args, kwargs))
    return tasks


def _find_unpicklable(t):
    """(index, exception) when task t cannot be encoded, else None."""
    try:
        fn_bytes = _serialize.dumps_fn(t[2])
    except Exception as e:
        return 0, e
    return _serialize.find_unpicklable([(t[0], fn_bytes, t[3], t[4])])


def _set(f, result=None, exc=None):
    try:
        if exc is not None:
            f.set_exception(exc)
        else:
            f.set_result(result)
    except _cf.InvalidStateError:
        pass  # already failed by a broken executor


def _deliver(f, ok, payload):
    if f.done():
        return
    try:
        value = pickle.loads(payload)
    except BaseException as e:
        _set(f, exc=e)
        return
    if ok:
        _set(f, value)
    else:
        exc, tb = value
        exc.__cause__ = RemoteTraceback(tb)
        _set(f, exc=exc)


def _check_max_workers(max_workers):
    if max_workers is None:
        return default_workers()
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError("pmaprt.Executor: max_workers must be a positive int or None, got %r"
                        % (max_workers,))
    if max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    return max_workers


class Executor(_cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on pmaprt worker processes.

    ``Executor(max_workers=None)`` starts its own Pool of ``max_workers``
    processes (one per core by default) on the first submit and stops it on
    shutdown. ``Executor(pool=p)`` runs on an existing Pool and leaves it
    running. Futures are ``concurrent.futures.Future``: ``wait`` and
    ``as_completed`` accept them. See docs/ARCHITECTURE.md for how it differs
    from ProcessPoolExecutor.
    """

    def __init__(self, max_workers=None, *, pool=None):
        if pool is not None:
            if not isinstance(pool, Pool):
                raise TypeError("pmaprt.Executor: pool must be a pmaprt.Pool, got %r" % (pool,))
            if max_workers is not None:
                raise ValueError("pmaprt.Executor: pass max_workers or pool, not both")
            pool._check_open()
            self._max_workers = pool.workers
            self._state = _State(pool, False, min(pool.workers + EXTRA_RUNNERS, SHARED_POOL_RUNNERS))
        else:
            n = _check_max_workers(max_workers)
            self._max_workers = n
            runners = min(n + EXTRA_RUNNERS, 63)
            self._state = _State(None, True, runners)
            self._max_jobs = max(32, runners + 1)
        self._pool_lock = threading.Lock()
        weakref.finalize(self, self._state.do_shutdown, False, False)

    def _ensure_pool(self):
        st = self._state
        if st.pool is None:
            with self._pool_lock:
                if st.pool is None:
                    st.check_open()
                    st.pool = Pool(self._max_workers, max_jobs=self._max_jobs)
                    st.start_watch()
        return st

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
            fn_bytes = _serialize.dumps_fn(fn)
            entries = []
            while True:
                chunk = tuple(itertools.islice(calls, chunksize))
                if not chunk:
                    break
                entries.append((_process_chunk, (fn_bytes, chunk), {}))
        fs = st.add(entries) if entries else []

        def result_iterator():
            try:
                fs.reverse()
                while fs:
                    if timeout is None:
                        r = _result_or_cancel(fs.pop())
                    else:
                        r = _result_or_cancel(fs.pop(), end_time - time.monotonic())
                    if chunksize == 1:
                        yield r
                    else:
                        yield from r
            finally:
                for f in fs:
                    f.cancel()

        return result_iterator()

    def shutdown(self, wait=True, *, cancel_futures=False):
        """As Executor.shutdown: no new tasks; with wait, returns once every
        pending task is done and the workers are stopped; cancel_futures
        cancels the tasks that have not started."""
        self._state.do_shutdown(wait, cancel_futures)

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


def _python_exit():
    global _global_shutdown
    _global_shutdown = True
    for st in list(_live_states):
        try:
            st.do_shutdown(True, False)
        except Exception:
            pass


# As concurrent.futures: pending work completes before the interpreter exits
# (before atexit handlers, among them the pools' own).
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_python_exit)
else:  # pragma: no cover
    import atexit
    atexit.register(_python_exit)
