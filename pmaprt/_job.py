"""One map, on the parent's side: planner, feeder and collector.

    caller --iterable--> plan_input: index ranges (sized) or feed (unsized)
                           |
       index: post the job with a window `limit`; raise it as the caller
              consumes, so a lazy consumer bounds what runs ahead.
       feed:  pull items, encode chunks into the job segment's table and
              byte ring, publish them; in-flight items are bounded.
                           |
    Pool.wait drains the rings -> on_record: chunk results by start index
                           |
    _chunks yields each chunk's result list in order (or as they come); the
    iterator the caller sees is itertools.chain over them, so each item costs
    a C-level step, not a generator resume. A failure is raised at the
    position map would raise it.

Inline: when the workers' measured CPU per item shows that dispatching cannot
beat map itself (the parent's own cost of decoding a result is about as large
as computing it), the parent claims the rest of the input and yields
``map(fn, rest)``, as map would run it.
"""
import collections
import itertools
import operator
import os
import pickle
import sys
import time

from . import _array, _serialize, _shm, _sched
from ._access import FEED_ENTRY, FeedPlan, plan_input, _unpicklable_item
from ._errors import RemoteTraceback
from ._shm import MODE_FEED, MODE_INDEX, REC_ERROR, S_FLAGS, S_LIMIT, S_N, S_NEXT, FLAG_FEED_DONE
from ._stats import MapStats, WorkerStats

# Index mode: how far past the consumer workers may run, in chunks per worker
# (at least WINDOW_MIN_ITEMS items). A lazy consumer that stops leaves at most
# this much work done ahead of it.
WINDOW_CHUNKS_PER_WORKER = 16
WINDOW_MIN_ITEMS = 16384
# Feed mode: chunks in flight per worker, and the byte ring for their items.
FEED_CHUNKS_PER_WORKER = 4
FEED_MIN_ITEMS = 64
FEED_TABLE = 1024
FEED_RING = 8 * 1024 * 1024
# A fed chunk bigger than this gets a segment of its own.
FEED_BIG = FEED_RING // 4
# Inline: decide after this many chunks have been measured, only when the rest
# is worth at least INLINE_MIN_WORK_S of serial work, and only when the model
# predicts the parallel path slower than map by this margin or less.
INLINE_MIN_CHUNKS = 4
INLINE_MIN_WORK_S = 0.005
INLINE_MARGIN = 1.25
# The caller's cost of taking one item from a result list (C-level iteration).
CONSUME_ITEM_S = 1e-8

try:
    _CORES = len(os.sched_getaffinity(0))
except AttributeError:
    _CORES = os.cpu_count() or 1


def _check_chunksize(chunksize):
    if chunksize is None:
        return 0
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError("pmaprt: chunksize must be a positive int or None, got %r" % (chunksize,))
    if chunksize < 1:
        raise ValueError("pmaprt: chunksize must be >= 1 (or None for adaptive), got %d" % chunksize)
    return min(chunksize, _shm.RANGE_N_MAX)


class MapJob:
    """The iterator returned by pmap and Pool.map; ``.stats`` has its MapStats.

    It holds the job's state and the iterator over it; the state does not
    refer back, so an abandoned map is finalized as soon as it is dropped.
    """

    __slots__ = ("_state", "_it", "__weakref__")

    def __init__(self, pool, fn, iterables, star, chunksize, ordered, workers, progress,
                 inline="auto", out=None, chunks=None):
        self._state = st = _JobState(pool, fn, iterables, star, chunksize, ordered, workers,
                                     progress, inline, out=out, chunks=chunks)
        self._it = itertools.chain.from_iterable(st._chunks())

    def __iter__(self):
        return self._it

    def __next__(self):
        return next(self._it)

    def close(self):
        """Stop the map early; workers drop what they were doing for it."""
        self._state.abandon()

    @property
    def stats(self):
        return self._state.stats

    def __repr__(self):
        return "<pmaprt map %s items=%s>" % (self._state.stats.mode, self._state.n)


