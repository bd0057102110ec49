"""Taking a map's records into results: in order or as they come, with each
failure raised at the position map would raise it.

- `ResultBook`: what has arrived (records by start index, in arrival order
  for an unordered map), what failed and where, and how far the consumer
  has taken results. Plain state: recovery and the feed read it too.
- `decode_record`: one record's payload as its list of results (and the
  exception its chunk raised, if it did).
- `Collector`: the consumer's loop over them (the generator under the
  caller's iterator), and the inline part: taking the rest of the map into
  the caller when the cost model (inline.py) says so, in timed pieces that
  hand items turning dear back to the workers.
"""
import collections
import functools
import itertools
import pickle
import time

from .. import _arrays, _shm
from .._errors import RemoteTraceback, ReturnedError, add_note
from .._shm import REC_ERROR, REC_LOCAL, REC_RESULT_ERRORS, S_LIMIT, S_NEXT
from .handoff import handoff
from .inline import (HANDOFF_CONFIRM_S, INLINE_MIN_CHUNKS, PROBE_CLEAR_FACTOR,
                     PROBE_CLOCK_STRIDE, PROBE_DEAR_ITEM_S, PROBE_FACTOR, PROBE_FIRST_SLACK_S,
                     PROBE_HANDOFF_S, PROBE_SLACK_S, PROBE_STRIKES, TAIL_TYPES, InlineTail,
                     probe_piece_s, rest_worth_inline)


class ResultBook:
    """Records and failures of one map, by item index. An error is kept at
    its index and raised when the consumer reaches it (ordered) or as soon
    as the results that arrived before it are taken (unordered)."""

    def __init__(self, ordered):
        self.ordered = ordered
        self.pending = {}          # start index -> (kind, count, payload)
        self.arrived = collections.deque()  # unordered: start indices in arrival order
        self.recorded = {}         # start -> count of the chunks whose record arrived
        self.records = 0
        self.errors = {}           # index -> exception raised there (parent side)
        self.error_at = None
        self.here_error = None     # fails wherever the consumer is
        self.err_rec = None        # lowest index where a chunk that arrived raised
        self.consumed = 0          # items the consumer has taken
        self.held_bytes = 0        # bytes of the records arrived and not yet taken
        # Called as on_fail(book, index, exc) after each fail_at (an SPMD
        # map's ranks fail together).
        self.on_fail = None

    def add(self, start, kind, count, payload):
        """A chunk's record arrived; False if it had arrived before (cannot
        happen: a chunk is run again only when its record is missing)."""
        if start in self.recorded:
            return False
        self.recorded[start] = count
        self.pending[start] = (kind, count, payload)
        self.held_bytes += record_bytes(kind, payload)
        self.records += 1
        if not self.ordered:
            self.arrived.append(start)
        if kind == REC_ERROR and (self.err_rec is None or start + count < self.err_rec):
            self.err_rec = start + count   # where the chunk's function raised
        return True

    def put_local(self, idx, results):
        """Results made here (a returned error for an item that killed its worker)."""
        self.pending[idx] = (REC_LOCAL, len(results), results)
        self.recorded[idx] = len(results)
        if not self.ordered:
            self.arrived.append(idx)

    def fail_at(self, index, exc):
        """The map raises exc when the consumer reaches item `index`."""
        if index not in self.errors:
            self.errors[index] = exc
        if self.error_at is None or index < self.error_at:
            self.error_at = index
        if self.on_fail is not None:
            self.on_fail(self, index, exc)

    def fail_here(self, exc):
        """The map raises exc at the consumer's position."""
        if self.here_error is None:
            self.here_error = exc

    def has_news(self):
        """Whether the consumer can go on without waiting. Ordered: only the
        record at its position counts (records further on do not let it
        move; returning for them would make the parent spin, taking a core from
        the workers, whenever results arrive out of order)."""
        if self.here_error is not None:
            return True
        if self.ordered:
            return self.consumed in self.pending or (
                self.error_at is not None and self.error_at <= self.consumed)
        return bool(self.arrived) or self.error_at is not None

    def keep_errors_before(self, end):
        """Items from `end` on run here and need no pickling: an item found
        unpicklable there is no error of this map any more."""
        errs = {i: e for i, e in self.errors.items() if i < end}
        if len(errs) < len(self.errors):
            self.errors = errs
            self.error_at = min(errs) if errs else None


