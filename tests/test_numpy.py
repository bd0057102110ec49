"""Zero-copy NumPy: shared arrays, rows and blocks, arrays inside items and
results, out=, numba, memory, and the shared memory's lifetime."""
import gc
import os
import resource
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import pmaprt
from pmaprt import Pool, pmap
from pmaprt import _arrays

from _waits import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 20_000          # float64 elements: 160 KB, over the out-of-band threshold
SMALL = 100           # 800 B: stays inside the pickle


@pytest.fixture(scope="module", params=["pvm", "copy"])
def pool(request):
    """Each test runs twice: workers read plain arrays from the parent
    (process_vm_readv), and, where that is not allowed, from their one copy
    in shared memory."""
    with Pool(2) as p:
        if request.param == "copy":
            p.arrays.pvm = False
        elif not p.arrays.pvm_allowed():
            pytest.skip("process_vm_readv from workers is not allowed here")
        yield p


# --- module-level functions (workers import them by reference)

def row_sum(r):
    return float(np.sum(r))


def times3(x):
    return x * 3


def ident(x):
    return x


def block_stats(b):
    return {"lo": float(b[0, 0]), "sum": b.sum(axis=0), "n": len(b)}


def origin(a):
    """What an array's memory ultimately belongs to: 'pickle' (decoded from
    the pickle itself), 'shared' (a pmaprt mapping) or 'own' (a buffer of its own)."""
    for _ in range(64):
        if isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        elif isinstance(a, memoryview):
            a = a.obj
        else:
            break
    if isinstance(a, (bytearray, bytes)):
        return "pickle"
    return "shared" if isinstance(a, _arrays.Mapping) else "own"


def nested(t):
    i, arr, meta = t
    return {"i": i, "double": arr * 2, "pair": (arr[:SMALL].copy(), meta["tag"]),
            "came": origin(arr)}


def bump_first(t):
    t[1][0] += 1.0
    return None


def add(a, b):
    return a + b


def wrong_rows(r):
    return r[:3]


def to_int(r):
    return r.astype(np.int64)


def to_float_from_int(r):
    return r * 0.5


def normalize(b):
    y = b - 0.25
    y *= 2.0
    np.clip(y, -1.0, 1.0, out=y)
    return y


def nested_pmap(x):
    # a pmap inside a worker runs serially there, chunks= and out= included
    out = np.zeros((4, 3))
    list(pmaprt.pmap(lambda b: b * 2, np.ones((4, 3)) * x, chunks=2, out=out))
    return float(out.sum())


# --- helpers

def memfd_fds(pid):
    """The pmaprt array/result memfds a process holds open."""
    out = []
    d = "/proc/%d/fd" % pid
    for fd in os.listdir(d):
        try:
            t = os.readlink(os.path.join(d, fd))
        except OSError:
            continue
        if "memfd:pmaprt-" in t:
            out.append(t)
    return out


def memfd_maps(pid):
    """The pmaprt array/result memfd mappings of a process."""
    with open("/proc/%d/maps" % pid) as f:
        return [line.split()[-2] for line in f if "memfd:pmaprt-" in line]


def no_array_memory(pool):
    pids = [os.getpid()] + pool.pids()
    return all(not memfd_fds(p) and not memfd_maps(p) for p in pids)


