"""The worker process.

A worker maps the pool's control segment, then loops: find the oldest active
job on the board that has work, join it, claim chunks until none is left,
leave; with nothing to do, spin briefly and sleep on the board's futex word.

In index mode a worker first takes chunks from the front of its own range,
then claims a span from the job's shared counter (guided self-scheduling),
then steals the back half of another worker's range, choosing victims in an
order drawn from a RNG seeded by (job seed, rank), so a schedule can be
reproduced. In feed mode it claims the next published chunk.

Results go into this worker's ring in the control segment, one record per
chunk, and the parent is woken only if it sleeps.
"""
import os
import pickle
import random
import select
import signal
import sys
import time
import traceback

from . import _array, _serialize, _shm, _sched
from ._access import FEED_ENTRY, open_spec
from ._errors import ReturnedError
from ._shm import (
    H_ACTIVE_MASK, H_BOARD_SEQ, H_BOARD_SLEEPERS, H_HOT_SPINNER, H_PARENT_SLEEPING, H_PARENT_WANT, H_RESULTS_SEQ, H_SHUTDOWN,
    MODE_FEED, MODE_INDEX, REC, REC_BIG, REC_BIG_ERROR, REC_ERROR, REC_RESULT, REC_STOLEN, REC_WRAP,
    RING_SIZE, S_CANCEL, S_CHUNK, S_DESC_LEN, S_DESC_SEG, S_FLAGS, S_GEN, S_LIMIT, S_MODE, S_N,
    HOT_CLAIMED, S_NEXT, S_NWORK, S_RANGES, WANT_POS_MASK, WANT_SHIFT, S_REFS, S_STATE, SLOT_ACTIVE, FLAG_FEED_DONE,
    FLAG_ON_ERROR_RETURN, FLAG_PROGRESS, REC_HAS_ERRORS, RETRY_RANGES, S_MAX_ITEMS,
    W_CLAIM, W_SLOT, W_CUR_DONE, W_CUR_GEN, W_CUR_K, W_CUR_LO, W_CUR_N, W_HEAD, W_PID, W_SPACE_SEQ, W_SPACE_WAIT,
    W_STATE, W_TAIL, WSTATE_READY, WSTATE_RECYCLED,
)

# True inside a worker: a nested pmap runs serially there.
IN_WORKER = False

# Spin before sleeping on a futex. Long enough to catch the next job of a
# tight submit loop without a system call, short enough not to take a core
# from the user's work when nothing comes.
SPIN_NS = 50_000 if (os.cpu_count() or 1) >= 4 else 0
# A worker that has just finished work, if no other worker holds the hot
# spinner word, spins this long for the next job before it sleeps, on every
# machine: a loop of calls (Pool.apply, Executor.submit) then finds it awake
# and posts without a wake call, which on a 2-core VM costs 20-50 us each way.
# One hot spinner at most keeps small machines from losing a core to spins.
HOT_SPIN_NS = 100_000
# A worker busy with one job after another reads its socket this often.
SOCKET_POLL_S = 0.001
# A sleeping worker wakes this often to check that its parent is alive.
IDLE_TIMEOUT_S = 1.0


class _JobCtx:
    __slots__ = ("slot", "gen", "off", "mode", "fn", "star", "get", "sizer", "seg", "nwork",
                 "rng", "error", "feed", "fn_key", "stolen", "ret", "progress", "max_items",
                 "retry_base", "spmd", "sink")


