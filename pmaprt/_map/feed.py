"""Feeding an unsized input (a generator, an iterator, a file) to the workers.

The job's segment holds a table of FEED_TABLE entries and a byte ring of
FEED_RING bytes after it:

    [ table: entry k % FEED_TABLE = (start, count, nbytes, offset, segment) ]
    [ ring: encoded chunks, written at the tail, freed from the head       ]
    [ the job's descriptor                                                 ]

The parent pulls items lazily, encodes a chunk into the ring (a chunk too
big for it, or holding arrays a worker will view in place, gets a segment of
its own), fills its table entry, then publishes it by raising the slot's
limit word to k + 1; workers claim entries below the limit with the shared
counter. A chunk's ring bytes are freed once its record arrived and every
chunk before it in the ring is freed too. What is in flight is bounded in
chunks per worker and in items ahead of the consumer, and held back while
the memory guard says the machine runs short. A chunk lost with its worker
is published again, from the fields kept for its latest entry (the table is
a ring: the old slot may hold another chunk by then).
"""
import collections
import itertools

from .. import _arrays, _serialize
from .._access import FEED_ENTRY, _unpicklable_item
from .._errors import WorkerCrashedError
from .._shm import FLAG_FEED_DONE, S_FLAGS, S_LIMIT, S_N
from .window import ahead_bytes

# Chunks in flight per worker, and items ahead of the consumer at least: more
# keeps workers busy through the parent's pauses, less holds less memory.
FEED_CHUNKS_PER_WORKER = 4
FEED_MIN_ITEMS = 64
FEED_TABLE = 1024
# Chunks in flight stay under this, so that chunks published again after a
# crash always find a free table entry.
FEED_MAX_OUTSTANDING = FEED_TABLE // 2
FEED_RING = 8 * 1024 * 1024
# A fed chunk bigger than this gets a segment of its own.
FEED_BIG = FEED_RING // 4
# A fed chunk of large items (their encoding and results, per item, as
# measured so far) holds at most this many bytes: what a lazy consumer's map
# holds ahead is a multiple of the chunk's bytes (window.ahead_bytes).
FEED_CHUNK_MAX_BYTES = 4 << 20