def same(a, b):
    """Deep equality for results that mix arrays, dicts, tuples and scalars."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and \
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# --- shared arrays

def test_shared_array_constructors():
    a = pmaprt.empty((100, 7), np.float32)
    assert isinstance(a, np.ndarray) and a.shape == (100, 7) and a.dtype == np.float32
    assert pmaprt.is_shared(a) and pmaprt.is_shared(a[3:9, ::2])
    z = pmaprt.zeros(1000, np.int64)
    assert pmaprt.is_shared(z) and not z.any()
    src = np.arange(24.0).reshape(4, 6)
    s = pmaprt.asarray(src)
    assert pmaprt.is_shared(s) and np.array_equal(s, src) and not np.shares_memory(s, src)
    assert pmaprt.asarray(s) is s                        # already shared: no copy
    assert pmaprt.asarray(s, dtype=np.float32).dtype == np.float32
    f = pmaprt.empty_like(np.asfortranarray(src))
    assert pmaprt.is_shared(f) and f.flags.f_contiguous
    assert pmaprt.is_shared(pmaprt.zeros_like(src)) and pmaprt.zeros_like(src).shape == (4, 6)
    assert not pmaprt.is_shared(src) and not pmaprt.is_shared(np.empty(3))
    assert not pmaprt.is_shared(pmaprt.empty(5, shared=False))
    assert pmaprt.empty(0).size == 0 and pmaprt.is_shared(pmaprt.empty((0, 3)))
    with pytest.raises(TypeError, match="Python objects"):
        pmaprt.empty(3, dtype=object)


def test_out_of_memory_is_a_clear_error_up_front():
    with pytest.raises(MemoryError, match="/dev/shm") as ei:
        pmaprt.empty((1 << 50,), np.uint8)
    assert "available" in str(ei.value)


@pytest.mark.parametrize("pvm", ["0", "1"])
def test_memfd_failures_are_memory_errors_not_sigbus(pvm):
    """A file-size limit makes every memfd past it fail: a shared array, and
    the copy of a plain input (when workers may not read the parent's memory,
    PMAPRT_PVM=0), raise MemoryError before any work; results too big for a
    memfd fall back to the pickle; nothing dies of SIGBUS."""
    script = textwrap.dedent("""
        import resource, sys
        import numpy as np
        import pmaprt
        resource.setrlimit(resource.RLIMIT_FSIZE, (12 << 20, resource.RLIM_INFINITY))
        try:
            pmaprt.empty((32 << 20,), np.uint8)
        except MemoryError as e:
            print("array:", e)
        with pmaprt.Pool(1) as pool:
            big = np.ones((4, 4 << 20), np.uint8)          # 16 MiB
            try:
                print("input ok:", list(pool.map(len, big)))
            except MemoryError as e:
                print("input:", e)
            # results of 16 MiB: no memfd for them in the worker, so they come in the pickle
            got = list(pool.map(np.ones, [2 << 20], chunksize=1))
            print("results:", got[0].nbytes, float(got[0].sum()))
        print("done")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, PMAPRT_PVM=pvm)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "array: pmaprt: could not reserve" in p.stdout and "/dev/shm" in p.stdout
    if pvm == "0":
        # its one copy into shared memory cannot be made
        assert "input: pmaprt: could not" in p.stdout
    else:
        # the workers read it from the parent: no shared memory needed
        assert "input ok: [4194304, 4194304, 4194304, 4194304]" in p.stdout
    assert "results: 16777216 2097152.0" in p.stdout
    assert p.stdout.strip().endswith("done")


# --- rows and blocks

def test_rows_like_map(pool):
    a = np.arange(30000.0).reshape(300, 100)
    want = list(map(row_sum, a))
    assert list(pool.map(row_sum, a)) == want                      # plain: one copy
    s = pmaprt.asarray(a)
    assert list(pool.map(row_sum, s)) == want                      # shared: by handle
    assert list(pool.map(row_sum, s[::-2])) == list(map(row_sum, a[::-2]))  # a strided view
    assert list(pool.map(row_sum, s[:, 10:20])) == list(map(row_sum, a[:, 10:20]))
    one_d = pmaprt.asarray(np.arange(5000) % 7)
    assert list(pool.map(times3, one_d)) == list(map(times3, np.arange(5000) % 7))
    got = list(pool.map(add, s, s))
    assert len(got) == 300 and all(np.array_equal(g, r + r) for g, r in zip(got, a))


