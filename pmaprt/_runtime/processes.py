"""Worker processes: starting them, noticing their deaths, replacing them.

Protocol, step by step:

1. The parent clears worker w's area (ring head and tail, current-chunk
   words, W_CLAIM, W_SLOT, W_STATE = WSTATE_STARTING) and starts a fresh
   interpreter (``python -c _WORKER_CMD``, never a fork: a parent with threads
   or a CUDA context is safe). The child inherits the control segment's memfd
   and one end of a socketpair; every child is started by one long-lived
   thread (`_Spawner`), because PR_SET_PDEATHSIG fires when the *thread* that
   started a process ends. Once the pool has lost a worker, replacements
   are forks of its zygote instead, when it is ready (zygote.py).
2. The parent sends a `WorkerStart` message, then every segment already lent
   (lent.py). The worker sets PR_SET_PDEATHSIG, maps the control segment,
   stores its pid and W_STATE = WSTATE_READY, and enters its loop (worker.py).
3. A waiting parent looks at every worker's exit status at least every POLL_S
   (`_check_workers`, lock held). For a dead worker it: gives back the hot
   spinner word it held (wake.py), drops the slot reference it held
   (board.py), drains its ring, then reads its current-chunk words and tells
   the job what was lost: a death inside a claim (W_CLAIM odd) marks the job
   suspect (claims.py reconciles it), else a chunk that was running (`on_lost`),
   a job that was loading (`on_load_crash`) or a feed chunk claimed but not
   read (`on_lost_feed_chunk`). Then it starts a replacement.
4. A worker that has run its `max_items_per_worker` leaves with W_STATE =
   WSTATE_RECYCLED and exit code 0: it is replaced and nothing is lost.
5. A worker whose current item has not moved for longer than its job's
   timeout is killed (SIGKILL) and handled as in 3; the item it ran is named.
6. Workers that die before ever becoming ready MAX_START_FAILURES times in a
   row break the pool instead of being restarted for ever.
"""
import atexit
import collections
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import NamedTuple

from .. import _arrays, _shm
from .._errors import WorkerCrashedError, describe_exit, oom_hint
from . import startup
from .zygote import ZygoteClient
from .._shm import (
    H_BOARD_SEQ, H_DEATHS, H_RESULTS_SEQ, H_SHUTDOWN, W_CLAIM, W_CUR_DONE, W_CUR_GEN, W_CUR_K, W_CUR_LO,
    W_CUR_N, W_HEAD, W_SLOT, W_STATE, W_TAIL, WSTATE_READY, WSTATE_RECYCLED,
)

# How often a waiting parent looks at its workers' exit status when no result
# arrives. Bounds how long a crash goes unnoticed; each look is one waitpid
# per worker.
POLL_S = 0.05
# Workers that die before they ever start this many times in a row make the
# pool broken instead of being restarted forever.
MAX_START_FAILURES = 3

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# `python -c` puts the working directory first on sys.path (unless safe_path):
# a module planted there would shadow the standard library in every worker.
# The command drops it before any import; WorkerStart then gives the
# worker the parent's sys.path, as multiprocessing's spawn does.
_WORKER_CMD = ("import sys; sys.path[:0 if getattr(sys.flags, 'safe_path', 0) else 1] = [%r]; "
               "from pmaprt._runtime.worker import main; main()" % _PKG_PARENT)


class WorkerStart(NamedTuple):
    """The first message on a new worker's socket."""
    parent_pid: int
    nworkers: int
    nslots: int
    sys_path: list
    seed: int
    max_items_per_worker: int
    setup: startup.WorkerSetup     # authkey, initializer (startup.py)


