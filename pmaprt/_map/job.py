"""One map on the parent's side: the iterator the caller gets, and the state
that posts the map and that the runtime reports to.

    caller --iterable--> plan_input: index ranges (sized) or feed (unsized)
                           |
       index: post the job with a window limit; raise it as the caller
              consumes, so a lazy consumer bounds what runs ahead (window.py).
       feed:  pull items, encode chunks into the job segment's table and
              byte ring, publish them; in-flight items are bounded (feed.py).
                           |
    Pool.wait drains the rings -> MapState.on_record: records by start index
    (collect.ResultBook); a dead worker's items -> recovery.py
                           |
    collect.Collector yields each chunk's result list in order (or as they
    come); the iterator the caller sees is _core.Results over them, which
    takes each list by index, so each item costs a C-level step, not a
    generator resume. A failure is raised at the position map would raise it.

Start: a map over a list, tuple or range (inline="auto", no option that
needs workers) runs its first item in the caller and goes on here while
items are cheap; dear items go to the workers (inline.py, handoff.py).
Inline: when the workers' measured CPU per item shows that dispatching cannot
beat map itself (inline.py, the cost model), the parent claims the rest of
the input and runs it as map would: for a list or tuple, _core.Results calls
fn(seq[i]) itself (one C step per item, as builtin map's own); otherwise it
yields ``map(fn, rest)``. An SPMD map (axis_name=) runs one shard per worker,
all at once (spmd.py).

`MapState` is the object the runtime holds: it keeps the map's identity and
its slot (gen, slot, off), starts it (plan, descriptor, post), answers the
runtime's calls by handing them to the piece that owns the concern, and
frees everything when the map ends.
"""
import pickle
import sys
import time

from .. import _arrays, _collective, _memguard, _serialize, _shm
from .._access import FeedPlan, plan_input
from .._errors import TooManyMapsError
from .._options import check_call, check_chunksize
from .._shm import FLAG_ON_ERROR_RETURN, FLAG_PROGRESS, MODE_FEED, MODE_INDEX, REC_ERROR, WANT_SHIFT
from .._stats import MapStats
from .._tuned import cached_chunksize
from .collect import Collector, ResultBook, decode_record, record_bytes
from .feed import Feeder
from .inline import PROBE_MARGIN, TAIL_TYPES, InlineTail, MapCosts, probe_item_s
from .recovery import Recovery
from .spmd import SpmdMap, spmd_shards
from .window import Window


def open_progress(fn, iterables):
    """The tqdm bar of ``progress=True``: labelled with the function's name, with
    a total when every input has a length (else a count, given a total when
    the input ends). tqdm is a dependency; an install without it gets an
    ImportError that says how to add it rather than a bare ModuleNotFoundError."""
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ImportError("pmaprt: progress=True needs tqdm, which is not installed "
                          "(pip install tqdm, or pip install 'pmaprt[bench]')") from e
    fn = getattr(fn, "func", fn)   # functools.partial: the wrapped function
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    try:
        total = min(len(x) for x in iterables)
    except TypeError:
        total = None
    return tqdm(total=total, desc=name, unit="item")


class MapJob:
    """The iterator returned by pmap and Pool.map; ``.stats`` has its MapStats.

    It holds the job's state and the iterator over it; the state does not
    refer back, so an abandoned map is finalized as soon as it is dropped.
    """

    __slots__ = ("_state", "_it", "__weakref__")

    def __init__(self, pool, fn, iterables, star, opts):
        self._state = st = MapState(pool, fn, iterables, star, opts)
        self._it = _shm._core.Results(Collector(st).chunks(), InlineTail)

    def __iter__(self):
        return self._it

    def __next__(self):
        return next(self._it)

    def close(self):
        """Stop the map early; workers drop what they were doing for it."""
        self._state.finish()

    @property
    def stats(self):
        return self._state.stats

    def __repr__(self):
        return "<pmaprt map %s items=%s>" % (self._state.stats.mode, self._state.n)


def job_segment(pool, segs, desc, data_size, blobs=()):
    """An index-mode job's segment, [data area][descriptor] (added to segs),
    or None when the descriptor fits inline and there is no data. Returns
    (seg, desc_off)."""
    if len(desc) <= _shm.INLINE_DESC and not data_size:
        return None, 0
    desc_off = (data_size + 63) // 64 * 64
    seg = pool.share(desc_off + len(desc), reserve=bool(data_size))
    segs.append(seg)
    _arrays.write_blobs(seg.buf, blobs)  # the one copy of the data, in threads when large
    seg.buf[desc_off: desc_off + len(desc)] = desc
    return seg, desc_off