def test_chunks_give_blocks(pool):
    a = np.arange(1000.0 * 4).reshape(1000, 4)
    s = pmaprt.asarray(a)
    for src in (a, s):
        got = list(pool.map(block_stats, src, chunks=64))
        want = [block_stats(a[i: i + 64]) for i in range(0, 1000, 64)]
        assert len(got) == 16 and all(same(g, w) for g, w in zip(got, want))
    sizes = [1, 0, 499, 500]
    got = list(pool.map(len, s, chunks=sizes))
    assert got == sizes
    # lists, ranges and several inputs at once
    assert list(pool.map(sum, list(range(100)), chunks=30)) == [435, 1335, 2235, 945]
    assert list(pool.map(len, range(10), chunks=4)) == [4, 4, 2]
    got = list(pool.map(add, s, s, chunks=250))
    assert all(np.array_equal(g, 2 * a[i * 250:(i + 1) * 250]) for i, g in enumerate(got))
    assert list(pool.map(len, np.empty((0, 3)), chunks=5)) == []


def test_chunks_errors(pool):
    a = np.zeros((10, 2))
    with pytest.raises(TypeError, match="sliced"):
        pool.map(len, iter(a), chunks=2)
    with pytest.raises(ValueError, match="add up"):
        pool.map(len, a, chunks=[3, 3])
    with pytest.raises(ValueError, match=">= 1"):
        pool.map(len, a, chunks=0)
    with pytest.raises(TypeError):
        pool.map(len, a, chunks="3")
    with pytest.raises(ValueError, match="same length"):
        pool.map(add, a, a[:5], chunks=2)


# --- arrays inside items and results

def test_arrays_in_tuples_and_dicts_both_ways(pool):
    items = [(i, np.full(BIG if i % 2 else SMALL, float(i)), {"tag": "t%d" % i}) for i in range(40)]
    want = list(map(nested, items))
    for src in (items, iter(items)):                # index mode (list) and feed mode (iterator)
        got = list(pool.map(nested, src, chunksize=3))
        for i, (g, w) in enumerate(zip(got, want)):
            assert g["i"] == w["i"] and g["pair"][1] == w["pair"][1]
            assert np.array_equal(g["double"], w["double"]) and g["double"].dtype == np.float64
            assert np.array_equal(g["pair"][0], w["pair"][0])
            # a large item array reaches fn outside the pickle: a view of shared
            # memory, or read from the parent into a buffer of its own
            assert (g["came"] != "pickle") == bool(i % 2), (i, g["came"])
            # a large result array is a view of the mapping the worker sent
            assert (_arrays.find_mapping(g["double"]) is not None) == bool(i % 2), i
            assert g["double"].flags.writeable


def test_shared_arrays_inside_items_go_by_handle(pool):
    base = pmaprt.zeros((6, BIG))
    items = [(i, base[i]) for i in range(6)]
    assert list(pool.map(bump_first, items)) == [None] * 6
    assert base[:, 0].tolist() == [1.0] * 6            # the workers wrote the parent's memory
    assert list(pool.map(bump_first, iter(items))) == [None] * 6
    assert base[:, 0].tolist() == [2.0] * 6


def test_results_that_view_a_shared_input_come_back_without_a_copy(pool):
    s = pmaprt.asarray(np.arange(8.0 * BIG).reshape(8, BIG))
    got = list(pool.map(ident, s))
    assert all(np.array_equal(g, r) for g, r in zip(got, s))
    assert all(np.shares_memory(g, s) for g in got)


def test_result_mappings_cost_no_descriptors(pool):
    def result_maps():
        return len([t for t in memfd_maps(os.getpid()) if "pmaprt-result" in t])
    gc.collect()
    before, maps_before = len(os.listdir("/proc/self/fd")), result_maps()
    got = list(pool.map(np.ones, [BIG] * 300, chunksize=1))
    assert all(g.shape == (BIG,) for g in got)
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    assert result_maps() - maps_before == 300            # one mapping per chunk ...
    for pid in [os.getpid()] + pool.pids():
        assert not [t for t in memfd_fds(pid) if "pmaprt-result" in t]   # ... and no fd kept
    del got
    gc.collect()
    assert result_maps() == maps_before


