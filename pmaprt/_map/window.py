"""The consumer window of an index-mode map, and the lazy encoding of long lists.

Workers claim items below the slot's limit word. The parent sets the limit
`size()` items past the consumer and raises it as the consumer takes results
(once the consumer is within half a window of it), so a lazy consumer
bounds what runs ahead of it, in items and in bytes (ahead_bytes); while
the machine runs short of memory (the memory guard) the limit stays where
it is, unless the workers have nothing left below it. As records arrive the
limit may also come down (hold_back): results found large, or memory found
short, after the limit was set. The blocks of a long list (_access.LazyBlocks) are encoded
as the limit passes them: into a segment of their own, named in the block
table, before the limit that lets workers read them is stored.
"""
import time

from .. import _arrays
from .._access import BLOCK_ENTRY
from .._shm import S_LIMIT

# How far past the consumer workers may run, in chunks per worker (at least
# WINDOW_MIN_ITEMS items). A lazy consumer that stops leaves at most this
# much work done ahead of it; a smaller window makes workers wait for the
# consumer to move it.
WINDOW_CHUNKS_PER_WORKER = 16
WINDOW_MIN_ITEMS = 16384
# While the map may still go inline, workers run at most about this much of
# map's time ahead: what they hold when the parent takes over is run at the
# parallel path's (slower) pace before the inline part can start.
INLINE_WINDOW_S = 0.01


# What a map holds ahead of its consumer is bounded in bytes as well as in
# items: results arrived and not yet taken, and (feed) items published and not
# yet done. The bound is AHEAD_CHUNKS chunks per worker, held between
# AHEAD_MIN_BYTES and AHEAD_MAX_BYTES: a lazy consumer of large results then
# costs a small multiple of workers x chunk bytes; a smaller bound makes
# workers wait for the consumer sooner. A chunk the consumer needs next is
# never held back.
AHEAD_CHUNKS = 2
AHEAD_MIN_BYTES = 4 << 20
AHEAD_MAX_BYTES = 128 << 20


def ahead_bytes(nwork, chunk_bytes):
    """The bytes a map may hold ahead of its consumer."""
    return int(min(AHEAD_MAX_BYTES, max(AHEAD_MIN_BYTES, AHEAD_CHUNKS * nwork * chunk_bytes)))


def window_items(nwork, avg_chunk, cpu_item=None):
    """How far past the consumer workers may run, in items. cpu_item: the
    workers' CPU seconds per item, where the map may still go inline (else
    None). Never below 4 chunks per worker, or workers would wait for it."""
    w = max(WINDOW_MIN_ITEMS, int(WINDOW_CHUNKS_PER_WORKER * nwork * avg_chunk))
    if cpu_item:
        w = min(w, max(WINDOW_MIN_ITEMS, int(4 * nwork * avg_chunk),
                       int(INLINE_WINDOW_S / cpu_item)))
    return w


class Window:
    """The limit of one index-mode job. `book` (collect.ResultBook) gives the
    consumer's position and takes an unpicklable item's error; `costs`
    (inline.MapCosts) the average chunk and the cost per item; `segs` is the
    job's list of segments to free."""

    def __init__(self, book, costs, guard, *, nwork, pool=None, arrays=None, segs=None):
        self.book = book
        self.costs = costs
        self.guard = guard
        self.nwork = nwork
        self.pool = pool
        self.arrays = arrays
        self.segs = segs if segs is not None else []
        self.limit = 0
        self.lazy = []             # _access.LazyBlocks of a long list input
        self.lazy_seg = None       # the segment holding their block tables
        self.off = None            # the job's slot in the control region, once posted

    def size(self, may_inline):
        c = self.costs
        w = window_items(self.nwork, c.avg_chunk, c.cpu_item if may_inline else None)
        if c.item_bytes:
            chunk_bytes = c.avg_chunk * c.item_bytes
            w = min(w, max(self.nwork, int(ahead_bytes(self.nwork, chunk_bytes) / c.item_bytes)))
        return w

    def hold_back(self, may_inline):
        """A record arrived: if the window shrank below the limit (results
        turned out large) or memory runs short, lower the limit; workers
        take no item at or past it (claims.py) until it rises again. Never
        below the item the consumer needs next plus a chunk."""
        consumed = self.book.consumed
        want = consumed + self.size(may_inline)
        if self.guard.low():
            want = consumed + max(1, int(self.costs.avg_chunk))
        want = max(want, consumed + 1)
        if want >= self.limit:
            return
        self.limit = want
        self.pool._r.store64(self.off + S_LIMIT, want)

    def open(self, n, start, lazy, lazy_seg, may_inline):
        """The first limit of a job for items start..n-1."""
        self.lazy, self.lazy_seg = lazy, lazy_seg
        self.limit = min(n, start + self.size(may_inline))
        return self.limit

    def advance(self, n, may_inline):
        """The consumer moved: raise the limit if it is within half a window.
        Returns the index of an item that could not be pickled (the map ends
        there, raising its error), or None."""
        consumed = self.book.consumed
        if self.limit >= n or self.limit - consumed >= max(1, self.size(may_inline) // 2):
            return None
        if self.limit > consumed and self.guard.low():
            return None
        limit = min(n, consumed + self.size(may_inline))
        stop = None
        if self.lazy:
            limit, stop = self._encode_lazy(limit)
        self.limit = limit
        pool = self.pool
        with pool._lock:
            if pool._r is not None:
                pool._r.store64(self.off + S_LIMIT, self.limit)
                pool.wake_workers()
        return stop

    def _encode_lazy(self, upto):
        """Encode the list blocks that items below `upto` need into a new
        segment and name them in the block table. Returns (limit, stop): the
        limit the workers may go to, less than `upto` when an item cannot be
        pickled, and the index of that item (else None)."""
        batches = []
        stop = None
        t_enc = time.perf_counter()
        # Encode ahead geometrically (at least twice what is encoded so far,
        # counted from the first block: a job for the rest of a map starts there):
        # a long map then makes O(log n) segments, not one per window move.
        # (A map that then goes inline has encoded at most twice what it needed.)
        lz0 = self.lazy[0]
        ahead = max(upto, (2 * lz0.k - lz0.k0) * lz0.bsize)
        for lz in self.lazy:
            blocks, err = lz.encode(ahead, self.arrays.encoder)
            if blocks:
                batches.append((lz, blocks))
            if err is not None:
                self.book.fail_at(*err)
                stop = err[0] if stop is None else min(stop, err[0])
                upto = min(upto, err[0])
        if not batches:
            return upto, stop
        t_enc = time.perf_counter() - t_enc
        items = sum(len(bl) for _, bl in batches) * self.lazy[0].bsize
        if items:
            self.costs.on_encoded(t_enc, items)
        size = sum((len(d) + 63) // 64 * 64 for _, bl in batches for _, d in bl)
        with self.pool._lock:
            if self.pool._res.ctl is None:
                return upto, stop
            seg = self.pool.share(size)
        self.segs.append(seg)
        table, pos, blobs = self.lazy_seg.buf, 0, []
        for lz, bl in batches:
            for k, d in bl:
                blobs.append((pos, d))
                BLOCK_ENTRY.pack_into(table, lz.table_off + k * BLOCK_ENTRY.size, seg.id, pos, len(d))
                pos += (len(d) + 63) // 64 * 64
        _arrays.write_blobs(seg.buf, blobs)
        return upto, stop
