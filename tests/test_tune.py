"""pmaprt.tune: finds the best chunk size within its time budget.

The argmin tests drive tune() with an injected timer that simulates a known
U-shaped cost curve (per-chunk overhead falling as 1/chunksize, load imbalance
growing with chunksize), so the right answer is known by construction; the
smoke test runs real maps on a real pool and asserts only shape, not speed.
"""
import math
import time

import pytest

from pmaprt import _tune, _tuned
from pmaprt._tune import tune
from pmaprt._tuned import TuneResult, cached, cached_chunksize, clear_cache

N = 1024


def u_shape(best=16, scale=1e-3):
    """seconds(cs) = scale * (best/cs + cs/best): minimum (2*scale) at cs == best."""
    calls = []

    def timer(fn, sample, chunksize, workers):
        calls.append((chunksize, workers))
        return scale * (best / chunksize + chunksize / best)

    timer.calls = calls
    return timer


def work_a(x):
    return x + 1


def work_b(x):
    return x - 1


@pytest.fixture(autouse=True)
def _clean_cache():
    clear_cache()
    yield
    clear_cache()


def test_finds_known_argmin():
    timer = u_shape(best=16)
    r = tune(work_a, range(N), workers=2, time_budget=5.0, cache=False, _timer=timer)
    assert isinstance(r, TuneResult)
    assert r.chunksize == 16 and r.workers == 2
    measured = [c for c, _, _, _ in r.curve]
    assert measured == _tune.default_chunksizes(N, 2)  # 1, 2, 4, ..., 512
    assert r.chunksize in measured
    for c, w, s, ips in r.curve:
        assert w == 2 and s > 0 and ips == pytest.approx(N / s)
    assert r.items == N and r.items_per_s == pytest.approx(N / (2e-3))


@pytest.mark.parametrize("best", [1, 4, 64, 512])
def test_argmin_anywhere_in_range(best):
    r = tune(work_a, range(N), workers=2, cache=False, _timer=u_shape(best=best))
    assert r.chunksize == best


def test_explicit_chunksizes_and_worker_counts():
    def timer(fn, sample, chunksize, workers):
        # U in chunk size (best 30 of the given ones) and in workers (best 3)
        return (30 / chunksize + chunksize / 30) * (1 + 0.25 * (workers - 3) ** 2) * 1e-3

    r = tune(work_a, list(range(300)), chunksizes=[100, 10, 30, 3, 30], workers=[1, 2, 3, 4],
             cache=False, _timer=timer)
    assert (r.chunksize, r.workers) == (30, 3)
    assert sorted({c for c, _, _, _ in r.curve}) == [3, 10, 30, 100]
    assert sorted({w for _, w, _, _ in r.curve}) == [1, 2, 3, 4]
    assert len(r.curve) == 16


def test_time_budget_bounds_the_measurements():
    calls = []

    def slow(fn, sample, chunksize, workers):
        calls.append(chunksize)
        return 1.0  # every map "takes" one second

    r = tune(work_a, range(N), workers=2, time_budget=3.5, cache=False, _timer=slow)
    assert 1 <= len(calls) <= 4
    assert sum(s for _, _, s, _ in r.curve) <= 3.5
    assert r.skipped  # the rest was left out, not silently dropped
    assert r.chunksize in [c for c, _, _, _ in r.curve]
    # large chunks first: they are the cheap ones to measure
    assert calls[0] == max(_tune.default_chunksizes(N, 2))


def test_first_point_always_measured():
    r = tune(work_a, range(10), workers=1, time_budget=0.01, cache=False,
             _timer=lambda *a: 5.0)
    assert len(r.curve) == 1


def test_noise_is_damped_by_repeats():
    """Leftover budget re-measures; each point keeps its best time."""
    seen = {}

    def noisy(fn, sample, chunksize, workers):
        k = seen.get(chunksize, 0)
        seen[chunksize] = k + 1
        base = 1e-3 * (8 / chunksize + chunksize / 8)
        # the first measurement of the true best is spoiled by a hiccup
        return base * (10 if (chunksize == 8 and k == 0) else 1)

    r = tune(work_a, range(256), workers=2, time_budget=5.0, cache=False, _timer=noisy)
    assert seen[8] >= 2
    assert r.chunksize == 8


def test_cache():
    assert cached_chunksize(work_a) is None
    r = tune(work_a, range(N), workers=2, _timer=u_shape(best=32))
    assert cached_chunksize(work_a) == 32 == r.chunksize
    assert cached(work_a) is r
    assert cached_chunksize(work_b) is None
    tune(work_b, range(N), workers=2, cache=False, _timer=u_shape(best=4))
    assert cached_chunksize(work_b) is None
    tune(work_b, range(N), workers=2, _timer=u_shape(best=4))
    assert cached_chunksize(work_b) == 4 and cached_chunksize(work_a) == 32
    clear_cache(work_a)
    assert cached_chunksize(work_a) is None and cached_chunksize(work_b) == 4
    clear_cache()
    assert cached_chunksize(work_b) is None


def test_cache_key_is_module_and_qualname():
    class K:
        def meth(self, x):
            return x

    k = K()
    tune(k.meth, range(64), workers=1, _timer=u_shape(best=8))
    assert cached_chunksize(K.meth) == 8  # bound method -> its function
    assert _tuned._key(K.meth).endswith("test_cache_key_is_module_and_qualname.<locals>.K.meth")
    import functools

    p = functools.partial(work_a)
    tune(p, range(64), workers=1, _timer=u_shape(best=8))
    assert cached_chunksize(p) is None  # no stable identity: not cached


def test_bad_arguments():
    with pytest.raises(ValueError):
        tune(work_a, [], _timer=u_shape())
    with pytest.raises(ValueError):
        tune(work_a, range(10), time_budget=0, _timer=u_shape())
    with pytest.raises(ValueError):
        tune(work_a, range(10), chunksizes=[0, 4], _timer=u_shape())
    with pytest.raises(ValueError):
        tune(work_a, range(10), workers=[0], _timer=u_shape())


def test_default_chunksizes():
    assert _tune.default_chunksizes(1, 4) == [1]
    assert _tune.default_chunksizes(100, 2) == [1, 2, 4, 8, 16, 32, 50]
    assert _tune.default_chunksizes(64, 2) == [1, 2, 4, 8, 16, 32]


def test_real_pool_smoke():
    """Real maps on a real pool: the answer is one of the measured points and
    the measurements fit the budget (no claim about which size wins)."""
    pmaprt = pytest.importorskip("pmaprt")
    if getattr(pmaprt, "Pool", None) is None:
        pytest.skip("pmaprt.Pool not available")
    budget = 3.0
    t0 = time.monotonic()
    r = tune(math.sqrt, list(range(4000)), time_budget=budget, cache=False)
    wall = time.monotonic() - t0
    assert r.curve
    measured = {(c, w) for c, w, _, _ in r.curve}
    assert (r.chunksize, r.workers) in measured
    assert all(s > 0 and ips > 0 for _, _, s, ips in r.curve)
    assert sum(s for _, _, s, _ in r.curve) <= budget
    assert r.elapsed_s > 0
    assert wall < budget + 60  # bounded: never loops on past its budget
    assert cached_chunksize(math.sqrt) is None
