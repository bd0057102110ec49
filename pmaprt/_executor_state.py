"""The machinery behind pmaprt.Executor: its queue, runner threads and batches.

``ExecutorState`` holds everything the runner threads need, so that an
Executor dropped without shutdown() is collected while its state finishes the
pending work (see ``pmaprt.executor`` for the data flow).

    add() --> queue (deque, under one lock) --> a runner thread takes a batch
      (up to the batch limit), marks its futures RUNNING, runs it as one
      unordered map of ``call`` (or one apply) --> deliver() each result

- The batch limit grows from one task per worker toward BATCH_TARGET_S of
  work per worker, from the measured seconds per task. Tasks in batches
  (RUNNING, no longer cancellable) are at most `running_cap`: one per worker
  and EXTRA_RUNNERS more (ProcessPoolExecutor's call queue) unless tasks are
  known to be short, then one batch limit.
- The runner keeps no reference to a task once it is delivered (function,
  arguments, future): what the caller drops is collected.
- Workers on demand (an owned pool, made with start=0): as
  ProcessPoolExecutor does, a submit reuses an idle worker (a credit left by
  a delivered task) or starts one more, up to max_workers.
- A crash (from a batch, or a replaced worker seen by the watch thread)
  breaks the state: every pending and running future fails with a
  BrokenProcessPool, and an owned pool's workers are stopped.
"""
import collections
import concurrent.futures as _cf
import itertools
import os
import signal
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

from ._errors import PoolClosedError, WorkerCrashedError
from ._executor_items import call, deliver, encode_batch, set_future

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

_live_states = weakref.WeakSet()
_global_shutdown = False