@pytest.mark.parametrize("fn", [ident, row_sum, times3, block_stats, normalize])
@pytest.mark.parametrize("kind", ["plain", "shared", "list", "iter"])
def test_results_identical_to_map(pool, fn, kind):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((64, 3000)).astype(np.float32)
    if fn is block_stats:
        a = a.reshape(64, 30, 100)
    want = list(map(fn, a))
    src = {"plain": a, "shared": pmaprt.asarray(a), "list": list(a), "iter": iter(list(a))}[kind]
    got = list(pool.map(fn, src))
    assert len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))


# --- out=

def test_out_rows_blocks_and_what_the_iterator_yields(pool):
    a = np.random.default_rng(1).random((5000, 16)).astype(np.float32)
    s = pmaprt.asarray(a)
    out = pmaprt.empty((5000,))
    assert list(pool.map(row_sum, s, out=out)) == [None] * 5000
    assert np.allclose(out, a.sum(axis=1))
    out2 = pmaprt.zeros((5000, 16), np.float32)
    ys = list(pool.map(normalize, s, chunks=512, out=out2))
    assert ys == [None] * 10 and np.array_equal(out2, normalize(a))
    out3 = pmaprt.zeros((5000, 16), np.float32)
    for _ in pool.map(normalize, s, chunks=512, out=out3, ordered=False):
        pass
    assert np.array_equal(out3, normalize(a))
    # a plain out: written by the workers into a twin, copied back chunk by chunk
    plain = np.zeros((5000, 16), np.float32)
    it = iter(pool.map(normalize, a, chunks=100, out=plain))
    next(it)
    assert np.array_equal(plain[:100], normalize(a[:100]))   # what was yielded is in out
    for _ in it:
        pass
    assert np.array_equal(plain, normalize(a))
    # starmap, and a generator input (feed mode)
    out4 = pmaprt.zeros(100)
    list(pool.starmap(add, [(i, 2 * i) for i in range(100)], out=out4))
    assert out4.tolist() == [3.0 * i for i in range(100)]
    out5 = pmaprt.zeros((50, 16), np.float32)
    list(pool.map(normalize, iter(list(a[:50])), out=out5))
    assert np.array_equal(out5, normalize(a[:50]))


def test_out_mismatches_fail_before_work(pool):
    s = pmaprt.asarray(np.ones((100, 8)))
    # out= that cannot take the input: raised by pool.map itself, nothing posted
    with pytest.raises(ValueError, match=r"out= has 99 rows .* the input has 100 items"):
        pool.map(row_sum, s, out=pmaprt.empty(99))
    with pytest.raises(ValueError, match=r"100 rows \(in 4 blocks\)"):
        pool.map(normalize, s, chunks=25, out=pmaprt.empty((90, 8)))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        pool.map(row_sum, s, out=[0.0] * 100)
    ro = pmaprt.empty(100)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pool.map(row_sum, s, out=ro)
    with pytest.raises(ValueError, match="at least one dimension"):
        pool.map(row_sum, s, out=np.array(0.0))

    # a result that does not fit its row: ValueError naming both, nothing written
    out = pmaprt.zeros((100, 8))
    with pytest.raises(ValueError) as ei:
        list(pool.map(wrong_rows, s, out=out))
    msg = str(ei.value)
    assert "returned an array of shape (3,), dtype float64" in msg
    assert "needs shape (8,)" in msg and "out has shape (100, 8), dtype float64" in msg
    assert not out.any()
    outi = pmaprt.zeros((100, 8), np.int32)
    with pytest.raises(ValueError, match="casts to int32"):
        list(pool.map(times3, s, out=outi))
    assert not outi.any()
    # a safe or same-kind cast is fine: int64 results into float32, float64 into float32
    outf = pmaprt.zeros((100, 8), np.float32)
    list(pool.map(to_int, s, out=outf))
    assert (outf == 1).all()
    # an unsized input longer than out fails at the first item past its end
    small = pmaprt.zeros(10)
    with pytest.raises(IndexError, match="out= has 10 rows"):
        list(pool.map(row_sum, iter(s), out=small))
    assert (small == 8).all()


def test_nested_pmap_with_out_and_chunks(pool):
    assert list(pool.map(nested_pmap, [1.0, 2.0])) == [24.0, 48.0]


