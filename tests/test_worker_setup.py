"""Worker set-up: Manager proxies, initializer/initargs, per-worker state,
native thread caps and the environment workers start with
(pmaprt/_runtime/startup.py), through Pool, pmap and Executor.

Every wait has a timeout; pools are closed by each test.
"""
import multiprocessing
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import pmaprt
from pmaprt import Executor, Pool
from pmaprt._runtime.startup import THREAD_VARS

pytestmark = pytest.mark.timeout(120)

T = 60  # seconds: the bound on every wait in this file


def record_pid(d, i):
    d[i] = os.getpid()
    return i


def set_event(ev):
    ev.set()
    return True


def load_state(value, log=None):
    st = pmaprt.worker_state()
    st["model"] = value
    st["loads"] = st.get("loads", 0) + 1
    if log is not None:
        log.put((pmaprt.worker_rank(), os.getpid()))


def use_state(x):
    st = pmaprt.worker_state()
    return st["model"] * x, st["loads"], pmaprt.worker_rank(), os.getpid()


def lazy_state(x):
    st = pmaprt.worker_state()
    if "table" not in st:
        st["table"] = {"built_by": os.getpid()}
        st["builds"] = st.get("builds", 0) + 1
    return st["table"]["built_by"] == os.getpid(), st["builds"]


def fail_init():
    raise ValueError("error in initializer")


def thread_info(_):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401  (loads the BLAS library threadpoolctl reads)
    blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    return {v: os.environ.get(v) for v in THREAD_VARS}, blas


def getenv(name):
    return os.environ.get(name)


# --- Manager proxies (the parent's authkey)


def test_manager_dict_and_event_reach_tasks():
    with multiprocessing.Manager() as mgr:
        d = mgr.dict()
        ev = mgr.Event()
        with Pool(2) as pool:
            assert list(pool.map(record_pid, [d] * 6, range(6), inline=False)) == list(range(6))
            assert set(d.keys()) == set(range(6))
            assert set(d.values()) <= set(pool.pids())
        with Executor(2) as ex:
            assert ex.submit(set_event, ev).result(timeout=T)
        assert ev.wait(T)
        assert list(pmaprt.pmap(record_pid, [d] * 3, [10, 11, 12], inline=False)) == [10, 11, 12]


# --- initializer and worker state


def test_pool_initializer_loads_state_used_by_later_items_and_maps():
    with Pool(2, initializer=load_state, initargs=(3,)) as pool:
        first = list(pool.map(use_state, range(20)))
        again = list(pool.map(use_state, range(20)))
        pids = set(pool.pids())
    for out in (first, again):
        assert [r[0] for r in out] == [3 * x for x in range(20)]
        assert all(r[1] == 1 for r in out)            # loaded once per worker, kept across maps
        assert {r[2] for r in out} <= {0, 1}
        assert {r[3] for r in out} <= pids            # never in the caller (no inline)


def test_worker_state_built_lazily_once_per_worker():
    with Pool(2) as pool:
        out = list(pool.map(lazy_state, range(200), inline=False))
        out += list(pool.map(lazy_state, range(200), inline=False))
    assert all(own and builds == 1 for own, builds in out)
    assert pmaprt.worker_rank() is None
    assert isinstance(pmaprt.worker_state(), dict)


def test_pmap_initializer_replaces_the_default_pool_only_for_another_set_up():
    pmaprt.shutdown()
    try:
        a = list(pmaprt.pmap(use_state, range(8), initializer=load_state, initargs=(2,)))
        pool_a = pmaprt.default_pool()
        assert [r[0] for r in a] == [2 * x for x in range(8)]
        b = list(pmaprt.pmap(use_state, range(8), initializer=load_state, initargs=(2,)))
        assert pmaprt.default_pool() is pool_a and [r[1] for r in b] == [1] * 8
        list(pmaprt.pmap(abs, range(8)))                 # no set-up asked: the same pool
        assert pmaprt.default_pool() is pool_a
        c = list(pmaprt.pmap(use_state, range(8), initializer=load_state, initargs=(5,)))
        assert [r[0] for r in c] == [5 * x for x in range(8)]
        assert pmaprt.default_pool() is not pool_a and pool_a.closed
    finally:
        pmaprt.shutdown()


def test_executor_initializer_and_spawn_queue_in_initargs():
    q = multiprocessing.get_context("spawn").Queue()
    with Executor(2, initializer=load_state, initargs=(7, q)) as ex:
        out = [f.result(timeout=T) for f in [ex.submit(use_state, i) for i in range(10)]]
        assert [r[0] for r in out] == [7 * i for i in range(10)]
        ran = {r[3] for r in out}     # workers that ran a task had run their initializer
        got = {q.get(timeout=T) for _ in range(len(ran))}
    assert {pid for _, pid in got} == ran


@pytest.mark.parametrize("how", ["pool", "executor"])
def test_failing_initializer_breaks_it(how):
    t0 = time.monotonic()
    if how == "pool":
        pool = Pool(2, initializer=fail_init)
        try:
            with pytest.raises(BrokenProcessPool, match="initializer"):
                list(pool.map(abs, range(10)))
        finally:
            pool.terminate()
    else:
        ex = Executor(2, initializer=fail_init)
        f = ex.submit(abs, -1)
        with pytest.raises(BrokenProcessPool):
            f.result(timeout=T)
        deadline = time.monotonic() + T
        while ex.broken is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(ex.broken, BrokenProcessPool)
        with pytest.raises(BrokenProcessPool):
            ex.submit(abs, -1)
        ex.shutdown()
    assert time.monotonic() - t0 < T


def test_bad_setup_arguments():
    with pytest.raises(TypeError, match="initializer"):
        Pool(1, initializer=42)
    with pytest.raises(ValueError, match="threads_per_worker"):
        Pool(1, threads_per_worker=0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Executor(1, initializer=42)
    with pytest.raises(TypeError, match="initargs"):
        Pool(1, initializer=load_state, initargs=(threading.Lock(),))


# --- native thread caps and the environment


def test_blas_threads_capped_in_workers():
    pytest.importorskip("threadpoolctl")
    cores = pmaprt._options.CORES
    with Pool(2) as pool:
        (env, blas), = pool.map(thread_info, [0], inline=False)
    want = max(1, cores // 2)
    assert all(env[v] == str(want) for v in THREAD_VARS), env
    assert blas and all(n == want for n in blas), blas
    with Pool(2, threads_per_worker=2) as pool:
        (env, blas), = pool.map(thread_info, [0], inline=False)
    assert all(env[v] == "2" for v in THREAD_VARS), env
    assert blas and all(n == 2 for n in blas), blas


def test_caller_environment_reaches_new_workers(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("PMAPRT_TEST_VAR", "before")
    with Pool(1, max_items_per_worker=1) as pool:
        assert pool.apply(getenv, "OMP_NUM_THREADS") == "3"       # the caller's value wins
        # Set after the pool started: a worker started later (recycled) sees it.
        monkeypatch.setenv("PMAPRT_TEST_VAR", "after")
        seen = [pool.apply(getenv, "PMAPRT_TEST_VAR") for _ in range(3)]
    assert seen[-1] == "after"
    with Pool(1, threads_per_worker=1) as pool:                 # an explicit cap wins
        assert pool.apply(getenv, "OMP_NUM_THREADS") == "1"
