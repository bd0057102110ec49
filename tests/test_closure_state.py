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


# --- Written-page tracking: an array the kernel saw unwritten is not hashed again

from pmaprt import _core, _memguard                 # noqa: E402
from pmaprt._arrays.written import STRIKES, WATCH   # noqa: E402

import mmap                                          # noqa: E402
import select                                        # noqa: E402
import tempfile                                      # noqa: E402

needs_tracking = pytest.mark.skipif(
    WATCH.status() is not None,
    reason="the kernel's userfaultfd WP_ASYNC with PAGEMAP_SCAN (Linux 6.7) is unavailable "
           "or failed its self-test: %s" % WATCH.status())

# 40 MiB: above glibc's largest mmap threshold (32 MiB), so the array has pages
# of its own and no neighbour's write makes it look written.
BIG = 5 << 20


def own_pages(seed=0):
    return np.random.default_rng(seed).random(BIG)


def private_map(pages=8):
    return mmap.mmap(-1, pages * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def span(buf):
    return _core.buffer_address(buf)


@needs_tracking
def test_tracker_reports_a_write_once_and_arms_the_pages_again():
    t = _core.WriteTracker()
    m = private_map()
    v = memoryview(m)
    addr, n = span(v)
    assert t.track(addr, n)
    assert not t.written(addr, n)
    v[5 * mmap.PAGESIZE + 7] = 1
    assert t.written(addr, n)
    assert not t.written(addr, n)       # armed again by the scan
    assert not t.written(addr, mmap.PAGESIZE)
    t.untrack(addr, n)
    v.release()
    m.close()


@needs_tracking
def test_tracker_sees_kernel_writes_and_dropped_pages():
    t = _core.WriteTracker()
    m = private_map()
    addr, n = span(memoryview(m))
    assert t.track(addr, n)
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 100)
        f.seek(0)
        assert f.readinto(memoryview(m)[3 * mmap.PAGESIZE: 3 * mmap.PAGESIZE + 100]) == 100
    assert t.written(addr, n)           # read(2) into the range: a kernel write
    assert not t.written(addr, n)
    m.madvise(mmap.MADV_DONTNEED, 2 * mmap.PAGESIZE, mmap.PAGESIZE)
    assert t.written(addr, n)           # its bytes became zeros with no write
    assert not t.written(addr, n)
    t.untrack(addr, n)
    m.close()


@needs_tracking
def test_tracker_refuses_memory_another_process_can_change():
    t = _core.WriteTracker()
    shared = mmap.mmap(-1, 4 * mmap.PAGESIZE)       # MAP_SHARED: a forked child writes it
    assert not t.track(*span(memoryview(shared)))
    with tempfile.TemporaryFile() as f:
        f.truncate(4 * mmap.PAGESIZE)
        private_file = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
        assert not t.track(*span(memoryview(private_file)))
    with pytest.raises(ValueError):
        t.track(span(memoryview(shared))[0], 0)
    with pytest.raises(TypeError):
        t.written(1)


@needs_tracking
def test_tracker_in_a_forked_child_answers_written_and_tracks_its_own_memory():
    t = _core.WriteTracker()
    m = private_map()
    addr, n = span(memoryview(m))
    assert t.track(addr, n)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            # the registration was not copied: the parent's record is not the child's
            ok = t.written(addr, n)
            mine = private_map()
            a2, n2 = span(memoryview(mine))
            ok = ok and t.track(a2, n2) and not t.written(a2, n2)
            memoryview(mine)[0] = 1
            ok = ok and t.written(a2, n2)
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert select.select([r], [], [], 60)[0], "the child did not answer within 60 s"
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        assert wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 60)
    assert not t.written(addr, n)       # the parent's record is untouched
    memoryview(m)[0] = 1
    assert t.written(addr, n)


@needs_tracking
def test_an_unwritten_array_is_not_hashed_again(pool):
    a = own_pages()
    store = pool.arrays.captured
    assert run(pool, lambda i: float(a[i])) == a[:4].tolist()
    assert WATCH.tracked(a)
    hashed = store.hashed
    for _ in range(3):
        assert run(pool, lambda i: float(a[i])) == a[:4].tolist()
    assert store.hashed == hashed and store.reused >= 3
    assert store.made == 1


