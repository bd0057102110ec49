"""A worker's death, on the map's side: what was lost, and what runs again.

- A worker that dies (or is killed for a timeout) running items lo..lo+cn-1
  loses them (`on_lost`). Without retries, timeouts or returned errors the
  map fails at lo. Otherwise the items that finished unreported and those
  not started run again free of charge; the item it was running is charged
  an attempt, and fails (raised, or returned as its result) once it has
  used its retries.
- A worker that dies loading the job loses nothing; a function that kills
  every process that loads it fails the map after enough deaths in a row
  (`on_load_crash`).
- A worker killed inside a claim (between the compare-and-swap that takes
  items and the store that records them) leaves items in no shared word:
  given a consistent view of where every item is, `reconcile` runs again
  exactly the items found nowhere (`gaps`).
- Lost index ranges wait in `backlog` until a retry word of the job's slot
  is free (`flush`); lost feed chunks are published again by the feed.
"""
from .._errors import WorkerCrashedError, add_note, item_timeout_error, oom_hint
from .._shm import RETRY_RANGES


def gaps(lo, hi, held):
    """The parts of [lo, hi) that no interval [a, b) of `held` covers, as
    (start, count) in increasing order."""
    out = []
    pos = lo
    for a, b in sorted(held):
        if pos >= hi:
            break
        if b <= a:
            continue
        if a > pos:
            out.append((pos, min(a, hi) - pos))
        pos = max(pos, b)
    if pos < hi:
        out.append((pos, hi - pos))
    return out


class Recovery:
    """Lost work of one map. `book` is its collect.ResultBook, `stats` its
    MapStats. It decides what runs again and returns it, as pieces (start,
    count); the job sends them to the backlog (`backlog`, then `flush`) or
    to the feed."""

    def __init__(self, book, stats, *, retries=0, timeout=None,
                 return_errors=False, tracked=False, nwork=1):
        self.book = book
        self.stats = stats
        self.retries = retries
        self.timeout = timeout
        self.ret = return_errors
        self.tracked = tracked     # workers publish per-item progress (see MapOptions.tracked)
        self.nwork = nwork
        self.attempts = {}         # item index -> crashes or timeouts on it
        self.backlog = []          # lost ranges waiting for a free retry word (index mode)
        self.load_crashes = 0      # workers that died loading this job, in a row

    def on_lost(self, what, pid, rc, lo, cn, done, timed_out):
        """A worker died (or was killed for a timeout) running items lo..lo+cn-1.
        timed_out: None, True, or "spurious" (killed, but its item had finished).
        Returns the pieces of [lo, lo+cn) to run again (perhaps none: the
        lost chunk is then settled), or None when nothing is to be done."""
        book = self.book
        if lo in book.recorded:
            return None
        self.load_crashes = 0
        if not self.tracked:
            book.fail_at(lo, WorkerCrashedError(
                "%s while running items %d..%d of this map%s" % (what, lo, lo + cn - 1, oom_hint(rc)),
                pid, rc, (lo, lo + cn)))
            return None
        self.stats.lost_chunks += 1
        after = (" after %d retr%s" % (self.retries, "y" if self.retries == 1 else "ies")
                 if self.retries else "")
        if timed_out == "spurious":
            return [(lo, cn)]
        if done >= cn:
            # Every item ran; it died encoding or sending the results (a result
            # that kills its pickler, or memory). Split the chunk in halves, free
            # of charge, until the item at fault is alone: then charge it.
            if cn > 1:
                h = cn // 2
                return [(lo, h), (lo + h, cn - h)]
            done = 0
            what += " while encoding or sending its result"
        done = max(0, done)
        idx = lo + done  # the item it was running; those before it finished, unreported
        tries = self.attempts.get(idx, 0) + 1
        self.attempts[idx] = tries
        pieces = [(lo, done)] if done else []
        if tries <= self.retries:
            self.stats.retried += 1
            pieces.append((idx, 1))
            failed = False
        else:
            if timed_out:
                err = item_timeout_error(idx, self.timeout, what.split(" was killed")[0])
                if after:
                    add_note(err, "pmaprt: it timed out%s" % after)
            else:
                err = WorkerCrashedError("%s (item %d of this map)%s%s"
                                         % (what, idx, after, oom_hint(rc)), pid, rc, (idx, idx + 1))
                if " while " not in what:
                    err = WorkerCrashedError("%s while running item %d of this map%s%s"
                                             % (what, idx, after, oom_hint(rc)), pid, rc, (idx, idx + 1))
            failed = True
            if self.ret:
                book.put_local(idx, [err])
            else:
                book.fail_at(idx, err)
        if lo + cn > idx + 1 and (self.ret or not failed):
            pieces.append((idx + 1, lo + cn - idx - 1))
        return pieces

    def on_load_crash(self, err):
        """A worker died while loading this job (no item was taken)."""
        # Nothing was lost, but a function that kills every process that loads
        # it must not be retried forever: with retries, give up after
        # (retries + 1) deaths per worker slot, in a row without any result.
        self.load_crashes += 1
        limit = (self.retries + 1) * (self.nwork + 2) if self.retries else 0
        if self.load_crashes > limit:
            self.book.fail_here(err)

    def reconcile(self, curs, words, nxt, gen, first, end):
        """Index mode: a worker died moving items between shared words, and
        may have taken some it had recorded nowhere. Given a consistent view
        of job `gen` (curs: every worker's (gen, lo, n, k) current-chunk
        words; words: the slot's non-empty range words as (lo, n); nxt: the
        shared counter), the items found nowhere never ran: returns them, as
        (start, count), to run again free of charge. The job's items are
        [first, end): those before ran elsewhere, those from end on run in
        the caller or do not exist."""
        book = self.book
        if (book.error_at is not None or book.err_rec is not None) and not book.ordered:
            return []   # the map raises at its next step: nothing is waited for
        lo = max(first, book.consumed) if book.ordered else first
        hi = min(nxt, end)
        for e in (book.error_at, book.err_rec):
            if e is not None:
                hi = min(hi, e)   # items from an error on are not waited for (an
                                  # error record names only the items before it)
        if lo >= hi:
            return []
        held = [(a, a + k) for a, k in book.recorded.items() if a + k > lo and a < hi]
        held += [(a, a + k) for g, a, k, _ in curs if g == gen and k > 0]
        held += [(a, a + k) for a, k in words]
        held += [(a, a + k) for a, k in self.backlog]
        lost = gaps(lo, hi, held)
        self.stats.reclaimed += sum(k for _, k in lost)
        return lost

    def flush(self, r, base, wake):
        """Hand backlog ranges to the workers through the retry words at
        `base` of region r, while one is free; wake() after each."""
        while self.backlog:
            a, k = self.backlog[0]
            for j in range(RETRY_RANGES):
                if r.range_put(base + 8 * j, a, k):
                    break
            else:
                return
            self.backlog.pop(0)
            wake()