class _Spawner:
    """Starts worker processes from one long-lived thread.

    PR_SET_PDEATHSIG fires when the *thread* that created a process ends, not
    the process: a pool created in a short-lived thread would lose its workers
    when that thread returns. So every worker is started by this daemon
    thread, which lives as long as the parent process.
    """

    def __init__(self):
        self._q = None
        self._lock = threading.Lock()

    def popen(self, cmd, **kw):
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(cmd, **kw)
        with self._lock:
            if self._q is None:
                self._q = queue.SimpleQueue()
                threading.Thread(target=self._run, name="pmaprt-spawner", daemon=True).start()
        box = queue.SimpleQueue()
        self._q.put((cmd, kw, box))
        ok, val = box.get()
        if ok:
            return val
        raise val

    def _run(self):
        while True:
            cmd, kw, box = self._q.get()
            try:
                box.put((True, subprocess.Popen(cmd, **kw)))
            except BaseException as e:
                box.put((False, e))


_spawner = _Spawner()


class _Resources:
    """What must be released even if the pool object is just dropped."""

    def __init__(self):
        self.procs = []
        self.socks = []
        self.zygote = ZygoteClient()
        self.outbox = []
        self.ctl = None
        self.segs = {}
        # Threads inside a futex wait on the control segment: it must not be
        # unmapped under them (terminate() from another thread). See wake.py.
        self.waiters = 0
        self.waiters_lock = threading.Lock()

    def terminate(self, graceful=True):
        ctl = self.ctl
        if ctl is None:
            return
        self.ctl = None
        try:
            # Every sleeper wakes: workers see H_SHUTDOWN, waiting parents
            # see the pool gone.
            ctl.region.store32(H_SHUTDOWN, 1)
            ctl.region.add32(H_BOARD_SEQ, 1)
            ctl.region.wake32(H_BOARD_SEQ, 1 << 30)
            ctl.region.add32(H_RESULTS_SEQ, 1)
            ctl.region.wake32(H_RESULTS_SEQ, 1 << 30)
        except Exception:
            pass
        procs = [p for p in self.procs if p is not None]
        if not graceful:
            for p in procs:
                _kill(p)
        deadline = time.monotonic() + (2.0 if graceful else 1.0)
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(p)
                try:
                    p.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
        self.zygote.close(graceful)     # after its workers: it reports their exits
        for s in self.socks:
            if s is not None:
                s.close()
        for box in self.outbox:
            while box:
                for fd in box.popleft()[1]:
                    os.close(fd)
        for seg in self.segs.values():
            seg.close()
        self.segs.clear()
        # Woken above, a waiting thread leaves its wait within microseconds.
        deadline = time.monotonic() + 5.0
        while self.waiters and time.monotonic() < deadline:
            time.sleep(0.001)
        if not self.waiters:
            ctl.close()


def _kill(p):
    try:
        p.kill()
    except OSError:
        pass


# Runtimes whose workers are ended at interpreter exit.
live_runtimes = weakref.WeakSet()


@atexit.register
def _shutdown_all():
    for p in list(live_runtimes):
        try:
            p.terminate()
        except Exception:
            pass


