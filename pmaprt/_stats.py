"""Statistics of one map, per worker, for users and the benchmark harness."""
from dataclasses import dataclass, field


@dataclass
class WorkerStats:
    rank: int
    items: int = 0
    chunks: int = 0
    steals: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    # (t_start, t_end, start_index, count), times in seconds from the map's start
    chunk_log: list = field(default_factory=list)


@dataclass
class MapStats:
    """Filled in while the map runs; complete once it is exhausted."""

    mode: str = ""
    workers: list = field(default_factory=list)
    items: int = 0
    wall_s: float = 0.0
    chunksizes: list = field(default_factory=list)
    t0: float = 0.0
    # Chunks lost to a dead (or timed-out) worker, and items run again for it.
    lost_chunks: int = 0
    retried: int = 0
    # Items (feed mode: chunks) that a worker killed as it claimed them took
    # with it unrecorded, found by the parent and run again.
    reclaimed: int = 0

    @property
    def steals(self):
        return sum(w.steals for w in self.workers)

    @property
    def chunks(self):
        return sum(w.chunks for w in self.workers)

    def record(self, rank, start, count, t0, t1, stolen):
        w = self.workers[rank]
        w.items += count
        w.chunks += 1
        w.steals += stolen
        w.busy_s += t1 - t0
        w.chunk_log.append((t0 - self.t0, t1 - self.t0, start, count))
        self.items += count
        self.chunksizes.append(count)

    def finish(self, wall_s):
        self.wall_s = wall_s
        for w in self.workers:
            w.idle_s = max(0.0, wall_s - w.busy_s)

    def summary(self):
        lines = ["mode=%s items=%d wall=%.4fs chunks=%d steals=%d"
                 % (self.mode, self.items, self.wall_s, self.chunks, self.steals)]
        for w in self.workers:
            lines.append("  worker %d: items=%d chunks=%d steals=%d busy=%.4fs idle=%.4fs"
                         % (w.rank, w.items, w.chunks, w.steals, w.busy_s, w.idle_s))
        return "\n".join(lines)
