"""Taking a map's records into results: in order or as they come, with each
failure raised at the position map would raise it.

- `ResultBook`: what has arrived (records by start index, in arrival order
  for an unordered map), what failed and where, and how far the consumer
  has taken results. Plain state: recovery and the feed read it too.
- `decode_record`: one record's payload as its list of results (and the
  exception its chunk raised, if it did).
"""
import collections
import pickle
import time

from .. import _serialize
from .._errors import RemoteTraceback, ReturnedError, add_note
from .._shm import REC_ERROR, REC_LOCAL

REC_RESULT_ERRORS = 6  # as in _pool: results among which are returned exceptions


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
        # Called as on_fail(index, exc) after each fail_at (an SPMD map's
        # ranks fail together).
        self.on_fail = None

    def add(self, start, kind, count, payload):
        """A chunk's record arrived; False if it had arrived before (cannot
        happen: a chunk is run again only when its record is missing)."""
        if start in self.recorded:
            return False
        self.recorded[start] = count
        self.pending[start] = (kind, count, payload)
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
            self.on_fail(index, exc)

    def fail_here(self, exc):
        """The map raises exc at the consumer's position."""
        if self.here_error is None:
            self.here_error = exc

    def has_news(self):
        """Whether the consumer can go on without waiting. Ordered: only the
        record at its position counts (records further on do not let it
        move; returning for them made the parent spin, taking a core from the
        workers, whenever results arrived out of order)."""
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


def decode_record(rec, start, dec=None):
    """(results, exc) of record rec = (kind, count, payload) of the chunk at
    `start`: exc is the exception the chunk's function raised after those
    results, or None. dec (an inline.PerItem): gets the decode seconds per
    item of plain result records."""
    kind, count, payload = rec
    if kind == REC_LOCAL:
        return payload, None
    if kind == REC_RESULT_ERRORS:
        results = _serialize.loads_list(payload)
        for i, v in enumerate(results):
            if type(v) is ReturnedError:
                results[i] = v.rebuild()
        return results, None
    if kind == REC_ERROR:
        ok_payload, exc_bytes, tb_text, pid = pickle.loads(payload)
        ok = _serialize.loads_list(ok_payload)
        exc = pickle.loads(exc_bytes)
        index = start + len(ok)
        if tb_text:
            exc.__cause__ = RemoteTraceback(tb_text)
        add_note(exc, "pmaprt: raised by the function on item %d of the map (worker pid %d)"
                 % (index, pid))
        return ok, exc
    t = time.perf_counter()
    results = _serialize.loads_list(payload)
    if count and dec is not None:
        # Per item, from the largest chunks only: a chunk's decode has a
        # fixed part that the first, small chunks (1, 4, 16 items) would
        # charge to each item, making items of a few microseconds look not
        # worth the workers.
        dec.add(time.perf_counter() - t, count)
    return results, None
