"""The pool: worker processes, the job board, and the parent's side of the rings.

- Workers are fresh interpreters (``python -c ...``), never forks: a parent
  with threads or an initialized CUDA context is safe, and the pool can be
  created from any thread. They inherit the control segment (a memfd) and one
  end of a socketpair; PR_SET_PDEATHSIG and a check of getppid() end them when
  the parent dies.
- A map is a job in one of the board's slots. Posting it bumps the board's
  futex word; workers that sleep there wake.
- Whichever thread waits for results drains every worker's ring under the
  pool's lock and hands each record to its job. It sleeps on the results
  futex word between records, waking at least every POLL_S to look at the
  workers' exit status: a dead worker is replaced, and the job that lost a
  chunk to it fails with WorkerCrashedError at that chunk's position.
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

from . import _task, _array, _shm
from ._map import MapJob
from ._options import check_max_items, check_workers
from ._options import MapOptions
from ._errors import PoolClosedError, WorkerCrashedError, describe_exit, oom_hint
from ._shm import (
    HOT_CLAIMED,
    H_ACTIVE_MASK, H_BOARD_SEQ, H_BOARD_SLEEPERS, H_HOT_SPINNER, H_MAGIC, H_PARENT_WANT, H_PARENT_SLEEPING, H_RESULTS_SEQ,
    H_SHUTDOWN, MAGIC, REC, REC_BIG, REC_BIG_ERROR, REC_ERROR, REC_HAS_ERRORS, REC_KIND_MASK,
    REC_RESULT, REC_STOLEN, REC_WRAP, RETRY_RANGES, RING_SIZE, S_CANCEL, S_REFS, S_STATE,
    SLOT_ACTIVE, SLOT_CLOSED, SLOT_FREE, W_CLAIM, W_SLOT, W_CUR_DONE, W_CUR_GEN, W_CUR_K, W_CUR_LO, W_CUR_N,
    W_HEAD, W_RING, W_SPACE_SEQ, W_SPACE_WAIT, W_STATE, W_TAIL, WSTATE_READY, WSTATE_RECYCLED,
)
# A result record whose chunk holds returned exceptions (on_error="return").
REC_RESULT_ERRORS = 6

# How often a waiting parent looks at its workers' exit status when no result
# arrives. Bounds how long a crash goes unnoticed; each look is one waitpid
# per worker.
POLL_S = 0.05
# The parent spins this long for a result before it sleeps (round trips).
# On fewer than 4 cores spinning only takes time from the workers.
SPIN_NS = 50_000 if (os.cpu_count() or 1) >= 4 else 0
# The parent waiting for one task (Pool.apply) spins this long first: a tiny
# call answers within it, and a waiting parent has nothing else to run.
TASK_SPIN_NS = 50_000 if (os.cpu_count() or 1) >= 2 else 0
# Workers that die before they ever start this many times in a row make the
# pool broken instead of being restarted forever.
MAX_START_FAILURES = 3
# Jobs (live map iterators) one pool can run at once.
DEFAULT_MAX_JOBS = 32

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER_CMD = ("import sys; sys.path.insert(0, %r); from pmaprt._worker import main; main()"
               % _PKG_PARENT)

_live_pools = weakref.WeakSet()


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
    """What must be released even if the Pool object is just dropped."""

    def __init__(self):
        self.procs = []
        self.socks = []
        self.outbox = []
        self.ctl = None
        self.segs = {}
        # Threads inside a futex wait on the control segment: it must not be
        # unmapped under them (terminate() from another thread).
        self.waiters = 0
        self.waiters_lock = threading.Lock()

    def enter_wait(self, want=0):
        with self.waiters_lock:
            self.waiters += 1
            ctl = self.ctl
            if ctl is not None:
                # One waiter may name the record it waits for; with more than
                # one, any record may be someone's.
                ctl.region.store64(H_PARENT_WANT, want if self.waiters == 1 else 0)

    def leave_wait(self):
        with self.waiters_lock:
            self.waiters -= 1

    def terminate(self, graceful=True):
        ctl = self.ctl
        if ctl is None:
            return
        self.ctl = None
        try:
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


class Pool:
    """Worker processes that persist across maps.

    ``with Pool(workers=4) as pool: list(pool.map(f, xs))``. The pool can run
    several maps at once (several live iterators, or several threads).
    """

    def __init__(self, workers=None, *, max_jobs=DEFAULT_MAX_JOBS, seed=0, max_items_per_worker=None):
        n = check_workers(workers)
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
        res.procs = [None] * n
        res.socks = [None] * n
        self._heads = [0] * n
        self._tail_offs = [self._layout.worker(w) + W_TAIL for w in range(n)]
        self._start_failures = 0
        self._jobs = {}
        self._gen = 0
        self._seg_id = 0
        self._broken = None
        self._closed = False
        self._last_check = time.monotonic()
        self._stall = [None] * n       # per worker: ((gen, lo, done), first seen) for timeouts
        # Messages to each worker (segments) that its socket did not take yet: a
        # worker busy in a long item does not read, and the parent must never
        # block on it (that would stop crash and timeout handling for everyone).
        self._outbox = res.outbox = [collections.deque() for _ in range(n)]
        self._flusher = None
        self._timed_out = {}           # worker -> the item index it was killed for
        self.recycled = 0              # workers replaced after max_items_per_worker
        self._finalizer = weakref.finalize(self, res.terminate, False)
        try:
            for w in range(n):
                self._spawn(w)
        except BaseException:
            self.terminate()
            raise
        _live_pools.add(self)

    # --- processes

    def _spawn(self, w):
        res = self._res
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
        self._heads[w] = 0
        self._stall[w] = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            cmd = [sys.executable, "-c", _WORKER_CMD, str(w), str(theirs.fileno()), str(res.ctl.fd)]
            proc = _spawner.popen(cmd, pass_fds=(theirs.fileno(), res.ctl.fd), close_fds=True,
                                  stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        res.procs[w] = proc
        res.socks[w] = ours
        self._drop_outbox(w)
        init = {
            "parent_pid": os.getpid(), "nworkers": self.workers, "nslots": self._layout.nslots,
            "sys_path": list(sys.path), "seed": self.seed,
            "max_items_per_worker": self.max_items_per_worker,
        }
        _shm.send_msg(ours, init)
        for seg in res.segs.values():
            _shm.send_msg(ours, ("seg", seg.id, seg.size), fds=[seg.fd])

    def pids(self):
        return [p.pid for p in self._res.procs if p is not None]

    def _check_workers(self):
        """Replace dead workers (their lost chunks go back to their jobs), kill
        workers stuck on one item past their job's timeout. Lock held."""
        now = self._last_check = time.monotonic()
        self._flush_all()
        for w, p in enumerate(self._res.procs):
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
        h = r.load64(H_HOT_SPINNER)
        if h & ~HOT_CLAIMED == w + 1 and r.cas64(H_HOT_SPINNER, h, 0):
            # Killed holding the hot spinner word: a task posted since then
            # woke no one (see wake_workers); the others look now.
            self.wake_workers()
        held = r.load32(area + W_SLOT)
        if held:
            # Killed inside a job: its reference to the slot goes with it
            # (else the slot, closed, could never be posted to again).
            r.store32(area + W_SLOT, 0)
            r.add32(self._layout.slot(held - 1) + S_REFS, -1)
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
            if r.load64(area + W_CLAIM) & 1 and getattr(job, "spmd", None) is None:
                # Killed moving items between shared words: what it held may be
                # recorded nowhere (see _reconcile). No item was running: its
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
            if getattr(sj, "spmd", None) is not None:
                sj.on_worker_death(w, proc.pid, rc, what)
        if not started:
            # SIGKILL is someone else's doing (the OOM killer, a user); a worker
            # that cannot start at all fails on its own, with an exit code.
            if rc != -signal.SIGKILL:
                self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                self._broken = WorkerCrashedError(
                    "pmaprt: worker processes fail to start (%s); is the Python environment "
                    "importable from a fresh interpreter?" % what, proc.pid, rc)
                for job in list(self._jobs.values()):
                    job.fail_here(self._broken)
                return
        else:
            self._start_failures = 0
        self._res.socks[w].close()
        self._spawn(w)

    def _reconcile(self, job):
        """A worker died as it moved items between shared words (W_CLAIM
        odd): between a claim's compare-and-swap and the store that records
        it, items are in no word. Reads where every item of the job is, in an
        order that sees each item that moves while it reads (current-chunk
        words, then range words, then the result rings: items move from a
        current chunk to a word or a ring only by a store to those first),
        and accepts the view only if no live worker started or ended a claim
        meanwhile (W_CLAIM even and unchanged). The job then runs again what
        is nowhere. Otherwise it tries again at the next check. Lock held."""
        r, lay = self._r, self._layout
        areas = [lay.worker(w) for w in range(self.workers)]
        seq = [r.load64(a + W_CLAIM) for a in areas]
        if any(c & 1 for c in seq):
            return
        off = job.off
        if off is None:
            job.suspect = False
            return
        curs = []
        for a in areas:
            # The claimed feed chunk first: a worker stores its items' range
            # in W_CUR_LO/N before it clears W_CUR_K.
            k = r.load64(a + W_CUR_K)
            curs.append((r.load64(a + W_CUR_GEN), r.load64(a + W_CUR_LO), r.load64(a + W_CUR_N), k))
        words = []
        if off is not None and r.load32(off + _shm.S_MODE) == _shm.MODE_INDEX:
            for w in range(self.workers):
                words.append(r.range_get(off + _shm.S_RANGES + 8 * w))
            for j in range(RETRY_RANGES):
                words.append(r.range_get(off + lay.retry_off + 8 * j))
        nxt = r.load64(off + _shm.S_NEXT)
        self._drain()
        if [r.load64(a + W_CLAIM) for a in areas] != seq:
            return
        if r.load64(off + _shm.S_GEN) != job.gen:
            job.suspect = False
            return
        job.suspect = False
        if job.reconcile(curs, [x for x in words if x[1]], nxt):
            r.store64(off + _shm.S_NEXT, 0)     # a task nobody holds: post it again
            self.wake_workers()

    # --- segments

    def share(self, size, reserve=True):
        """A new segment, mapped here and sent to every worker. Lock held."""
        self._seg_id += 1
        seg = _shm.Segment(size, seg_id=self._seg_id, reserve=reserve)
        self._res.segs[seg.id] = seg
        for w in range(self.workers):
            self._send(w, ("seg", seg.id, seg.size), seg.fd)
        return seg

    def unshare(self, seg):
        if self._res.segs.pop(seg.id, None) is None:
            return
        for w in range(self.workers):
            self._send(w, ("unseg", seg.id))
        seg.close()
        if isinstance(seg, _array.ArraySeg):
            self.wake_workers()  # the array was freed: idle workers drop their mapping now

    def _send(self, w, msg, fd=None):
        """Queue a message for worker w and send what its socket takes now."""
        box = self._outbox[w]
        # A queued fd must outlive the segment's own (closed by unshare): dup it.
        box.append([_shm.frame(msg), [os.dup(fd)] if fd is not None else []])
        self._flush(w)

    def _flush(self, w):
        self._flush_once(w)
        if self._outbox[w]:
            self._flush_later()

    def _flush_all(self):
        for w, box in enumerate(self._outbox):
            if box:
                self._flush(w)

    def _flush_later(self):
        """A worker's socket is full: keep sending in the background until the
        outbox is empty, so messages (a released array, say) reach idle workers
        even when no map is waiting on the pool."""
        t = self._flusher
        if t is not None and t.is_alive():
            return
        ref = weakref.ref(self)

        def run():
            while True:
                time.sleep(0.05)
                pool = ref()
                if pool is None or pool._res.ctl is None:
                    return
                with pool._lock:
                    if pool._res.ctl is None:
                        return
                    for w, box in enumerate(pool._outbox):
                        if box:
                            pool._flush_once(w)
                    if not any(pool._outbox):
                        pool._flusher = None
                        return
                del pool

        self._flusher = threading.Thread(target=run, name="pmaprt-outbox", daemon=True)
        self._flusher.start()

    def _flush_once(self, w):
        box = self._outbox[w]
        sock = self._res.socks[w]
        while box:
            data, fds = box[0]
            try:
                n = _shm.send_nowait(sock, data, fds)
            except BlockingIOError:
                return
            except OSError:
                self._drop_outbox(w)
                return
            for fd in fds:
                os.close(fd)
            if n < len(data):
                box[0] = [data[n:], []]
            else:
                box.popleft()

    def _drop_outbox(self, w):
        box = self._outbox[w]
        while box:
            for fd in box.popleft()[1]:
                os.close(fd)

    # --- jobs

    def _check_open(self):
        if self._closed:
            raise PoolClosedError("pmaprt: this pool is closed")
        if self._broken is not None:
            raise self._broken

    def _post(self, job, desc, mode, n, limit, chunk, nwork, desc_seg, desc_off=0, flags=0,
              max_items=0, spmd_seg=None, start=0):
        """Put a job on the board. Lock held. Returns (slot, offset).
        spmd_seg: an SPMD map's collective segment; worker w alone runs item w."""
        r, lay = self._r, self._layout
        slot = None
        for s in range(lay.nslots):
            off = lay.slot(s)
            st = r.load32(off + S_STATE)
            if st == SLOT_FREE or (st == SLOT_CLOSED and r.load32(off + S_REFS) == 0):
                slot = s
                break
        if slot is None:
            raise RuntimeError(
                "pmaprt: %d maps are already live on this pool; consume or close some of the "
                "iterators (or create the Pool with a larger max_jobs)" % lay.nslots)
        self._gen += 1
        gen = self._gen
        off = lay.slot(slot)
        r.store32(off + S_STATE, SLOT_FREE)
        r.store64(off + _shm.S_GEN, gen)
        r.store32(off + _shm.S_MODE, mode)
        r.store32(off + _shm.S_FLAGS, flags)
        r.store64(off + _shm.S_MAX_ITEMS, max_items or 0)
        r.store64(off + _shm.S_N, n)
        r.store64(off + _shm.S_LIMIT, limit)
        r.store64(off + _shm.S_NEXT, start)   # items before start ran elsewhere
        r.store32(off + S_CANCEL, 0)
        r.store32(off + _shm.S_CHUNK, chunk)
        r.store32(off + _shm.S_NWORK, nwork)
        for w in range(self.workers):
            r.range_set(off + _shm.S_RANGES + 8 * w, 0, 0)
        for j in range(RETRY_RANGES):
            r.range_set(off + lay.retry_off + 8 * j, 0, 0)
        if spmd_seg is not None:
            r.store32(off + _shm.S_FLAGS, flags | _shm.FLAG_SPMD)
            r.store64(off + _shm.S_SPMD_SEG, spmd_seg.id)
            r.store64(off + _shm.S_NEXT, n)
            for w in range(n):
                r.range_set(off + _shm.S_RANGES + 8 * w, w, 1)
        if desc_seg is None:
            r.store32(off + _shm.S_DESC_LEN, len(desc))
            r.store64(off + _shm.S_DESC_SEG, 0)
            base = off + lay.desc_off
            self._ctl.buf[base: base + len(desc)] = desc
        else:
            r.store32(off + _shm.S_DESC_LEN, len(desc))
            r.store64(off + _shm.S_DESC_SEG, desc_seg.id)
            r.store64(off + _shm.S_DESC_OFF, desc_off)
        r.store32(off + S_STATE, SLOT_ACTIVE)
        r.store64(H_ACTIVE_MASK, r.load64(H_ACTIVE_MASK) | (1 << slot))
        self._jobs[gen] = job
        # A small job wakes only as many workers as it has items. A job that only
        # some ranks may join (an SPMD map, workers=k) wakes every worker: a
        # futex wake picks sleepers at random, and a woken rank >= nwork would
        # not take part (the others would sleep up to a second).
        if spmd_seg is not None or nwork < self.workers:
            self.wake_workers()
        else:
            self.wake_workers(nwork if n < 0 else max(1, min(nwork, n)))
        return gen, slot, off

    def wake_workers(self, count=1 << 30, task=False):
        r = self._r
        if task:
            # A worker spins for it (see _worker.HOT_SPIN_NS): the first post
            # to mark the word claimed skips the wake; the spinner answers for
            # that one task (and wakes a sleeper if it cannot take it itself).
            # Claimed before the sequence moves: the spinner, which gives the
            # word back as soon as it sees the sequence move, cannot slip in
            # between (it did, half the time, when the bump came first).
            h = r.load64(H_HOT_SPINNER)
            if h and not h & HOT_CLAIMED and r.cas64(H_HOT_SPINNER, h, h | HOT_CLAIMED):
                r.add32(H_BOARD_SEQ, 1)
                return
        r.add32(H_BOARD_SEQ, 1)
        if r.load32(H_BOARD_SLEEPERS):
            r.wake32(H_BOARD_SEQ, count)

    def _retire(self, gen, slot, off):
        """The job is over: workers stop claiming; the slot is reused once they left."""
        with self._lock:
            r = self._r
            if self._res.ctl is None:
                self._jobs.pop(gen, None)
                return
            if r.load64(off + _shm.S_GEN) == gen:
                r.store32(off + S_CANCEL, 1)
                r.store32(off + S_STATE, SLOT_CLOSED)
                r.store64(H_ACTIVE_MASK, r.load64(H_ACTIVE_MASK) & ~(1 << slot))
            self._jobs.pop(gen, None)

    # --- results

    def _drain_worker(self, w):
        """Hand every record in worker w's ring to its job. Lock held.
        Returns the set of (gen, start) it saw."""
        r = self._r
        area = self._layout.worker(w)
        tail = r.load64(area + W_TAIL)
        head = self._heads[w]
        seen = set()
        if tail == head:
            return seen
        buf = self._ctl.buf
        base = area + W_RING
        jobs = self._jobs
        while head < tail:
            pos = head % RING_SIZE
            total, kind, gen, start, count, plen, t0, t1, cpu, enc = REC.unpack_from(buf, base + pos)
            k = kind & REC_KIND_MASK
            if k == REC_WRAP:
                head += total
                continue
            if k == REC_BIG:
                try:
                    payload = _shm.recv_blob(self._res.socks[w])
                except (EOFError, OSError):
                    # The worker died while sending it: the record never was;
                    # its death is handled (and the chunk run again) by _check_workers.
                    break
                k = REC_ERROR if kind & REC_BIG_ERROR else REC_RESULT
            else:
                p = base + pos + REC.size
                payload = bytes(buf[p: p + plen])
            if k == REC_RESULT and _array.is_result_stub(payload):
                # results with large arrays: their memfd came ahead on the socket
                payload = _array.attach_result(payload, self._res.socks[w])
            if kind & REC_HAS_ERRORS:
                k = REC_RESULT_ERRORS
            head += total
            seen.add((gen, start))
            job = jobs.get(gen)
            if job is not None:
                job.on_record(w, k, start, count, payload, t0, t1, cpu, bool(kind & REC_STOLEN), enc)
        self._heads[w] = head
        r.store64(area + W_HEAD, head)
        r.add32(area + W_SPACE_SEQ, 1)
        if r.load32(area + W_SPACE_WAIT):
            r.wake32(area + W_SPACE_SEQ, 1)
        return seen

    def _drain(self):
        # One load per worker for the common case, an empty ring: a waiting
        # parent drains every ring on each wake-up, so this runs per result.
        got = 0
        load, heads = self._r.load64, self._heads
        for w, off in enumerate(self._tail_offs):
            if load(off) != heads[w] and self._drain_worker(w):
                got += 1
        return got

    def wait(self, job, spin_ns=None):
        """Wait until something arrives for any job (or POLL_S passes)."""
        r = self._r
        if r is None or self._res.ctl is None:
            raise PoolClosedError("pmaprt: the pool was terminated while a map was running")
        seq = r.load32(H_RESULTS_SEQ)
        with self._lock:
            got = self._drain()
            if time.monotonic() - self._last_check > POLL_S:
                self._check_workers()
            else:
                self._flush_all()
        if got or job.has_news():
            return
        res = self._res
        want = job.wait_key() if hasattr(job, "wait_key") else 0
        res.enter_wait(want)
        try:
            if res.ctl is None:
                raise PoolClosedError("pmaprt: the pool was terminated while a map was running")
            # H_PARENT_SLEEPING counts the parent only while it sleeps in the
            # kernel: a worker that finds it spinning skips the wake call.
            changed = r.wait32(H_RESULTS_SEQ, seq, POLL_S,
                               SPIN_NS if spin_ns is None else spin_ns, H_PARENT_SLEEPING)
        finally:
            res.leave_wait()
        with self._lock:
            if self._r is None or self._res.ctl is None:
                return      # terminated meanwhile: the caller's next wait says so
            # What woke this wait is handed over now, not on the next call.
            self._drain()
            if not changed:
                self._check_workers()

    # --- the public API

    def map(self, fn, *iterables, chunksize=None, ordered=True, workers=None, progress=False,
            inline="auto", retries=0, timeout=None, on_error="raise", max_items_per_worker=None,
            memory_floor=None, axis_name=None, out=None,
            chunks=None):
        """Lazy map(fn, *iterables) on this pool's workers.

        inline="auto": when the measured cost per item shows that dispatching to
        workers cannot beat map itself, the rest runs here, as map would run it;
        inline=False keeps every item on the workers (True is "auto").

        Reliability (each turns inline off: items then always run on workers):

        - retries=N: the items of a worker that dies are run again on other
          workers; the item it was running when it died counts one attempt,
          and fails with WorkerCrashedError once N retries are spent.
        - timeout=seconds: a worker that spends longer than this on one item
          is killed and replaced; the item fails with TimeoutError (or is
          retried, if retries allow).
        - on_error="return": an exception raised by fn on an item (and a
          crash or timeout past its retries) takes that item's place in the
          results, and the map goes on.
        - max_items_per_worker=N: a worker that has run N items is replaced by
          a fresh one (for functions that leak memory).
        - memory_floor=bytes: while the machine's available memory is below
          it, no more work is put in flight beyond one chunk (default: the
          larger of 256 MiB and 5 % of RAM; 0 turns the guard off).

        axis_name: an SPMD map: shard i runs on worker i, all at once, and fn may
        call pmaprt.psum/pmean/allreduce over that axis (see _collective.py).
        SPMD maps take none of the reliability options.

        chunks=k (ndarray, list, tuple or range inputs): fn gets blocks of k rows,
        x[lo:hi], instead of rows; chunks=[k0, k1, ...] gives the block lengths.
        out=array: workers write fn's result for item i into out[i] (for block
        i, into out[lo:hi]) and the iterator yields None per item once its
        result is in out. See pmaprt.pmap.
        """
        return self.run_map(fn, iterables, False, MapOptions.make(
            chunksize=chunksize, ordered=ordered, workers=workers, progress=progress,
            inline=inline, retries=retries, timeout=timeout, on_error=on_error,
            max_items_per_worker=max_items_per_worker, memory_floor=memory_floor,
            axis_name=axis_name, out=out, chunks=chunks))

    def imap_unordered(self, fn, *iterables, **options):
        """Like map, results in the order they finish (same options as map)."""
        options["ordered"] = False
        return self.map(fn, *iterables, **options)

    def starmap(self, fn, iterable, *, chunksize=None, ordered=True, workers=None, progress=False,
                inline="auto", retries=0, timeout=None, on_error="raise", max_items_per_worker=None,
                memory_floor=None, axis_name=None, out=None):
        """itertools.starmap(fn, iterable), in parallel (same options as map)."""
        return self.run_map(fn, (iterable,), True, MapOptions.make(
            chunksize=chunksize, ordered=ordered, workers=workers, progress=progress,
            inline=inline, retries=retries, timeout=timeout, on_error=on_error,
            max_items_per_worker=max_items_per_worker, memory_floor=memory_floor,
            axis_name=axis_name, out=out))

    def run_map(self, fn, iterables, star, opts):
        """A map with options already checked (MapOptions): the one entry
        that pmap and the methods above share."""
        return MapJob(self, fn, iterables, star, opts)

    def apply(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on one worker; returns its result (or raises
        its exception, with the worker's traceback as ``__cause__``)."""
        if not callable(fn):
            raise TypeError("pmaprt: %r is not callable" % (fn,))
        self._check_open()
        desc = _task.encode(fn, args, kwargs)
        if desc is None:
            # Large or unusual arguments: the general path (cloudpickle, shared
            # memory for big data, errors that name what cannot be pickled).
            if kwargs:
                import functools
                fn = functools.partial(fn, **kwargs)
            return list(self.starmap(fn, (args,), chunksize=1, inline=False))[0]
        task = _task.Task()
        with self._lock:
            self._check_open()
            gen, slot, off = self._post_task(task, desc)
        try:
            if TASK_SPIN_NS:
                # Spin (in C, the GIL released) on the slot's done word: a
                # tiny call answers within it, with none of wait()'s work.
                try:
                    self._r.wait32(off + _shm.S_TASK_DONE, 0, 0, TASK_SPIN_NS)
                except (AttributeError, ValueError):
                    pass    # terminated meanwhile: wait() says so
            while not task.has_news():
                self.wait(task, TASK_SPIN_NS)
            if not task.done:
                task.take_slot()
        except KeyboardInterrupt:
            # The worker may be deep in a long call: end it now, as a map does.
            self._jobs.pop(gen, None)
            self.terminate()
            from . import _api
            _api._forget_default(self)
            raise
        finally:
            self._retire(gen, slot, off)
        if task.exc is not None:
            exc, task.exc = task.exc, None
            raise exc
        return task.value

    def _post_task(self, task, desc):
        """Put one task on the board (see _task.py). Lock held."""
        r, lay = self._r, self._layout
        for s in range(lay.nslots):
            off = lay.slot(s)
            st = r.load32(off + S_STATE)
            if st == SLOT_FREE or (st == SLOT_CLOSED and r.load32(off + S_REFS) == 0):
                break
        else:
            raise RuntimeError(
                "pmaprt: %d maps are already live on this pool; consume or close some of the "
                "iterators (or create the Pool with a larger max_jobs)" % lay.nslots)
        self._gen += 1
        gen = task.gen = self._gen
        task.off = off
        r.store32(off + S_STATE, SLOT_FREE)
        r.store64(off + _shm.S_GEN, gen)
        r.store32(off + _shm.S_MODE, _shm.MODE_TASK)
        r.store32(off + _shm.S_FLAGS, 0)
        r.store64(off + _shm.S_N, 1)
        r.store64(off + _shm.S_LIMIT, 1)
        r.store64(off + _shm.S_NEXT, 0)
        r.store32(off + S_CANCEL, 0)
        r.store32(off + _shm.S_NWORK, self.workers)
        r.store32(off + _shm.S_DESC_LEN, len(desc))
        r.store64(off + _shm.S_DESC_SEG, 0)
        r.store32(off + _shm.S_TASK_DONE, 0)
        base = off + lay.desc_off
        self._ctl.buf[base: base + len(desc)] = desc
        task.r, task.buf, task.base = r, self._ctl.buf, base
        r.store32(off + S_STATE, SLOT_ACTIVE)
        r.store64(H_ACTIVE_MASK, r.load64(H_ACTIVE_MASK) | (1 << s))
        self._jobs[gen] = task
        self.wake_workers(1, task=True)
        return gen, s, off

    def close(self):
        """Stop the workers once they are idle; waits for them."""
        self._closed = True
        _live_pools.discard(self)
        self._finalizer.detach()
        self._res.terminate(graceful=True)
        self._r = None

    def terminate(self):
        """Kill the workers now."""
        self._closed = True
        _live_pools.discard(self)
        self._finalizer.detach()
        self._res.terminate(graceful=False)
        self._r = None

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.terminate()

    def __repr__(self):
        state = "closed" if self._closed else "broken" if self._broken else "running"
        return "<pmaprt.Pool workers=%d %s>" % (self.workers, state)


@atexit.register
def _shutdown_all():
    for p in list(_live_pools):
        try:
            p.terminate()
        except Exception:
            pass
