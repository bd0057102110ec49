"""A worker killed inside a claim: between the compare-and-swap that takes
items (or a task, or a feed chunk) and the store that records them.

Such a kill lands on a few instructions, so it is made to happen here: the
mapped function, in the worker, swaps the worker's shared-memory region for
a proxy whose claim calls do the compare-and-swap without the recording
store and then SIGKILL the process. The items it took are then in no range
word and in no worker's current-chunk words. Without the parent's
reconciliation (Pool._reconcile) the map waits for them for ever; with it,
they run again (they never started), every result arrives once, in order,
and the map's statistics count them as reclaimed.

Every consumption here runs with a deadline: a hang fails the test.
"""
import gc
import os
import signal
import threading

import pytest

from pmaprt import Pool, _shm
from test_reliability import once   # True the first time any process calls it with a path

pytestmark = pytest.mark.timeout(120)

DEADLINE_S = 60


# --- run in the workers

class DieInWindow:
    """Stands in for the worker's Region: the claim named `what` takes its
    items as the real one would, records nothing, and kills the process."""

    def __init__(self, region, what, marker=None):
        self._r = region
        self._what = what
        self._marker = marker

    def __getattr__(self, name):
        return getattr(self._r, name)

    def _die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def range_take(self, off, maxc, *mark):
        if self._what != "take":
            return self._r.range_take(off, maxc, *mark)
        lo, n = self._r.range_take(off, maxc)
        if n:
            self._die()
        return lo, n

    def range_steal(self, off, *dest):
        if self._what != "steal" or os.path.exists(self._marker):
            return self._r.range_steal(off, *dest)
        lo, n = self._r.range_steal(off)
        if n:
            if once(self._marker):
                self._die()     # the first steal of any worker
            self._r.range_set(dest[0], lo, n)   # another one's: record it as the C call would
        return lo, n

    def claim_span(self, nxt, expected, span, dest):
        if self._what != "span":
            return self._r.claim_span(nxt, expected, span, dest)
        if self._r.cas64(nxt, expected, expected + span):
            self._die()
        return False

    def range_untake(self, off, lo, c, mark, kept):
        if self._what != "untake":
            return self._r.range_untake(off, lo, c, mark, kept)
        # Give the items back, but store `kept` into a spare word of the
        # worker's area (mark is its W_CUR_N): the current chunk still names
        # them too when the process dies.
        spare = mark - _shm.W_CUR_N + _shm.W_RING - 8
        if self._r.range_untake(off, lo, c, spare, kept):
            self._die()
        return False

    def cas64_mark(self, off, expected, new, mark, value):
        if self._what != "mark":
            return self._r.cas64_mark(off, expected, new, mark, value)
        if self._r.cas64(off, expected, new):
            self._die()
        return False


_armed = []


def arm(what, marker=None):
    if _armed:
        return
    _armed.append(what)
    from pmaprt._runtime.worker import Worker
    for w in [o for o in gc.get_objects() if isinstance(o, Worker)]:
        if not isinstance(w.r, DieInWindow):
            w.r = DieInWindow(w.r, what, marker)


def arm_once_at(args):
    """x * 3; at item `at`, the first time any worker gets there, the next
    claim of kind `what` by this worker dies in its window."""
    x, at, marker, what = args
    if x == at and once(marker):
        arm(what)
    return x * 3


def slow_arm_steals(args):
    """x * 3; every worker is armed: the first steal by any of them dies in
    its window. Items before `slow_to` take 10 ms: the worker whose first
    span holds them is helped by the others (as in test_steal)."""
    x, marker, slow_to = args
    arm("steal", marker)
    if x < slow_to:
        import time
        time.sleep(0.01)
    return x * 3


def shift_arm_untake(args):
    """x * 3; the first item arms the worker to die at its first untake,
    which the cost shift at item `shift` (from nothing to 20 ms) causes: the
    chunk sized for cheap items gives its unstarted rest back."""
    x, shift = args
    arm("untake")
    if x >= shift:
        import time
        time.sleep(0.02)
    return x * 3


def arm_now(what):
    arm(what)
    return os.getpid()


def triple(x):
    return x * 3


def nap(x):
    import time
    time.sleep(0.05)
    return x


# --- the parent