class MapState:
    """One map's state, and the job the runtime reports to (the attributes
    and methods the runtime uses: gen, off, timeout, backlog, suspect, spmd,
    on_record, wait_key, has_news, fail_here, on_lost, on_lost_feed_chunk,
    on_load_crash, reconcile, flush_backlog, on_worker_death)."""

    # A worker died moving items between shared words: the pool reconciles
    # this job (Pool._reconcile) once it gets a consistent view.
    suspect = False
    first = 0                      # index mode: items before this ran elsewhere
    wake_due = None                # set when posted (the Job protocol)

    def __init__(self, pool, fn, iterables, star, opts):
        check_call(fn, iterables)
        self.opts = opts
        self.retries, self.timeout, self.ret = opts.retries, opts.timeout, opts.return_errors
        self.max_items = opts.max_items_per_worker
        self.guard = _memguard.MemoryGuard(opts.memory_floor)
        self.tracked = opts.tracked
        axis_name, out, chunks, progress = opts.axis_name, opts.out, opts.chunks, opts.progress
        self.flags = (FLAG_PROGRESS if self.tracked else 0) | (FLAG_ON_ERROR_RETURN if self.ret else 0)
        pool._check_open()
        self.pool = pool
        self.fn = fn
        self.iterables = iterables
        self.ordered = opts.ordered
        # Items that must run in workers (retries, timeouts) never run inline.
        self.inline_ok = opts.inline in ("auto", True) and not self.tracked
        self.inline_from = None    # the caller runs the items from here on
        chunksize = opts.chunksize
        if chunksize is None:
            chunksize = cached_chunksize(fn)
        self.fixed = check_chunksize(chunksize, _shm.RANGE_N_MAX)
        self.nwork = pool.workers if opts.workers is None else min(pool.workers, opts.workers)
        # SPMD map (axis_name, spmd.py): one shard per worker, all at once, never
        # inline and never retried; self.spmd is the collective segment's parent side.
        self.spmd = self.spmd_map = None
        if axis_name is not None:
            iterables, spmd_n = spmd_shards(iterables, axis_name, self.nwork, opts)
            self.iterables = iterables
            self.inline_ok = False
            self.fixed = 1
            self.nwork = max(1, spmd_n)
        self.stats = MapStats(nworkers=pool.workers)
        self.feeder = None          # feed mode: feed.Feeder
        self.book = ResultBook(self.ordered)
        self.recovery = Recovery(self.book, self.stats, retries=self.retries,
                                 timeout=self.timeout, return_errors=self.ret,
                                 tracked=self.tracked, nwork=self.nwork)
        self.backlog = self.recovery.backlog   # the runtime reads it (see flush_backlog)
        self.segs = []              # segments to free when the map ends (shared with the pieces)
        self.gen = None
        self.costs = MapCosts(self.fixed, self.nwork)
        self.n = None
        self.n_input = None        # a sized input's length (n stops at an unpicklable item)
        self.progress = None       # a tqdm bar (progress=True)
        self.star = star = star or len(iterables) > 1
        # arrays (_arrays/): chunks= blocks, out=, shared arrays and out-of-band buffers
        self.arrays = _arrays.JobArrays(pool, self.segs, iterables, out, chunks, star)
        self.iterables = iterables = self.arrays.iterables
        self.window = Window(self.book, self.costs, self.guard, nwork=self.nwork, pool=pool,
                             arrays=self.arrays, segs=self.segs)
        if out is not None:
            self.inline_ok = False  # the workers write out=; results here would not
            if self.ret:
                raise ValueError("pmaprt: out= and on_error='return' do not go together: an "
                                 "exception cannot take an array row's place")
        self.probe = False
        if self.inline_ok and not self.fixed and not star and not progress and out is None \
                and chunks is None and axis_name is None and len(iterables) == 1 \
                and type(iterables[0]) in TAIL_TYPES:
            # The first item here, then timed pieces while items are cheap:
            # no job until an item proves dear (inline.py, handoff.py).
            self.probe, self.probe_est = True, PROBE_MARGIN * probe_item_s(self.nwork)
            self.n = self.n_input = len(iterables[0])
            self.feed_mode = False
            self.slot, self.off = None, None
            self.stats.mode = "inline"
            self.stats.t0 = time.perf_counter()
            return
        if progress:
            self.progress = open_progress(fn, iterables)  # before any job: tqdm may be missing
        fn_bytes = self.arrays.dumps_fn(fn)
        plan = plan_input(iterables, star, self.arrays.encoder,
                          upfront=None if axis_name is not None else self.window.size(self._may_inline()))
        if axis_name is not None:
            with pool._lock:
                self.spmd = _collective.SpmdParent(pool, spmd_n, axis_name)
                self.spmd_map = SpmdMap(self.spmd)
                self.book.on_fail = self.spmd_map.failed
                self.segs.append(self.spmd.seg)
        self.feed_mode = isinstance(plan, FeedPlan)
        self.stats.mode = "feed" if self.feed_mode else "index"
        self.stats.t0 = time.perf_counter()
        with pool._lock:
            if self.feed_mode:
                self._start_feed(plan, fn_bytes, star)
            else:
                self._start_index(plan, fn_bytes, star)
        self.arrays.started = True
        if self.progress is not None and self.n is not None and self.progress.total != self.n:
            self.progress.total = self.n   # a sized input that stops early (unpicklable item)
            self.progress.refresh()

    # --- starting

    def _start_index(self, plan, fn_bytes, star, start=0, dear=False):
        if self.n_input is None:
            self.n_input = min(len(x) for x in self.iterables)
        self.n = plan.n
        if plan.n > _shm.RANGE_LO_MAX:
            raise OverflowError("pmaprt: a map of more than %d items is not supported" % _shm.RANGE_LO_MAX)
        if plan.error is not None:
            self.book.fail_at(*plan.error)
        desc = _serialize.dumps_obj((fn_bytes, star, plan.spec, self.pool.seed)
                                    + self.arrays.desc_extra())
        seg, desc_off = job_segment(self.pool, self.segs, desc, plan.data_size, plan.blobs)
        self.first = start
        limit = self.window.open(self.n, start, plan.lazy, seg, self._may_inline())
        self.gen, self.slot, self.off = self.pool._post(
            self, desc, MODE_INDEX, self.n, limit, self.fixed, self.nwork, seg, desc_off,
            self.flags, self.max_items,
            spmd_seg=self.spmd.seg if self.spmd is not None else None, start=start, dear=dear)
        self.window.off = self.off

    def start_after_probe(self, k, mode):
        """Items ran here (the probe, or an inline rest) and proved dear: post
        the job for items k.. (items before k ran here). Called on the
        handoff thread while item k - 1 still runs here (handoff.py). False if it cannot
        be posted (the function cannot be pickled, every job slot is busy):
        the rest then runs here too, to the input's end (items need no
        pickling here). Raises the pool's error if it was closed or broken
        since map()."""
        self.pool._check_open()
        try:
            fn_bytes = self.arrays.dumps_fn(self.fn)
        except Exception:
            return False
        # Items of a list before k are not pickled (start=k: placeholders).
        plan = plan_input(self.iterables, self.star, self.arrays.encoder,
                          upfront=k + self.window.size(self._may_inline()), start=k)
        book = self.book
        saved = self.n, book.consumed, book.error_at, dict(book.errors)
        book.consumed = k
        try:
            with self.pool._lock:
                self.pool._check_open()
                self._start_index(plan, fn_bytes, self.star, start=k, dear=True)
        except TooManyMapsError:
            with self.pool._lock:
                for seg in self.segs:   # every job slot busy: the rest runs here
                    self.pool.unshare(seg)
            self.segs.clear()
            self.n, book.consumed, book.error_at, book.errors = saved
            return False
        self.stats.mode = mode
        self.arrays.started = True
        return True

    def _start_feed(self, plan, fn_bytes, star):
        self.feeder = feeder = Feeder(
            plan.iterator, self.book, self.stats, self.costs.sizer, nwork=self.nwork,
            quota=self.max_items or self.pool.max_items_per_worker, guard=self.guard,
            pool=self.pool, arrays=self.arrays, segs=self.segs, costs=self.costs)
        desc = pickle.dumps((fn_bytes, star, feeder.spec(), self.pool.seed)
                            + self.arrays.desc_extra(), 5)
        seg, desc_off = feeder.share_segment(desc)
        self.gen, self.slot, self.off = self.pool._post(
            self, desc, MODE_FEED, -1, 0, self.fixed, self.nwork, seg, desc_off,
            self.flags, self.max_items)
        feeder.posted(self.off, self.flags)

    def feed(self, refill=False):
        """Feed mode: publish more chunks (refill: the one held back first)."""
        feeder = self.feeder
        if refill:
            feeder.refill()
        else:
            feeder.feed()
        if self.n is None and feeder.total is not None:
            # The input ended: it had this many items.
            self.n = n = feeder.total
            if self.progress is not None:
                self.progress.total = n
                self.progress.refresh()

    def _may_inline(self):
        """Whether the map may still go inline (the window is kept short then)."""
        return self.inline_ok and not self.fixed

    # --- the consumer's side (collect.Collector)

    def take(self, rec, start):
        """(results, exc) of a record taken by the consumer."""
        if self.arrays.on_take is not None:
            self.arrays.on_take(start, rec[1])  # a plain out=: copy this chunk's rows back
        return decode_record(rec, start, self.costs.dec)

    def raise_limit(self):
        """The consumer moved: move the window (index mode)."""
        stop = self.window.advance(self.n, self._may_inline())
        if stop is not None:
            # An item that cannot be pickled: the map ends there, and not inline.
            self.inline_ok = False
            self.n = min(self.n, stop)

    # --- records from the pool (lock held)

    def on_record(self, w, kind, start, count, payload, t0, t1, cpu, stolen, enc=0.0):
        if self.spmd is not None and self.spmd_map.on_record(self.book, self.take, kind, start,
                                                             count, payload):
            return
        if not self.book.add(start, kind, count, payload):
            return
        self.recovery.load_crashes = 0
        self.costs.on_bytes(count, record_bytes(kind, payload))
        if not self.feed_mode and self.spmd is None and self.inline_from is None:
            self.window.hold_back(self._may_inline())
        self.arrays.done(start)
        if kind != REC_ERROR:
            self.stats.record(w, start, count, t0, t1, stolen)
            self.costs.on_chunk(count, t0, t1, cpu, enc, self.book.consumed)
        if self.feed_mode:
            self.feeder.on_record(start)

    def wait_key(self):
        """What a parent asleep for this map waits for (see H_PARENT_WANT):
        the record at the consumer's position, for an ordered map over
        index ranges; 0 (any record) where others matter too (a feed to
        refill, a progress bar, retries and timeouts, an SPMD map)."""
        if self.ordered and not self.feed_mode and self.gen is not None \
                and self.progress is None and self.spmd is None and not self.tracked:
            return ((self.slot + 1) << WANT_SHIFT) | self.book.consumed
        return 0

    def has_news(self):
        return self.book.has_news()

    def fail_here(self, exc):
        """The map raises exc at the consumer's position."""
        self.book.fail_here(exc)

    def on_worker_death(self, w, pid, rc, what):
        """Pool._on_death, for an SPMD map: worker w died."""
        self.spmd_map.on_worker_death(self.book, w, pid, rc, what, self.n, self.pool._r, self.off)

    # --- lost work (pool lock held): recovery.py, feed.py

    def on_lost(self, what, pid, rc, lo, cn, done, timed_out):
        pieces = self.recovery.on_lost(what, pid, rc, lo, cn, done, timed_out)
        if pieces is not None:
            self._requeue(lo, cn, pieces)

    def on_load_crash(self, err):
        self.recovery.on_load_crash(err)

    def on_lost_feed_chunk(self, k):
        self.feeder.on_lost_chunk(k)

    def _requeue(self, lo, cn, pieces):
        """Run the pieces of lost chunk [lo, lo+cn) again."""
        if self.feed_mode:
            self.feeder.refeed_pieces(lo, cn, pieces)
        else:
            self.backlog.extend(pieces)
            self.flush_backlog()

    def flush_backlog(self):
        """Hand lost ranges to the workers through the job's retry words."""
        r = self.pool._r
        if r is None or self.gen is None:
            return
        self.recovery.flush(r, self.off + self.pool._layout.retry_off, self.pool.wake_workers)

    def reconcile(self, curs, words, nxt):
        """Pool._reconcile: a worker died moving items between shared words,
        and may have taken some it had recorded nowhere (between a claim's
        compare-and-swap and the store that records it). Given a consistent
        view of the job, the items (index mode) or chunks (feed mode) found
        nowhere run again."""
        if self.gen is None or self.spmd is not None:
            return
        if self.feed_mode:
            self.feeder.reconcile(curs, nxt, self.gen)
            return
        end = self.n if self.inline_from is None else min(self.n, self.inline_from)
        for a, k in self.recovery.reconcile(curs, words, nxt, self.gen, self.first, end):
            self._requeue(a, k, [(a, k)])

    # --- the end

    def finish(self, abandoned=False):
        """The map ended (or was abandoned, or the caller runs the rest):
        retire the job, free its segments. abandoned: dropped unread (no
        exception of the caller's is about this map)."""
        if self.gen is None and not self.segs:
            if self.probe and not self.stats.wall_s:
                self.stats.finish(time.perf_counter() - self.stats.t0)
            return
        exc = None if abandoned else sys.exc_info()[1]
        self.stats.finish(time.perf_counter() - self.stats.t0)
        if self.progress is not None:
            self.progress.close()
        pool = self.pool
        if isinstance(exc, KeyboardInterrupt):
            # The workers may be deep in long items: end them now, leave nothing behind.
            self.gen = None
            self.segs.clear()
            pool.terminate()    # (a terminated default pool is replaced on its next use)
            return
        if self.spmd is not None and not self.spmd.complete():
            with pool._lock:
                self.spmd.abort(None)   # ranks still waiting in a collective stop now
        if self.gen is not None:
            pool._retire(self.gen, self.slot, self.off)
            self.gen = None
        if pool._res.ctl is not None:
            with pool._lock:
                for seg in self.segs:
                    pool.unshare(seg)
        self.segs.clear()
        self.arrays.release()
