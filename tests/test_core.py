"""pmap behaves as map: same results, same exceptions, lazily, in order."""
import functools
import itertools
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pmaprt
from pmaprt import Pool, pmap


@pytest.fixture(scope="module")
def pool():
    with Pool(2) as p:
        yield p


class Boom(Exception):
    pass


def double(x):
    return x * 2


def add(a, b):
    return a + b


def fail_at(limit):
    def f(x):
        if x == limit:
            raise Boom("item %r" % (x,))
        return (x, x)
    return f


def ident(x):
    return x


items = st.one_of(
    st.integers(), st.text(max_size=5), st.none(),
    st.tuples(st.integers(), st.text(max_size=3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xs=st.lists(items, max_size=3000), chunksize=st.one_of(st.none(), st.integers(1, 300)),
       workers=st.integers(1, 2), as_iter=st.booleans())
def test_differential_matches_map(pool, xs, chunksize, workers, as_iter):
    src = iter(xs) if as_iter else xs
    got = list(pool.map(ident, src, chunksize=chunksize, workers=workers))
    assert got == list(map(ident, xs))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 2000), bad=st.integers(0, 2500), chunksize=st.one_of(st.none(), st.integers(1, 64)),
       as_iter=st.booleans())
def test_differential_exception_position(pool, n, bad, chunksize, as_iter):
    f = fail_at(bad)
    expected, exp_exc = [], None
    try:
        for y in map(f, range(n)):
            expected.append(y)
    except Boom as e:
        exp_exc = e
    got, got_exc = [], None
    src = iter(range(n)) if as_iter else range(n)
    try:
        for y in pool.map(f, src, chunksize=chunksize, inline=False):
            got.append(y)
    except Boom as e:
        got_exc = e
    assert got == expected
    assert (exp_exc is None) == (got_exc is None)
    if got_exc is not None:
        assert str(got_exc) == str(exp_exc)
        assert isinstance(got_exc.__cause__, pmaprt.RemoteTraceback)
        assert any("item %d" % bad in note for note in got_exc.__notes__)


def test_several_iterables_zip_like_map(pool):
    assert list(pool.map(add, [1, 2, 3], (10, 20))) == [11, 22]
    assert list(pool.map(add, range(5), iter(range(100)))) == [0, 2, 4, 6, 8]
    assert list(pmap(pow, [2, 3, 4], range(3))) == [1, 3, 16]


def test_starmap_and_unordered(pool):
    args = [(i, i) for i in range(500)]
    assert list(pool.starmap(add, args)) == [2 * i for i in range(500)]
    assert list(pmaprt.starmap(add, iter(args))) == [2 * i for i in range(500)]
    assert sorted(pool.imap_unordered(double, range(1000))) == [2 * i for i in range(1000)]
    assert sorted(pmaprt.imap_unordered(double, iter(range(1000)), chunksize=7)) == [2 * i for i in range(1000)]


def test_lambdas_closures_and_local_functions(pool):
    k = 3
    def local(x):
        return x + k
    assert list(pool.map(lambda x: x * k, range(10))) == [x * 3 for x in range(10)]
    assert list(pool.map(local, range(10))) == [x + 3 for x in range(10)]


def test_is_lazy_over_an_infinite_generator(pool):
    counter = itertools.count()
    it = pool.map(double, counter)
    assert list(itertools.islice(it, 1000)) == [2 * i for i in range(1000)]
    # the feeder bounds what it pulls ahead of the consumer
    assert next(counter) < 1000 + 200_000
    it.close()


def test_lazy_over_a_huge_range(pool):
    it = pool.map(double, range(10**12))
    assert list(itertools.islice(it, 5000)) == [2 * i for i in range(5000)]
    it.close()


def test_ndarray_rows_and_inputs(pool):
    a = np.arange(200_000, dtype=np.float64).reshape(20_000, 10)
    got = list(pool.map(np.sum, a))
    assert got == [float(r.sum()) for r in a]
    small = np.arange(10)
    assert list(pool.map(int, small)) == list(range(10))