@needs_tracking
@pytest.mark.parametrize("how", ["element", "copyto", "readinto"])
def test_a_write_to_a_tracked_array_is_seen(pool, how):
    a = own_pages()
    store = pool.arrays.captured
    assert run(pool, lambda i: float(a[i * 1000])) == a[:4000:1000].tolist()
    hashed = store.hashed
    if how == "element":
        a[2000] = -5.0
    elif how == "copyto":
        np.copyto(a[2000:2001], -5.0)
    else:
        with tempfile.TemporaryFile() as f:
            f.write(np.float64(-5.0).tobytes())
            f.seek(0)
            f.readinto(memoryview(a[2000:2001]).cast("B"))
    assert run(pool, lambda i: float(a[i * 1000])) == [a[0], a[1000], -5.0, a[3000]]
    assert store.hashed == hashed + 1 and store.made == 2


@needs_tracking
def test_a_write_through_another_view_is_seen_by_both(pool):
    a = own_pages()
    v = a[:]                # another array object over the same pages
    store = pool.arrays.captured
    run(pool, lambda i: float(a[i]))
    run(pool, lambda i: float(v[i]))
    a[1] = -1.0
    assert run(pool, lambda i: float(v[i])) == v[:4].tolist()    # this scan consumes the write
    assert run(pool, lambda i: float(a[i])) == [a[0], -1.0, a[2], a[3]]
    assert store.hashed >= 4


@needs_tracking
def test_an_array_written_before_every_map_stops_being_tracked(pool):
    a = own_pages()
    run(pool, lambda i: float(a[i]))
    for k in range(STRIKES):
        assert WATCH.tracked(a)
        a[0] = k
        assert run(pool, lambda i: float(a[i]), 1) == [k]
    assert not WATCH.tracked(a)
    a[0] = 99
    assert run(pool, lambda i: float(a[i]), 1) == [99]     # hashed: still right


# --- Executor.submit and the joblib backend use the same segments


def test_twenty_submits_of_a_closure_create_one_segment():
    a = np.random.default_rng(1).random(1 << 19)      # 4 MiB
    with Pool(2) as p, pmaprt.Executor(pool=p) as ex:
        store = p.arrays.captured
        fs = [ex.submit(lambda i: float(a[i]) + float(a.sum()), i) for i in range(20)]
        s = float(a.sum())
        assert [f.result(timeout=120) for f in fs] == [float(a[i]) + s for i in range(20)]
        assert store.made == 1 and store.copied == a.nbytes
        assert wait_until(lambda: all(not e.pins for e in store._entries.values()), 30)
        assert list(ex.map(lambda i: float(a[i]), range(6), chunksize=3, timeout=120)) \
            == a[:6].tolist()
        assert store.made == 1
        assert wait_until(lambda: all(not e.pins for e in store._entries.values()), 30)
        del fs, a
        gc.collect()
        assert wait_until(lambda: store.nbytes == 0, 30)   # freed with the array


def test_the_joblib_backend_ships_a_closure_once():
    joblib = pytest.importorskip("joblib")
    import pmaprt.joblib    # noqa: F401  registers backend="pmaprt"
    a = np.random.default_rng(2).random(1 << 19)
    with Pool(2) as p:
        with joblib.parallel_config(backend="pmaprt", pool=p):
            for _ in range(3):
                got = joblib.Parallel(n_jobs=2)(joblib.delayed(lambda i: float(a[i]))(i)
                                                for i in range(8))
                assert got == a[:8].tolist()
        assert p.arrays.captured.made == 1


# --- The memory guard: unpinned segments go while memory is short


def test_the_cache_yields_when_available_memory_is_under_the_floor(pool, monkeypatch):
    a, b = big(1), big(2)
    store = pool.arrays.captured
    run(pool, lambda i: float(a[i]), 2)
    assert store.nbytes == a.nbytes             # kept for the next map while a lives
    monkeypatch.setattr(_memguard, "available_bytes", lambda: _memguard.default_floor() - 1)
    assert run(pool, lambda i: float(b[i]), 2) == b[:2].tolist()
    # a's unpinned segment went as the map began, b's as it ended
    assert store.nbytes == 0 and store.yielded == 2
    monkeypatch.setattr(_memguard, "available_bytes", lambda: 1 << 50)
    assert run(pool, lambda i: float(a[i]), 2) == a[:2].tolist()
    assert store.nbytes == a.nbytes
