"""pmaprt.tune: finds the best chunk size within its time budget, pairs every
measurement with the default, and says "no gain" when nothing beats it.

The argmin tests drive tune() with an injected timer that simulates a known
U-shaped cost curve (per-chunk overhead falling as 1/chunksize, load imbalance
growing with chunksize), so the right answer is known by construction; the
noise tests add seeded noise to a flat curve; the smoke test runs real maps on
a real pool and asserts only shape, not speed.
"""
import math
import random
import time

import pytest

from pmaprt import _tune, _tuned
from pmaprt._tune import tune
from pmaprt._tuned import TuneResult, cached, cached_chunksize, clear_cache

N = 1024


def u_shape(best=16, scale=1e-3, adaptive=None):
    """seconds(cs) = scale * (best/cs + cs/best): minimum (2*scale) at cs == best;
    adaptive chunks (cs None) take ``adaptive`` x scale (default 3: slower
    than the best size, so a recommendation is due)."""
    calls = []

    def timer(fn, sample, chunksize, workers):
        calls.append((chunksize, workers))
        if chunksize is None:
            return scale * (3.0 if adaptive is None else adaptive)
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
    # the default (adaptive) takes 3e-3, the best 2e-3: every fresh pair reads 1.5
    assert r.gain == pytest.approx(1.5) and not r.no_gain
    assert len(r.confirm_ratios) == _tune.CONFIRM_PAIRS
    text = repr(r)
    assert text.startswith("TuneResult(chunksize=16, workers=2: 1.50x the speed of the default")
    assert "5 of 5 fresh pairs faster" in text and "\n" not in text and len(text) < 300


@pytest.mark.parametrize("best", [1, 4, 64, 512])
def test_argmin_anywhere_in_range(best):
    r = tune(work_a, range(N), workers=2, cache=False, _timer=u_shape(best=best))
    assert r.chunksize == best


def test_explicit_chunksizes_and_worker_counts(monkeypatch):
    monkeypatch.setattr(_tune, "default_workers", lambda: 4)

    def timer(fn, sample, chunksize, workers):
        # U in chunk size (best 30 of the given ones) and in workers (best 3)
        cs = 300 if chunksize is None else chunksize
        return (30 / cs + cs / 30) * (1 + 0.25 * (workers - 3) ** 2) * 1e-3

    r = tune(work_a, list(range(300)), chunksizes=[100, 10, 30, 3, 30], workers=[1, 2, 3, 4],
             time_budget=60.0, cache=False, _timer=timer)
    assert (r.chunksize, r.workers) == (30, 3)
    assert r.reference_workers == 4 and r.gain > 1
    # adaptive on 3 workers was measured too: the gain over it is the chunk size's alone
    assert r.gain_vs_adaptive == pytest.approx(r.gain / (r.gain / ((300 / 30 + 30 / 300) / 2)))
    assert "adaptive chunks on 3 workers" in repr(r)
    assert sorted({c for c, _, _, _ in r.curve}) == [3, 10, 30, 100]
    assert sorted({w for _, w, _, _ in r.curve}) == [1, 2, 3, 4]
    assert len(r.curve) == 16


def test_time_budget_bounds_the_measurements():
    calls = []

    def slow(fn, sample, chunksize, workers):
        calls.append(chunksize)
        return 1.0  # every map "takes" one second

    r = tune(work_a, range(N), workers=2, time_budget=3.5, cache=False, _timer=slow)
    assert 2 <= len(calls) <= 4
    assert r.skipped  # the rest was left out, not silently dropped
    # the default first, then large chunks: they are the cheap ones to measure
    assert calls[0] is None and calls[1] == max(_tune.default_chunksizes(N, 2))
    assert r.no_gain and r.chunksize is None  # equal times: nothing to recommend


def test_first_point_always_measured():
    r = tune(work_a, range(10), workers=1, time_budget=0.01, cache=False,
             _timer=lambda *a: 5.0)
    assert len(r.curve) == 1 and r.no_gain


