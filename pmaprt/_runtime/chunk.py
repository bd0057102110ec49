"""Running a map's chunks in a worker: items, errors, progress, preemption.

Protocol, step by step (the worker, inside a job it entered, board.py):

1. Load the job once per worker (`job_context`): its descriptor (inline in
   the slot, or in a lent segment), the function (cached by its bytes), the
   input's reader, an out= sink, a chunk sizer and the victim RNG. W_CUR_N =
   -1 while loading: a crash then is the job's (`on_load_crash`). A load
   error is kept and reported as the first chunk this worker claims.
2. Claim a chunk (claims.py) until none is left or the job is cancelled.
3. The claim recorded the chunk in W_CUR_LO and W_CUR_N; store W_CUR =
   (gen, lo, n) again (a feed chunk: its items' range from its table entry,
   then W_CUR_K = -1), read its items, and run fn on each.
4. With progress asked for (retries, timeouts, on_error="return"), store the
   items done in W_CUR_DONE after each item: the parent then names the item
   a crash or timeout hit, and an exception can take its item's place.
5. Preemption: an index-mode chunk sized from a cost per item that has since
   risen runs in strides; past its deadline, the items not started go back
   to the front of this worker's range word (`range_untake`, in the claim
   bracket), where a smaller next chunk or a thief takes them.
6. Put one record (ring.py): the results, or the results before an error and
   the error; then W_CUR = (0, 0, 0). A worker that has run
   max_items_per_worker items leaves (worker.py).
"""
import pickle
import random
import time

from .. import _arrays, _serialize, _sched
from .._access import FEED_ENTRY, open_spec
from .._collective import rank_fn
from .._errors import ReturnedError
from .._shm import (
    FLAG_ON_ERROR_RETURN, FLAG_PROGRESS, FLAG_SPMD, MODE_FEED, REC_HAS_ERRORS, REC_RESULT,
    REC_STOLEN, S_CANCEL, S_CHUNK, S_DESC_LEN, S_DESC_OFF, S_DESC_SEG, S_FLAGS, S_GEN,
    S_MAX_ITEMS, S_MODE, S_NWORK, S_RANGES, S_SPMD_SEG, W_CUR_GEN, W_CUR_K, W_CUR_LO, W_CUR_N,
)
from .claims import begin_move, end_move
from .wake import WAKE_AFTER_S

class _JobCtx:
    """What a worker keeps of one job it entered."""
    __slots__ = ("slot", "gen", "off", "mode", "fn", "star", "get", "sizer", "seg", "nwork",
                 "rng", "error", "feed", "fn_key", "stolen", "ret", "progress", "max_items",
                 "retry_base", "spmd", "sink")


class ChunkRunner:
    """The worker's side (a worker mixin). State: jobs (slot -> _JobCtx),
    fns (the functions it decoded: _arrays.FunctionCache), t_items (fn bytes
    -> last seconds per item, to start the next map of the same function
    well), items_done, prog (a view of W_CUR_DONE)."""

    def job_context(self, s, gen, off):
        """Step 1: the context of the job in slot s, loaded once."""
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
        ctx.spmd = r.load64(off + S_SPMD_SEG) if flags & FLAG_SPMD else 0
        ctx.sink = None
        self._set_cur(gen, -1, -1)
        try:
            seg_id = r.load64(off + S_DESC_SEG)
            n = r.load32(off + S_DESC_LEN)
            if seg_id:
                ctx.seg = self.segment(seg_id)
                doff = r.load64(off + S_DESC_OFF)
                desc = pickle.loads(ctx.seg.buf[doff: doff + n])
            else:
                ctx.seg = None
                base = off + self.layout.desc_off
                desc = pickle.loads(self.ctl.buf[base: base + n])
            fn_bytes, ctx.star, spec, seed = desc[:4]
            ctx.fn_key = fn_bytes
            ctx.fn = fn = self.fns.load(fn_bytes)
            ctx.sink = _arrays.open_sink(desc[4] if len(desc) > 4 else None, fn, self.segment)
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

    def run_chunks(self, s, gen, off):
        """Step 2: claim and run chunks of a map while it has any."""
        entered = time.perf_counter()
        ctx = self.job_context(s, gen, off)
        did = False
        owe = True      # wake.py, step 5: this worker may still owe the others a wake
        r = self.r
        while not r.load32(off + S_CANCEL):
            got = self.claim_feed(ctx) if ctx.mode == MODE_FEED else self.claim_index(ctx)
            if got is None:
                break
            lo, n, stolen = got
            if owe and (time.perf_counter() - entered >= WAKE_AFTER_S
                        or not self._cheap(ctx, n)):
                owe = not self.pay_wake(off, ctx.nwork)
            self.run_chunk(ctx, lo, n, stolen)
            did = True
            if ctx.max_items and self.items_done >= ctx.max_items:
                self.recycle()
        if ctx.fn_key is not None and ctx.sizer.t_item is not None:
            self.t_items[ctx.fn_key] = ctx.sizer.t_item
        return did

    @staticmethod
    def _cheap(ctx, n):
        """Whether this worker expects its chunk of n items (n < 0: a feed
        chunk) to end within WAKE_AFTER_S, by a cost per item it measured."""
        t = ctx.sizer.t_item
        return t is not None and 0 <= n * t < WAKE_AFTER_S

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
        return start, count, _arrays.loads_list(buf[doff: doff + nbytes])

    def run_chunk(self, ctx, lo, n, stolen):
        """Steps 3-6 for one chunk (n < 0: feed chunk number lo)."""
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
        # goes in the record apart, for the map's inline cost model.
        t_got = time.perf_counter()
        c0 = time.thread_time()
        fn = ctx.fn
        out = []
        app = out.append
        has_errors = False
        try:
            if ctx.spmd:
                fn = rank_fn(fn, self.segment(ctx.spmd), lo)
            elif n > 1 and ctx.get is not None and not ctx.sizer.fixed \
                    and ctx.sizer.t_item is not None:
                # Step 5 (see _sched.PREEMPT_FACTOR). Feed chunks are not cut:
                # their items live in the feed, not in a range word.
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
                payload = _arrays.dumps_list(out, self.oob)
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
        """Step 5: the item loop of a chunk that may run far longer than
        planned. Runs the items in strides; past the chunk's deadline, the
        items not started go back to the front of this worker's range.
        Returns (has_errors, items kept in this chunk)."""
        deadline = t0 + _sched.preempt_deadline_s(n, ctx.sizer.t_item)
        stride = _sched.preempt_stride(n)
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
                begin_move(self)
                try:
                    given = self.r.range_untake(mine, lo + i, n - i, self.area + W_CUR_N, i)
                finally:
                    end_move(self)
                if given:
                    return has_errors, i
                deadline = float("inf")   # cannot give them back: finish the chunk
        return has_errors, n

    def _run_items_tracked(self, ctx, fn, items, lo, out, base=0):
        """Step 4: the item loop when the parent follows progress. Returns
        whether some result is a returned exception."""
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