class Worker:
    def __init__(self, rank, sock, init, ctl_fd):
        self.rank = rank
        self.sock = sock
        self.parent_pid = init["parent_pid"]
        self.layout = _shm.Layout(init["nworkers"], init["nslots"])
        self.ctl = _shm.Segment(self.layout.size, fd=ctl_fd)
        self.r = self.ctl.region
        self.area = self.layout.worker(rank)
        self.ring_off = self.area + _shm.W_RING
        self.tail = self.r.load64(self.area + W_TAIL)
        self.segs = {}
        self.jobs = {}
        self.fns = {}          # pickled fn -> fn (a function compiles once per worker)
        self.t_items = {}      # pickled fn -> last seconds per item, to start the next map well
        self.seed = init["seed"]
        # Worker recycling: exit (and be replaced) after this many items.
        self.max_items = init.get("max_items_per_worker") or 0
        self.items_done = 0
        self.cur_slot = -1     # the job slot being worked on (for H_PARENT_WANT)
        self.hot_held = False  # holds H_HOT_SPINNER (taken as a task's record goes out)
        self.owe_wake = False  # a task's post skipped its wake on this worker's word
        self.claim_seq = 0     # W_CLAIM: odd while items move between shared words
        # Items of the current chunk finished, for the parent (retries, timeouts).
        self.prog = self.ctl.buf[self.area + W_CUR_DONE: self.area + W_CUR_DONE + 8].cast("q")
        self.oob = _array.ResultEncoder(sock)   # results with large arrays: through shared memory
        _array.set_resolver(self.segment)       # items that refer to shared arrays

    # --- segments from the parent

    def _handle_msg(self, msg, fds):
        kind = msg[0]
        if kind == "seg":
            _, seg_id, size = msg
            # mapped, its descriptor closed at once; unmapped with its last view
            self.segs[seg_id] = _array.MappedSegment(fds[0], size, seg_id)
        elif kind == "unseg":
            seg = self.segs.pop(msg[1], None)
            if seg is not None:
                seg.close()
                self._forget_finished_jobs()
        elif kind == "stop":
            raise SystemExit(0)

    def _forget_finished_jobs(self):
        """Drop cached contexts of jobs that are over: they hold views of
        segments (a shared array's memory must go with its last user)."""
        r = self.r
        for k, c in list(self.jobs.items()):
            if r.load64(c.off + S_GEN) != c.gen or r.load32(c.off + S_CANCEL):
                del self.jobs[k]

    def poll_socket(self):
        while select.select([self.sock], [], [], 0)[0]:
            msg, fds = _shm.recv_msg(self.sock)
            self._handle_msg(msg, fds)

    def segment(self, seg_id):
        # The parent sends segments as its workers' sockets take them (it never
        # blocks on a busy worker), so this may wait for the parent's next turn.
        while seg_id not in self.segs:
            if not select.select([self.sock], [], [], IDLE_TIMEOUT_S)[0]:
                if os.getppid() != self.parent_pid or self.r.load32(H_SHUTDOWN):
                    raise SystemExit(0)
                continue
            msg, fds = _shm.recv_msg(self.sock)
            self._handle_msg(msg, fds)
        return self.segs[seg_id]

    # --- the board

    def run(self):
        r = self.r
        r.store32(self.area + W_PID, os.getpid())
        r.store32(self.area + W_STATE, WSTATE_READY)
        me = self.rank + 1
        hot = False
        polled = 0.0
        clock = time.perf_counter
        while True:
            if r.load32(H_SHUTDOWN):
                return
            # The socket carries rare messages (segments, frees): between
            # busy turns it is looked at every SOCKET_POLL_S, not at each
            # (one system call per turn was a tenth of a round trip).
            seq = r.load32(H_BOARD_SEQ)
            now = clock()
            if now - polled > SOCKET_POLL_S:
                polled = now
                self.poll_socket()
            if self.work_once():
                hot = True
                continue
            if hot:
                hot = False
                if self.hot_held or r.cas64(H_HOT_SPINNER, 0, me):
                    self.hot_held = True
                    # Spin only (timeout 0), then give the word back before
                    # sleeping. A post that marked it claimed skipped its wake
                    # call: this worker looks at the board for it (the post
                    # bumped the sequence first, so its task is there).
                    changed = r.wait32(H_BOARD_SEQ, seq, 0, HOT_SPIN_NS)
                    if self._release_hot() or changed:
                        continue
            # Before sleeping, always: a freed segment's mapping goes now (the
            # parent bumps the sequence after sending, so nothing is missed).
            self.poll_socket()
            polled = clock()
            # Counted in H_BOARD_SLEEPERS only once asleep in the kernel: while
            # this worker spins, the parent posts a job without a wake call.
            changed = r.wait32(H_BOARD_SEQ, seq, IDLE_TIMEOUT_S, SPIN_NS, H_BOARD_SLEEPERS)
            if not changed and os.getppid() != self.parent_pid:
                return

    def work_once(self):
        """Join the oldest active job with work; True if any work was done."""
        r = self.r
        mask = r.load64(H_ACTIVE_MASK)
        if not mask:
            self.owe_wake = False
            return False
        cands = []
        s = 0
        while mask:
            if mask & 1:
                off = self.layout.slot(s)
                cands.append((r.load64(off + S_GEN), s, off))
            mask >>= 1
            s += 1
        cands.sort()
        did = False
        for i, (gen, s, off) in enumerate(cands):
            if self.rank >= r.load32(off + S_NWORK) or not self.has_work(off):
                continue
            if self.hot_held:      # about to work: tasks must wake a sleeper again
                self._release_hot()
            if self.owe_wake:
                # A task's post skipped its wake call on this worker's word. If
                # this worker is not about to take that task (it runs a map,
                # or other jobs wait too), a sleeper must look instead.
                self.owe_wake = False
                if (r.load32(off + S_MODE) != _shm.MODE_TASK
                        or any(self.has_work(o) for _, _, o in cands[i + 1:])) \
                        and r.load32(H_BOARD_SLEEPERS):
                    r.wake32(H_BOARD_SEQ, 1)
            # The reference first, then its record (and the record cleared
            # before the reference is dropped): a kill in between leaks the
            # reference rather than dropping one that is not held.
            r.add32(off + S_REFS, 1)
            r.store32(self.area + W_SLOT, s + 1)
            self.cur_slot = s
            try:
                if r.load32(off + S_STATE) == SLOT_ACTIVE and r.load64(off + S_GEN) == gen \
                        and not r.load32(off + S_CANCEL):
                    did |= self.run_job(s, gen, off)
            finally:
                r.store32(self.area + W_SLOT, 0)
                r.add32(off + S_REFS, -1)
            if did:
                return True
        self.owe_wake = False   # nothing taken: the task went to another worker
        return did

    def _release_hot(self):
        """Give H_HOT_SPINNER back; True (and owe_wake set) if a task's post
        relied on it (skipped its wake call)."""
        r = self.r
        self.hot_held = False
        while True:
            h = r.load64(H_HOT_SPINNER)
            if r.cas64(H_HOT_SPINNER, h, 0):
                break
        if h & HOT_CLAIMED:
            self.owe_wake = True
            return True
        return False

    def has_work(self, off):
        r = self.r
        if r.load32(off + S_CANCEL):
            return False
        nxt, lim = r.load64(off + S_NEXT), r.load64(off + S_LIMIT)
        if nxt < lim:
            return True
        if r.load32(off + S_MODE) != MODE_INDEX:
            return False
        base = off + S_RANGES
        for w in range(r.load32(off + S_NWORK)):
            if r.range_get(base + 8 * w)[1]:
                return True
        base = off + self.layout.retry_off
        for j in range(RETRY_RANGES):
            if r.range_get(base + 8 * j)[1]:
                return True
        return False

    def job(self, s, gen, off):
        ctx = self.jobs.get(s)
        if ctx is not None and ctx.gen == gen:
            return ctx
        r = self.r
        ctx = _JobCtx()
        ctx.slot, ctx.gen, ctx.off = s, gen, off
        ctx.mode = r.load32(off + S_MODE)
        ctx.nwork = r.load32(off + S_NWORK)
        ctx.error = None
        ctx.stolen = False
        ctx.fn_key = None
        flags = r.load32(off + S_FLAGS)
        ctx.ret = bool(flags & FLAG_ON_ERROR_RETURN)
        ctx.progress = bool(flags & (FLAG_PROGRESS | FLAG_ON_ERROR_RETURN))
        ctx.max_items = r.load64(off + S_MAX_ITEMS) or self.max_items
        ctx.retry_base = off + self.layout.retry_off
        # SPMD map: the id of its collective segment (0: an ordinary map).
        ctx.spmd = r.load64(off + _shm.S_SPMD_SEG) if r.load32(off + S_FLAGS) & _shm.FLAG_SPMD else 0
        ctx.sink = None
        # A crash while loading the job is charged to it (lo = -1).
        self._set_cur(gen, -1, -1)
        try:
            seg_id = r.load64(off + S_DESC_SEG)
            n = r.load32(off + S_DESC_LEN)
            if seg_id:
                ctx.seg = self.segment(seg_id)
                doff = r.load64(off + _shm.S_DESC_OFF)
                desc = pickle.loads(ctx.seg.buf[doff: doff + n])
            else:
                ctx.seg = None
                base = off + self.layout.desc_off
                desc = pickle.loads(self.ctl.buf[base: base + n])
            fn_bytes, ctx.star, spec, seed = desc[:4]
            ctx.fn_key = fn_bytes
            fn = self.fns.get(fn_bytes)
            if fn is None:
                fn = _serialize.loads_fn(fn_bytes)
                if len(self.fns) >= 32:
                    self.fns.clear()
                self.fns[fn_bytes] = fn
            ctx.fn = fn
            ctx.sink = _array.open_sink(desc[4] if len(desc) > 4 else None, fn, self.segment)
            if ctx.sink is not None:
                ctx.fn = ctx.sink  # out=: results are written into the shared array
            segbuf = ctx.seg.buf if ctx.seg is not None else None
            if ctx.mode == MODE_FEED:
                ctx.feed = spec[1:]
                ctx.get = None
            else:
                ctx.get = open_spec(spec, segbuf)
            ctx.rng = _sched.victim_rng(seed, self.rank)
        except BaseException as e:  # reported at the first chunk this worker claims
            ctx.error = (e, "while loading the function or input of this map in the worker")
            ctx.fn = None
            ctx.rng = random.Random(self.rank)
        finally:
            self._set_cur(0, 0, 0)
        ctx.sizer = _sched.ChunkSizer(r.load32(off + S_CHUNK), self.t_items.get(ctx.fn_key))
        for k in [k for k, c in self.jobs.items() if k != s and r.load64(c.off + S_GEN) != c.gen]:
            del self.jobs[k]
        self.jobs[s] = ctx
        return ctx

    def run_job(self, s, gen, off):
        if self.r.load32(off + S_MODE) == _shm.MODE_TASK:
            return self.run_task(gen, off)
        ctx = self.job(s, gen, off)
        did = False
        r = self.r
        while not r.load32(off + S_CANCEL):
            got = self.claim_feed(ctx) if ctx.mode == MODE_FEED else self.claim_index(ctx)
            if got is None:
                break
            lo, n, stolen = got
            self.run_chunk(ctx, lo, n, stolen)
            did = True
            if ctx.max_items and self.items_done >= ctx.max_items:
                self.recycle()
        if ctx.fn_key is not None and ctx.sizer.t_item is not None:
            self.t_items[ctx.fn_key] = ctx.sizer.t_item
        return did

    def run_task(self, gen, off):
        """One call (Pool.apply; see _task.py): claim it, run it, put its record."""
        r, a = self.r, self.area
        r.store64(a + W_CUR_N, 0)
        r.store64(a + W_CUR_K, -1)
        r.store64(a + W_CUR_GEN, gen)
        self.claim_seq += 1
        r.store64(a + W_CLAIM, self.claim_seq)
        took = r.cas64_mark(off + S_NEXT, 0, 1, a + W_CUR_K, 0)
        self.claim_seq += 1
        r.store64(a + W_CLAIM, self.claim_seq)
        if not took:
            return False    # another worker took it
        self._set_cur(gen, 0, 1)
        r.store64(a + W_CUR_K, -1)
        t0 = time.perf_counter()
        try:
            n = r.load32(off + S_DESC_LEN)
            base = off + self.layout.desc_off
            fn_bytes, args, kwargs = pickle.loads(self.ctl.buf[base: base + n])
            fn = self.fns.get(fn_bytes)
            if fn is None:
                fn = _serialize.loads_fn(fn_bytes)
                if len(self.fns) >= 32:
                    self.fns.clear()
                self.fns[fn_bytes] = fn
        except BaseException as e:
            self.put_error(gen, 0, 1, [], e, "while loading the task in the worker", t0, False,
                           hot=True)
            self._task_in_ring(off)
            self._set_cur(0, 0, 0)
            return True
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            self.put_error(gen, 0, 1, [], e, None, t0, False, hot=True)
            self._task_in_ring(off)
            self._set_cur(0, 0, 0)
            return True
        t1 = time.perf_counter()
        self.items_done += 1
        try:
            payload = _serialize.dumps_list([result], self.oob)
        except BaseException as e:
            err = TypeError("pmaprt: the result of the task (a %s) cannot be pickled to return "
                            "it from the worker: %s" % (type(result).__name__, e))
            self.put_error(gen, 0, 1, [], err, None, t0, False, tb=False, hot=True)
            self._task_in_ring(off)
            self._set_cur(0, 0, 0)
            return True
        hot = not self._recycling()
        if len(payload) <= _shm.INLINE_DESC and not _array.is_result_stub(payload):
            self.put_task_result(off, payload, hot)
        else:
            self.put(REC_RESULT, gen, 0, 1, payload, t0, t1, hot=hot)
            self._task_in_ring(off)
        self._set_cur(0, 0, 0)
        if self.max_items and self.items_done >= self.max_items:
            self.recycle()
        return True

    def _task_in_ring(self, off):
        # The task's record is in the ring (an error, a large result): a
        # caller spinning on the slot's done word stops, and drains it.
        self.r.store32(off + _shm.S_TASK_DONE, 2)

    def put_task_result(self, off, payload, hot):
        """A task's result, into its slot (see _shm.S_TASK_DONE): the caller
        reads it there, with no record to parse."""
        r = self.r
        if hot and not self.hot_held:
            self.hot_held = r.cas64(H_HOT_SPINNER, 0, self.rank + 1)   # as put() does
        base = off + self.layout.desc_off
        self.ctl.buf[base: base + len(payload)] = payload
        r.store64(off + _shm.S_TASK_LEN, len(payload))
        r.store32(off + _shm.S_TASK_DONE, 1)
        r.add32(H_RESULTS_SEQ, 1)
        if r.load32(H_PARENT_SLEEPING):
            r.wake32(H_RESULTS_SEQ, 1 << 30)

    def _recycling(self):
        return bool(self.max_items and self.items_done >= self.max_items)

    def recycle(self):
        """max_items_per_worker reached: leave cleanly; the parent starts a fresh worker."""
        r = self.r
        if self.hot_held and self._release_hot() and r.load32(H_BOARD_SLEEPERS):
            r.wake32(H_BOARD_SEQ, 1)    # a task relied on this worker: another looks
        self.owe_wake = False
        r.store32(self.area + W_STATE, WSTATE_RECYCLED)
        raise SystemExit(0)

    # --- claiming work
    #
    # Every index a worker takes is, at every instant, either in a range word
    # of the job slot or in this worker's "current chunk" words (W_CUR_*): the
    # C calls move it and record it in one step. So when a worker dies, the
    # parent knows exactly which items it lost, and can run them again.

    def claim_index(self, ctx):
        r, a = self.r, self.area
        r.store64(a + W_CUR_N, 0)
        r.store64(a + W_CUR_GEN, ctx.gen)
        self.prog[0] = 0
        self.claim_seq += 1
        r.store64(a + W_CLAIM, self.claim_seq)     # odd: moving items
        try:
            return self._claim_index(ctx)
        finally:
            self.claim_seq += 1
            r.store64(a + W_CLAIM, self.claim_seq)

    def _claim_index(self, ctx):
        r, off, a = self.r, ctx.off, self.area
        mine = off + S_RANGES + 8 * self.rank
        if ctx.spmd:
            # One shard per rank: this worker's own, never a span or a steal.
            lo, n = r.range_take(mine, 1, a + W_CUR_LO)
            return (lo, n, False) if n else None
        n_all = r.load64(off + S_N)
        while True:
            c = ctx.sizer.size(max(0, n_all - r.load64(off + S_NEXT)), ctx.nwork)
            if ctx.max_items:
                c = max(1, min(c, ctx.max_items - self.items_done))
            lo, n = r.range_take(mine, c, a + W_CUR_LO)
            if n:
                return lo, n, ctx.stolen
            ctx.stolen = False
            # A span from the shared counter.
            nxt = r.load64(off + S_NEXT)
            lim = r.load64(off + S_LIMIT)
            if nxt < lim:
                span = min(_sched.span_size(c, lim - nxt, ctx.nwork), _shm.RANGE_N_MAX)
                r.claim_span(off + S_NEXT, nxt, span, mine)
                continue
            # Items handed back by the parent (a dead worker's chunk) come first.
            base = ctx.retry_base
            for j in range(RETRY_RANGES):
                if r.range_steal(base + 8 * j, mine)[1]:
                    ctx.stolen = True
                    break
            else:
                # Steal the back half of a victim's range.
                for v in _sched.victims(ctx.rng, self.rank, ctx.nwork):
                    if r.range_steal(off + S_RANGES + 8 * v, mine)[1]:
                        ctx.stolen = True
                        break
                else:
                    return None

    def claim_feed(self, ctx):
        r, off, a = self.r, ctx.off, self.area
        r.store64(a + W_CUR_N, 0)
        r.store64(a + W_CUR_K, -1)
        r.store64(a + W_CUR_GEN, ctx.gen)
        self.prog[0] = 0
        self.claim_seq += 1
        r.store64(a + W_CLAIM, self.claim_seq)
        try:
            while True:
                k = r.load64(off + S_NEXT)
                if k >= r.load64(off + S_LIMIT):
                    return None
                if r.cas64_mark(off + S_NEXT, k, k + 1, a + W_CUR_K, k):
                    return k, -1, False
        finally:
            self.claim_seq += 1
            r.store64(a + W_CLAIM, self.claim_seq)

    # --- running a chunk

    def _set_cur(self, gen, lo, n):
        r, a = self.r, self.area
        if n == 0:
            r.store64(a + W_CUR_N, 0)
        r.store64(a + W_CUR_GEN, gen)
        r.store64(a + W_CUR_LO, lo)
        r.store64(a + W_CUR_N, n)

    def _feed_items(self, ctx, k):
        table_off, table_cap = ctx.feed[0], ctx.feed[1]
        start, count, nbytes, doff, seg_id = FEED_ENTRY.unpack_from(
            ctx.seg.buf, table_off + (k % table_cap) * FEED_ENTRY.size)
        self._set_cur(ctx.gen, start, count)
        self.r.store64(self.area + W_CUR_K, -1)
        buf = self.segment(seg_id).buf if seg_id else ctx.seg.buf
        return start, count, _serialize.loads_list(buf[doff: doff + nbytes])

    def run_chunk(self, ctx, lo, n, stolen):
        t0 = time.perf_counter()
        if n >= 0:
            self._set_cur(ctx.gen, lo, n)
        items = None
        try:
            if n < 0:
                lo, n, items = self._feed_items(ctx, lo)
            if ctx.error is not None:
                raise ctx.error[0]
            if items is None:
                items = ctx.get(lo, lo + n)
        except BaseException as e:
            where = ctx.error[1] if ctx.error is not None else \
                "while reading items %d..%d of the input in the worker" % (lo, lo + n - 1)
            self.put_error(ctx.gen, lo, n, [], e, where, t0, stolen)
            self._set_cur(0, 0, 0)
            return
        if ctx.sink is not None:
            ctx.sink.pos = lo
        # cpu: the items' calls alone (what map would spend on them); the
        # chunk's overhead here (reading the items, encoding the results)
        # goes in the record apart (see _map.inline.tiny_by_model).
        t_got = time.perf_counter()
        c0 = time.thread_time()
        fn = ctx.fn
        out = []
        app = out.append
        has_errors = False
        try:
            if ctx.spmd:
                from ._collective import rank_fn
                fn = rank_fn(fn, self.segment(ctx.spmd), lo)
            elif n > 1 and ctx.get is not None and not ctx.sizer.fixed \
                    and ctx.sizer.t_item is not None:
                # An index-mode chunk sized from a cost that has since risen
                # gives back what it has not started (see _sched.PREEMPT_FACTOR).
                # Feed chunks are not cut: their items live in the feed, not
                # in a range word.
                has_errors, n = self._run_items_preemptible(ctx, fn, items, lo, n, t0, out)
                items = None
            if items is None:
                pass
            elif ctx.progress:
                has_errors = self._run_items_tracked(ctx, fn, items, lo, out)
            elif ctx.star:
                for args in items:
                    app(fn(*args))
            else:
                for x in items:
                    app(fn(x))
        except BaseException as e:
            self.put_error(ctx.gen, lo, n, out, e, None, t0, stolen)
            self._set_cur(0, 0, 0)
            return
        t1 = time.perf_counter()
        cpu = time.thread_time() - c0
        ctx.sizer.observe(n, t1 - t0)
        self.items_done += n
        while True:
            try:
                payload = _serialize.dumps_list(out, self.oob)
                if self.oob is not None and self.oob.moved > _sched.GROW_MAX_BYTES:
                    ctx.sizer.hold()
                break
            except BaseException:
                bad = _serialize.find_unpicklable(out, BaseException)
                j, exc = bad if bad is not None else (0, TypeError("cannot be pickled"))
                err = TypeError("pmaprt: the result of item %d (a %s) cannot be pickled to return "
                                "it from the worker: %s" % (lo + j, type(out[j]).__name__, exc))
                if not ctx.ret:
                    self.put_error(ctx.gen, lo, n, out[:j], err, None, t0, stolen, tb=False)
                    self._set_cur(0, 0, 0)
                    return
                out[j] = ReturnedError.wrap(err, lo + j, tb=False)
                has_errors = True
        kind = REC_RESULT | (REC_STOLEN if stolen else 0) | (REC_HAS_ERRORS if has_errors else 0)
        self.put(kind, ctx.gen, lo, n, payload, t0, t1, cpu,
                 enc=(t_got - t0) + (time.perf_counter() - t1))
        self._set_cur(0, 0, 0)

    def _run_items_preemptible(self, ctx, fn, items, lo, n, t0, out):
        """The item loop of a chunk that may run far longer than planned (the
        cost per item rose since it was sized). Runs the items in strides;
        past the chunk's deadline, the items not started go back to the front
        of this worker's range (where the next, smaller chunk or a thief takes
        them). Returns (has_errors, items kept in this chunk)."""
        expected = n * ctx.sizer.t_item
        deadline = t0 + max(_sched.PREEMPT_MIN_S, _sched.PREEMPT_FACTOR * expected)
        stride = max(1, n // _sched.PREEMPT_STRIDES)
        star, progress = ctx.star, ctx.progress
        app = out.append
        has_errors = False
        i = 0
        while i < n:
            j = min(n, i + stride)
            seg = items[i:j]
            if progress:
                has_errors |= self._run_items_tracked(ctx, fn, seg, lo, out, base=i)
            elif star:
                for args in seg:
                    app(fn(*args))
            else:
                for x in seg:
                    app(fn(x))
            i = j
            if i < n and time.perf_counter() > deadline:
                mine = ctx.off + S_RANGES + 8 * self.rank
                r, a = self.r, self.area
                self.claim_seq += 1
                r.store64(a + W_CLAIM, self.claim_seq)
                try:
                    given = r.range_untake(mine, lo + i, n - i, a + W_CUR_N, i)
                finally:
                    self.claim_seq += 1
                    r.store64(a + W_CLAIM, self.claim_seq)
                if given:
                    return has_errors, i
                deadline = float("inf")   # cannot give them back: finish the chunk
        return has_errors, n

    def _run_items_tracked(self, ctx, fn, items, lo, out, base=0):
        """The item loop when the parent follows progress (retries, timeouts) or
        exceptions are returned as results (on_error="return"). Returns whether
        some result is a returned exception."""
        prog = self.prog
        app = out.append
        star, ret = ctx.star, ctx.ret
        has_errors = False
        prog[0] = base
        for i, x in enumerate(items, base):
            try:
                v = fn(*x) if star else fn(x)
            except Exception as e:
                if not ret:
                    raise
                v = ReturnedError.wrap(e, lo + i)
                has_errors = True
            app(v)
            prog[0] = i + 1
        return has_errors

    def put_error(self, gen, lo, n, ok, exc, where, t0, stolen, tb=True, hot=False):
        """Results before the failure, then the exception and its traceback."""
        self.prog[0] = max(n, 0)  # no item is running any more: encoding (no timeout applies)
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if tb else ""
        if where:
            tb_text = "(%s)\n%s" % (where, tb_text)
        try:
            ok_payload = _serialize.dumps_list(ok)
        except BaseException:
            ok_payload, ok = _serialize.dumps_list([]), []
        try:
            exc_bytes = _serialize.dumps_obj(exc)
            pickle.loads(exc_bytes)
        except BaseException as pe:
            exc_bytes = pickle.dumps(RuntimeError(
                "pmaprt: %s: %s (the exception could not be pickled: %s)"
                % (type(exc).__name__, exc, pe)))
        payload = pickle.dumps((ok_payload, exc_bytes, tb_text, os.getpid()), 5)
        self.put(REC_ERROR | (REC_STOLEN if stolen else 0), gen, lo, len(ok), payload,
                 t0, time.perf_counter(), hot=hot)

    # --- the result ring

    def put(self, kind, gen, start, count, payload, t0, t1, cpu=0.0, hot=False, enc=0.0):
        r, a = self.r, self.area
        if hot and not self.hot_held:
            # A task's record: take the hot spinner word just before it goes
            # out (after all user code: a hold must stay short), so that the
            # caller's next task finds this worker awake (see HOT_SPIN_NS).
            self.hot_held = r.cas64(H_HOT_SPINNER, 0, self.rank + 1)
        plen = len(payload)
        big = plen > RING_SIZE // 2
        if big:
            kind = (REC_BIG | (REC_BIG_ERROR if (kind & 0xFF) == REC_ERROR else 0)
                    | (kind & (REC_STOLEN | REC_HAS_ERRORS)))
            body = 0
        else:
            body = plen
        need = (REC.size + body + 7) // 8 * 8
        while True:
            head = r.load64(a + W_HEAD)
            pos = self.tail % RING_SIZE
            wrap = RING_SIZE - pos if RING_SIZE - pos < need else 0
            if RING_SIZE - (self.tail - head) >= need + wrap:
                break
            seq = r.load32(a + W_SPACE_SEQ)
            r.store32(a + W_SPACE_WAIT, 1)
            if r.load32(H_PARENT_SLEEPING):
                # The parent may sleep for a record this one does not hold:
                # it must drain the ring for this worker to go on.
                r.add32(H_RESULTS_SEQ, 1)
                r.wake32(H_RESULTS_SEQ, 1 << 30)
            if r.load64(a + W_HEAD) == head:
                if not r.wait32(a + W_SPACE_SEQ, seq, IDLE_TIMEOUT_S, SPIN_NS) \
                        and os.getppid() != self.parent_pid:
                    raise SystemExit(0)
            r.store32(a + W_SPACE_WAIT, 0)
        buf = self.ctl.buf
        base = self.ring_off
        if wrap:
            REC.pack_into(buf, base + pos, wrap, REC_WRAP, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
            pos = 0
        REC.pack_into(buf, base + pos, need, kind, gen, start, count, plen, t0, t1, cpu, enc)
        if body:
            buf[base + pos + REC.size: base + pos + REC.size + plen] = payload
        self.tail += wrap + need
        r.store64(a + W_TAIL, self.tail)
        r.add32(H_RESULTS_SEQ, 1)
        if r.load32(H_PARENT_SLEEPING):
            want = r.load64(H_PARENT_WANT)
            # A parent asleep for one position of an ordered map is woken only
            # by the record that holds it (or by anything but a plain result):
            # records further on would wake it to find it cannot go on yet.
            # A stub record's arrays went ahead as memfds on the socket: the
            # parent must read them, or the socket fills and this worker blocks.
            if not want or big or (kind & 0xFF) != REC_RESULT \
                    or _array.is_result_stub(payload) or (
                    want >> WANT_SHIFT == self.cur_slot + 1
                    and start <= (want & WANT_POS_MASK) < start + count):
                r.wake32(H_RESULTS_SEQ, 1 << 30)
        if big:
            _shm.send_blob(self.sock, payload)


def main():
    global IN_WORKER
    IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank, sock_fd, ctl_fd = (int(x) for x in sys.argv[1:4])
    import socket
    sock = socket.socket(fileno=sock_fd)
    init, _ = _shm.recv_msg(sock)
    sys.path[:] = init["sys_path"]
    try:
        from . import _core_loader
        _core_loader.core().set_pdeathsig(signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != init["parent_pid"]:
        os._exit(0)
    worker = Worker(rank, sock, init, ctl_fd)
    code = 0
    try:
        worker.run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except EOFError:
        code = 0
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