def test_a_screening_fluke_is_not_recommended():
    """A point two of whose three screening pairs are spoiled in its favour
    (the default's run beside it was slowed) is the screening's best; its
    fresh pairs show no gain, and the result says so instead of recommending it."""
    seen = {}
    npts = len(_tune.default_chunksizes(256, 2))
    spoiled = {3, npts + 3}   # the default's runs paired with the 4th point, rounds 1 and 2

    def fluky(fn, sample, chunksize, workers):
        k = seen.get(chunksize, 0)
        seen[chunksize] = k + 1
        if chunksize is None:           # the default: 1 ms, 10 ms when spoiled
            return 10e-3 if k in spoiled else 1e-3
        return 1e-3 * (1.0 + 0.1 * abs(math.log2(chunksize / 8)))  # never faster

    r = tune(work_a, range(256), workers=2, time_budget=10.0, cache=True, _timer=fluky)
    assert r.candidate == (16, 2) and len(r.candidate_ratios) == _tune.CONFIRM_PAIRS
    assert r.no_gain and r.chunksize is None and r.gain is None
    assert "no gain" in repr(r) and "fresh pairs" in repr(r)
    assert cached_chunksize(work_a) is None


@pytest.mark.parametrize("seed", range(5))
def test_noise_never_recommends_fewer_workers(monkeypatch, seed):
    """A flat curve under +-30 % noise: whatever the screening's best, fewer
    workers than the default's are never recommended (the confirmation's
    fresh pairs must all show it faster, and here nothing is)."""
    monkeypatch.setattr(_tune, "default_workers", lambda: 2)
    rng = random.Random(seed)

    def noisy(fn, sample, chunksize, workers):
        # one worker is truly 2x slower; chunk size does not matter
        return 1e-3 * (2.0 if workers == 1 else 1.0) * rng.uniform(0.7, 1.3)

    r = tune(work_a, range(512), workers=[1, 2], time_budget=10.0, cache=False, _timer=noisy)
    assert r.workers == 2
    assert r.chunksize is None or min(r.confirm_ratios) > 1.0


def test_no_gain_when_adaptive_is_as_fast_as_the_best():
    r = tune(work_a, range(N), workers=2, cache=False, _timer=u_shape(best=16, adaptive=2.0))
    assert r.no_gain and r.chunksize is None and r.workers == 2
    assert r.candidate == (16, 2)
    text = repr(r)
    assert text.startswith("TuneResult(no gain: keep the default (adaptive chunks, 2 workers)")
    assert "best candidate chunksize=16 workers=2" in text


def test_a_cached_recommendation_does_not_stand_in_for_adaptive():
    """The default's runs are adaptive even when an older tune() cached a
    size for the function; no gain now forgets that size."""
    tune(work_a, range(N), workers=2, _timer=u_shape(best=32))
    assert cached_chunksize(work_a) == 32
    seen = []

    def timer(fn, sample, chunksize, workers):
        if chunksize is None:
            seen.append(cached_chunksize(fn))
        return 1e-3
    tune(work_a, range(N), workers=2, _timer=timer)
    assert seen and set(seen) == {None}
    assert cached_chunksize(work_a) is None
    # cache=False leaves an older recommendation as it was
    tune(work_a, range(N), workers=2, _timer=u_shape(best=32))
    tune(work_a, range(N), workers=2, cache=False, _timer=timer)
    assert cached_chunksize(work_a) == 32


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
    assert r.chunksize is None or (r.chunksize, r.workers) in measured
    assert all(s > 0 and ips > 0 for _, _, s, ips in r.curve)
    assert all(ratios for ratios in r.ratios.values())
    assert len(repr(r).splitlines()) == 1
    assert r.elapsed_s > 0
    assert wall < budget + 60  # bounded: never loops on past its budget
    assert cached_chunksize(math.sqrt) is None