def _after_fork_in_child():
    """os.fork() copied this process with its pools: their workers, sockets
    and shared words are the parent's. The child lets go of its copies
    without a word to them (no atexit shutdown, no finalizer, no message);
    its own maps get a fresh pool. The spawner's thread did not survive the
    fork: a fresh spawner starts one on first use."""
    global _spawner
    _spawner = _Spawner()
    owner = os.getppid()
    for p in list(live_runtimes):
        p._forsake(owner)
    live_runtimes.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Processes:
    """The parent's side (a runtime mixin): spawn, check, replace workers.
    State: self._res (procs, socks), _start_failures, _stall, _timed_out,
    _last_check, recycled; _owner_pid once a fork's child let go of it."""

    _owner_pid = None

    def _forsake(self, owner_pid):
        """In the child of os.fork(): this pool is process owner_pid's. Close
        this process's copies of its sockets, descriptors and mappings; touch
        no shared word and no worker. Locks held by the parent's threads at
        the fork would never be released here: a fresh one."""
        self._finalizer.detach()
        self._lock = threading.RLock()
        self._closed = True
        self._owner_pid = owner_pid
        res, self._res = self._res, _Resources()
        self._outbox = self._res.outbox = [collections.deque() for _ in range(self.workers)]
        self._r = self._ctl = None
        for sock in res.socks:
            if sock is not None:
                sock.close()
        if res.zygote.sock is not None:
            res.zygote.sock.close()
        for box in res.outbox:
            for _, fds in box:
                for fd in fds:
                    os.close(fd)
        for seg in res.segs.values():
            if not isinstance(seg, _arrays.ArraySeg):    # a shared array stays the caller's
                seg.close()
        if res.ctl is not None:
            res.ctl.close()

    def _init_processes(self, n):
        self._res.procs = [None] * n
        self._res.socks = [None] * n
        self._start_failures = 0
        self._last_check = time.monotonic()
        self._deaths_seen = 0          # H_DEATHS when workers were last checked
        self._stall = [None] * n       # per worker: ((gen, lo, done), first seen) for timeouts
        self._timed_out = {}           # worker -> the item index it was killed for
        self.recycled = 0              # workers replaced after max_items_per_worker

    def _clear_area(self, w):
        """Worker w's words as a worker that holds nothing (step 1)."""
        r = self._r
        area = self._layout.worker(w)
        r.store64(area + W_HEAD, 0)
        r.store64(area + W_TAIL, 0)
        r.store64(area + W_CUR_N, 0)
        r.store64(area + W_CUR_K, -1)
        r.store64(area + W_CUR_DONE, 0)
        r.store64(area + W_CLAIM, 0)
        r.store32(area + W_SLOT, 0)
        r.store32(area + W_STATE, 0)

    def start_worker(self):
        """Start the next worker not started yet (a pool made with start= fewer
        than its workers grows on demand); False when all are started."""
        with self._lock:
            self._check_open()
            if self.started >= self.workers:
                return False
            self._spawn(self.started)
            self.started += 1
            return True

    def _spawn(self, w):
        res = self._res
        self._clear_area(w)
        self._heads[w] = 0
        self._stall[w] = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        setup, setup_fds = self.startup.message()
        try:
            proc = self._start_process(w, theirs)
        finally:
            theirs.close()
        res.procs[w] = proc
        res.socks[w] = ours
        self._drop_outbox(w)
        try:
            _shm.send_msg(ours, WorkerStart(os.getpid(), self.workers, self._layout.nslots,
                                            list(sys.path), self.seed, self.max_items_per_worker,
                                            setup), fds=setup_fds)
        except OSError:
            # It died before its start message (a kill, the OOM killer): a
            # death like any other, seen by the next _check_workers, which
            # replaces it; nothing of a job was in its hands.
            return
        self._lend_all(w)

    def _start_process(self, w, sock):
        """A new worker process for rank w, given its end of the socketpair:
        a fork of the zygote once it is ready (zygote.py), else a fresh
        interpreter."""
        zygote = self._res.zygote
        if zygote.usable():
            proc = zygote.fork(w, sock)
            if proc is not None:
                return proc
        cmd = [sys.executable, "-c", _WORKER_CMD, str(w), str(sock.fileno()), str(self._res.ctl.fd)]
        return _spawner.popen(cmd, pass_fds=(sock.fileno(), self._res.ctl.fd), close_fds=True,
                              stdin=subprocess.DEVNULL, env=self.startup.child_env())

    def pids(self):
        return [p.pid for p in self._res.procs if p is not None]

    def _check_workers(self):
        """Replace dead workers (their lost chunks go back to their jobs), kill
        workers stuck on one item past their job's timeout. Lock held."""
        now = self._last_check = time.monotonic()
        self._deaths_seen = self._r.load32(H_DEATHS)
        self._flush_all()
        for w, p in enumerate(self._res.procs):
            if p is None:       # not started yet (Runtime(start=))
                continue
            rc = p.poll()
            if rc is not None:
                self._on_death(w, p, rc)
            elif self._jobs:
                self._check_stuck(w, p, now)
        for job in list(self._jobs.values()):
            if job.backlog:
                job.flush_backlog()
            if job.suspect:
                self._reconcile(job)

    def _check_stuck(self, w, proc, now):
        r = self._r
        area = self._layout.worker(w)
        cn = r.load64(area + W_CUR_N)
        job = self._jobs.get(r.load64(area + W_CUR_GEN)) if cn > 0 else None
        if job is None or job.timeout is None:
            self._stall[w] = None
            return
        key = (job.gen, r.load64(area + W_CUR_LO), r.load64(area + W_CUR_DONE))
        if key[2] >= cn:          # every item done: it is writing the record
            self._stall[w] = None
            return
        st = self._stall[w]
        if st is None or st[0] != key:
            self._stall[w] = (key, now)
        elif now - st[1] > job.timeout and w not in self._timed_out:
            self._timed_out[w] = key[1] + key[2]
            try:
                proc.send_signal(signal.SIGKILL)
            except OSError:
                pass

    def _on_death(self, w, proc, rc):
        r = self._r
        area = self._layout.worker(w)
        self._release_dead_hot_spinner(w)
        self._drop_dead_ref(w)
        try:
            drained = self._drain_worker(w)
        except (EOFError, OSError):
            drained = ()
        state = r.load32(area + W_STATE)
        started = state in (WSTATE_READY, WSTATE_RECYCLED)
        recycled = state == WSTATE_RECYCLED and rc == 0
        gen, lo, cn = r.load64(area + W_CUR_GEN), r.load64(area + W_CUR_LO), r.load64(area + W_CUR_N)
        done, k = r.load64(area + W_CUR_DONE), r.load64(area + W_CUR_K)
        timed_out = self._timed_out.pop(w, None)
        if timed_out is not None:
            # The slow item may have finished between the sample and the kill:
            # then the worker was killed for nothing, and nothing is charged.
            timed_out = True if cn > 0 and lo + done == timed_out else "spurious"
        what = "worker %d (pid %d) %s" % (w, proc.pid, describe_exit(rc))
        job = self._jobs.get(gen)
        if recycled:
            self.recycled += 1
        elif job is not None:
            if r.load64(area + W_CLAIM) & 1 and job.spmd is None:
                # Killed moving items between shared words: what it held may be
                # recorded nowhere (see claims.py). No item was running: its
                # current chunk, if any, had not started, or was being cut
                # (an untake: the items that ran are run again; nothing is
                # charged). Reconciled once the replacement is started.
                job.suspect = True
            elif cn > 0 and (gen, lo) not in drained:
                job.on_lost(what, proc.pid, rc, lo, cn, done, timed_out)
            elif cn < 0:
                job.on_load_crash(WorkerCrashedError(
                    what + " while loading the function or input of this map" + oom_hint(rc),
                    proc.pid, rc, None))
            elif cn == 0 and k >= 0:
                job.on_lost_feed_chunk(k)
        for sj in list(self._jobs.values()):
            if sj.spmd is not None:
                sj.on_worker_death(w, proc.pid, rc, what)
        if not started:
            # SIGKILL is someone else's doing (the OOM killer, a user); a worker
            # that cannot start at all fails on its own, with an exit code.
            if rc != -signal.SIGKILL:
                self._start_failures += 1
            if rc == startup.INIT_FAILED_EXIT:
                self._broken = startup.initializer_error(what, proc.pid, rc)
            elif self._start_failures >= MAX_START_FAILURES:
                self._broken = WorkerCrashedError(
                    "pmaprt: worker processes fail to start (%s); is the Python environment "
                    "importable from a fresh interpreter?" % what, proc.pid, rc)
            if self._broken is not None:
                for job in list(self._jobs.values()):
                    job.fail_here(self._broken)
                return
        else:
            self._start_failures = 0
        if self._res.zygote.proc is None and not recycled:
            # A pool that loses workers may lose more: replacements fork
            # from a preloaded zygote once it is ready (zygote.py).
            self._res.zygote.start(_spawner, self._res.ctl.fd, _PKG_PARENT)
        self._res.socks[w].close()
        self._spawn(w)