def record_bytes(kind, payload):
    """The memory a record holds until it is taken: its payload, or the
    mapping its arrays lie in (results made here hold none of ours)."""
    if kind == REC_LOCAL:
        return 0
    m = getattr(payload, "mapping", None)
    if m is not None:
        return m.size
    return len(payload)


def decode_record(rec, start, dec=None):
    """(results, exc) of record rec = (kind, count, payload) of the chunk at
    `start`: exc is the exception the chunk's function raised after those
    results, or None. dec (an inline.PerItem): gets the decode seconds per
    item of plain result records."""
    kind, count, payload = rec
    if kind == REC_LOCAL:
        return payload, None
    if kind == REC_RESULT_ERRORS:
        results = _arrays.loads_list(payload)
        for i, v in enumerate(results):
            if type(v) is ReturnedError:
                results[i] = v.rebuild()
        return results, None
    if kind == REC_ERROR:
        ok_payload, exc_bytes, tb_text, pid = pickle.loads(payload)
        ok = _arrays.loads_list(ok_payload)
        exc = pickle.loads(exc_bytes)
        index = start + len(ok)
        if tb_text:
            exc.__cause__ = RemoteTraceback(tb_text)
        add_note(exc, "pmaprt: raised by the function on item %d of the map (worker pid %d)"
                 % (index, pid))
        return ok, exc
    t = time.perf_counter()
    results = _arrays.loads_list(payload)
    if count and dec is not None:
        # Per item, from the largest chunks only: a chunk's decode has a
        # fixed part that the first, small chunks (1, 4, 16 items) would
        # charge to each item, making items of a few microseconds look not
        # worth the workers.
        dec.add(time.perf_counter() - t, count)
    return results, None