def test_strings_bytes_tuples_and_sequences(pool):
    assert list(pool.map(str.upper, "abc")) == ["A", "B", "C"]
    assert list(pool.map(double, b"\x01\x02")) == [2, 4]
    assert list(pool.map(double, tuple(range(100)))) == [2 * i for i in range(100)]
    assert list(pool.map(ident, {"a": 1, "b": 2})) == ["a", "b"]
    assert list(pool.map(ident, [])) == []


def test_default_pool_is_reused():
    list(pmap(double, range(10)))
    p1 = pmaprt.default_pool()
    pids = p1.pids()
    for _ in range(20):
        assert list(pmap(double, range(10))) == [2 * i for i in range(10)]
    assert pmaprt.default_pool() is p1
    assert p1.pids() == pids


def test_many_live_iterators_at_once(pool):
    its = [pool.map(double, range(i, i + 3000)) for i in range(8)]
    outs = [list(it) for it in reversed(its)]
    assert outs == [[2 * x for x in range(i, i + 3000)] for i in reversed(range(8))]
    a, b = pool.map(double, range(5000)), pool.map(ident, range(5000))
    assert list(zip(a, b)) == [(2 * i, i) for i in range(5000)]


def test_abandoned_iterators_free_their_slot():
    with Pool(1, max_jobs=2) as p:
        for _ in range(10):
            it = p.map(double, range(100_000))
            next(iter(it))
            del it
        assert list(p.map(double, range(3))) == [0, 2, 4]


def test_a_map_past_max_jobs_is_a_named_error():
    import pmaprt
    with Pool(1, max_jobs=1) as p:
        held = p.map(double, range(100_000), inline=False)
        next(iter(held))                    # the only slot, held
        with pytest.raises(pmaprt.TooManyMapsError, match="max_jobs"):
            p.map(double, range(10), inline=False)
        assert list(held) == [2 * i for i in range(1, 100_000)]


def test_stats_describe_the_map(pool):
    it = pool.map(double, range(20_000), inline=False)
    assert list(it) == [2 * i for i in range(20_000)]
    s = it.stats
    assert s.items == 20_000
    assert sum(w.items for w in s.workers) == 20_000
    assert sum(w.chunks for w in s.workers) == len(s.chunksizes) == s.chunks
    assert s.wall_s > 0
    for w in s.workers:
        for t0, t1, start, count in w.chunk_log:
            assert t1 >= t0 and 0 <= start < 20_000 and count >= 1


def test_fixed_chunksize_is_respected(pool):
    it = pool.map(double, range(1000), chunksize=100, inline=False)
    list(it)
    assert set(it.stats.chunksizes) <= set(range(1, 101))
    assert max(it.stats.chunksizes) == 100


def test_inline_runs_tiny_items_in_the_caller_with_map_results(pool):
    it = pool.map(double, range(400_000))
    assert list(it) == [2 * i for i in range(400_000)]


def fail_at_big(x):
    if x == 399_990:
        raise KeyError(x)
    return x * 2


def test_inline_list_rest_runs_like_map(pool):
    # A list (or tuple) of tiny items goes inline, where _core.Results calls
    # fn itself: same results, same exception at the same item as map, and
    # the next call goes on after it, as map's does. Going inline is the cost
    # model's decision, and a loaded machine's pauses can make the pieces
    # look dear (the map then starts on the workers): five tries.
    xs = list(range(400_000))
    for _ in range(5):
        it = pool.map(double, xs)
        assert list(it) == [2 * i for i in xs]
        if "inline" in it.stats.mode:
            break
    assert "inline" in it.stats.mode
    assert list(pool.map(double, tuple(xs))) == [2 * i for i in xs]
    # Built before the maps: the consumer's own work between two items of a
    # timed piece counts in the piece's time.
    head = [2 * i for i in range(399_990)]
    tail = [2 * i for i in range(399_991, 400_000)]
    for _ in range(5):
        got = []
        it = pool.map(fail_at_big, xs)
        with pytest.raises(KeyError) as ei:
            for y in it:
                got.append(y)
        rest = list(it)
        assert ei.value.args == (399_990,)
        assert got == head
        if rest:
            # Raised inline: the iterator goes on with the next item, as map's.
            assert rest == tail, it.stats.mode
            break
        # Raised on a worker (the pieces looked dear, and the end of the map
        # went back to the workers): there the map ends at the exception.
        assert it.stats.mode.split("+")[-1] != "inline", it.stats.mode
    assert rest == tail, it.stats.mode