class Feeder:
    """The parent's side of one fed map. `book` (collect.ResultBook) gives
    the consumer's position and takes failures; `sizer` (a _sched.ChunkSizer)
    sizes chunks; `quota` caps a chunk at a worker's remaining items (0: no
    cap). `total` is the input's length once the workers were told it
    ended. `pool`, `arrays` (the job's _arrays.JobArrays) and `segs` (the
    job's list of segments to free) are needed only to publish. It refers
    to no job: the job reads it."""

    def __init__(self, iterator, book, stats, sizer, *, nwork=1, quota=0, guard=None,
                 pool=None, arrays=None, segs=None, costs=None):
        self.it = iterator
        self.book = book
        self.stats = stats
        self.sizer = sizer
        self.nwork = nwork
        self.quota = quota
        self.guard = guard
        self.pool = pool
        self.arrays = arrays
        self.segs = segs if segs is not None else []
        self.costs = costs            # inline.MapCosts: result bytes per item
        self.inflight_bytes = 0       # bytes of published chunks whose record has not arrived
        self.inflight_items = 0       # and their items (their results are on the way)
        self.in_item_bytes = 0.0      # encoded bytes per item published (moving average)
        self.fed = 0                  # items published
        self.chunks = 0               # table entries published
        self.chunks_published = 0     # chunks (with an entry in outstanding) and
        self.chunks_done = 0          # those of them whose record arrived
        self.feed_done = False
        self.total = None
        self.held = None              # (items, data) that found no room in the ring
        # chunk -> [first item, first byte in the ring (None: own segment), end byte or
        # segment, done, bytes, items]
        self.outstanding = collections.OrderedDict()
        self.start_chunk = {}
        # chunk start -> its latest table entry k, and k -> that entry's fields
        # (the table is a ring: an old k's slot may hold another chunk since)
        self.last_entry = {}
        self.entries = {}
        self.ring_tail = 0
        self.table_off = 0
        self.ring_off = FEED_TABLE * FEED_ENTRY.size
        self.seg = None
        self.off = None               # the job's slot in the control region, once posted
        self.flags = 0

    # --- starting (pool lock held)

    def spec(self):
        """What the workers' open_spec needs to find the table and the ring."""
        return ("feed", self.table_off, FEED_TABLE, self.ring_off, FEED_RING)

    def share_segment(self, desc):
        """The job's segment: table, ring, then `desc`. Returns (seg, desc_off)."""
        desc_off = self.ring_off + FEED_RING
        self.seg = self.pool.share(desc_off + len(desc), reserve=False)
        self.segs.append(self.seg)
        self.seg.buf[desc_off: desc_off + len(desc)] = desc
        return self.seg, desc_off

    def posted(self, off, flags):
        self.off, self.flags = off, flags

    # --- feeding (consumer's thread)

    def feed(self):
        """Publish chunks until the bounds on what is in flight are reached."""
        pool = self.pool
        book = self.book
        with pool._lock:
            while not self.feed_done:
                # Chunks not yet done (a done chunk behind a slow one only holds ring bytes).
                inflight = self.chunks_published - self.chunks_done
                if inflight >= min(FEED_MAX_OUTSTANDING, FEED_CHUNKS_PER_WORKER * self.nwork):
                    return
                if inflight and self.guard.low():
                    return
                c = self.sizer.size()
                if self.quota:
                    c = min(c, self.quota)
                per_item = self.in_item_bytes + (self.costs.item_bytes if self.costs else 0.0)
                if per_item * c > FEED_CHUNK_MAX_BYTES:
                    c = max(1, int(FEED_CHUNK_MAX_BYTES / per_item))
                if self.fed - book.consumed > max(FEED_MIN_ITEMS, FEED_CHUNKS_PER_WORKER * self.nwork * c):
                    return
                # Published and not consumed, with this chunk, within the
                # bound; the chunk the consumer needs next goes regardless.
                if self.fed > book.consumed and \
                        self.bytes_ahead() + c * per_item > self.ahead_bytes(c):
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
                    book.fail_at(self.fed + len(items), e)
                if items:
                    try:
                        data = _arrays.dumps_list(items, self.arrays.encoder)
                    except _serialize.PICKLE_ERRORS:
                        bad = _serialize.find_unpicklable(items)
                        j, exc = bad if bad is not None else (0, TypeError("cannot be pickled"))
                        self.feed_done = True
                        book.fail_at(self.fed + j, _unpicklable_item(self.fed + j, items[j], exc))
                        items = items[:j]
                        data = _arrays.dumps_list(items, self.arrays.encoder) if items else None
                    self.arrays.hold(self.fed)  # shared arrays in this chunk: kept until its record
                    if items and not self._publish(items, data):
                        # no room in the ring: keep the items for the next round
                        self.held = (items, data)
                        return
                if self.feed_done:
                    r = pool._r
                    r.store64(self.off + S_N, self.fed)
                    r.store32(self.off + S_FLAGS, self.flags | FLAG_FEED_DONE)
                    self.total = self.fed

    def bytes_ahead(self):
        """What this map holds ahead of its consumer: items in flight, their
        results on the way (at the bytes per result measured so far), results
        arrived and not taken."""
        out = self.costs.item_bytes if self.costs is not None else 0.0
        return self.inflight_bytes + self.inflight_items * out + self.book.held_bytes

    def ahead_bytes(self, c):
        """The bytes this map may hold ahead of its consumer (window.ahead_bytes)
        for chunks of c items: their items in flight, their results waiting."""
        out = self.costs.item_bytes if self.costs is not None else 0.0
        return ahead_bytes(self.nwork, c * (self.in_item_bytes + out))

    def refill(self):
        """Publish the chunk held back for lack of ring space, then feed on."""
        held = self.held
        if held is not None:
            with self.pool._lock:
                if self._publish(*held):
                    self.held = None
                else:
                    return
        self.feed()

    def end(self):
        """The input's length once every item is published, else None."""
        return self.fed if self.feed_done and self.held is None else None

    def rest(self):
        """The items not yet published, for the caller to run (inline)."""
        held = self.held[0] if self.held is not None else []
        self.held = None
        return itertools.chain(held, self.it) if held else self.it

    def _publish(self, items, data):
        """Write one chunk and publish it; False when the ring has no room yet."""
        nbytes = len(data)
        k = self.chunks
        seg_id = 0
        if nbytes > FEED_BIG or _arrays.has_inline_buffers(data):
            # (arrays decoded in a worker view their chunk's memory: never the ring, which is reused)
            seg = self.pool.share(nbytes)
            _arrays.write_blobs(seg.buf, [(0, data)])
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
        self.outstanding[k] = [self.fed, bstart, bend, False, nbytes, len(items)]
        self.inflight_bytes += nbytes
        self.inflight_items += len(items)
        b = nbytes / len(items)
        self.in_item_bytes = b if b > self.in_item_bytes else 0.9 * self.in_item_bytes + 0.1 * b
        self.chunks_published += 1
        self.start_chunk[self.fed] = k
        self._note_entry(k, (self.fed, len(items), nbytes, doff, seg_id))
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

    # --- records and lost chunks (pool lock held)

    def on_record(self, start):
        """The record of the chunk at `start` arrived."""
        self._drop_entry(start)
        k = self.start_chunk.pop(start, None)
        if k is not None and k in self.outstanding:
            entry = self.outstanding[k]
            entry[3] = True
            self.inflight_bytes -= entry[4]
            self.inflight_items -= entry[5]
            self.chunks_done += 1
            self._free_fed()

    def _note_entry(self, k, ent):
        old = self.last_entry.get(ent[0])
        if old is not None:
            self.entries.pop(old, None)
        self.last_entry[ent[0]] = k
        self.entries[k] = ent

    def _drop_entry(self, start):
        k = self.last_entry.pop(start, None)
        if k is not None:
            self.entries.pop(k, None)

    def _table_entry(self, start, count, nbytes, doff, seg_id):
        """Publish a chunk already written (again, after a loss) as entry k."""
        k = self.chunks
        FEED_ENTRY.pack_into(self.seg.buf, self.table_off + (k % FEED_TABLE) * FEED_ENTRY.size,
                             start, count, nbytes, doff, seg_id)
        self._note_entry(k, (start, count, nbytes, doff, seg_id))
        self.chunks = k + 1
        self.pool._r.store64(self.off + S_LIMIT, self.chunks)
        self.pool.wake_workers()

    def on_lost_chunk(self, k):
        """A worker died between claiming feed chunk k and reading it: publish it
        again (unless its record arrived, or it was published again since)."""
        ent = self.entries.get(k)
        if ent is None or ent[0] in self.book.recorded or self.start_chunk.get(ent[0]) is None:
            return
        self._table_entry(*ent)

    def reconcile(self, curs, nxt, gen):
        """A worker died inside a claim (see recovery.py): chunks claimed
        (their entry below the shared counter nxt), held by no live worker of
        job `gen` and not recorded, are published again."""
        live_k = {k for g, _, n, k in curs if g == gen and k >= 0}
        live_lo = {a for g, a, n, _ in curs if g == gen and n > 0}
        for k, entry in list(self.outstanding.items()):
            s = entry[0]
            if entry[3] or s in self.book.recorded or s in live_lo:
                continue
            e = self.last_entry.get(s)
            if e is None or e >= nxt or e in live_k:
                continue    # not claimed yet, or claimed by a live worker
            self.stats.reclaimed += 1
            self.on_lost_chunk(e)

    def refeed_pieces(self, lo, cn, pieces):
        """Publish the pieces of lost chunk [lo, lo+cn) as chunks of their own."""
        k = self.start_chunk.pop(lo, None)
        entry = self.outstanding.get(k) if k is not None else None
        ent = self.entries.get(self.last_entry.get(lo))
        if entry is None or ent is None:
            return
        self._drop_entry(lo)
        start, count, nbytes, doff, seg_id = ent
        buf = self.pool._res.segs[seg_id].buf if seg_id else self.seg.buf
        try:
            items = _arrays.loads_list(buf[doff: doff + nbytes])
        except Exception as e:
            # Cannot rebuild the items here (arrays out of band): fail the lost range.
            self.book.fail_at(lo, WorkerCrashedError(
                "pmaprt: items %d..%d of this map were lost with their worker and cannot be "
                "re-sent (%s)" % (lo, lo + cn - 1, e), None, None, (lo, lo + cn)))
            return
        for a, m in pieces:
            sub = items[a - lo: a - lo + m]
            data = _serialize.dumps_list(sub)
            seg = self.pool.share(len(data))
            seg.buf[:len(data)] = data
            self.segs.append(seg)
            self.outstanding[self.chunks] = [a, None, seg, False, len(data), m]
            self.inflight_bytes += len(data)
            self.inflight_items += m
            self.chunks_published += 1
            self.start_chunk[a] = self.chunks
            self._table_entry(a, m, len(data), 0, seg.id)
        if not entry[3]:
            entry[3] = True
            self.inflight_bytes -= entry[4]
            self.inflight_items -= entry[5]
            self.chunks_done += 1
        self._free_fed()