class Collector:
    """The consumer's side of one map (`job`, a job.MapState): yields each
    chunk's result list in order (or as they come) for _core.Results to
    chain, waits on the pool when none is ready, keeps the window moving or
    the feed going, and takes the map over in the caller (inline) when the
    cost model says so, handing dear items back to the workers.

    It refers to the job and the job never to it or its generator: the
    caller's iterator alone keeps the generator, so an abandoned map is
    finalized as soon as it is dropped."""

    __slots__ = ("job",)

    def __init__(self, job):
        self.job = job

    def __del__(self):
        # The generator's frame alone holds this object. A map dropped
        # before its first item was asked for never ran the generator's
        # `finally`: it ends here, its slot and segments freed (a started
        # map ended there already; finish() is then a no-op).
        self.job.finish(abandoned=True)

    def chunks(self):
        """Yields result lists; the caller's iterator chains them."""
        job = self.job
        book = job.book
        try:
            pos = 0
            pending, arrived = book.pending, book.arrived
            if job.probe:
                # The start of a map over a list, tuple or range (see inline.PROBE_PIECE_S).
                done, posted = yield from self._probe()
                if posted is None:
                    posted = done < job.n_input and job.start_after_probe(done, "probe+index")
                if not posted:
                    if done < job.n_input:
                        yield InlineTail((job.fn, job.iterables[0], done, job.n_input))
                    return
                pos = done
            if job.feed_mode:
                job.feed()
            while True:     # again when an inline rest hands dear items back
                while True:
                    end = self._end()
                    if end is not None and pos >= end:
                        break
                    if book.ordered:
                        rec = pending.pop(pos, None)
                        start = pos
                    else:
                        start = arrived.popleft() if arrived else None
                        rec = pending.pop(start) if start is not None else None
                    if rec is not None:
                        book.held_bytes -= record_bytes(rec[0], rec[2])
                    else:
                        # Ordered: an error is raised where map would raise it.
                        # Unordered: as soon as it is known (once the results that
                        # arrived before it are yielded), like a result in finishing order.
                        if book.error_at is not None and (book.error_at <= pos or not book.ordered):
                            raise book.errors[book.error_at]
                        self._wait()
                        continue
                    results, exc = job.take(rec, start)
                    pos += len(results)
                    book.consumed = pos
                    if job.progress is not None:
                        job.progress.update(len(results))
                    yield results
                    if exc is not None:
                        raise exc
                    if job.inline_from is not None:
                        continue
                    if self._want_inline():
                        self._go_inline()
                    elif not job.feed_mode:
                        job.raise_limit()
                    elif not job.feeder.feed_done:
                        job.feed(refill=True)
                if book.error_at is not None and (job.inline_from is None or book.error_at <= pos):
                    raise book.errors[book.error_at]
                if job.inline_from is not None:
                    job.finish()
                    rest = self._inline_rest()
                    if job.progress is not None:
                        rest = _counted(_tail_iter(rest), job.progress)
                    elif type(rest) is InlineTail:
                        # Timed pieces, as a probed map's: items that turn
                        # dear (a cost shift) go back to the workers, in a job
                        # posted for the rest, rather than run serially here.
                        done, posted = yield from self._timed_inline(
                            job.inline_from, PROBE_FACTOR * job.costs.cpu_item, self._post_rest)
                        if done < job.n_input:
                            if posted is None:
                                posted = self._post_rest(done)
                            if posted:
                                pos = done
                                continue
                            yield InlineTail((job.fn, job.iterables[0], done, job.n_input))
                        return
                    yield rest
                return
        finally:
            job.finish()

    def _end(self):
        """Items the workers deliver: all of them, or those before the inline part."""
        job = self.job
        if job.inline_from is not None:
            return job.inline_from
        if job.feed_mode:
            return job.feeder.end()
        return job.n

    def _wait(self):
        job = self.job
        if job.book.here_error is not None:
            raise job.book.here_error
        if job.feed_mode and job.inline_from is None:
            job.feed(refill=True)
        costs = job.costs
        if costs.obs_consumed is None:
            job.pool.wait(job)
        else:
            t = time.perf_counter()
            job.pool.wait(job)
            costs.wait_s += time.perf_counter() - t

    # --- inline: the caller takes the rest of the map

    def _want_inline(self):
        """The cost model (inline.py) finds map itself as fast as the
        parallel path, and the rest is worth the switch."""
        job = self.job
        if not job.inline_ok or job.fixed or job.book.records < INLINE_MIN_CHUNKS:
            return False
        c = job.costs
        if not c.decode_known() or not c.tiny(job.book.consumed):
            return False
        if not job.feed_mode:
            nxt = job.pool._r.load64(job.off + S_NEXT)
            if not rest_worth_inline(job.n - nxt, c.cpu_item):
                return False
            if job.window.limit < nxt:
                # Held back for memory (window.hold_back): the items claimed
                # past the limit would all come at once on the switch.
                return False
        return True

    def _go_inline(self):
        """Claim everything not yet claimed by a worker (job.inline_from: where it starts)."""
        job = self.job
        job.inline_ok = False
        r = job.pool._r
        with job.pool._lock:
            if job.feed_mode:
                job.inline_from = job.feeder.fed
            else:
                while True:
                    nxt = r.load64(job.off + S_NEXT)
                    if nxt >= job.n or r.cas64(job.off + S_NEXT, nxt, job.n):
                        break
                job.inline_from = min(nxt, job.n)
                # Items claimed before the switch may lie past a limit lowered
                # for memory (window.hold_back): the workers deliver them all.
                if job.window.limit < job.n:
                    job.window.limit = job.n
                    r.store64(job.off + S_LIMIT, job.n)
                    job.pool.wake_workers()
                # Items from here on run here and need no pickling: an item
                # found unpicklable there is no error of this map any more.
                job.book.keep_errors_before(job.inline_from)
        job.stats.mode += "+inline"

    def _inline_rest(self):
        """map(fn, items from inline_from on), as a C-level map object."""
        job = self.job
        fn, a = job.fn, job.inline_from
        if job.feed_mode:
            rest = job.feeder.rest()
            return itertools.starmap(fn, rest) if job.star else map(fn, rest)
        end = job.n_input
        if len(job.iterables) == 1 and not job.star \
                and type(job.iterables[0]) in TAIL_TYPES:
            return InlineTail((fn, job.iterables[0], a, end))
        parts = [_tail(x, a, end) for x in job.iterables]
        if len(parts) > 1:
            return map(fn, *parts)
        return itertools.starmap(fn, parts[0]) if job.star else map(fn, parts[0])

    def _post_rest(self, k):
        """The inline rest of a map proved dear from item k: post the job
        for items k.. (on the handoff thread, or here); False if it cannot be."""
        job = self.job
        job.inline_from = None
        try:
            return job.start_after_probe(k, job.stats.mode + "+index")
        except Exception:
            # Closed or broken since: this map needs no worker any more; it
            # ends here, as before.
            if not (job.pool._closed or job.pool._broken is not None):
                raise
            return False

    def _probe(self):
        """Runs the first item here, with the handoff armed (handoff.py),
        then timed pieces while items cost under the break-even. Returns
        (index reached, whether the job for the rest was posted: None if
        it was not tried)."""
        job = self.job
        h = handoff.arm(lambda: job.start_after_probe(1, "probe+index"), PROBE_HANDOFF_S)
        t = time.perf_counter()
        try:
            yield InlineTail((job.fn, job.iterables[0], 0, 1))
        finally:
            posted, ok = handoff.disarm(h)
        if posted:
            return 1, ok
        if time.perf_counter() - t > PROBE_CLEAR_FACTOR * job.probe_est + PROBE_FIRST_SLACK_S:
            return 1, None      # the first item alone was far dearer: the workers take the rest
        return (yield from self._timed_inline(
            1, job.probe_est, functools.partial(job.start_after_probe, mode="probe+index")))

    def _timed_inline(self, done, per_item, post):
        """Yields timed pieces of the rest (from item `done`) run here; ends
        at the end of the input, after PROBE_STRIKES pieces in a row that
        cost more than per_item seconds per item, or after one piece that
        cost PROBE_CLEAR_FACTOR times that, or of a single item that ran past
        the whole budget, or once the handoff thread ran post(k) (the job for
        items k..) for a piece still running PROBE_HANDOFF_S past its budget.
        Returns (the index reached, what post returned: None if it did not run)."""
        job = self.job
        seq, n, fn = job.iterables[0], job.n_input, job.fn
        piece_s = probe_piece_s(job.nwork)
        strikes = 0
        while done < n:
            budget = _shm._core.PieceBudget(piece_s, PROBE_DEAR_ITEM_S, PROBE_CLOCK_STRIDE, done)
            h = handoff.arm(functools.partial(_cut_and_post, budget, post, n),
                            piece_s + PROBE_HANDOFF_S)
            t = time.perf_counter()
            try:
                yield InlineTail((fn, seq, done, n, budget))
            finally:
                handed, res = handoff.disarm(h)
            if handed and res is not None:
                return res      # (where the piece was cut, whether the job was posted)
            dt = time.perf_counter() - t
            stop = budget.stop
            if stop is None or stop <= done:
                break       # cannot happen: a piece runs one item at least
            cost = (stop - done) * per_item + PROBE_SLACK_S
            dear = dt > cost
            strikes = strikes + 1 if dear else 0
            # Far dearer (or a single item past the budget): no pause of a
            # piece's length explains it; one piece suffices.
            clear = dt > PROBE_CLEAR_FACTOR * cost or (stop - done == 1 and dt > piece_s)
            done = stop
            if strikes >= PROBE_STRIKES or (dear and clear):
                # Dear items (other inputs, a cost shift, a slow consumer):
                # the workers take the rest, measured afresh.
                break
        return done, None


