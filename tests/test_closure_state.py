"""A function's large captured arrays go to a pool's workers once, through
content-addressed read-only shared segments (pmaprt/_arrays/captured.py).

The assertions are on the pool's own accounting (segments made, bytes copied,
segments freed) and on the workers' /proc/<pid>/maps, never on time. Maps use
chunksize=1 so that they run on the workers (a cheap map may otherwise run in
the caller, where nothing is pickled).
"""
import functools
import gc
import os
import time

import numpy as np
import pytest

import pmaprt
from pmaprt import Pool
from pmaprt._arrays import captured

from _procs import wait_until

N = 300_000     # float64: 2.3 MiB, above CAPTURE_MIN


def big(seed=0):
    return np.random.default_rng(seed).random(N)


def run(pool, fn, n=4):
    return list(pool.map(fn, range(n), chunksize=1))


def take(a):
    """What a map of `lambda i: a[i] + a.sum()` over range(n) returns, here."""
    s = float(a.sum())
    return lambda n=4: [float(a[i]) + s for i in range(n)]


class Holder:
    def __init__(self, a):
        self.a = a

    def __call__(self, i):
        return float(self.a[i]) + float(self.a.sum())


def take_from(d, i):
    return float(d["x"][i]) + float(d["y"].sum())


def inode_of(store):
    """Inode of each live captured segment's memfd (a mapping's identity in /proc/pid/maps)."""
    return [os.fstat(e.seg.fd).st_ino for e in store._entries.values()]


def mapped_inodes(pid):
    out = set()
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "memfd:" in line:
                out.add(int(parts[4]))
    return out


@pytest.fixture
def pool():
    with Pool(2) as p:
        yield p


def test_second_map_of_a_closure_does_not_ship_the_array_again(pool):
    a = big()
    expect = take(a)
    store = pool.arrays.captured
    assert run(pool, lambda i: float(a[i]) + float(a.sum())) == expect()
    assert (store.made, store.copied) == (1, a.nbytes)
    assert run(pool, lambda i: float(a[i]) + float(a.sum())) == expect()
    assert (store.made, store.copied) == (1, a.nbytes)      # the same segment, not shipped again


def test_mutation_between_maps_is_seen_and_the_stale_copy_freed(pool):
    a = big()
    store = pool.arrays.captured
    assert run(pool, lambda i: float(a[i])) == a[:4].tolist()
    a[:4] = [-1, -2, -3, -4]
    assert run(pool, lambda i: float(a[i])) == [-1, -2, -3, -4]
    assert store.made == 2
    assert store.freed == 1         # the array's bytes moved on: its old segment went
    assert len(store.segment_ids()) == 1


def test_a_different_array_with_the_same_bytes_reuses_the_segment(pool):
    a = big()
    b = a.copy()
    c = a.view(np.int64)            # the same bytes, another dtype
    store = pool.arrays.captured
    assert run(pool, lambda i: float(a[i])) == a[:4].tolist()
    assert run(pool, lambda i: float(b[i])) == a[:4].tolist()
    assert run(pool, lambda i: int(c[i])) == c[:4].tolist()
    assert store.made == 1


def test_freeing_the_array_frees_the_segment_here_and_in_every_worker(pool):
    a = big()
    store = pool.arrays.captured
    segs_before = set(pool._res.segs)
    run(pool, lambda i: float(a[i]))
    (ino,) = inode_of(store)
    (sid,) = store.segment_ids()
    pids = pool.pids()
    assert ino in mapped_inodes(os.getpid())
    assert any(ino in mapped_inodes(p) for p in pids)     # the workers that ran an item
    del a
    gc.collect()
    assert store.segment_ids() == [] and store.nbytes == 0
    assert sid not in pool._res.segs
    assert set(pool._res.segs) <= segs_before
    assert ino not in mapped_inodes(os.getpid())
    # every worker, idle, is woken to drop its mapping (its cached function included)
    assert wait_until(lambda: all(ino not in mapped_inodes(p) for p in pids), 20), \
        "a worker still maps the freed segment"


def test_workers_cannot_write_to_the_shared_copy(pool):
    a = big()

    def write(i):
        a[i] = 5.0

    with pytest.raises(ValueError, match="read-only"):
        run(pool, write)
    assert run(pool, lambda i: float(a[i])) == a[:4].tolist()


