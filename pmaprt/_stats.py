"""Statistics of one map, per worker, for users and the benchmark harness.

``it.stats`` of a map is a :class:`MapStats`. Its ``repr`` is short (one line,
then one per worker); ``print(it.stats.summary())`` or ``str(it.stats)`` gives
the same figures with the mode in words. The full record of every chunk is
behind attributes: ``chunk_log`` (all workers, in start order) and each
worker's ``WorkerStats.chunk_log``; ``chunksizes`` lists every chunk's size.
"""
from dataclasses import dataclass, field

#: what each part of ``MapStats.mode`` means; parts are joined by "+" in the
#: order the map went through them (``index+inline``: began on the workers,
#: the calling process took the rest)
MODE_PARTS = {
    "index": "on the workers, items read by index from shared memory",
    "feed": "on the workers, items streamed to them in chunks",
    "inline": "in the calling process (items cheaper to run than to ship)",
}


def describe_mode(mode):
    """``MapStats.mode`` in words: ``"index+inline"`` -> "on the workers, ...;
    then in the calling process (...)"."""
    parts = [p for p in (mode or "").split("+") if p]
    if not parts:
        return "not started"
    return "; then ".join(MODE_PARTS.get(p, p) for p in parts)


@dataclass(repr=False)
class WorkerStats:
    rank: int
    items: int = 0
    chunks: int = 0
    steals: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    # (t_start, t_end, start_index, count), times in seconds from the map's start
    chunk_log: list = field(default_factory=list)

    def __repr__(self):
        return ("WorkerStats(rank=%d, items=%d, chunks=%d, steals=%d, busy=%.4fs, idle=%.4fs, "
                "chunk_log=<%d entries>)" % (self.rank, self.items, self.chunks, self.steals,
                                            self.busy_s, self.idle_s, len(self.chunk_log)))


class MapStats:
    """How one map ran; filled in while it runs, complete once it is exhausted.

    ``mode`` (see :func:`describe_mode`), ``items``, ``wall_s``, ``workers``
    (a :class:`WorkerStats` per worker: items, chunks, steals, busy and idle
    seconds, its chunk log), ``chunks``, ``steals``, ``chunksizes`` (every
    chunk's size), ``chunk_log`` (every chunk), ``lost_chunks``, ``retried``,
    ``reclaimed``. ``summary()`` is the readable form.

    A map only appends one tuple per chunk (`record`); the per-worker
    figures are built from those when first read, and again only after
    more chunks arrived: a short map that nobody inspects pays no more."""

    def __init__(self, mode="", workers=None, nworkers=0, *, wall_s=0.0, t0=0.0, lost_chunks=0,
                 retried=0, reclaimed=0):
        """workers: a list of fresh WorkerStats (only its length counts) or
        nworkers: the workers the map may use."""
        self.mode = mode
        self.wall_s = wall_s
        self.t0 = t0
        # Chunks lost to a dead (or timed-out) worker, and items run again for it.
        self.lost_chunks = lost_chunks
        self.retried = retried
        # Items (feed mode: chunks) that a worker killed as it claimed them took
        # with it unrecorded, found by the parent and run again.
        self.reclaimed = reclaimed
        self._nworkers = len(workers) if workers is not None else nworkers
        self._log = []          # (rank, start, count, t0, t1, stolen), in arrival order
        self._built = None      # (chunks, wall_s) the built figures are for
        self._workers = []

    def record(self, rank, start, count, t0, t1, stolen):
        self._log.append((rank, start, count, t0, t1, stolen))

    def finish(self, wall_s):
        self.wall_s = wall_s

    @property
    def workers(self):
        key = (len(self._log), self.wall_s)
        if self._built != key:
            self._workers = self._build()
            self._built = key
        return self._workers

    def _build(self):
        ranks = max([self._nworkers] + [r + 1 for r, *_ in self._log])
        ws = [WorkerStats(w) for w in range(ranks)]
        t00 = self.t0
        for rank, start, count, t0, t1, stolen in self._log:
            w = ws[rank]
            w.items += count
            w.chunks += 1
            w.steals += stolen
            w.busy_s += t1 - t0
            w.chunk_log.append((t0 - t00, t1 - t00, start, count))
        if self.wall_s:
            for w in ws:
                w.idle_s = max(0.0, self.wall_s - w.busy_s)
        return ws

    @property
    def items(self):
        return sum(c for _, _, c, _, _, _ in self._log)

    @property
    def chunksizes(self):
        return [c for _, _, c, _, _, _ in self._log]

    @property
    def steals(self):
        return sum(s for *_, s in self._log)

    @property
    def chunks(self):
        return len(self._log)

    @property
    def chunk_log(self):
        """Every chunk of every worker, ``(rank, t_start, t_end, start_index,
        count)``, in the order they started (times from the map's start)."""
        rows = [(w.rank,) + tuple(e) for w in self.workers for e in w.chunk_log]
        rows.sort(key=lambda r: (r[1], r[0]))
        return rows

    def _recovery(self):
        if not (self.lost_chunks or self.retried or self.reclaimed):
            return ""
        return " lost_chunks=%d retried=%d reclaimed=%d" % (
            self.lost_chunks, self.retried, self.reclaimed)

    def __repr__(self):
        head = "MapStats(mode=%r, items=%d, wall=%.4fs, chunks=%d, steals=%d%s)" % (
            self.mode, self.items, self.wall_s, self.chunks, self.steals, self._recovery())
        return "\n".join([head] + ["  " + repr(w) for w in self.workers])

    def __str__(self):
        return self.summary()

    def summary(self):
        """A few lines for people: the mode in words, totals, then one line
        per worker (items, chunks, steals, busy and idle seconds)."""
        lines = ["mode=%s items=%d wall=%.4fs chunks=%d steals=%d%s"
                 % (self.mode, self.items, self.wall_s, self.chunks, self.steals,
                    self._recovery()),
                 "  ran " + describe_mode(self.mode)]
        for w in self.workers:
            lines.append("  worker %d: items=%d chunks=%d steals=%d busy=%.4fs idle=%.4fs"
                         % (w.rank, w.items, w.chunks, w.steals, w.busy_s, w.idle_s))
        return "\n".join(lines)