def _cut_and_post(budget, post, n):
    """On the handoff thread: if one item has been running here for
    HANDOFF_CONFIRM_S, end the piece after it and post the job for the items
    after it, if any (of n): (index, what post returned, or None if nothing
    was left to post). None if no item was running (the consumer's time), or
    items moved on (a pause of this process, or a slow consumer, between
    cheap items): the piece's own timing judges those."""
    k = budget.running
    if k is None:
        return None
    time.sleep(HANDOFF_CONFIRM_S)
    k = budget.cut(k)
    if k is None:
        return None
    return k, (post(k) if k < n else None)


def _counted(it, bar):
    """it, with the progress bar advanced per item."""
    for x in it:
        bar.update(1)
        yield x


def _tail_iter(rest):
    if type(rest) is InlineTail:
        fn, seq, a, end = rest
        return map(fn, itertools.islice(seq, a, end))
    return rest


def _tail(x, a, end):
    """Items a..end-1 of a sized input, as an iterable."""
    if isinstance(x, (list, tuple)):
        # no copy of the rest (a long list's tail would be copied whole)
        return itertools.islice(x, a, end) if a or end < len(x) else x
    if isinstance(x, (range, str, bytes)):
        return x[a:end] if a else x
    if type(x).__module__ == "numpy" and type(x).__name__ == "ndarray":
        return x[a:end]
    return (x[i] for i in range(a, end))
