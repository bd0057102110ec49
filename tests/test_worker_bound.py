"""A bound on `workers`: asking for more than the documented maximum is a
clear error before any process starts, not a machine run out of memory."""
import pytest

import pmaprt
from pmaprt import Pool, _options
from pmaprt._runtime import processes


class Started(Exception):
    pass


@pytest.fixture
def no_spawn(monkeypatch):
    """Starting a worker fails the test at once (the unbounded code would
    start interpreters until the machine runs out)."""
    def refuse(*a, **kw):
        raise Started("a worker process was started")
    monkeypatch.setattr(processes._spawner, "popen", refuse)


@pytest.mark.parametrize("n", [10 ** 6, "max+1"])
def test_too_many_workers_is_a_clear_error(no_spawn, n):
    most = _options.max_workers()
    n = most + 1 if n == "max+1" else n
    for make in (lambda: Pool(n), lambda: list(pmaprt.pmap(abs, [1, 2], workers=n)),
                 lambda: pmaprt.Executor(max_workers=n)):
        with pytest.raises(ValueError, match=r"workers=%d .*maximum of %d" % (n, most)):
            make()


def test_the_maximum_is_documented_and_can_be_raised(monkeypatch):
    cores = _options.CORES
    assert _options.max_workers() == max(_options.MIN_MAX_WORKERS,
                                         _options.MAX_WORKERS_PER_CORE * cores)
    monkeypatch.setenv("PMAPRT_MAX_WORKERS", "100000")
    assert _options.max_workers() == _options.HARD_MAX_WORKERS
    monkeypatch.setenv("PMAPRT_MAX_WORKERS", "3")
    assert _options.check_workers(3) == 3
    with pytest.raises(ValueError, match="PMAPRT_MAX_WORKERS"):
        _options.check_workers(4)
    monkeypatch.setenv("PMAPRT_MAX_WORKERS", "many")
    with pytest.raises(ValueError, match="PMAPRT_MAX_WORKERS must be an int"):
        _options.check_workers(2)


def test_a_pool_at_a_lowered_maximum_still_runs(monkeypatch):
    monkeypatch.setenv("PMAPRT_MAX_WORKERS", "2")
    with Pool(2) as p:
        assert list(p.map(abs, [-1, -2, -3], inline=False)) == [1, 2, 3]