def test_small_closures_take_the_old_path(pool):
    a = np.arange(1000.0)       # 8 KB
    assert run(pool, lambda i: float(a[i] * 2)) == [0.0, 2.0, 4.0, 6.0]
    assert pool.arrays.captured.made == 0


@pytest.mark.parametrize("kind", ["dict", "partial", "callable", "default", "list"])
def test_arrays_inside_objects_are_captured(pool, kind):
    a, b = big(1), big(2)
    expect = [float(a[i]) + float(b.sum()) for i in range(4)]
    if kind == "dict":
        d = {"x": a, "y": b}
        fn = lambda i: take_from(d, i)     # noqa: E731
    elif kind == "partial":
        fn = functools.partial(take_from, {"x": a, "y": b})
    elif kind == "callable":
        fn = Holder(a)
        expect = [float(a[i]) + float(a.sum()) for i in range(4)]
    elif kind == "default":
        def fn(i, x=a, y=b):
            return float(x[i]) + float(y.sum())
    else:
        pair = [a, b]
        fn = lambda i: float(pair[0][i]) + float(pair[1].sum())   # noqa: E731
    store = pool.arrays.captured
    assert run(pool, fn) == expect
    made = store.made
    assert made == (1 if kind == "callable" else 2)
    assert run(pool, fn) == expect
    assert store.made == made


def test_non_contiguous_and_fortran_arrays_keep_their_values(pool):
    m = np.asfortranarray(big().reshape(600, 500))
    v = np.random.default_rng(3).random(3 * N)[::3]     # strided, 2.3 MiB
    assert run(pool, lambda i: m[i].tolist() + v[i:i + 5].tolist()) == \
        [m[i].tolist() + v[i:i + 5].tolist() for i in range(4)]
    assert pool.arrays.captured.made == 2


def test_apply_with_a_closure_ships_the_array_once(pool):
    a = big()
    store = pool.arrays.captured
    assert pool.apply(lambda: float(a.sum())) == float(a.sum())
    assert pool.apply(lambda: float(a[7])) == float(a[7])
    assert store.made == 1


def test_no_leak_over_many_maps(pool):
    store = pool.arrays.captured
    segs_before = set(pool._res.segs)
    shm_before = set(os.listdir("/dev/shm"))
    a = big()
    for k in range(25):
        a[0] = k
        assert run(pool, lambda i: float(a[0]), 2) == [k, k]
        b = big(k)                  # a fresh array each time, dropped at once
        assert run(pool, lambda i: float(b[1]), 2) == [b[1]] * 2
        del b
    assert len(store.segment_ids()) == 1            # a's current bytes only
    assert store.made == 50 and store.freed == 49
    del a
    gc.collect()
    assert store.segment_ids() == [] and store.nbytes == 0
    assert set(pool._res.segs) <= segs_before
    assert set(os.listdir("/dev/shm")) == shm_before


def test_the_cache_of_unpinned_segments_is_bounded(pool, monkeypatch):
    monkeypatch.setattr(captured, "CACHE_BYTES", 3 * N * 8)
    store = pool.arrays.captured
    keep = [big(k) for k in range(6)]
    for a in keep:
        run(pool, lambda i: float(a[i]), 2)
    assert store.made == 6
    assert store.nbytes <= 3 * N * 8        # the least recently used went
    assert run(pool, lambda i: float(keep[0][i]), 2) == keep[0][:2].tolist()


def test_pinned_segments_outlive_the_cache_bound_while_their_map_runs(pool, monkeypatch):
    monkeypatch.setattr(captured, "CACHE_BYTES", 0)
    a = big()
    it = pool.map(lambda i: float(a[i]), range(50), chunksize=1)
    first = next(it)                    # the map is live: its segment is pinned
    assert pool.arrays.captured.nbytes == a.nbytes
    assert [first] + list(it) == a[:50].tolist()
    assert pool.arrays.captured.nbytes == 0     # unpinned with a zero cache: freed at the map's end


def test_pmap_on_the_default_pool_gets_the_same():
    a = big()
    got = list(pmaprt.pmap(lambda i: float(a[i]), range(4), chunksize=1))
    assert got == a[:4].tolist()
    store = pmaprt.default_pool().arrays.captured
    made = store.made
    assert list(pmaprt.pmap(lambda i: float(a[i]), range(4), chunksize=1)) == got
    assert store.made == made