class _JobState:
    def __init__(self, pool, fn, iterables, star, chunksize, ordered, workers, progress, inline,
                 out=None, chunks=None):
        if not callable(fn):
            raise TypeError("pmaprt: %r is not callable" % (fn,))
        if not iterables:
            raise TypeError("pmap() must have at least two arguments.")
        for i, x in enumerate(iterables):
            try:
                iter(x)
            except TypeError:
                raise TypeError("pmaprt: argument %d of the map (%s) is not iterable"
                                % (i + 2, type(x).__name__)) from None
        if inline not in ("auto", False, True):
            raise ValueError("pmaprt: inline must be 'auto' or False, got %r" % (inline,))
        pool._check_open()
        self.pool = pool
        self.fn = fn
        self.iterables = iterables
        self.ordered = ordered
        self.inline_ok = inline == "auto"
        self.inline_from = None
        if chunksize is None:
            from ._tune import cached_chunksize
            chunksize = cached_chunksize(fn)
        self.fixed = _check_chunksize(chunksize)
        self.nwork = pool.workers if workers is None else min(pool.workers, workers)
        self.stats = MapStats(workers=[WorkerStats(w) for w in range(pool.workers)])
        self.pending = {}          # start index -> (kind, count, payload)
        self.arrived = collections.deque()  # unordered: start indices in arrival order
        self.errors = {}           # index -> exception raised there (parent side)
        self.error_at = None
        self.here_error = None     # fails wherever the consumer is
        self.consumed = 0
        self.records = 0
        self.segs = []
        self.gen = None
        self.t_item = _sched.ChunkSizer(self.fixed)
        self.cpu_item = None       # workers' CPU seconds per item (EWMA)
        self.dec_item = None       # the parent's decode seconds per item (EWMA)
        self.avg_chunk = 1.0
        self.n = None
        self._progress = None
        self.star = star = star or len(iterables) > 1
        # arrays (_array.py): chunks= blocks, out=, shared arrays and out-of-band buffers
        self.arrays = _array.JobArrays(pool, self.segs, iterables, out, chunks, star)
        self.iterables = iterables = self.arrays.iterables
        if out is not None:
            self.inline_ok = False  # the workers write out=; results here would not
        fn_bytes = _serialize.dumps_fn(fn)
        plan = plan_input(iterables, star, self.arrays.encoder)
        self.feed_mode = isinstance(plan, FeedPlan)
        self.stats.mode = "feed" if self.feed_mode else "index"
        self.stats.t0 = time.perf_counter()
        with pool._lock:
            if self.feed_mode:
                self._start_feed(plan, fn_bytes, star)
            else:
                self._start_index(plan, fn_bytes, star)
        self.arrays.started = True
        if progress:
            from tqdm.auto import tqdm
            self._progress = tqdm(total=self.n, unit="it")

    # --- starting

    def _segment_for(self, desc, data_size, blobs=()):
        """A job segment holding [data area][descriptor], or None when the
        descriptor fits inline and there is no data. Returns (seg, desc_off)."""
        if len(desc) <= _shm.INLINE_DESC and not data_size:
            return None, 0
        desc_off = (data_size + 63) // 64 * 64
        seg = self.pool.share(desc_off + len(desc), reserve=bool(data_size))
        self.segs.append(seg)
        _array.write_blobs(seg.buf, blobs)  # the one copy of the data, in threads when large
        seg.buf[desc_off: desc_off + len(desc)] = desc
        return seg, desc_off

    def _start_index(self, plan, fn_bytes, star):
        self.n = plan.n
        if plan.n > _shm.RANGE_LO_MAX:
            raise OverflowError("pmaprt: a map of more than %d items is not supported" % _shm.RANGE_LO_MAX)
        if plan.error is not None:
            self.fail_at(*plan.error)
        desc = _serialize.dumps_obj((fn_bytes, star, plan.spec, self.pool.seed)
                                    + self.arrays.desc_extra())
        seg, desc_off = self._segment_for(desc, plan.data_size, plan.blobs)
        self.limit = min(self.n, self._window())
        self.gen, self.slot, self.off = self.pool._post(
            self, desc, MODE_INDEX, self.n, self.limit, self.fixed, self.nwork, seg, desc_off)

    def _start_feed(self, plan, fn_bytes, star):
        self.it = plan.iterator
        self.fed = 0                  # items published
        self.chunks = 0               # chunks published
        self.feed_done = False
        self._held = None
        # chunk -> [first item, first byte in the ring (None: own segment), end byte or segment, done]
        self.outstanding = collections.OrderedDict()
        self.start_chunk = {}
        self.ring_tail = 0
        self.table_off = 0
        self.ring_off = FEED_TABLE * FEED_ENTRY.size
        spec = ("feed", self.table_off, FEED_TABLE, self.ring_off, FEED_RING)
        desc = pickle.dumps((fn_bytes, star, spec, self.pool.seed) + self.arrays.desc_extra(), 5)
        desc_off = self.ring_off + FEED_RING
        self.seg = self.pool.share(desc_off + len(desc), reserve=False)
        self.segs.append(self.seg)
        self.seg.buf[desc_off: desc_off + len(desc)] = desc
        self.gen, self.slot, self.off = self.pool._post(
            self, desc, MODE_FEED, -1, 0, self.fixed, self.nwork, self.seg, desc_off)

    def _window(self):
        return max(WINDOW_MIN_ITEMS, int(WINDOW_CHUNKS_PER_WORKER * self.nwork * self.avg_chunk))

    # --- records from the pool (lock held)

    def on_record(self, w, kind, start, count, payload, t0, t1, cpu, stolen):
        self.pending[start] = (kind, count, payload)
        self.records += 1
        self.arrays.done(start)
        if not self.ordered:
            self.arrived.append(start)
        if kind != REC_ERROR:
            self.stats.record(w, start, count, t0, t1, stolen)
            self.avg_chunk = 0.8 * self.avg_chunk + 0.2 * count
            if count:
                self.t_item.observe(count, t1 - t0)
                c = cpu / count
                self.cpu_item = c if self.cpu_item is None else 0.5 * c + 0.5 * self.cpu_item
        if self.feed_mode:
            k = self.start_chunk.pop(start, None)
            if k is not None and k in self.outstanding:
                self.outstanding[k][3] = True
                self._free_fed()

    def has_news(self):
        return bool(self.pending) or self.here_error is not None

    def fail_at(self, index, exc):
        """The map raises exc when the consumer reaches item `index`."""
        if index not in self.errors:
            self.errors[index] = exc
        if self.error_at is None or index < self.error_at:
            self.error_at = index

    def fail_here(self, exc):
        """The map raises exc at the consumer's position."""
        if self.here_error is None:
            self.here_error = exc

    # --- feeding (consumer's thread)

    def _feed(self):
        pool = self.pool
        with pool._lock:
            while not self.feed_done:
                if len(self.outstanding) >= min(FEED_TABLE, FEED_CHUNKS_PER_WORKER * self.nwork):
                    return
                c = self.t_item.size()
                if self.fed - self.consumed > max(FEED_MIN_ITEMS, FEED_CHUNKS_PER_WORKER * self.nwork * c):
                    return
                items = []
                app = items.append
                it = self.it
                try:
                    for _ in range(c):
                        app(next(it))
                except StopIteration:
                    self.feed_done = True
                except Exception as e:
                    self.feed_done = True
                    self.fail_at(self.fed + len(items), e)
                if items:
                    try:
                        data = _serialize.dumps_list(items, self.arrays.encoder)
                    except _serialize.PICKLE_ERRORS:
                        bad = _serialize.find_unpicklable(items)
                        j, exc = bad if bad is not None else (0, TypeError("cannot be pickled"))
                        self.feed_done = True
                        self.fail_at(self.fed + j, _unpicklable_item(self.fed + j, items[j], exc))
                        items = items[:j]
                        data = _serialize.dumps_list(items, self.arrays.encoder) if items else None
                    self.arrays.hold(self.fed)  # shared arrays in this chunk: kept until its record
                    if items and not self._publish(items, data):
                        # no room in the ring: keep the items for the next round
                        self._held = (items, data)
                        return
                if self.feed_done:
                    r = pool._r
                    r.store64(self.off + S_N, self.fed)
                    r.store32(self.off + S_FLAGS, FLAG_FEED_DONE)
                    self.n = self.fed
                    if self._progress is not None:
                        self._progress.total = self.n
                        self._progress.refresh()

    def _publish(self, items, data):
        """Write one chunk and publish it; False when the ring has no room yet."""
        nbytes = len(data)
        k = self.chunks
        seg_id = 0
        if nbytes > FEED_BIG or _array.has_inline_buffers(data):
            # (arrays decoded in a worker view their chunk's memory: never the ring, which is reused)
            seg = self.pool.share(nbytes)
            _array.write_blobs(seg.buf, [(0, data)])
            self.segs.append(seg)
            seg_id, doff, bstart, bend = seg.id, 0, None, seg
        else:
            pos = self.ring_tail % FEED_RING
            skip = FEED_RING - pos if pos + nbytes > FEED_RING else 0
            if self.ring_tail + skip + nbytes - self._ring_head() > FEED_RING:
                return False
            bstart = self.ring_tail + skip
            doff = self.ring_off + bstart % FEED_RING
            self.seg.buf[doff: doff + nbytes] = data
            self.ring_tail = bend = bstart + nbytes
        FEED_ENTRY.pack_into(self.seg.buf, self.table_off + (k % FEED_TABLE) * FEED_ENTRY.size,
                             self.fed, len(items), nbytes, doff, seg_id)
        self.outstanding[k] = [self.fed, bstart, bend, False]
        self.start_chunk[self.fed] = k
        self.fed += len(items)
        self.chunks = k + 1
        self.pool._r.store64(self.off + S_LIMIT, self.chunks)
        self.pool.wake_workers()
        return True

    def _ring_head(self):
        """The first ring byte still in use: the start of the oldest chunk in the ring."""
        for entry in self.outstanding.values():
            if entry[1] is not None:
                return entry[1]
        return self.ring_tail

    def _free_fed(self):
        while self.outstanding:
            k, entry = next(iter(self.outstanding.items()))
            if not entry[3]:
                break
            del self.outstanding[k]
            if entry[1] is None:
                self.segs.remove(entry[2])
                self.pool.unshare(entry[2])

    # --- inline

    def _want_inline(self):
        """The cost model: map's time per item (the workers' CPU per item)
        against the parallel path's, which is bounded by the parent's decode,
        by all the CPU shared over the cores, and by the workers."""
        if not self.inline_ok or self.fixed or self.records < INLINE_MIN_CHUNKS:
            return False
        t, p = self.cpu_item, self.dec_item
        if t is None or p is None:
            return False
        p += CONSUME_ITEM_S
        if not self.feed_mode:
            nxt = self.pool._r.load64(self.off + S_NEXT)
            if (self.n - nxt) * t < INLINE_MIN_WORK_S:
                return False
        par = max(p, (t + p) / _CORES, t / self.nwork)
        return par * INLINE_MARGIN >= t

    def _go_inline(self):
        """Claim everything not yet claimed by a worker; returns where it starts."""
        self.inline_ok = False
        r = self.pool._r
        with self.pool._lock:
            if self.feed_mode:
                self.inline_from = self.fed
            else:
                while True:
                    nxt = r.load64(self.off + S_NEXT)
                    if nxt >= self.n or r.cas64(self.off + S_NEXT, nxt, self.n):
                        break
                self.inline_from = min(nxt, self.n)
        self.stats.mode += "+inline"

    def _inline_rest(self):
        """map(fn, items from inline_from on), as a C-level map object."""
        a = self.inline_from
        if self.feed_mode:
            held = self._held[0] if self._held is not None else []
            self._held = None
            rest = itertools.chain(held, self.it) if held else self.it
            return itertools.starmap(self.fn, rest) if self.star else map(self.fn, rest)
        end = self.n
        parts = [_tail(x, a, end) for x in self.iterables]
        if len(parts) > 1:
            return map(self.fn, *parts)
        return itertools.starmap(self.fn, parts[0]) if self.star else map(self.fn, parts[0])

    # --- consuming

    def _raise_limit(self):
        if self.feed_mode or self.limit >= self.n:
            return
        if self.limit - self.consumed < self._window() // 2:
            self.limit = min(self.n, self.consumed + self._window())
            with self.pool._lock:
                if self.pool._r is not None:
                    self.pool._r.store64(self.off + S_LIMIT, self.limit)
                    self.pool.wake_workers()

    def _end(self):
        """Items the workers deliver: all of them, or those before the inline part."""
        if self.inline_from is not None:
            return self.inline_from
        if self.feed_mode:
            return self.fed if self.feed_done and self._held is None else None
        return self.n

    def _take(self, rec, start):
        kind, count, payload = rec
        if self.arrays.on_take is not None:
            self.arrays.on_take(start, count)  # a plain out=: copy this chunk's rows back
        if kind == REC_ERROR:
            ok_payload, exc_bytes, tb_text, pid = pickle.loads(payload)
            ok = _serialize.loads_list(ok_payload)
            exc = pickle.loads(exc_bytes)
            index = start + len(ok)
            if tb_text:
                exc.__cause__ = RemoteTraceback(tb_text)
            _add_note(exc, "pmaprt: raised by the function on item %d of the map (worker pid %d)"
                      % (index, pid))
            return ok, exc
        t = time.perf_counter()
        results = _serialize.loads_list(payload)
        if count:
            d = (time.perf_counter() - t) / count
            self.dec_item = d if self.dec_item is None else 0.5 * d + 0.5 * self.dec_item
        return results, None

    def _wait(self):
        if self.here_error is not None:
            raise self.here_error
        if self.feed_mode and self.inline_from is None:
            self._refeed()
        self.pool.wait(self)

    def _refeed(self):
        held = self._held
        if held is not None:
            with self.pool._lock:
                if self._publish(*held):
                    self._held = None
                else:
                    return
        self._feed()

    def _chunks(self):
        """Yields result lists; the caller's iterator chains them."""
        try:
            pos = 0
            pending, arrived = self.pending, self.arrived
            if self.feed_mode:
                self._feed()
            while True:
                end = self._end()
                if end is not None and pos >= end:
                    break
                if self.ordered:
                    rec = pending.pop(pos, None)
                    start = pos
                else:
                    start = arrived.popleft() if arrived else None
                    rec = pending.pop(start) if start is not None else None
                if rec is None:
                    if self.error_at is not None and self.error_at <= pos:
                        raise self.errors[self.error_at]
                    self._wait()
                    continue
                results, exc = self._take(rec, start)
                pos += len(results)
                self.consumed = pos
                if self._progress is not None:
                    self._progress.update(len(results))
                yield results
                if exc is not None:
                    raise exc
                if self.inline_from is not None:
                    continue
                if self._want_inline():
                    self._go_inline()
                elif not self.feed_mode:
                    self._raise_limit()
                elif not self.feed_done:
                    self._refeed()
            if self.error_at is not None and (self.inline_from is None or self.error_at <= pos):
                raise self.errors[self.error_at]
            if self.inline_from is not None:
                self._finish()
                rest = self._inline_rest()
                if self._progress is not None:
                    rest = self._progress_wrap(rest)
                yield rest
        finally:
            self._finish()

    def _progress_wrap(self, it):
        bar = self._progress
        for x in it:
            bar.update(1)
            yield x

    def abandon(self):
        self._finish()

    def _finish(self):
        if self.gen is None and not self.segs:
            return
        exc = sys.exc_info()[1]
        self.stats.finish(time.perf_counter() - self.stats.t0)
        if self._progress is not None:
            self._progress.close()
        pool = self.pool
        if isinstance(exc, KeyboardInterrupt):
            # The workers may be deep in long items: end them now, leave nothing behind.
            self.gen = None
            self.segs = []
            pool.terminate()
            from . import _api
            _api._forget_default(pool)
            return
        if self.gen is not None:
            pool._retire(self.gen, self.slot, self.off)
            self.gen = None
        if pool._res.ctl is not None:
            with pool._lock:
                for seg in self.segs:
                    pool.unshare(seg)
        self.segs = []
        self.arrays.release()


def _tail(x, a, end):
    """Items a..end-1 of a sized input, as an iterable."""
    if isinstance(x, (range, list, tuple, str, bytes)):
        return x[a:end] if a else x
    if type(x).__module__ == "numpy" and type(x).__name__ == "ndarray":
        return x[a:end]
    return (x[i] for i in range(a, end))


def _add_note(exc, note):
    if hasattr(exc, "add_note"):
        try:
            exc.add_note(note)
        except Exception:
            pass
