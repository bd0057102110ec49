"""The map's side of an SPMD map (axis_name=): one shard per worker, all at once.

Worker w runs shard w alone (chunks of one item, never inline, never
retried: its ranks meet in collectives and cannot be re-run apart). The
collective segment itself is _collective.SpmdParent's. Here: checking the
shards, and failing the map as one. The first rank that fails is what the
map raises, at once, and every other rank's collective is aborted; a rank
that failed only because the collective was aborted raises that first
failure; a worker that dies holding its shard fails the map.
"""
from .. import _collective
from .._errors import CollectiveAbortedError, WorkerCrashedError, oom_hint
from .._shm import REC_ERROR, S_RANGES


def spmd_shards(iterables, axis_name, nwork, opts):
    """The shards of an SPMD map (materialized), and how many there are.
    Raises when they do not fit the workers, or options ask for re-runs."""
    iterables, n = _collective.spmd_inputs(iterables, axis_name, nwork)
    if opts.tracked or opts.max_items_per_worker:
        raise ValueError("pmaprt: an SPMD map (axis_name=%r) takes none of retries=, "
                         "timeout=, on_error='return' or max_items_per_worker=: its ranks "
                         "run together and cannot be re-run alone" % (axis_name,))
    return iterables, n


class SpmdMap:
    """Failures of one SPMD map, whose _collective.SpmdParent is `parent`;
    `book` is the map's collect.ResultBook. It refers to neither the book nor
    the job (the book calls `failed` back). Lock held in every method."""

    def __init__(self, parent):
        self.parent = parent

    def failed(self, book, rank, exc):
        """ResultBook.on_fail: a rank failed. The first failure is what the
        map raises, at once; every other rank's collective is aborted."""
        sp = self.parent
        if sp.root is None:
            sp.root = exc
            sp.abort(rank)
            for r in sp.secondary:
                book.fail_at(r, exc)
            book.fail_here(exc)

    def on_record(self, book, take, kind, start, count, payload):
        """True when the record was handled here: a rank's error (take(rec,
        start) decodes it into (results, exc))."""
        sp = self.parent
        if kind != REC_ERROR:
            sp.delivered.add(start)
            return False
        book.records += 1
        _ok, exc = take((kind, count, payload), start)
        if isinstance(exc, CollectiveAbortedError):
            # Failed only because another rank did: the map raises that one.
            if sp.root is None:
                sp.secondary.append(start)
                return True
            exc = sp.root
        book.fail_at(start, exc)
        return True

    def on_worker_death(self, book, w, pid, rc, what, n, r, off):
        """Worker w died (n: the map's shards; r, off: the control region and
        the job's slot). If it had taken its shard and not delivered it, the
        map fails (a rank is never re-run)."""
        if n is None or w >= n or w in self.parent.delivered:
            return
        if r.range_get(off + S_RANGES + 8 * w)[1]:
            return  # its shard was never started: the replacement worker runs it
        book.fail_at(w, WorkerCrashedError(
            "pmaprt: %s while running rank %d of an SPMD map%s" % (what, w, oom_hint(rc)),
            pid, rc, (w, w + 1)))