# --- numba: one compilation per worker, not per chunk

def _compiles(pool):
    """{worker pid: numba compilations so far}, from every worker."""
    import _numba_kernels as K

    seen = {}
    for _ in range(20):
        for pid, c in pool.map(K.compiles_here, range(4 * pool.workers), chunksize=1):
            seen[pid] = c
        if set(seen) >= set(pool.pids()):
            return seen
    raise AssertionError("not every worker answered: %s vs %s" % (seen, pool.pids()))


def test_numba_compiles_once_per_worker():
    numba = pytest.importorskip("numba")
    import _numba_kernels as K

    @numba.njit
    def local_kernel(x):          # pickled by value (cloudpickle)
        return x * 3.0

    def local_calls(x):           # a closure that calls it, also by value
        return local_kernel(x) + 1.0

    xs = np.arange(300.0)
    with Pool(2) as pool:
        c0 = _compiles(pool)
        for fn in (K.nb_kernel, K.calls_kernel, local_kernel, local_calls):
            for _ in range(2):                      # two maps of 300 one-item chunks each
                it = pool.map(fn, xs, chunksize=1, inline=False)
                got = list(it)
                assert it.stats.chunks == 300
                assert np.allclose(got, [fn(x) for x in xs])
        c1 = _compiles(pool)
    # per worker: nb_kernel once as the map's function (rebuilt from its
    # pickle), once as the module global calls_kernel uses; local_kernel once
    # (local_calls finds the same dispatcher)
    for pid in c1:
        assert c1[pid] - c0[pid] == 3, (c0, c1)


# --- memory: parent + workers stay within input + output + 10 % (PSS and USS sums)

def trimmed_pid(x):
    from pmaprt.bench.memory import trim_heap

    time.sleep(0.02)
    trim_heap()
    return os.getpid()


def _peak(pool, run):
    from pmaprt.bench.memory import PeakMemory, trim_heap

    gc.collect()
    wait_for(lambda: no_array_memory(pool), timeout=5)
    # heap memory freed by earlier tests but not yet given back would be given
    # back during the run and hide part of its growth (seen in full runs: the
    # PSS sum at the end 10-20 % short of the two arrays): give it back now,
    # in the parent and in every worker (each of which has loaded this module
    # and numpy before the baseline)
    for _ in range(50):
        if set(pool.map(trimmed_pid, range(4 * pool.workers), chunksize=1)) >= set(pool.pids()):
            break
    trim_heap()
    with PeakMemory(lambda: [os.getpid()] + pool.pids(), interval=0.002) as pm:
        kept = run()
    del kept
    return pm


@pytest.mark.parametrize("case", ["shared in, shared out", "shared in, results", "plain in"])
def test_peak_memory_within_input_plus_output(pool, case):
    rows = (96 << 20) // 64                     # 96 MiB of (rows, 16) float32
    list(pool.map(normalize, np.ones((64, 16), np.float32), chunks=8))  # numpy loaded everywhere
    nbytes = rows * 64

    def run():
        if case == "plain in":
            a = np.full((rows, 16), 0.5, np.float32)
        else:
            a = pmaprt.empty((rows, 16), np.float32)
            a[:] = 0.5
        if case == "shared in, results":
            res = list(pool.map(normalize, a, chunks=4096))
            return a, res
        out = pmaprt.empty((rows, 16), np.float32)
        for _ in pool.map(normalize, a, chunks=4096, out=out):
            pass
        return a, out

    pm = _peak(pool, run)
    # a plain input costs its one copy into shared memory, unless the workers
    # read it from the parent
    copies = 1 if case == "plain in" and not pool.arrays.pvm_allowed() else 0
    bound = 1.10 * ((2 + copies) * nbytes)
    # USS sum (what the issue names): its peak cannot read high from sampling skew
    assert pm.growth("uss") <= bound, ("uss", pm.growth("uss") / 2**20, bound / 2**20)
    # PSS sum (shared pages counted once): exact once nothing moves, at the end,
    # with everything still alive; its peak while workers map pages for the
    # first time can read high by the sampling skew (bench/memory.py), up to
    # ~15 % seen on a loaded 2-core machine
    end = pm.growth_at_end("pss")
    assert end <= bound, ("pss at the end", end / 2**20, bound / 2**20)
    assert pm.growth("pss") <= 1.25 * bound / 1.10, ("pss peak", pm.growth("pss") / 2**20)
    # the PSS sum did see both arrays (every page of pmaprt's shared memory is
    # mapped somewhere in the tree: allocated with MADV_POPULATE_WRITE)
    assert end >= 1.9 * nbytes