def busy_or_fail(n):
    if n < 0:
        raise ValueError("negative %d" % n)
    s = 0
    for i in range(n):
        s += i
    return s


def test_a_tiny_map_over_a_list_or_range_runs_in_the_caller(pool):
    # No job, no worker: the first item here, then timed pieces while items
    # stay cheap (a loaded machine's pause can hand a piece over: 3 tries).
    for _ in range(3):
        it = pool.map(busy_or_fail, [3] * 5000)
        assert list(it) == [3] * 5000
        if it.stats.mode == "inline":
            break
    assert it.stats.mode == "inline"
    assert sum(w.items for w in it.stats.workers) == 0
    assert it.stats.wall_s > 0
    for _ in range(3):
        it = pool.map(double, range(20_000))
        assert list(it) == [2 * i for i in range(20_000)]
        if it.stats.mode == "inline":
            break
    assert it.stats.mode == "inline"


def test_a_map_over_a_list_hands_dear_inputs_to_the_workers(pool):
    v = busy_or_fail(100_000)
    cases = {
        "dear from the start": [100_000] * 40,
        "fewer dear items than a piece checks": [100_000] * 6,
        "a cheap head, a dear tail": [1] * 3000 + [100_000] * 40,
    }
    for name, xs in cases.items():
        it = pool.map(busy_or_fail, xs)
        assert list(it) == [busy_or_fail(x) if x == 1 else v for x in xs], name
        assert it.stats.mode == "probe+index", name
        assert sum(w.items for w in it.stats.workers) > 0, name
    # A range: the dear rest goes to the workers from where the piece stopped.
    xs = range(100_000, 100_040)
    it = pool.map(busy_or_fail, xs)
    assert list(it) == [busy_or_fail(x) for x in xs]
    assert it.stats.mode == "probe+index"
    assert sum(w.items for w in it.stats.workers) > 0
    # Unordered: every result once.
    xs = [100_000] * 30 + [5] * 30
    assert sorted(pool.imap_unordered(busy_or_fail, xs)) == sorted(busy_or_fail(x) for x in xs)
    # Errors on the workers are named at their item's index in the map.
    xs = [100_000] * 40
    xs[30] = -1
    it = pool.map(busy_or_fail, xs)
    got = []
    with pytest.raises(ValueError, match="negative -1") as ei:
        for y in it:
            got.append(y)
    assert got == [v] * 30
    assert it.stats.mode == "probe+index"
    assert any("item 30 of the map" in n for n in getattr(ei.value, "__notes__", []))


def wait_for_the_last_or_mark(marks, last, slow, x):
    """Item `slow` waits (at most 10 s) until item `last` has run elsewhere:
    whether it had, and where it ran; item `last` leaves a mark, the others
    only return (cheap, so that the probe keeps them here)."""
    if x == slow:
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(marks, str(last))) and time.monotonic() < deadline:
            time.sleep(0.005)
        return os.path.exists(os.path.join(marks, str(last))), os.getpid()
    if x == last:
        open(os.path.join(marks, str(x)), "w").close()
    return x, os.getpid()