def consume(it, pool):
    """list(it) with a deadline: past it, the pool is terminated (which ends
    the wait) and the test fails."""
    box = {}

    def run():
        try:
            box["out"] = list(it)
        except BaseException as e:  # reported below
            box["exc"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(DEADLINE_S)
    if t.is_alive():
        pool.terminate()
        t.join(10)
        pytest.fail("the map waited %d s for items a killed worker took unrecorded" % DEADLINE_S)
    if "exc" in box:
        raise box["exc"]
    return box["out"]


@pytest.mark.parametrize("what", ["take", "span"])
def test_items_taken_unrecorded_run_again(tmp_path, what):
    marker = str(tmp_path / "armed")
    n = 400
    items = [(x, 5, marker, what) for x in range(n)]
    with Pool(workers=1) as pool:
        it = pool.map(arm_once_at, items, chunksize=4, inline=False)
        out = consume(it, pool)
        assert out == [x * 3 for x in range(n)]
        assert it.stats.reclaimed > 0
        # The pool goes on, with its replacement worker.
        assert list(pool.map(triple, range(50), inline=False)) == [x * 3 for x in range(50)]


@pytest.mark.parametrize("options", [{}, {"retries": 1, "ordered": False}],
                         ids=["default", "retries-unordered"])
def test_items_stolen_unrecorded_run_again(tmp_path, options):
    marker = str(tmp_path / "died")
    n = 2000
    items = [(x, marker, 40) for x in range(n)]
    with Pool(workers=2, seed=7) as pool:
        # Both workers up and this module loaded in each before the armed
        # map: a worker that joins late might find nothing left to steal.
        assert sorted(pool.map(nap, range(4), chunksize=1, inline=False)) == [0, 1, 2, 3]
        it = pool.map(slow_arm_steals, items, inline=False, **options)
        out = consume(it, pool)
        assert sorted(out) == [x * 3 for x in range(n)]
        if options.get("ordered", True):
            assert out == [x * 3 for x in range(n)]
        assert os.path.exists(marker), "no worker stole: the test did not test"
        assert it.stats.reclaimed > 0


@pytest.mark.parametrize("options", [{}, {"retries": 1}], ids=["default", "retries"])
def test_items_given_back_unrecorded_run_once(options):
    # Killed after its unstarted items went back to its range word, before
    # its current chunk stopped naming them: they are in two places. They
    # must run once, not twice (retries), and no error is raised.
    n, shift = 2100, 2000
    with Pool(workers=1) as pool:
        it = pool.map(shift_arm_untake, [(x, shift) for x in range(n)], inline=False,
                      **options)
        out = consume(it, pool)
        assert out == [x * 3 for x in range(n)]
        assert it.stats.reclaimed > 0, "no chunk was cut: the test did not test"
        assert it.stats.items == n      # each item's result arrived once


def test_feed_chunk_taken_unrecorded_runs_again(tmp_path):
    marker = str(tmp_path / "armed")
    n = 300
    gen = ((x, 3, marker, "mark") for x in range(n))
    with Pool(workers=1) as pool:
        it = pool.map(arm_once_at, gen, chunksize=4, inline=False)
        out = consume(it, pool)
        assert out == [x * 3 for x in range(n)]
        assert it.stats.reclaimed > 0


def test_task_taken_unrecorded_runs_again():
    with Pool(workers=1) as pool:
        pid = pool.apply(arm_now, "mark")
        box = {}
        t = threading.Thread(target=lambda: box.update(v=pool.apply(triple, 14)), daemon=True)
        t.start()
        t.join(DEADLINE_S)
        if t.is_alive():
            pool.terminate()
            t.join(10)
            pytest.fail("Pool.apply waited for a task a killed worker took unrecorded")
        assert box["v"] == 42
        assert pool.pids() != [pid]      # it ran on the replacement


# --- the parent's interval arithmetic

from hypothesis import given, strategies as st  # noqa: E402

from pmaprt._map.collect import ResultBook  # noqa: E402
from pmaprt._map.recovery import Recovery, gaps  # noqa: E402
from pmaprt._stats import MapStats  # noqa: E402


@given(st.integers(0, 60), st.integers(0, 60),
       st.lists(st.tuples(st.integers(0, 70), st.integers(0, 12)), max_size=12))
def test_gaps_are_exactly_what_no_interval_covers(lo, hi, spans):
    held = [(a, a + k) for a, k in spans]
    out = gaps(lo, hi, held)
    want = [i for i in range(lo, hi) if not any(a <= i < b for a, b in held)]
    got = [i for a, k in out for i in range(a, a + k)]
    assert got == want
    assert all(k > 0 for _, k in out)
    # maximal pieces: two gaps never touch
    assert all(a1 + k1 < a2 for (a1, k1), (a2, _) in zip(out, out[1:]))


# --- the job's side of reconciliation, on a Recovery built from plain values

def _recovery(ordered=True, consumed=0, recorded=(), error_at=None, err_rec=None, backlog=()):
    """A Recovery over a ResultBook in the given state."""
    book = ResultBook(ordered)
    book.consumed = consumed
    book.recorded.update(recorded)
    book.error_at, book.err_rec = error_at, err_rec
    rec = Recovery(book, MapStats())
    rec.backlog.extend(backlog)
    return rec


def test_reconcile_requeues_exactly_what_is_nowhere():
    # [0, 100) arrived; [100, 120) is a live worker's chunk; [120, 200) in a
    # range word; [200, 260) in the backlog; [260, 300) nowhere; the shared
    # counter is at 300 (nothing past it was claimed).
    rec = _recovery(recorded={0: 50, 50: 50}, backlog=[(200, 60)])
    curs = [(7, 100, 20, -1), (3, 0, 99, -1)]      # another job's chunk is not this one's
    assert rec.reconcile(curs, [(120, 80)], 300, gen=7, first=0, end=1000) == [(260, 40)]
    assert rec.stats.reclaimed == 40


def test_reconcile_stops_at_an_error_record():
    # A chunk [300, 350) raised at 310: its record names only [300, 310). The
    # item that raised and the rest of its chunk are not waited for (the map
    # raises there): they must not run again.
    rec = _recovery(recorded={0: 100, 300: 10}, err_rec=310)
    assert rec.reconcile([], [(200, 100)], 1000, gen=7, first=0, end=1000) == [(100, 100)]


def test_reconcile_respects_hand_over_start_consumed_and_inline():
    # the job's items start at 400 (a hand-over) and end at 700 (inline from there)
    rec = _recovery(consumed=450)
    assert rec.reconcile([], [], 900, gen=7, first=400, end=700) == [(450, 250)]
    rec = _recovery(ordered=False, err_rec=20)
    # unordered: the error is raised next, nothing waits
    assert rec.reconcile([], [], 900, gen=7, first=0, end=1000) == []
    assert rec.stats.reclaimed == 0


def test_feed_entries_survive_a_wrapped_table():
    # A lost feed chunk is published again from the fields kept for its
    # latest table entry, not from the table (a ring: that slot may hold
    # another chunk by then); a chunk whose record arrived is not.
    from pmaprt._map.feed import FEED_TABLE, Feeder
    feeder = Feeder(iter(()), ResultBook(True), MapStats(), None)
    published = []
    feeder._table_entry = lambda *ent: published.append(ent)
    feeder._note_entry(5, (40, 8, 100, 0, 0))
    feeder.start_chunk[40] = 5
    feeder.outstanding[5] = [40, None, None, False]
    feeder._note_entry(5 + FEED_TABLE, (9000, 8, 100, 0, 0))   # the slot's next chunk
    feeder.on_lost_chunk(5)
    assert published == [(40, 8, 100, 0, 0)]
    # reconcile: chunk 40 claimed (entry 5 < nxt), held by nobody: published again
    published.clear()
    feeder.reconcile([(7, 0, 0, -1)], 6, gen=7)
    assert published == [(40, 8, 100, 0, 0)] and feeder.stats.reclaimed == 1
    # held by a live worker (claimed, or read): left alone
    published.clear()
    feeder.reconcile([(7, 0, 0, 5)], 6, gen=7)
    feeder.reconcile([(7, 40, 8, -1)], 6, gen=7)
    assert published == []
    # its record arrived: nothing to publish, and its entry is dropped
    feeder.book.recorded[40] = 8
    feeder._drop_entry(40)
    feeder.on_lost_chunk(5)
    assert published == [] and 5 not in feeder.entries