# --- lifetime: the last reference frees the memory, in the parent and the workers

def test_shared_memory_freed_with_its_last_reference(pool):
    assert wait_for(lambda: no_array_memory(pool))
    a = pmaprt.asarray(np.arange(4.0 * BIG).reshape(4, BIG))
    out = pmaprt.empty((4, BIG))
    list(pool.map(times3, a, out=out))
    res = list(pool.map(times3, a))                 # results: worker memfds, mapped here
    view = a[1]
    assert memfd_maps(os.getpid())
    # every worker maps it on receipt (an idle one when it next looks at its
    # socket) and keeps the mapping between maps; none keeps the descriptor
    assert wait_for(lambda: all(memfd_maps(pid) for pid in pool.pids()))
    for pid in pool.pids():
        assert not memfd_fds(pid), "workers close a received descriptor at once"
    # results and out live on as long as they are referenced
    del out, res
    gc.collect()
    # the array is still referenced through `view`: nothing of it goes yet
    del a
    gc.collect()
    time.sleep(0.2)
    assert np.array_equal(view, np.arange(BIG, 2.0 * BIG))
    assert memfd_maps(os.getpid())
    del view
    gc.collect()
    assert wait_for(lambda: no_array_memory(pool)), [
        (p, memfd_fds(p), memfd_maps(p)) for p in [os.getpid()] + pool.pids()]
    # a later map still works (the workers dropped what they had)
    assert list(pool.map(row_sum, pmaprt.asarray(np.ones((3, 5))))) == [5.0] * 3


def test_array_dropped_while_only_an_item_holds_it(pool):
    """Items that are the only reference to a shared array: the map keeps each
    alive until a worker has taken its chunk, then lets it go, so a stream of
    fresh arrays is not all kept to the end (the feed window bounds it)."""
    n = 3000

    def gen():
        for i in range(n):
            a = pmaprt.zeros(BIG)
            a[:] = i
            yield a
    peak = 0
    for i, r in enumerate(pool.map(row_sum, gen())):
        assert r == float(i * BIG)
        if i % 100 == 0:
            gc.collect()
            peak = max(peak, len(memfd_maps(os.getpid())))
    assert 0 < peak < n // 2, peak
    gc.collect()
    assert wait_for(lambda: no_array_memory(pool))


def test_pmap_default_pool_with_arrays():
    s = pmaprt.asarray(np.arange(12.0).reshape(6, 2))
    out = pmaprt.zeros(6)
    assert list(pmap(row_sum, s, out=out, workers=2)) == [None] * 6
    assert out.tolist() == [1.0, 5.0, 9.0, 13.0, 17.0, 21.0]
    assert list(pmaprt.imap_unordered(len, s, chunks=3)) == [3, 3]


def fill_if_array(item):
    i, a = item
    if a is not None:
        a[:] = i
    return i


def test_shared_arrays_late_in_a_long_list_are_written_in_place(pool):
    # A long list is encoded lazily, block by block as the map goes on: items
    # far from the start that hold shared arrays still go by handle, so what
    # fn writes into them is what the caller sees.
    n = 40_000
    arrays = {i: pmaprt.zeros(BIG) for i in range(n - 20, n)}
    items = [(i, arrays.get(i)) for i in range(n)]
    assert list(pool.map(fill_if_array, items, inline=False)) == list(range(n))
    assert all(float(a[0]) == i and float(a[-1]) == i for i, a in arrays.items())
