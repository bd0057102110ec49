"""The Job protocol: everything the runtime calls on a job it runs.

A job is whatever sits in a board slot: one map (its state, in the map layer
above) or one task (`Pool.apply`, `task.Task`). The runtime calls these and
nothing else, always with the pool's lock held, never probing for optional
parts: what only some jobs need has a real default here (a task has no
backlog, no timeout and no SPMD ranks). A map's state satisfies the protocol
by its shape; a task subclasses it to take the defaults.
"""
from typing import Any, Optional, Protocol


class Job(Protocol):
    __slots__ = ()

    # Set by the runtime when the job is posted: its id and its slot's offset
    # in the control segment (None until posted).
    gen: Optional[int]
    off: Optional[int]
    # A worker died moving items between shared words (see claims.py): the
    # runtime reconciles the job once it gets a consistent view.
    suspect: bool = False
    # Seconds one item may run before its worker is killed (None: no limit).
    timeout: Optional[float] = None
    # Lost ranges waiting for a free retry word (flush_backlog hands them on).
    backlog: Any = ()
    # An SPMD map's parent side (rank i runs shard i); None for other jobs.
    spmd: Any = None
    # An index map posted with one wake-up: when (time.perf_counter) the
    # parent waiting for it wakes the other workers (wake.py, step 9).
    wake_due: Optional[float] = None

    # --- records and waiting

    def on_record(self, w, kind, start, count, payload, t0, t1, cpu, stolen, enc=0.0):
        """A record from worker w's ring (ring.py): `kind` is REC_RESULT,
        REC_ERROR or REC_RESULT_ERRORS; items [start, start + count)."""
        ...

    def has_news(self) -> bool:
        """Whether the waiting consumer can go on without sleeping."""
        ...

    def wait_key(self) -> int:
        """The one record a parent asleep for this job waits for, as
        H_PARENT_WANT holds it (wake.py); 0: any record."""
        return 0

    # --- losses (processes.py, claims.py)

    def on_lost(self, what, pid, rc, lo, cn, done, timed_out):
        """A worker died running items [lo, lo + cn), `done` of them finished;
        timed_out: True (killed for the job's timeout), "spurious" (killed for
        it, but the item had finished), or None."""
        ...

    def on_lost_feed_chunk(self, k):
        """A worker died holding feed chunk k before it read its items."""
        ...

    def on_load_crash(self, err):
        """A worker died loading the job's function or input."""
        ...

    def on_worker_death(self, w, pid, rc, what):
        """Any worker died (SPMD maps: a rank that took its shard is lost)."""

    def reconcile(self, curs, words, nxt) -> bool:
        """A consistent view after a death inside a claim: `curs` the workers'
        (gen, lo, n, k) current-chunk words, `words` the slot's non-empty
        (lo, n) range words, `nxt` its S_NEXT. Runs again what is nowhere;
        True only for a task that must be posted again."""
        ...

    def fail_here(self, exc):
        """The job fails with exc at its consumer's position."""
        ...

    def flush_backlog(self):
        """Hand lost ranges on to the workers (retry words). Nothing waits by
        default."""