class ExecutorState:
    """One executor's queue, runner threads, batch sizing and broken/shut-down state."""

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
        self.running = 0                      # tasks in batches, not yet delivered
        self.idle_credit = 0                  # workers that finished a task, not yet reused
        self.shutdown = False
        self.broken = None
        self.forked = False                   # this is a child made by os.fork()
        self.pool_closed = False
        self.task_s = None      # EWMA of seconds per task (wall x busy workers / tasks)
        self.batch_cap = None   # set on the first batch: one task per worker
        self.stop_watch = threading.Event()
        _live_states.add(self)

    def start_watch(self):
        """Owned pool: a replaced worker means one of our tasks killed it."""
        threading.Thread(target=_watch, args=(self, self.pool), name="pmaprt-executor-watch",
                         daemon=True).start()

    # --- submitting (caller's thread)

    def check_open(self):
        if self.forked:
            raise RuntimeError("pmaprt.Executor: this executor belongs to the process it was "
                               "created in, not to this child made by os.fork(); create a new "
                               "Executor here")
        if self.broken is not None:
            raise self.broken_error()
        if self.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def broken_error(self):
        b = self.broken
        err = BrokenProcessPool("pmaprt.Executor is broken (%s); create a new Executor" % b)
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
            # Workers on demand (an owned pool): each task takes an idle
            # worker's credit, else starts a worker while some are left to start.
            grow = 0
            if self.owns_pool:
                use = min(self.idle_credit, len(futs))
                self.idle_credit -= use
                grow = min(len(futs) - use, self.pool.workers - self.pool.started)
            if self.idle:
                self.cond.notify()
            elif self.alive < self.max_runners:
                self._start_runner()
        for _ in range(grow):
            if not self.pool.start_worker():
                break
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
            room = self.running_cap() - self.running
            if self.queue and room > 0:
                break
            if self.shutdown and not self.queue:
                return None
            self.idle += 1
            try:
                self.cond.wait()
            finally:
                self.idle -= 1
        batch = []
        q = self.queue
        cap = min(self._batch_limit(), room)
        while q and len(batch) < cap:
            entry = q.popleft()
            if entry[1].set_running_or_notify_cancel():
                batch.append(entry)
        self.running += len(batch)
        self._hand_on()
        return batch

    def _hand_on(self):
        """More is queued than this runner took: another runner takes it,
        if the cap on running tasks leaves room. Lock held."""
        if self.queue and self.running < self.running_cap():
            if self.idle:
                self.cond.notify()
            elif self.alive < self.max_runners:
                self._start_runner()

    def running_cap(self):
        """Tasks that may be RUNNING at once (in batches): a worker's worth
        and EXTRA_RUNNERS more, so that a shutdown(cancel_futures=True) or a
        cancel() still reaches the rest, as with ProcessPoolExecutor's call
        queue; for tasks known to be short, at least one batch limit."""
        base = self.pool.workers + EXTRA_RUNNERS
        if self.task_s is None or self.task_s >= BATCH_TARGET_S:
            return base
        # Short tasks: a batch per runner, so that the next batches are
        # posted while one is collected.
        return max(base, self._batch_limit() * self.max_runners)

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
                del batch   # nothing of the last batch stays alive while waiting
        finally:
            with self.lock:
                self.alive -= 1
                last = self.alive == 0 and (self.shutdown or self.broken is not None)
                if not last:
                    self.cond.notify()
            if last:
                self._close_pool()

    def _run_batch(self, batch):
        futs = {}
        # the batch's captured segments stay pinned until its futures are done
        store, pins = self.pool.arrays.captured, set()
        tasks = encode_batch(batch, futs, lambda fn: store.dumps_fn(fn, pins), store, pins)
        if len(tasks) < len(batch):     # failed to pickle: their futures are settled
            with self.lock:
                self.running -= len(batch) - len(tasks)
        batch.clear()   # the functions and arguments: the tasks' bytes hold them now
        try:
            with self.lock:
                if self.broken is not None:
                    err = self.broken_error()
                    for f in futs.values():
                        set_future(f, exc=err)
                    return
                self.batches[id(futs)] = futs
            if tasks:
                self._run_tasks(tasks, futs)
        finally:
            store.unpin(pins)
            with self.lock:
                self.batches.pop(id(futs), None)
                self.running -= len(futs)
                self._hand_on()

    def _settle(self, done):
        """`done` tasks were delivered: their slots (and workers) are free."""
        with self.lock:
            self.running -= done
            self.idle_credit = min(self.idle_credit + done, self.pool.started)
            self._hand_on()

    def _run_tasks(self, tasks, futs):
        it = None
        n = len(tasks)
        unsettled = 0
        try:
            t0 = time.perf_counter()
            if n == 1:
                # One task: the pool's single-call path (no map to set up).
                it = iter((self.pool.apply(call, tasks[0]),))
            else:
                it = self.pool.map(call, tasks, ordered=False, inline=False,
                                   chunksize=self._chunksize(n))
            del tasks
            # Delivered tasks leave the running count in groups (one lock
            # per group): one by one for a batch of a few long tasks, whose
            # freed slots other runners wait for, an eighth of a large batch.
            group = max(1, n // 8)
            for tid, status, payload in it:
                f = futs.pop(tid)
                err = deliver(f, status, payload)
                del f, payload
                unsettled += 1
                if unsettled >= group:
                    self._settle(unsettled)
                    unsettled = 0
                if err is not None:
                    self._break(err)
                if self.broken is not None:
                    break
            else:
                self._observe(n, time.perf_counter() - t0)
        except (BrokenProcessPool, PoolClosedError) as e:
            self._break(e)
        except BaseException as e:
            # The map itself failed (not a task: those are reported one by
            # one): the tasks not yet delivered fail with its error.
            for f in futs.values():
                set_future(f, exc=e)
        finally:
            if it is not None and hasattr(it, "close"):
                it.close()
            if unsettled:
                self._settle(unsettled)
        if futs and self.broken is not None:
            # Left over only when the executor broke while this batch ran.
            err = self.broken_error()
            for f in futs.values():
                set_future(f, exc=err)

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
            set_future(f, exc=err)
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

    def terminate(self, exc, cancel_queued=True):
        """Stop now (kill_workers, joblib's abort): queued tasks are cancelled
        (or fail with exc), running ones fail with exc, and the workers of an
        owned pool are killed, so nothing keeps running for a caller that no
        longer wants it."""
        with self.lock:
            self.shutdown = True
            queued = [e[1] for e in self.queue]
            self.queue.clear()
            running = [f for futs in self.batches.values() for f in list(futs.values())]
            self.cond.notify_all()
        for f in queued:
            if cancel_queued:
                f.cancel()
            else:
                set_future(f, exc=exc)
        for f in running:
            set_future(f, exc=exc)
        if self.owns_pool and self.pool is not None and not self.pool.closed:
            self.pool.terminate()

    def do_shutdown(self, wait, cancel_futures):
        with self.lock:
            self.shutdown = True
            cancelled = []
            if cancel_futures:
                # What would be in ProcessPoolExecutor's call queue by now
                # (the running cap) still runs; the rest is cancelled.
                keep = max(0, self.running_cap() - self.running) if self.pool is not None else 0
                while len(self.queue) > keep:
                    cancelled.append(self.queue.pop()[1])
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


def _watch(st, pool):
    """The watch thread of an executor that owns its pool: a worker replaced
    for any reason but recycling (max_tasks_per_child) is a crash."""
    pids = pool.pids()
    recycled = pool.recycled
    while not st.stop_watch.wait(WATCH_S):
        if st.broken is not None or pool.closed:
            return
        now = pool.pids()
        if now != pids:
            gone = sorted(set(pids) - set(now))
            # The pool counts a recycled worker before it starts the replacement.
            if len(gone) <= pool.recycled - recycled:
                recycled += len(gone)
                pids = now
                continue
            st._break(WorkerCrashedError(
                "worker process %s terminated abruptly (killed by a signal or exited) while "
                "the executor ran its tasks" % ", ".join("pid %d" % p for p in gone)))
            return


def _forget_in_child():
    """os.fork(): the child starts with no live executor. Each state, its
    threads and its pool are the parent's: the child leaves them alone
    (never stops the parent's workers) and refuses new submits to them."""
    global _live_states
    states, _live_states = list(_live_states), weakref.WeakSet()
    for st in states:
        st.forked = True
        st.owns_pool = False
        st.pool_closed = True
        st.shutdown = True
        st.stop_watch = threading.Event()
        st.lock = threading.Lock()
        st.cond = threading.Condition(st.lock)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def shutdown_all():
    """At interpreter exit: no new submits; every live executor's pending
    work completes (as concurrent.futures does)."""
    global _global_shutdown
    _global_shutdown = True
    for st in list(_live_states):
        try:
            st.do_shutdown(True, False)
        except Exception:
            pass