def test_a_dear_item_in_a_later_probe_piece_hands_the_rest_over_while_it_runs(pool, tmp_path):
    # Item 10 runs inside the probe's first timed piece (items 1.. are cheap):
    # the handoff thread must cut the piece after it and post items 11.. to
    # the workers while it still runs here; it waits for the last item's mark.
    fn = functools.partial(wait_for_the_last_or_mark, str(tmp_path), 39, 10)
    got = list(pool.map(fn, list(range(40))))
    assert got[10] == (True, os.getpid())
    assert [x for x, _ in got[:10] + got[11:]] == list(range(10)) + list(range(11, 40))
    assert all(pid != os.getpid() for _, pid in got[11:])


def test_a_map_started_here_on_a_pool_closed_since_says_so():
    p = Pool(2)
    try:
        it = p.map(busy_or_fail, [100_000] * 40)
    finally:
        p.close()
    with pytest.raises(pmaprt.PoolClosedError):
        list(it)


class _Tail(tuple):
    __slots__ = ()


def test_results_iterator_pieces():
    from pmaprt._shm import _core
    calls = []

    def f(x):
        calls.append(x)
        if x == 3:
            raise ValueError("three")
        return x * 10

    def pieces():
        yield [1, 2]
        yield []
        yield _Tail((f, [0, 1, 2, 3, 4, 5], 2, 5))   # fn(seq[2..4])
        yield iter("ab")
        yield _Tail((str, (7, 8, 9), 1, 99))        # end past a tuple: clamped
    r = _core.Results(pieces(), _Tail)
    assert iter(r) is r
    assert [next(r) for _ in range(3)] == [1, 2, 20]
    with pytest.raises(ValueError, match="three"):
        next(r)
    assert list(r) == [40, "a", "b", "8", "9"]
    assert calls == [2, 3, 4]
    assert list(r) == []
    # A list that shrinks under an inline tail stops at its new end, as
    # iterating the list would.
    xs = [1, 2, 3, 4, 5]

    def shrink(x):
        if x == 2:
            del xs[3:]
        return x
    assert list(_core.Results(iter([_Tail((shrink, xs, 0, 5))]), _Tail)) == [1, 2, 3]
    with pytest.raises(TypeError, match="list, tuple or range"):
        list(_core.Results(iter([_Tail((f, "abc", 0, 3))]), _Tail))
    # A range: fn(r[i]), clamped to its length, timed like a list.
    def g(x):
        return x + 1
    assert list(_core.Results(iter([_Tail((g, range(10, 20, 2), 1, 99))]), _Tail)) == \
        [13, 15, 17, 19]
    # ranges of C-sized ints are computed in C, others through range[i]:
    # the same items either way (negative steps, the edges of a long long,
    # past them)
    big = 2 ** 63
    for r in (range(0), range(5, -7, -3), range(-big, -big + 50, 7), range(big - 40, big - 1, 3),
              range(big - 5, big + 5), range(-3 * big, 3 * big, big // 2), range(0, 10 ** 30, 10 ** 28)):
        for a, b in ((0, len(r)), (1, len(r) - 1), (2, len(r) + 5)):
            assert list(_core.Results(iter([_Tail((g, r, a, b))]), _Tail)) == \
                [x + 1 for x in r[a:b]], (r, a, b)
    budget = _core.PieceBudget(0.0, 2e-6, 16)   # a budget of 0 s: one item, then it stops
    assert budget.stop is None
    assert list(_core.Results(iter([_Tail((g, range(100), 3, 50, budget))]), _Tail)) == [4]
    assert budget.stop == 4
    with pytest.raises(TypeError):
        _core.Results(iter([]), "not a type")


def test_results_iterator_errors_and_cycles_are_collected():
    import gc
    import weakref
    from pmaprt._shm import _core

    def pieces():
        yield [1]
        raise RuntimeError("source failed")
    r = _core.Results(pieces(), _Tail)
    assert next(r) == 1
    with pytest.raises(RuntimeError, match="source failed"):
        next(r)

    class Box:
        pass
    b = Box()
    b.r = _core.Results(iter([[b]]), _Tail)     # a cycle through the iterator
    ref = weakref.ref(b)
    del b
    gc.collect()
    assert ref() is None


def nap_then_clock(x):
    time.sleep(0.03)
    return time.monotonic()


def test_ordered_parent_is_woken_by_the_record_it_waits_for(pool):
    # An ordered map's parent, asleep, names the position it waits for
    # (H_PARENT_WANT): workers skip the wake call for records further on, and
    # must make it for that one. A missed wake leaves the parent to its 50 ms
    # poll: a result would reach the consumer 25 ms late on average.
    lat = []
    for t_done in pool.map(nap_then_clock, range(60), chunksize=1):
        lat.append(time.monotonic() - t_done)
    lat.sort()
    assert lat[len(lat) // 2] < 0.012, lat


def test_apply(pool):
    assert pool.apply(add, 2, 3) == 5
    assert pool.apply(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]


def test_progress_bar(pool, capsys):
    assert list(pool.map(double, range(50), progress=True)) == [2 * i for i in range(50)]


def test_closed_pool_refuses_work():
    p = Pool(1)
    p.close()
    with pytest.raises(pmaprt.PoolClosedError):
        p.map(double, range(3))


def test_public_exports():
    assert set(pmaprt.__all__) >= {"pmap", "imap_unordered", "starmap", "Pool", "WorkerCrashedError",
                                   "MapStats", "shutdown"}
    for name in pmaprt.__all__:
        assert hasattr(pmaprt, name)


# --- long lists: encoded lazily as the window moves (_access.LazyBlocks)

class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling for this one")


def test_long_list_encoded_lazily_matches_map(pool):
    xs = [(i, str(i)) for i in range(120_000)]
    it = pool.map(ident, xs, inline=False)
    assert list(it) == xs
    assert it.stats.items == len(xs)
    ys = list(range(100_000))
    assert list(pool.starmap(add, [(i, i) for i in range(90_000)], inline=False)) == \
        [2 * i for i in range(90_000)]
    assert list(pool.map(add, ys, ys, inline=False)) == [2 * i for i in ys]


@pytest.mark.parametrize("fresh", [True, False])
def test_long_list_with_a_late_unpicklable_item(pool, fresh):
    # fresh: a new pool, whose small first chunks move the window in small
    # steps, so the bad item's block is encoded well before the window reaches it
    xs = list(range(100_000))
    xs[90_000] = Unpicklable()
    p = Pool(2) if fresh else pool
    try:
        got = []
        with pytest.raises(TypeError, match="item 90000") as ei:
            for y in p.map(ident, xs, inline=False):
                got.append(y)
        assert got == list(range(90_000))
        assert "no pickling" in str(ei.value)
        assert list(p.map(ident, range(5))) == list(range(5))   # the pool goes on
    finally:
        if fresh:
            p.close()


def test_long_list_abandoned_early_frees_its_segments(pool):
    it = pool.map(ident, list(range(200_000)), inline=False)
    assert [next(it) for _ in range(10)] == list(range(10))
    it.close()
    assert list(pool.map(ident, list(range(70_000)), inline=False)) == list(range(70_000))


def test_long_list_map_opens_few_segments(pool):
    # Lazy blocks are encoded ahead geometrically: a long map adds a handful of
    # segments (file descriptors), not one per window move.
    import psutil
    me = psutil.Process()
    fds0 = me.num_fds()
    peak = 0
    it = pool.map(ident, list(range(1_000_000)), chunksize=2000)
    for i, y in enumerate(it):
        if i % 50_000 == 0:
            peak = max(peak, me.num_fds() - fds0)
    assert peak <= 40, peak


def test_a_list_that_shrinks_during_the_map_raises(pool):
    xs = list(range(200_000))
    it = pool.map(ident, xs, inline=False)
    assert next(it) == 0
    del xs[60_000:]
    with pytest.raises(RuntimeError, match="changed size"):
        for _ in it:
            pass


def about_a_microsecond(x):
    sum(range(40))
    return x


def test_fixed_chunks_are_not_held_back_by_the_window(pool):
    # The window cap that keeps a map able to go inline cheaply applies to
    # adaptive chunk sizes only: with chunksize=N (never inline) the window
    # must hold several chunks per worker, or workers wait for it.
    it = pool.map(about_a_microsecond, range(200_000), chunksize=20_000)
    assert list(it) == list(range(200_000))
    st = it._state
    w = st.window.size(st._may_inline())
    assert w >= 4 * st.nwork * 20_000, (w, st.costs.avg_chunk, st.costs.cpu_item)



def _load_slowly():
    time.sleep(0.002)
    return "first"


class _SlowToLoad:
    def __reduce__(self):
        return _load_slowly, ()


def five_us_slow_first_load(x):
    if x == 0:
        return _SlowToLoad()
    return busy_or_fail(150)     # about 5 us


def test_items_of_a_few_us_stay_on_the_workers(pool):
    # 5 us items: two workers beat map by far, so the cost model must never
    # take the rest of such a map into the caller. A chunk's decode has a
    # fixed part; taken from the first, 1-item chunk as the cost per item, it
    # once made the model run such maps here, serially. Here the first result
    # takes 2 ms to load, so that a model trusting it would always go inline.
    # (An array starts on the workers: a list would run its first items
    # here, where nothing is loaded.)
    import numpy as np
    xs = np.arange(10_000)
    v = busy_or_fail(150)
    for _ in range(8):
        it = pool.map(five_us_slow_first_load, xs)
        assert list(it) == ["first"] + [v] * (len(xs) - 1)
        assert "inline" not in it.stats.mode
    # A list starts here, and goes to the workers after a piece or two.
    it = pool.map(five_us_slow_first_load, list(range(10_000)))
    assert list(it)[1:] == [v] * 9999
    assert it.stats.mode == "probe+index"
    assert sum(w.items for w in it.stats.workers) > 8000


def tiny_then_dear(x):
    if x >= 399_000:
        return busy_or_fail(20_000)     # about 0.5 ms
    return x * 2


def test_inline_rest_hands_items_that_turn_dear_back_to_the_workers(pool):
    # Tiny items keep the map inline; when the last thousand turn dear (about
    # 0.5 ms each), they must go to the workers from where they start, not
    # run one by one here. A loaded machine's pauses can hand a tiny piece
    # over early: three tries.
    xs = list(range(400_000))
    want = [tiny_then_dear(x) for x in range(399_000)] + [busy_or_fail(20_000)] * 1000
    for _ in range(3):
        it = pool.map(tiny_then_dear, xs)
        assert list(it) == want
        handed = sum(c for w in it.stats.workers for (_, _, lo, c) in w.chunk_log
                      if lo >= 399_000)
        if handed > 500:
            break
    assert handed > 500, it.stats.mode


def busy_or_zero(x):
    return busy_or_fail(x) if type(x) is int else 0


def test_dear_rest_with_every_slot_busy_runs_here_to_the_end():
    # The hand-over cannot post (the pool's one job slot is held by another
    # map): the rest runs here, all of it. An item that cannot be pickled
    # (a lock) is no error here, where nothing is pickled.
    import threading
    p = Pool(2, max_jobs=1)
    try:
        held = p.map(busy_or_fail, [1] * 100_000, inline=False)
        next(held)                          # the only slot, held
        v = busy_or_fail(100_000)
        xs = [100_000] * 40 + [threading.Lock()] + [1] * 9
        it = p.map(busy_or_zero, xs)
        assert list(it) == [v] * 40 + [0] + [0] * 9
        assert it.stats.mode == "inline"
        assert list(held) == [0] * 99_999
    finally:
        p.terminate()


def test_hand_over_of_a_long_list_encodes_only_the_rest():
    from pmaprt._access import plan_input
    xs = ["item %06d %s" % (i, "x" * 100) for i in range(200_000)]
    whole = plan_input([xs], False, upfront=200_000)
    rest = plan_input([xs], False, upfront=200_000, start=190_000)
    assert rest.n == whole.n == 200_000 and rest.error is None
    assert rest.data_size < whole.data_size / 10, (rest.data_size, whole.data_size)


def test_hand_over_never_pickles_the_items_that_ran_already():
    # Items before the hand-over ran in the caller: an unpicklable one among
    # them, in the same block as the first item handed over (or in a list
    # small enough to travel in the descriptor), is no error of the job.
    import threading
    from pmaprt._access import plan_input
    lock = threading.Lock()
    for xs, k in (([1] * 20 + [lock] + [1] * 100, 50),                 # small: the descriptor
                  ([1] * 20 + [lock] + [1] * 30_000, 3000),            # blocks
                  (["s%07d" % i for i in range(100_000)], 60_010)):    # lazily encoded blocks
        if type(xs[0]) is str:
            xs[60_000] = lock
            plan = plan_input([xs], False, upfront=k + 8192, start=k)
        else:
            plan = plan_input([xs], False, start=k)
        assert plan.error is None, (len(xs), k, plan.error)
        assert plan.n == len(xs)
    # ... while one at or after the start still fails, at its index
    xs = [1] * 100 + [lock] + [1] * 100
    plan = plan_input([xs], False, start=100)
    assert plan.error is not None and plan.error[0] == 100


def zero_unless_int(x):
    return busy_or_fail(x) if type(x) is int else 0


def test_a_map_with_an_unpicklable_item_it_ran_hands_over_the_rest(pool):
    import threading
    lock = threading.Lock()
    for xs in ([1] * 20 + [lock] + [1] * 3000 + [100_000] * 40,
               [1] * 20 + [lock] + [100_000] * 40):
        it = pool.map(zero_unless_int, xs)
        assert list(it) == [zero_unless_int(x) for x in xs]
        assert it.stats.mode == "probe+index"
        assert sum(w.items for w in it.stats.workers) > 0


def test_map_that_went_inline_finishes_when_the_pool_is_closed_meanwhile():
    p = Pool(2)
    try:
        xs = list(range(400_000))
        want = [tiny_then_dear(x) for x in range(399_000)] + [busy_or_fail(20_000)] * 1000
        for _ in range(3):
            it = p.map(tiny_then_dear, xs)
            got = []
            for y in it:
                got.append(y)
                # Once the caller runs the rest (the items before the switch,
                # which workers had taken, have all arrived: terminating
                # before would fail the map with PoolClosedError, as it should).
                st = it._state
                if st.inline_from is not None and len(got) > st.inline_from and not p.closed:
                    p.terminate()          # the rest needs no worker unless handed back
            if "inline" in it.stats.mode:
                break
            p.terminate()
            p = Pool(2)
        assert got == want
        assert "inline" in it.stats.mode
    finally:
        p.terminate()


def test_idle_workers_use_no_cpu():
    # Between maps the workers sleep on a futex: no polling, no spinning.
    # A builtin function: a worker that first loads a function of this module
    # imports the module (pytest and all, a fraction of a second of CPU), and
    # one woken late for the map would do that inside the idle window.
    import psutil
    with Pool(2) as p:
        assert list(p.map(abs, range(-1000, 0), inline=False)) == list(range(1000, 0, -1))
        assert p.apply(abs, -4) == 4
        time.sleep(0.2)                 # past the hot spinner's 500 us
        procs = [psutil.Process(pid) for pid in p.pids()]
        before = [sum(pr.cpu_times()[:2]) for pr in procs]
        time.sleep(2.0)
        after = [sum(pr.cpu_times()[:2]) for pr in procs]
    used = [a - b for a, b in zip(after, before)]
    assert max(used) <= 0.05, used      # CPU seconds in 2 s idle (a poll loop: ~2 s)


def test_module_level_functions_go_by_reference():
    import pickletools
    from pmaprt import _serialize
    data = _serialize.dumps_fn(double)
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert "STACK_GLOBAL" in ops or "GLOBAL" in ops
    assert b"co_code" not in data and len(data) < 100, data     # a name, not the code
    assert _serialize.loads_fn(data) is double
    # a lambda goes by value (cloudpickle)
    lam = eval("lambda x: x + 1")
    assert _serialize.loads_fn(_serialize.dumps_fn(lam))(1) == 2
    assert not _serialize.by_reference(lam)


def _script_namespace(src):
    """Functions as a user's script defines them: in __main__, so pickled by value."""
    ns = {"__name__": "__main__"}
    exec(compile(src, "<script>", "exec"), ns)
    return ns


def _counter():
    k = 1

    def add_k(x):
        return x + k

    def set_k(v):
        nonlocal k
        k = v
    return add_k, set_k


def test_by_value_pickles_are_reused_only_while_their_state_is_the_same():
    import gc
    import weakref
    from pmaprt import _serialize
    ns = _script_namespace("K = 2\ndef scale(x):\n    return x * K\n"
                           "L = [1]\ndef shift(x):\n    return x + L[0]\n")
    scale, shift = ns["scale"], ns["shift"]
    first = _serialize.dumps_fn(scale)
    assert _serialize.dumps_fn(scale) is first          # the same state: reused
    ns["K"] = 3                                         # a global rebound: pickled afresh
    again = _serialize.dumps_fn(scale)
    assert again is not first and _serialize.loads_fn(again)(1) == 3
    # a mutable global (the list could change in place): pickled every time
    assert _serialize.BY_VALUE.get(shift) == (None, None)
    assert _serialize.dumps_fn(shift) is not _serialize.dumps_fn(shift)
    add_k, set_k = _counter()                           # a closure cell changed
    before = _serialize.dumps_fn(add_k)
    assert _serialize.dumps_fn(add_k) is before
    set_k(5)
    assert _serialize.loads_fn(_serialize.dumps_fn(add_k))(0) == 5
    gone = weakref.ref(add_k)                           # entries go with their functions
    del add_k, set_k
    gc.collect()
    assert gone() is None


def test_workers_see_a_rebound_global_of_a_script_function():
    ns = _script_namespace("K = 2\ndef scale(x):\n    return x * K\n")
    with Pool(2) as p:
        assert list(p.map(ns["scale"], [1, 2], inline=False)) == [2, 4]
        ns["K"] = 10
        assert list(p.map(ns["scale"], [1, 2], inline=False)) == [10, 20]


class Squares:
    """A sized, indexable input that is no list, tuple, range or array."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i * i


def test_a_custom_sequence_is_indexed_not_iterated(pool):
    xs = Squares(5000)
    it = pool.map(double, xs, inline=False)
    assert list(it) == [2 * i * i for i in range(5000)]
    assert it.stats.mode == "index"             # split into index ranges, not fed
    assert sum(w.items for w in it.stats.workers) == 5000


def test_a_dropped_map_is_freed_at_once(pool):
    # A map's state holds no reference cycle: dropping its iterator frees it,
    # and whatever its records hold (results in shared memory), at once, not
    # at the garbage collector's next pass. Index, feed, retries, SPMD.
    import gc
    import weakref
    gc.disable()
    try:
        cases = [(range(10_000), {}), ((x for x in range(10_000)), {}),
                 (list(range(10_000)), {"retries": 1, "ordered": False})]
        for xs, options in cases:
            it = pool.map(double, xs, inline=False, chunksize=10, **options)
            next(it)
            state = weakref.ref(it._state)
            del it
            assert state() is None, options
        it = pool.map(double, range(2), axis_name="i")
        assert list(it) == [0, 2]
        state = weakref.ref(it._state)
        del it
        assert state() is None
    finally:
        gc.enable()
