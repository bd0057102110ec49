"""Memory ahead of a lazy consumer is bounded in bytes, not only in items;
the memory guard is checked as results arrive. Sizes here are large enough
that a bound in items alone would hold gigabytes."""
import itertools
import time

import numpy as np
import psutil
import pytest

from pmaprt import Pool, _memguard

MIB = 1 << 20


def tree_bytes(pool):
    """Proportional set size of this process and its workers (shared pages
    counted once across them)."""
    total = 0
    for pid in [psutil.Process().pid] + pool.pids():
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.Error:
            pass
    return total


def mib_arrays():
    for i in itertools.count():
        a = np.empty(MIB // 8)
        a.fill(i)
        yield a


def same(a):
    return a


def five_mib(i):
    return np.full(5 * MIB // 8, float(i))


@pytest.fixture
def pool():
    p = Pool(2)
    list(p.map(abs, range(10), inline=False))
    yield p
    p.terminate()


def test_a_lazy_consumer_of_an_endless_feed_of_1_mib_results(pool):
    it = pool.map(same, mib_arrays())
    base = tree_bytes(pool)
    peak = 0
    for k, a in enumerate(itertools.islice(it, 120)):
        assert a[0] == k
        if k % 10 == 0:
            time.sleep(0.3)             # a slow consumer: workers would run ahead
            peak = max(peak, tree_bytes(pool) - base)
    it.close()
    assert peak < 256 * MIB, "the process tree grew by %d MiB" % (peak // MIB)


def test_an_index_map_of_5_mib_results_holds_little_ahead(pool):
    it = pool.map(five_mib, range(400))
    ahead = 0
    for k, a in enumerate(itertools.islice(it, 30)):
        assert a[0] == k
        time.sleep(0.05)
        ahead = max(ahead, len(it._state.book.pending))   # results arrived, not taken
    it.close()
    # the default bound (16 MiB for such chunks) and a chunk per worker running
    assert ahead * 5 * MIB <= 80 * MIB, "%d results of 5 MiB held ahead" % ahead


def test_the_memory_guard_holds_back_a_short_map_as_results_arrive(pool, monkeypatch):
    monkeypatch.setattr(_memguard, "available_bytes", lambda: 0)
    it = pool.map(five_mib, range(200), memory_floor=1 << 40)
    worst = 0
    for k, a in enumerate(itertools.islice(it, 20)):
        assert a[0] == k
        time.sleep(0.05)
        worst = max(worst, len(it._state.book.pending))
    it.close()
    assert worst <= 8, worst
